//! Reply path. Requests complete in any order and drop their reply here; one
//! writer task per connection sends everything queued with a single
//! `sendmsg` whose iovecs point at the reply headers and straight at the
//! backend's read buffers, so read data is never copied on the way out.

use super::budget::Permit;
use super::socket::NbdSocket;
use super::tls::TlsSession;
use crate::backend::pipe::Spliced;
use crate::backend::ReadBuf;
use crate::protocol::ReplyHeader;
use futures_lite::future::or;
use futures_lite::AsyncWriteExt;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

pub enum Body {
    None,
    Read(ReadBuf),
    Bytes(Vec<u8>),
}

pub struct Reply {
    pub header: ReplyHeader,
    pub body: Body,
    /// Released once the reply has left the socket.
    pub _permit: Option<Permit>,
}

/// Replies per sendmsg; well under IOV_MAX at two iovecs each.
const BATCH: usize = 256;
/// iovecs one sendmsg takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

#[derive(Default)]
pub struct Outbox {
    queue: RefCell<VecDeque<Reply>>,
    writer: Cell<Option<Waker>>,
    closed: Cell<bool>,
    failed: Cell<bool>,
    /// Vec bodies come back here for the reader to reuse.
    pub pool: BufferPool,
    /// Replies are encrypted here once STARTTLS has run.
    tls: Option<Rc<TlsSession>>,
    /// A peer that takes no reply bytes for this long is dropped.
    write_timeout: Option<Duration>,
    /// The peer runs on this host: a lone reply lends it the shard's CPU
    /// ([`super::colocate`]).
    local_peer: bool,
}

impl Outbox {
    pub fn new(
        tls: Option<Rc<TlsSession>>,
        write_timeout: Option<Duration>,
        local_peer: bool,
    ) -> Self {
        Outbox {
            tls,
            write_timeout,
            local_peer,
            ..Default::default()
        }
    }

