//! The connection's receive buffer. Reads try a non-blocking recv first and
//! only fall back to glommio (which waits for readiness) on EAGAIN, which
//! saves a readiness poll per batch of pipelined requests.

use futures_lite::AsyncReadExt;
use std::io;
use std::os::unix::io::RawFd;

pub struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub fn new(capacity: usize) -> Self {
        RecvBuf {
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
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

    /// Reads more bytes; Ok(0) is end of stream.
    pub async fn fill<R: futures_lite::AsyncRead + Unpin>(
        &mut self,
        fd: RawFd,
        reader: &mut R,
    ) -> io::Result<usize> {
        if self.end == self.buf.len() {
            // Move the partial tail to the front; it is at most one request.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let space = &mut self.buf[self.end..];
        let n = match recv_now(fd, space) {
            Some(r) => r?,
            None => reader.read(space).await?,
        };
        self.end += n;
        Ok(n)
    }

    /// Ensures at least `n` bytes are buffered; false on end of stream.
    pub async fn ensure<R: futures_lite::AsyncRead + Unpin>(
        &mut self,
        n: usize,
        fd: RawFd,
        reader: &mut R,
    ) -> io::Result<bool> {
        debug_assert!(n <= self.buf.len());
        while self.len() < n {
            if self.start + n > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.fill(fd, reader).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A recv that never blocks; None means "would block".
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
    // SAFETY: buf is valid writable memory of buf.len() bytes.
    unsafe { recv_raw(fd, buf.as_mut_ptr(), buf.len()) }
}

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

/// Bytes zeroed for each wait on an empty socket (glommio reads into
/// initialised memory only); the rest of a payload is never pre-filled.
const WAIT_WINDOW: usize = 64 * 1024;

/// Appends exactly `len` payload bytes to `dst`: first what is already
/// buffered, then the rest straight from the socket into `dst` itself.
pub async fn read_payload<R: futures_lite::AsyncRead + Unpin>(
    buf: &mut RecvBuf,
    fd: RawFd,
    reader: &mut R,
    dst: &mut Vec<u8>,
    len: usize,
) -> io::Result<()> {
    let have = buf.len().min(len);
    dst.extend_from_slice(&buf.data()[..have]);
    buf.consume(have);
    dst.reserve(len - dst.len());
    while dst.len() < len {
        let at = dst.len();
        let want = len - at;
        // SAFETY: the spare capacity holds at least `want` bytes.
        let n = match unsafe { recv_raw(fd, dst.as_mut_ptr().add(at), want) } {
            Some(r) => r?,
            None => {
                let window = want.min(WAIT_WINDOW);
                dst.resize(at + window, 0);
                let n = reader.read(&mut dst[at..]).await;
                dst.truncate(at);
                n?
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: recv (or the read into the zeroed window) initialised these n bytes.
        unsafe { dst.set_len(at + n) };
    }
    Ok(())
}

/// Discards `n` bytes without holding more than the buffer's worth.
pub async fn skip<R: futures_lite::AsyncRead + Unpin>(
    buf: &mut RecvBuf,
    fd: RawFd,
    reader: &mut R,
    mut n: usize,
) -> io::Result<()> {
    loop {
        let take = buf.len().min(n);
        buf.consume(take);
        n -= take;
        if n == 0 {
            return Ok(());
        }
        if buf.fill(fd, reader).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}
