//! The connection's read side: a receive buffer filled by non-blocking
//! `recv` calls, waiting through io_uring only when the socket is empty.
//!
//! The wait is a one-byte `MSG_PEEK` on a duplicate of the socket, so an
//! idle connection costs one failed `recv` and one io_uring operation per
//! wakeup, and payloads are received straight into their final buffer
//! without being zero-filled first. glommio's own `read` would try a `recv`
//! of its own before waiting and again after, and only reads into
//! initialised memory.

use super::socket::NbdSocket;
use super::tls::TlsSession;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub struct Reader {
    socket: Rc<NbdSocket>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A wait past this instant fails with TimedOut (handshake slowloris guard).
    deadline: Option<Instant>,
    /// Set once STARTTLS has run: bytes come out of the session, not the socket.
    tls: Option<Rc<TlsSession>>,
    /// The socket was empty at the last look (a `recv` would block, or took
    /// less than it had room for): the next fill waits first instead of
    /// paying a `recv` that would fail (at QD1 it always would, as the
    /// reply has not even gone out yet).
    drained: bool,
}

impl Reader {
    pub fn new(socket: Rc<NbdSocket>, capacity: usize) -> Self {
        Reader {
            socket,
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            deadline: None,
            tls: None,
            drained: false,
        }
    }

    /// Makes room for at least `capacity` bytes (keeping what is buffered):
    /// a connection starts small and gets its full buffer once negotiated,
    /// so a crowd of silent peers costs little memory.
    pub fn grow(&mut self, capacity: usize) {
        if capacity > self.buf.len() {
            let mut buf = vec![0u8; capacity].into_boxed_slice();
            let len = self.len();
            buf[..len].copy_from_slice(self.data());
            self.buf = buf;
            self.start = 0;
            self.end = len;
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// From now on every byte is decrypted by `tls`. Nothing may be
    /// buffered: bytes read before TLS were never protected.
    pub fn set_tls(&mut self, tls: Rc<TlsSession>) {
        debug_assert_eq!(self.len(), 0);
        self.tls = Some(tls);
        // The TLS handshake read past what we saw: rustls may hold data.
        self.drained = false;
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

    /// Reads more bytes; Ok(0) is end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            // Move the partial tail to the front; it is at most one request.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            if std::mem::take(&mut self.drained) {
                self.socket.readable(self.deadline).await?;
            }
            let space = &mut self.buf[self.end..];
            let room = space.len();
            let got = match &self.tls {
                Some(tls) => tls.recv(&self.socket, space),
                // SAFETY: space is valid writable memory of space.len() bytes.
                None => unsafe { self.socket.recv(space.as_mut_ptr(), room) },
            };
            let Some(r) = got else {
                self.drained = true;
                continue;
            };
            let n = r?;
            self.end += n;
            // rustls may hold decrypted bytes back: only a plain socket
            // tells us it is empty.
            self.drained = self.tls.is_none() && n > 0 && n < room;
            return Ok(n);
        }
    }

    /// Ensures at least `n` bytes are buffered; false on end of stream.
    pub async fn ensure(&mut self, n: usize) -> io::Result<bool> {
        self.grow(n);
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
        if let Some(tls) = &self.tls {
            // rustls copies into initialised memory only.
            let mut at = dst.len();
            dst.resize(len, 0);
            while at < len {
                match tls.recv(&self.socket, &mut dst[at..]) {
                    None => self.socket.readable(self.deadline).await?,
                    Some(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Some(r) => at += r?,
                }
            }
            return Ok(());
        }
        while dst.len() < len {
            let at = dst.len();
            // SAFETY: the spare capacity holds at least len - at bytes.
            let Some(r) = (unsafe { self.socket.recv(dst.as_mut_ptr().add(at), len - at) }) else {
                self.socket.readable(self.deadline).await?;
                continue;
            };
            let n = r?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.drained = n < len - at;
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
