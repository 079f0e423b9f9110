//! NBD error values: positive, fixed by the spec (not the host's errno numbering).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    pub const ALL: [Errno; 8] = [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ];

    pub const fn wire(self) -> u32 {
        self as u32
    }

    /// Its position in [`Errno::ALL`], for per-error counters.
    pub const fn index(self) -> usize {
        match self {
            Errno::Perm => 0,
            Errno::Io => 1,
            Errno::NoMem => 2,
            Errno::Inval => 3,
            Errno::NoSpc => 4,
            Errno::Overflow => 5,
            Errno::NotSup => 6,
            Errno::Shutdown => 7,
        }
    }

    /// Maps a host errno onto the subset the spec allows; anything else is EIO.
    pub fn from_host(code: i32) -> Self {
        match code {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::EOPNOTSUPP => Errno::NotSup,
            libc::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    pub fn from_io(err: &std::io::Error) -> Self {
        err.raw_os_error().map_or(Errno::Io, Self::from_host)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_match_spec() {
        let table = [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ];
        for (e, v) in table {
            assert_eq!(e.wire(), v, "{e}");
        }
    }

    #[test]
    fn index_is_the_position_in_all() {
        for (i, e) in Errno::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{e}");
        }
    }

    #[test]
    fn host_errors_fold_into_spec_subset() {
        assert_eq!(Errno::from_host(libc::EROFS), Errno::Perm);
        assert_eq!(Errno::from_host(libc::EDQUOT), Errno::NoSpc);
        assert_eq!(Errno::from_host(libc::EBADF), Errno::Io);
        assert_eq!(Errno::from_host(libc::EOPNOTSUPP), Errno::NotSup);
    }
}
