//! TLS on an NBD connection, in userspace: rustls's sans-IO connection sits
//! between the socket and the connection's reader and writer. (This host's
//! kernel may have no `tls` ULP, so the server never relies on kernel TLS.)
//!
//! The reader and the writer run on one executor thread and borrow the
//! session only between awaits. Only the writer puts TLS records on the
//! socket, so records from the two sides never interleave; when reading
//! leaves records to send (an alert, a key update) it wakes the writer.

use super::outbox::write_all_within;
use super::socket::NbdSocket;
use futures_lite::{AsyncWrite, AsyncWriteExt};
use rustls::{ServerConfig, ServerConnection};
use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

/// Ciphertext held before it is pushed to the socket.
const SEND_CHUNK: usize = 256 * 1024;

pub struct TlsSession {
    conn: RefCell<ServerConnection>,
    /// Records are waiting that no reply will carry out.
    flush: Cell<bool>,
    writer: Cell<Option<Waker>>,
}

/// The socket as a non-blocking `Read` for rustls.
struct SocketRead<'a>(&'a NbdSocket);

impl Read for SocketRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is initialised writable memory of buf.len() bytes.
        match unsafe { self.0.recv(buf.as_mut_ptr(), buf.len()) } {
            Some(r) => r,
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Moves every record rustls holds into `out`.
fn drain(conn: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

impl TlsSession {
    /// Runs the TLS handshake on a connection that has just sent its ACK to
    /// STARTTLS; past `deadline` it fails with TimedOut.
    pub async fn accept<W: AsyncWrite + Unpin>(
        config: Arc<ServerConfig>,
        socket: &NbdSocket,
        wr: &mut W,
        deadline: Option<Instant>,
    ) -> io::Result<TlsSession> {
        let mut conn = ServerConnection::new(config).map_err(invalid)?;
        let mut out = Vec::new();
        loop {
            drain(&mut conn, &mut out)?;
            if !out.is_empty() {
                wr.write_all(&out).await?;
                out.clear();
            }
            if !conn.is_handshaking() {
                break;
            }
            match conn.read_tls(&mut SocketRead(socket)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the client why (the alert), then give up.
                        drain(&mut conn, &mut out)?;
                        let _ = wr.write_all(&out).await;
                        return Err(invalid(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    socket.readable(deadline).await?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(TlsSession {
            conn: RefCell::new(conn),
            flush: Cell::new(false),
            writer: Cell::new(None),
        })
    }

    /// The negotiated protocol version and cipher suite, for the log.
    pub fn describe(&self) -> String {
        let c = self.conn.borrow();
        match (c.protocol_version(), c.negotiated_cipher_suite()) {
            (Some(v), Some(s)) => format!("{v:?} {:?}", s.suite()),
            _ => "unknown".into(),
        }
    }

    /// Decrypted bytes into `dst`: None when the socket has nothing more
    /// yet, Some(Ok(0)) at the end of the stream.
    pub fn recv(&self, socket: &NbdSocket, dst: &mut [u8]) -> Option<io::Result<usize>> {
        let mut conn = self.conn.borrow_mut();
        loop {
            match conn.reader().read(dst) {
                Ok(n) => return Some(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the TCP stream without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Some(Ok(0)),
                Err(e) => return Some(Err(e)),
            }
            match conn.read_tls(&mut SocketRead(socket)) {
                Ok(0) => return Some(Ok(0)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some(Err(e)),
            }
            let processed = conn.process_new_packets();
            if conn.wants_write() {
                self.flush.set(true);
                if let Some(w) = self.writer.take() {
                    w.wake();
                }
            }
            if let Err(e) = processed {
                return Some(Err(invalid(e)));
            }
        }
    }

    /// Whether records are waiting; if not, `waker` is woken when some are.
    pub fn poll_flush(&self, waker: &Waker) -> bool {
        if self.flush.take() {
            return true;
        }
        self.writer.set(Some(waker.clone()));
        false
    }

    /// Encrypts `slices` and sends them with whatever records are waiting;
    /// each wait for room lasts at most `limit`.
    pub async fn send<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        slices: &[&[u8]],
        limit: Option<Duration>,
    ) -> io::Result<()> {
        let mut out = Vec::new();
        for s in slices {
            let mut rest = *s;
            while !rest.is_empty() {
                {
                    let mut c = self.conn.borrow_mut();
                    let n = c.writer().write(rest)?;
                    rest = &rest[n..];
                    drain(&mut c, &mut out)?;
                }
                if out.len() >= SEND_CHUNK {
                    write_all_within(wr, &out, limit).await?;
                    out.clear();
                }
            }
        }
        drain(&mut self.conn.borrow_mut(), &mut out)?;
        write_all_within(wr, &out, limit).await
    }

    /// Ends the session with close_notify.
    pub async fn close<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        limit: Option<Duration>,
    ) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.send(wr, &[], limit).await
    }
}
