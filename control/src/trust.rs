//! What the runner trusts on disk. Its state directory and the files in it
//! must be its own user's and writable by no one else; the names it creates
//! there are unpredictable and opened with `O_EXCL|O_NOFOLLOW`; nothing it
//! opens there follows a symlink. A directory others can write could
//! otherwise redirect a root daemon's writes with a planted link.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{} is owned by uid {owner}, not by this process's user (uid {me}); chown it",
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{} is writable by group or others (mode {mode:o}); run chmod go-w on it", path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("{} is readable by others (mode {mode:o}); run chmod 600 on it", path.display())]
    Readable { path: PathBuf, mode: u32 },
    #[error("{} is a symbolic link; nbd-runner follows no links in its state directory", path.display())]
    Symlink { path: PathBuf },
}

impl TrustError {
    pub fn not_found(&self) -> bool {
        matches!(self, TrustError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    pub fn permission_denied(&self) -> bool {
        matches!(self, TrustError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
    }
}

/// What a file may let others do besides its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privacy {
    /// Others may read it, no one else may write it (state, lock, directory).
    NoOtherWriters,
    /// Only the owner may read it (tokens, keys).
    Secret,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> TrustError + 'a {
    move |source| TrustError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Checks that `meta` (of `path`) belongs to `owners` and is as private as asked.
pub fn check(
    path: &Path,
    meta: &Metadata,
    owners: &[u32],
    privacy: Privacy,
) -> Result<(), TrustError> {
    if !owners.contains(&meta.uid()) {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            me: euid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if privacy == Privacy::Secret && mode & 0o077 != 0 {
        return Err(TrustError::Readable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The state directory: ours and writable only by us.
pub fn check_dir(dir: &Path) -> Result<(), TrustError> {
    let meta = std::fs::metadata(dir).map_err(io(dir, "stat"))?;
    check(dir, &meta, &[euid()], Privacy::NoOtherWriters)
}

/// Opens `path` without following a symlink at its last component and
/// checks the opened file (not the name, which could change meanwhile).
pub fn open(
    path: &Path,
    opts: &mut OpenOptions,
    owners: &[u32],
    privacy: Privacy,
) -> Result<File, TrustError> {
    let file = opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                TrustError::Symlink {
                    path: path.to_owned(),
                }
            } else {
                io(path, "open")(e)
            }
        })?;
    let meta = file.metadata().map_err(io(path, "stat"))?;
    check(path, &meta, owners, privacy)?;
    Ok(file)
}

/// Creates a new private file under an unpredictable name `PREFIX.RANDOM`
/// in `dir` (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600).
pub fn create_unique(dir: &Path, prefix: &str) -> Result<(PathBuf, File), TrustError> {
    let path = dir.join(format!("{prefix}.{}", random_hex(12)));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io(&path, "create"))?;
    Ok((path, file))
}

/// `n` random bytes from the kernel, as hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(k) => filled += k,
            Err(rustix::io::Errno::INTR) => {}
            // getrandom cannot fail on a kernel this runner supports (>= 3.17).
            Err(e) => panic!("getrandom: {e}"),
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writable_secret_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "x").unwrap();
        let me = [euid()];
        let set =
            |mode| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let open = |privacy| open(&p, OpenOptions::new().read(true), &me, privacy);
        set(0o644);
        assert!(open(Privacy::NoOtherWriters).is_ok());
        assert!(matches!(
            open(Privacy::Secret),
            Err(TrustError::Readable { .. })
        ));
        set(0o666);
        assert!(matches!(
            open(Privacy::NoOtherWriters),
            Err(TrustError::Writable { .. })
        ));
        set(0o600);
        assert!(open(Privacy::Secret).is_ok());
        let other = [euid() + 1];
        let e =
            super::open(&p, OpenOptions::new().read(true), &other, Privacy::Secret).unwrap_err();
        assert!(e.to_string().contains("not by this process's user"), "{e}");
    }

    #[test]
    fn symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open(
            &link,
            OpenOptions::new().read(true),
            &[euid()],
            Privacy::NoOtherWriters,
        )
        .unwrap_err();
        assert!(matches!(e, TrustError::Symlink { .. }), "{e}");
    }

    #[test]
    fn unique_names_are_new_private_and_unpredictable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = create_unique(dir.path(), "t").unwrap();
        let (b, _) = create_unique(dir.path(), "t").unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::metadata(&a).unwrap().mode() & 0o777, 0o600);
        assert_eq!(random_hex(16).len(), 32);
    }
}