    pub fn push(&self, reply: Reply) {
        if self.failed.get() {
            return; // the client is gone; dropping releases the permit
        }
        self.queue.borrow_mut().push_back(reply);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// No more replies will come; the writer exits once the queue is empty.
    pub fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    async fn next_batch(&self, batch: &mut Vec<Reply>) -> bool {
        poll_fn(|cx| {
            let mut q = self.queue.borrow_mut();
            if !q.is_empty() {
                let n = q.len().min(BATCH);
                batch.extend(q.drain(..n));
                return Poll::Ready(true);
            }
            if self.closed.get() {
                return Poll::Ready(false);
            }
            if let Some(tls) = &self.tls {
                if tls.poll_flush(cx.waker()) {
                    return Poll::Ready(true); // records only, no replies
                }
            }
            self.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// The writer task: runs until closed and drained, or the socket fails.
    pub async fn run<W: futures_lite::AsyncWrite + Unpin>(&self, socket: &NbdSocket, mut wr: W) {
        let mut batch = Vec::with_capacity(BATCH);
        while self.next_batch(&mut batch).await {
            let result = match &self.tls {
                Some(tls) => match unsplice(&mut batch) {
                    Ok(()) => {
                        tls.send(&mut wr, &slices_of(&batch), self.write_timeout)
                            .await
                    }
                    Err(e) => Err(e),
                },
                None => self.send_plain(socket, &mut wr, &mut batch).await,
            };
            for r in batch.drain(..) {
                match r.body {
                    Body::Read(b) => {
                        if let Some(v) = b.into_vec() {
                            self.pool.put(v)
                        }
                    }
                    Body::Bytes(v) => self.pool.put(v),
                    Body::None => {}
                }
            }
            if let Err(e) = result {
                tracing::debug!(error = %e, "reply write failed; dropping connection");
                self.failed.set(true);
                self.queue.borrow_mut().clear();
                // Wake the reader out of a blocking recv.
                socket.shut_both();
                return;
            }
        }
        if let Some(tls) = &self.tls {
            let _ = tls.close(&mut wr, self.write_timeout).await;
        }
        let _ = wr.flush().await;
    }

    /// Sends a batch on a plain socket: gathered `sendmsg`s, and spliced
    /// bodies straight from their pipes, each after its own header.
    async fn send_plain<W: futures_lite::AsyncWrite + Unpin>(
        &self,
        socket: &NbdSocket,
        wr: &mut W,
        batch: &mut [Reply],
    ) -> io::Result<()> {
        let (limit, local) = (self.write_timeout, self.local_peer);
        let mut from = 0;
        while from < batch.len() {
            let spliced = batch[from..]
                .iter()
                .position(|r| matches!(r.body, Body::Read(ReadBuf::Spliced { .. })))
                .map(|i| from + i);
            let upto = spliced.map_or(batch.len(), |i| i + 1);
            // Up to and with the spliced reply's header, which waits for
            // its body (MSG_MORE) instead of leaving alone.
            let slices = slices_of(&batch[from..upto]);
            send_all(socket, wr, &slices, limit, local, spliced.is_some()).await?;
            from = upto;
            if let Some(i) = spliced {
                let more = i + 1 < batch.len();
                if let Body::Read(ReadBuf::Spliced { pipe, .. }) = &mut batch[i].body {
                    splice_all(socket, wr, pipe, limit, more).await?;
                }
            }
        }
        Ok(())
    }
}

/// Header and body slices of `replies`, in order (a spliced body has none).
fn slices_of(replies: &[Reply]) -> Vec<&[u8]> {
    let mut slices: Vec<&[u8]> = Vec::with_capacity(replies.len() * 2);
    for r in replies {
        slices.push(r.header.as_bytes());
        match &r.body {
            Body::None => {}
            Body::Read(b) => slices.extend(b.slices()),
            Body::Bytes(b) => slices.push(b),
        }
    }
    slices
}

/// Brings spliced and mapped bodies into memory (TLS must encrypt the bytes).
fn unsplice(batch: &mut [Reply]) -> io::Result<()> {
    for r in batch {
        if let Body::Read(b) = &mut r.body {
            if !b.outside_memory() {
                continue;
            }
            let taken = std::mem::replace(b, ReadBuf::Vec(Vec::new()));
            *b = taken.unspliced()?;
        }
    }
    Ok(())
}

/// Moves a spliced body into the socket; when it is full, glommio waits
/// for room while writing the next page of it (read out of the pipe).
async fn splice_all<W: futures_lite::AsyncWrite + Unpin>(
    socket: &NbdSocket,
    wr: &mut W,
    body: &mut Spliced,
    limit: Option<Duration>,
    more: bool,
) -> io::Result<()> {
    while body.left() > 0 {
        match body.send(socket.fd(), more) {
            Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Some(r) => {
                r?;
            }
            None => {
                let page = body.take_bytes(4096)?;
                write_all_within(wr, &page, limit).await?;
            }
        }
    }
    Ok(())
}

/// One write that waits for room at most `limit`: a peer that stops
/// reading fails with TimedOut instead of holding its budget for ever.
pub async fn write_within<W: futures_lite::AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &[u8],
    limit: Option<Duration>,
) -> io::Result<usize> {
    let Some(limit) = limit else {
        return wr.write(buf).await;
    };
    or(wr.write(buf), async {
        glommio::timer::sleep(limit).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer read no reply bytes within the write timeout",
        ))
    })
    .await
}

/// [`write_within`] until all of `buf` is written.
pub async fn write_all_within<W: futures_lite::AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    limit: Option<Duration>,
) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write_within(wr, buf, limit).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Writes every slice, gathering them into as few syscalls as the socket allows.
pub async fn send_all<W: futures_lite::AsyncWrite + Unpin>(
    socket: &NbdSocket,
    wr: &mut W,
    slices: &[&[u8]],
    limit: Option<Duration>,
    local_peer: bool,
    more: bool,
) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(slices.len());
    while idx < slices.len() {
        if slices[idx].len() == off {
            idx += 1;
            off = 0;
            continue;
        }
        iov.clear();
        // A batch of chunked reads can hold more slices than one sendmsg takes.
        for (i, s) in slices[idx..].iter().take(IOV_MAX).enumerate() {
            let s = if i == 0 { &s[off..] } else { s };
            if !s.is_empty() {
                iov.push(libc::iovec {
                    iov_base: s.as_ptr() as *mut _,
                    iov_len: s.len(),
                });
            }
        }
        let sent = super::colocate::around_send(
            local_peer,
            || socket.incoming_cpu(),
            || socket.sendmsg(&iov, more),
        );
        let n = match sent {
            Some(r) => r?,
            // Socket full: let glommio wait for room, then go back to gathering.
            None => write_within(wr, &slices[idx][off..], limit).await?,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n;
        while n > 0 {
            let left = slices[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Reusable payload buffers, so steady-state IO does not allocate.
/// Bounded in count and bytes: what it keeps plus what is in flight is what
/// a shard's warmed heap must hold (see the engine's swap reserve).
#[derive(Default)]
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    bytes: Cell<usize>,
}

const POOL_MAX_BUFFERS: usize = 64;
const POOL_MAX_CAPACITY: usize = 1 << 20;
const POOL_MAX_BYTES: usize = 8 << 20;

impl BufferPool {
    pub fn get(&self, capacity: usize) -> Vec<u8> {
        let mut free = self.free.borrow_mut();
        match free.iter().rposition(|v| v.capacity() >= capacity) {
            Some(i) => {
                let v = free.swap_remove(i);
                self.bytes.set(self.bytes.get() - v.capacity());
                v
            }
            None => Vec::with_capacity(capacity),
        }
    }

    pub fn put(&self, mut v: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        let bytes = self.bytes.get() + v.capacity();
        if v.capacity() <= POOL_MAX_CAPACITY
            && free.len() < POOL_MAX_BUFFERS
            && bytes <= POOL_MAX_BYTES
        {
            v.clear();
            free.push(v);
            self.bytes.set(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_at_most_its_byte_bound() {
        let pool = BufferPool::default();
        for _ in 0..20 {
            pool.put(Vec::with_capacity(1 << 20));
        }
        assert_eq!(pool.free.borrow().len(), POOL_MAX_BYTES >> 20);
        // Taking one makes room for one more, and no more.
        let v = pool.get(4096);
        assert!(v.capacity() >= 1 << 20);
        pool.put(Vec::with_capacity(1 << 20));
        pool.put(Vec::with_capacity(1 << 20));
        assert_eq!(pool.free.borrow().len(), POOL_MAX_BYTES >> 20);
        assert_eq!(pool.bytes.get(), POOL_MAX_BYTES);
    }
}
