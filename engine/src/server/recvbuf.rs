//! The connection's read side: a receive buffer filled by non-blocking
//! `recv` calls, waiting through io_uring only when the socket is empty.
//!
//! The wait is a one-byte `MSG_PEEK` on a duplicate of the socket, so an
//! idle connection costs one failed `recv` and one io_uring operation per
//! wakeup, and payloads are received straight into their final buffer
//! without being zero-filled first. glommio's own `read` would try a `recv`
//! of its own before waiting and again after, and only reads into
//! initialised memory.

use glommio::net::TcpStream;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

pub struct Reader {
    /// Our duplicate of the socket; shutting it down wakes a pending wait.
    waiter: TcpStream,
    fd: RawFd,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A wait past this instant fails with TimedOut (handshake slowloris guard).
    deadline: Option<Instant>,
}

impl Reader {
    /// Reads from `socket` through a duplicate descriptor owned by the reader.
    pub fn new(socket: RawFd, capacity: usize) -> io::Result<Self> {
        // SAFETY: dup of a descriptor that is open for the duration of the call.
        let fd = unsafe { libc::fcntl(socket, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own; the stream closes it.
        let waiter = unsafe { TcpStream::from_raw_fd(fd) };
        Ok(Reader {
            waiter,
            fd,
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            deadline: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.waiter.as_raw_fd()
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.deadline = timeout.map(|t| Instant::now() + t);
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Waits until the socket has data or is closed.
    async fn readable(&self) -> io::Result<()> {
        let mut probe = [0u8; 1];
        let peek = self.waiter.peek(&mut probe);
        let result = match self.deadline {
            None => peek.await,
            Some(at) => {
                glommio::timer::timeout(at.saturating_duration_since(Instant::now()), peek).await
            }
        };
        result.map(drop).map_err(Into::into)
    }

    /// Reads more bytes; Ok(0) is end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            // Move the partial tail to the front; it is at most one request.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            let space = &mut self.buf[self.end..];
            // SAFETY: space is valid writable memory of space.len() bytes.
            if let Some(r) = unsafe { recv_raw(self.fd, space.as_mut_ptr(), space.len()) } {
                let n = r?;
                self.end += n;
                return Ok(n);
            }
            self.readable().await?;
        }
    }

    /// Ensures at least `n` bytes are buffered; false on end of stream.
    pub async fn ensure(&mut self, n: usize) -> io::Result<bool> {
        debug_assert!(n <= self.buf.len());
        while self.len() < n {
            if self.start + n > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.fill().await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Appends exactly `len` payload bytes to `dst`: first what is already
    /// buffered, then the rest straight from the socket into `dst` itself.
    pub async fn read_payload(&mut self, dst: &mut Vec<u8>, len: usize) -> io::Result<()> {
        let have = self.len().min(len);
        dst.extend_from_slice(&self.data()[..have]);
        self.consume(have);
        dst.reserve(len - dst.len());
        while dst.len() < len {
            let at = dst.len();
            // SAFETY: the spare capacity holds at least len - at bytes.
            let Some(r) = (unsafe { recv_raw(self.fd, dst.as_mut_ptr().add(at), len - at) }) else {
                self.readable().await?;
                continue;
            };
            let n = r?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // SAFETY: recv initialised these n bytes.
            unsafe { dst.set_len(at + n) };
        }
        Ok(())
    }

    /// Discards `n` bytes without holding more than the buffer's worth.
    pub async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let take = self.len().min(n);
            self.consume(take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// A recv that never blocks; None means "would block".
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes (initialised or not).
unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> Option<io::Result<usize>> {
    loop {
        let r = libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT);
        if r >= 0 {
            return Some(Ok(r as usize));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return None,
            _ => return Some(Err(err)),
        }
    }
}
