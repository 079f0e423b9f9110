//! Large buffered reads without a copy: the file's page-cache pages are
//! spliced into a pipe and from there into the socket, so the shard never
//! touches the bytes (a 1 MiB read was a copy out of the page cache and
//! another into the socket, over half of the shard's CPU; tuning.md).
//!
//! A pipe holds references to the pages, not a snapshot: a write that lands
//! before the reply leaves can show through, which only a read overlapping
//! that write in flight can see, and NBD leaves that undefined.
//!
//! Pipes are pooled per shard and bounded ([`POOL_MAX`]): a client cannot
//! make the runner open descriptors, and a read finds none free it takes
//! the copying path.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// Reads from this size up are spliced; below it the two copies cost less
/// than the extra syscalls.
pub const SPLICE_MIN: usize = 128 * 1024;
/// What a pipe is asked to hold: the largest read the Linux block layer
/// sends, and unprivileged users' `pipe-max-size` default.
const CAPACITY: usize = 1 << 20;
/// Pipes one shard keeps (two descriptors each).
pub const POOL_MAX: usize = 16;

/// An empty pipe of at least [`CAPACITY`] bytes.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

#[derive(Default)]
struct Pool {
    free: Vec<Pipe>,
    /// Pipes open on this shard, free or holding a reply.
    open: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

impl Pipe {
    fn new() -> Option<Pipe> {
        use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
        // Refused past the user's pipe-pages limit: then no splicing.
        let got = fcntl_setpipe_size(&write, CAPACITY).ok()?;
        (got >= CAPACITY).then_some(Pipe { read, write })
    }

    /// A free pipe from this shard's pool, or a new one while under the bound.
    fn take() -> Option<Pipe> {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if let Some(pipe) = p.free.pop() {
                return Some(pipe);
            }
            if p.open >= POOL_MAX {
                return None;
            }
            let pipe = Pipe::new()?;
            p.open += 1;
            Some(pipe)
        })
    }
}

/// `len` bytes of a file, waiting in a pipe to be spliced into a socket.
/// Dropped with bytes left (the peer went away), the pipe is closed rather
/// than reused.
pub struct Spliced {
    pipe: Option<Pipe>,
    len: usize,
    left: usize,
}

impl Spliced {
    /// Splices `len` bytes at `offset` of `file` into a pooled pipe; None
    /// when no pipe is free or `len` does not fit one. May block on the
    /// file: call it where blocking is allowed, or after [`resident`].
    /// Short of `len` (end of file, or the pages did not fit the pipe's
    /// slots) the bytes come back through [`Spliced::into_vec`].
    pub fn fill(file: BorrowedFd<'_>, offset: u64, len: usize) -> Option<io::Result<Spliced>> {
        if !(SPLICE_MIN..=CAPACITY).contains(&len) {
            return None;
        }
        let pipe = Pipe::take()?;
        let mut done = 0;
        let mut at = offset;
        while done < len {
            match rustix::pipe::splice(
                file,
                Some(&mut at),
                &pipe.write,
                None,
                len - done,
                rustix::pipe::SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                // The pipe's slots are full: the pages were smaller than asked.
                Err(rustix::io::Errno::AGAIN) if done > 0 => break,
                Err(e) => {
                    forget_open();
                    return Some(Err(e.into()));
                }
            }
        }
        Some(Ok(Spliced {
            pipe: Some(pipe),
            len: done,
            left: done,
        }))
    }

