//! One owner for each NBD connection's socket. Every raw call on it (the
//! non-blocking `recv` and `sendmsg`, `shutdown`, the io_uring wait for
//! data) goes through [`NbdSocket`], which holds its own duplicate of the
//! descriptor. The reader, the writer and the shard's connection list share
//! it, so the descriptor closes after the last of them: a shutdown from the
//! shard can never reach a closed and reused fd.

use glommio::net::TcpStream;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub struct NbdSocket {
    /// Our duplicate of the accepted socket; glommio waits on it.
    stream: TcpStream,
}

impl NbdSocket {
    /// Duplicates the accepted stream's descriptor (the writer keeps the
    /// original for glommio's waits for room).
    pub fn dup_of(accepted: &TcpStream) -> io::Result<Rc<Self>> {
        // SAFETY: dup of a descriptor that is open for the duration of the call.
        let fd = unsafe { libc::fcntl(accepted.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own; the stream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        // A splice into the socket blocks unless the socket itself is
        // non-blocking (its flag alone decides). Every other call on it
        // already passes MSG_DONTWAIT or waits through io_uring.
        // SAFETY: our own descriptor, open for the duration of the call.
        let borrowed = unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) };
        let flags = rustix::fs::fcntl_getfl(borrowed)?;
        rustix::fs::fcntl_setfl(borrowed, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Rc::new(NbdSocket { stream }))
    }

    /// A `recv` that never blocks; None means "would block".
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes (initialised or not).
    pub unsafe fn recv(&self, ptr: *mut u8, len: usize) -> Option<io::Result<usize>> {
        retry(|| unsafe {
            libc::recv(self.stream.as_raw_fd(), ptr.cast(), len, libc::MSG_DONTWAIT)
        })
    }

    /// For a splice into the socket.
    pub fn fd(&self) -> rustix::fd::BorrowedFd<'_> {
        // SAFETY: our own descriptor, open for as long as `self` lives.
        unsafe { rustix::fd::BorrowedFd::borrow_raw(self.stream.as_raw_fd()) }
    }

    /// A gathering `sendmsg` that never blocks; None means "would block".
    /// `more`: the next bytes follow at once (MSG_MORE), so a reply header
    /// does not leave as a segment of its own.
    pub fn sendmsg(&self, iov: &[libc::iovec], more: bool) -> Option<io::Result<usize>> {
        // SAFETY: msghdr is plain data; iov points at live slices for this call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut _;
        msg.msg_iovlen = iov.len();
        let fd = self.stream.as_raw_fd();
        // SAFETY: our socket; msg is valid for the duration of the call.
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        retry(|| unsafe { libc::sendmsg(fd, &msg, flags) })
    }

    /// The CPU that last processed a packet from the peer. On loopback the
    /// receive runs in the sender's context, so that is the CPU the client
    /// ran on when it sent its last request.
    pub fn incoming_cpu(&self) -> Option<usize> {
        rustix::net::sockopt::socket_incoming_cpu(self.fd())
            .ok()
            .map(|c| c as usize)
    }

    /// Stops reading: the reader sees end of stream once the buffered
    /// requests are consumed (a clean shutdown).
    pub fn shut_read(&self) {
        // SAFETY: shutdown on our own descriptor.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RD) };
    }

    /// Stops both ways: wakes a reader blocked on a client that is gone.
    pub fn shut_both(&self) {
        // SAFETY: shutdown on our own descriptor.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Ends a connection without losing replies: a FIN after the last one,
    /// then a wait (at most `limit`, the write timeout) until the peer has
    /// acknowledged every byte. Closing with unread requests in the socket
    /// resets it, and a reset throws away what is still in our send queue;
    /// what has reached the peer stays readable there.
    pub async fn finish(&self, limit: Option<Duration>) {
        let fd = self.stream.as_raw_fd();
        // SAFETY: shutdown on our own descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        let deadline = limit.map(|l| Instant::now() + l);
        while unacknowledged(fd) > 0 && deadline.is_none_or(|d| Instant::now() < d) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits (through io_uring, with a one-byte peek) until the socket has
    /// data or is closed; past `deadline` it fails with TimedOut. Callers
    /// wait after a `recv` found the socket empty, so the peek goes to the
    /// ring at once, without another non-blocking try first.
    pub async fn readable(&self, deadline: Option<Instant>) -> io::Result<()> {
        let mut probe = [0u8; 1];
        let peek = self.stream.peek_uring(&mut probe);
        let result = match deadline {
            None => peek.await,
            Some(at) => {
                glommio::timer::timeout(at.saturating_duration_since(Instant::now()), peek).await
            }
        };
        result.map(drop).map_err(Into::into)
    }
}

/// Bytes sent on `fd` that the peer has not acknowledged (SIOCOUTQ).
fn unacknowledged(fd: std::os::unix::io::RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int for a TCP socket.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } < 0 {
        return 0;
    }
    n
}

/// Runs a syscall returning `ssize_t` until it is not EINTR; EAGAIN is None.
fn retry(mut call: impl FnMut() -> isize) -> Option<io::Result<usize>> {
    loop {
        let r = call();
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
