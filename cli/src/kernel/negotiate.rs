//! Client side of the NBD handshake, done in userspace before a socket is
//! handed to the kernel: sockets, timeouts and multi-connection checks
//! around the sans-IO [`ClientHandshake`] (`nbd_engine::protocol::client`),
//! which holds every protocol decision.
//!
//! A read timeout guards the handshake and is cleared afterwards, because the
//! kernel's receive thread inherits the socket's `SO_RCVTIMEO` and would treat
//! an idle connection as dead.

pub use nbd_engine::protocol::client::{ClientError, ClientNegotiated as Negotiated};
use nbd_engine::protocol::ClientHandshake;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why a handshake failed. Every message names the export or the phase.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{addr}: no address to connect to")]
    NoAddress { addr: String },
    #[error("timed out waiting for the server during {during}")]
    Timeout { during: &'static str },
    #[error("I/O error during {during}: {source}")]
    Io {
        during: &'static str,
        source: io::Error,
    },
    /// What the server said or did wrong, from the sans-IO handshake.
    #[error(transparent)]
    Nbd(#[from] ClientError),
    #[error(
        "the server does not allow {wanted} connections to export {name:?} (no CAN_MULTI_CONN)"
    )]
    NoMultiConn { name: String, wanted: usize },
    #[error("connections to export {name:?} disagree on its size or flags ({a:?} vs {b:?})")]
    Inconsistent {
        name: String,
        a: Box<Negotiated>,
        b: Box<Negotiated>,
    },
}

/// Default handshake timeout used by [`connect_export`] callers that have no
/// opinion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` (HOST:PORT), handshakes for `export` and returns the
/// socket in transmission phase, ready for the kernel, blocking and without
/// timeouts. `timeout` bounds the TCP connect and each read/write of the
/// handshake.
pub fn connect_export(
    addr: &str,
    export: &str,
    timeout: Duration,
) -> Result<(TcpStream, Negotiated), NegotiateError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let info = negotiate(&s, export, timeout)?;
                return Ok((s, info));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(source) => NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        },
        None => NegotiateError::NoAddress {
            addr: addr.to_owned(),
        },
    })
}

/// Opens `count` connections to the same export (for a multi-connection
/// device). Fails if the server does not advertise `CAN_MULTI_CONN` when
/// `count > 1` (the kernel would refuse), or if the connections disagree.
pub fn connect_export_many(
    addr: &str,
    export: &str,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<TcpStream>, Negotiated), NegotiateError> {
    assert!(count > 0, "at least one connection");
    let (first, info) = connect_export(addr, export, timeout)?;
    if count > 1 && !info.can_multi_conn() {
        return Err(NegotiateError::NoMultiConn {
            name: export.to_owned(),
            wanted: count,
        });
    }
    let mut socks = vec![first];
    for _ in 1..count {
        let (s, other) = connect_export(addr, export, timeout)?;
        if other.size != info.size || other.flags != info.flags {
            return Err(NegotiateError::Inconsistent {
                name: export.to_owned(),
                a: Box::new(info),
                b: Box::new(other),
            });
        }
        socks.push(s);
    }
    Ok((socks, info))
}

/// Handshakes on an already connected socket. Sets `timeout` as the read and
/// write timeout for the handshake and clears both afterwards (also on
/// error), and turns on TCP_NODELAY.
pub fn negotiate(
    stream: &TcpStream,
    export: &str,
    timeout: Duration,
) -> Result<Negotiated, NegotiateError> {
    let setup = |during| move |source| NegotiateError::Io { during, source };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(setup("socket setup"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(setup("socket setup"))?;
    let _ = stream.set_nodelay(true);
    let mut s = stream;
    let result = handshake(&mut s, export);
    let clear = stream
        .set_read_timeout(None)
        .and_then(|_| stream.set_write_timeout(None));
    let info = result?;
    clear.map_err(setup("socket setup"))?;
    Ok(info)
}

/// The handshake itself, over any byte stream (unit tests use pipes): a
/// thin blocking driver of [`ClientHandshake`].
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, NegotiateError> {
    let mut hs = ClientHandshake::new(export)?;
    let mut buf = Vec::new();
    loop {
        if hs.has_output() {
            let during = hs.phase();
            let out = hs.take_output();
            s.write_all(&out)
                .and_then(|()| s.flush())
                .map_err(|e| io_error(e, during, &hs))?;
        }
        if let Some(n) = hs.negotiated() {
            return Ok(*n);
        }
        buf.resize(hs.want(), 0);
        s.read_exact(&mut buf)
            .map_err(|e| io_error(e, hs.phase(), &hs))?;
        hs.receive(&buf)?;
    }
}

fn io_error(e: io::Error, during: &'static str, hs: &ClientHandshake) -> NegotiateError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NegotiateError::Timeout { during },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => hs.on_eof().into(),
        _ => NegotiateError::Io { during, source: e },
    }
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