    /// Bytes spliced in.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves what is left into `socket` without blocking; None means the
    /// socket is full. `more` says another reply follows at once.
    pub fn send(&mut self, socket: BorrowedFd<'_>, more: bool) -> Option<io::Result<usize>> {
        let pipe = self.pipe.as_ref()?;
        use rustix::pipe::SpliceFlags;
        let flags = if more {
            SpliceFlags::NONBLOCK | SpliceFlags::MORE
        } else {
            SpliceFlags::NONBLOCK
        };
        loop {
            match rustix::pipe::splice(&pipe.read, None, socket, None, self.left, flags) {
                Ok(n) => {
                    self.left -= n;
                    return Some(Ok(n));
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return None,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    pub fn left(&self) -> usize {
        self.left
    }

    /// Up to `max` of the bytes left, read out of the pipe (for a wait on a
    /// full socket, and for TLS, which must see the bytes).
    pub fn take_bytes(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let Some(pipe) = self.pipe.as_ref() else {
            return Ok(Vec::new());
        };
        let want = self.left.min(max);
        // Read into uninitialised capacity: zeroing first would cost as much.
        let mut v = Vec::with_capacity(want);
        while v.len() < want {
            match rustix::io::read(&pipe.read, rustix::buffer::spare_capacity(&mut v)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.left -= v.len();
        Ok(v)
    }

    /// All the bytes, out of the pipe.
    pub fn into_vec(mut self) -> io::Result<Vec<u8>> {
        self.take_bytes(usize::MAX)
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        if self.left > 0 {
            forget_open();
            return; // closes it, with whatever it still holds
        }
        POOL.with(|p| p.borrow_mut().free.push(pipe));
    }
}

/// A pipe taken from the pool is closed instead of given back.
fn forget_open() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.open = p.open.saturating_sub(1);
    });
}

/// Whether every page of `[offset, offset+len)` is in the page cache, so a
/// splice from it will not wait for the disk (cachestat(2), Linux 6.5; an
/// older kernel answers no, and the read goes to an IO thread).
pub fn resident(file: BorrowedFd<'_>, offset: u64, len: usize) -> bool {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (the unified syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    let page = 4096u64;
    let first = offset / page;
    let last = (offset + len as u64).div_ceil(page);
    let range = Range {
        off: first * page,
        len: (last - first) * page,
    };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes one `Stat`, both live here.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    r == 0 && stat.nr_cache >= last - first
}

/// [`Spliced::fill`] when it cannot wait for the disk: the pages are all
/// cached, or nothing else is waiting on the shard (as a lone `pread`
/// would). None sends the read down the asynchronous copying path.
pub fn fill_if_cached(
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> Option<io::Result<Spliced>> {
    if !(SPLICE_MIN..=CAPACITY).contains(&len) {
        return None;
    }
    if super::lone::alone() || resident(file, offset, len) {
        return Spliced::fill(file, offset, len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn a_spliced_read_reaches_the_socket_unchanged_and_never_blocks_on_it() {
        let data = pattern(3 << 20);
        let file = file_of(&data);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        tx.set_nonblocking(true).unwrap();
        // A peer that reads nothing: the socket fills, and a send says so.
        let mut sends = vec![];
        let mut full = false;
        for i in 0..64 {
            let off = (i % 3) << 20;
            let mut s = Spliced::fill(file.as_fd(), off as u64, 1 << 20)
                .unwrap()
                .unwrap();
            assert_eq!(s.len(), 1 << 20);
            while s.left() > 0 {
                match s.send(tx.as_fd(), false) {
                    Some(r) => assert!(r.unwrap() > 0),
                    None => {
                        full = true;
                        break;
                    }
                }
            }
            let sent = (1 << 20) - s.left();
            sends.push((off, sent));
            if full {
                break; // dropped with bytes left: closed, not pooled
            }
        }
        assert!(full, "64 MiB never filled the socket");
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).unwrap();
        let want: Vec<u8> = sends
            .iter()
            .flat_map(|&(off, n)| data[off..off + n].iter().copied())
            .collect();
        assert!(got == want, "bytes differ");
        // Every pipe still counted is free in the pool.
        POOL.with(|p| {
            let p = p.borrow();
            assert_eq!(p.open, p.free.len());
        });
    }

    #[test]
    fn short_reads_and_small_or_huge_lengths() {
        let data = pattern(SPLICE_MIN + 5000);
        let file = file_of(&data);
        assert!(Spliced::fill(file.as_fd(), 0, SPLICE_MIN - 1).is_none());
        assert!(Spliced::fill(file.as_fd(), 0, CAPACITY + 1).is_none());
        // Past the end: only what the file has, read back out of the pipe.
        let s = Spliced::fill(file.as_fd(), 4000, SPLICE_MIN + 4096)
            .unwrap()
            .unwrap();
        assert_eq!(s.len(), SPLICE_MIN + 1000);
        assert!(s.into_vec().unwrap() == data[4000..]);
        // At the end: nothing, and the pipe goes back to the pool.
        let s = Spliced::fill(file.as_fd(), data.len() as u64, SPLICE_MIN)
            .unwrap()
            .unwrap();
        assert!(s.is_empty());
        drop(s);
        POOL.with(|p| assert_eq!(p.borrow().open, p.borrow().free.len()));
    }

    #[test]
    fn the_pool_is_bounded() {
        let file = file_of(&pattern(SPLICE_MIN));
        let held: Vec<_> = (0..POOL_MAX)
            .map(|_| Spliced::fill(file.as_fd(), 0, SPLICE_MIN).unwrap().unwrap())
            .collect();
        assert!(Spliced::fill(file.as_fd(), 0, SPLICE_MIN).is_none());
        drop(held); // full pipes: closed
        POOL.with(|p| assert_eq!(p.borrow().open, 0));
        assert!(Spliced::fill(file.as_fd(), 0, SPLICE_MIN).is_some());
    }

    #[test]
    fn residency_follows_the_page_cache() {
        let file = file_of(&pattern(1 << 20));
        // Just written: cached.
        assert!(resident(file.as_fd(), 0, 1 << 20));
        assert!(resident(file.as_fd(), 4095, 4098));
        // Past the end nothing is cached.
        assert!(!resident(file.as_fd(), 1 << 20, 4096));
    }
}
