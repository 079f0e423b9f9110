//! Client side of the NBD handshake, done in userspace before a socket is
//! handed to the kernel: sockets, timeouts and multi-connection checks
//! around the sans-IO [`ClientHandshake`] (`nbd_engine::protocol::client`),
//! which holds every protocol decision.
//!
//! With TLS the whole negotiation runs inside a rustls session, which is
//! then handed to the kernel's TLS (see [`super::ktls`]), so the socket the
//! kernel gets encrypts by itself.
//!
//! A read timeout guards the handshake and is cleared afterwards, because the
//! kernel's receive thread inherits the socket's `SO_RCVTIMEO` and would treat
//! an idle connection as dead.

pub use nbd_engine::protocol::client::{ClientError, ClientNegotiated as Negotiated};
use nbd_engine::protocol::ClientHandshake;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
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
    #[error("TLS with {host}: {why}")]
    Tls { host: String, why: String },
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
    connect_export_with(addr, export, timeout, None)
}

/// [`connect_export`], over TLS when `tls` is given: the server's
/// certificate must match the host in `addr`, and the session ends up in
/// the kernel's TLS on the returned socket.
pub fn connect_export_with(
    addr: &str,
    export: &str,
    timeout: Duration,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<(TcpStream, Negotiated), NegotiateError> {
    let tls = tls_target(addr, tls)?;
    let mut last = None;
    for a in &resolve(addr)? {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let info = negotiate_with(&s, export, timeout, tls.clone())?;
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

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, NegotiateError> {
    Ok(addr
        .to_socket_addrs()
        .map_err(|source| NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .collect())
}

/// With TLS, what the server's certificate must name: the host in `addr`.
fn tls_target(
    addr: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<Option<TlsTarget>, NegotiateError> {
    let Some(config) = tls else {
        return Ok(None);
    };
    let host = nbd_engine::config::hostport::split_host_port(addr)
        .map(|(h, _)| h.to_owned())
        .unwrap_or_else(|_| addr.to_owned());
    let name = ServerName::try_from(host.clone()).map_err(|e| NegotiateError::Tls {
        host: host.clone(),
        why: e.to_string(),
    })?;
    Ok(Some((config.clone(), name, host)))
}

/// TCP sockets bound, before they connect, to the source address they will
/// reach the server from, so the server's view of each (its peer address)
/// is known in advance: the runner places connections by it.
pub struct BoundSockets {
    addr: String,
    remote: SocketAddr,
    sockets: Vec<socket2::Socket>,
}

impl BoundSockets {
    /// `count` sockets for `addr` (HOST:PORT, its first address).
    pub fn new(addr: &str, count: usize) -> Result<Self, NegotiateError> {
        let failed = |source| NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let remote = *resolve(addr)?
            .first()
            .ok_or_else(|| NegotiateError::NoAddress {
                addr: addr.to_owned(),
            })?;
        // The source address routing picks for `remote`, as connect would
        // (socket2 opens sockets close-on-exec).
        let any: SocketAddr = match remote {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let probe = std::net::UdpSocket::bind(any).map_err(failed)?;
        probe.connect(remote).map_err(failed)?;
        let source = SocketAddr::new(probe.local_addr().map_err(failed)?.ip(), 0);
        let sockets = (0..count)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(remote),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                s.bind(&source.into())?;
                Ok(s)
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(failed)?;
        Ok(BoundSockets {
            addr: addr.to_owned(),
            remote,
            sockets,
        })
    }

    /// Each socket's source address, in connect order.
    pub fn sources(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok()?.as_socket())
            .collect()
    }

    /// Connects them in order and negotiates, as [`connect_export_many`].
    pub fn connect(
        self,
        export: &str,
        timeout: Duration,
        tls: Option<&Arc<ClientConfig>>,
    ) -> Result<(Vec<TcpStream>, Negotiated), NegotiateError> {
        let tls = tls_target(&self.addr, tls)?;
        let (addr, remote) = (self.addr, self.remote);
        let count = self.sockets.len();
        let mut sockets = self.sockets.into_iter();
        connect_many(export, count, || {
            let s = sockets.next().expect("one socket per connection");
            s.connect_timeout(&remote.into(), timeout)
                .map_err(|source| NegotiateError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let s = TcpStream::from(s);
            let info = negotiate_with(&s, export, timeout, tls.clone())?;
            Ok((s, info))
        })
    }
}

/// Opens `count` connections to the same export (for a multi-connection
/// device). Fails if the server does not advertise `CAN_MULTI_CONN` when
/// `count > 1` (the kernel would refuse), or if the connections disagree.
pub fn connect_export_many(
    addr: &str,
    export: &str,
    count: usize,
    timeout: Duration,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<(Vec<TcpStream>, Negotiated), NegotiateError> {
    connect_many(export, count, || {
        connect_export_with(addr, export, timeout, tls)
    })
}

/// [`connect_export_many`] over the runner's unix socket: plain NBD, on
/// the runner's own host.
pub fn connect_unix_many(
    path: &Path,
    export: &str,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<UnixStream>, Negotiated), NegotiateError> {
    connect_many(export, count, || {
        let s = UnixStream::connect(path).map_err(|source| NegotiateError::Connect {
            addr: path.display().to_string(),
            source,
        })?;
        let info = with_timeouts(&s, timeout, |mut s| handshake(&mut s, export))?;
        Ok((s, info))
    })
}

fn connect_many<S>(
    export: &str,
    count: usize,
    mut connect: impl FnMut() -> Result<(S, Negotiated), NegotiateError>,
) -> Result<(Vec<S>, Negotiated), NegotiateError> {
    assert!(count > 0, "at least one connection");
    let (first, info) = connect()?;
    if count > 1 && !info.can_multi_conn() {
        return Err(NegotiateError::NoMultiConn {
            name: export.to_owned(),
            wanted: count,
        });
    }
    let mut socks = vec![first];
    for _ in 1..count {
        let (s, other) = connect()?;
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

/// Runs `f` with `timeout` on each read and write of `s`, cleared after
/// (also on error).
fn with_timeouts<S: Timeouts, T>(
    s: &S,
    timeout: Duration,
    f: impl FnOnce(&S) -> Result<T, NegotiateError>,
) -> Result<T, NegotiateError> {
    let setup = |source| NegotiateError::Io {
        during: "socket setup",
        source,
    };
    s.set_timeouts(Some(timeout)).map_err(setup)?;
    let result = f(s);
    let clear = s.set_timeouts(None);
    let out = result?;
    clear.map_err(setup)?;
    Ok(out)
}

/// Read and write timeouts on a std socket.
trait Timeouts {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timeouts for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Handshakes on an already connected socket. Sets `timeout` as the read and
/// write timeout for the handshake and clears both afterwards (also on
/// error), and turns on TCP_NODELAY.
pub fn negotiate(
    stream: &TcpStream,
    export: &str,
    timeout: Duration,
) -> Result<Negotiated, NegotiateError> {
    negotiate_with(stream, export, timeout, None)
}

/// What TLS needs: the client's credentials, the name the server's
/// certificate must carry, and that name for messages.
type TlsTarget = (Arc<ClientConfig>, ServerName<'static>, String);

fn negotiate_with(
    stream: &TcpStream,
    export: &str,
    timeout: Duration,
    tls: Option<TlsTarget>,
) -> Result<Negotiated, NegotiateError> {
    let _ = stream.set_nodelay(true);
    with_timeouts(stream, timeout, |stream| {
        let mut s = stream;
        match tls {
            None => handshake(&mut s, export),
            Some((config, name, host)) => {
                let tls_err = |why: String| NegotiateError::Tls {
                    host: host.clone(),
                    why,
                };
                let mut upgrade = |s: &mut &TcpStream| {
                    let mut conn = ClientConnection::new(config.clone(), name.clone())
                        .map_err(|e| tls_err(e.to_string()))?;
                    while conn.is_handshaking() {
                        conn.complete_io(s).map_err(|e| tls_err(e.to_string()))?;
                    }
                    Ok(conn)
                };
                drive(
                    &mut s,
                    ClientHandshake::new(export)?.with_tls(),
                    &mut upgrade,
                )
                .and_then(|(info, conn)| {
                    let conn =
                        conn.ok_or_else(|| tls_err("the handshake ended before TLS".into()))?;
                    super::ktls::install(stream, conn).map_err(|e| tls_err(e.to_string()))?;
                    Ok(info)
                })
            }
        }
    })
}

/// The handshake itself, over any byte stream (unit tests use pipes): a
/// thin blocking driver of [`ClientHandshake`].
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, NegotiateError> {
    let mut no_tls = |_: &mut S| -> Result<ClientConnection, NegotiateError> {
        unreachable!("a plain handshake never starts TLS")
    };
    drive(s, ClientHandshake::new(export)?, &mut no_tls).map(|(n, _)| n)
}

/// Drives `hs` over `s`; when it asks for TLS, `upgrade` runs the TLS
/// handshake and every later byte goes through the session, which is
/// returned with the result.
fn drive<S: Read + Write>(
    s: &mut S,
    mut hs: ClientHandshake,
    upgrade: &mut dyn FnMut(&mut S) -> Result<ClientConnection, NegotiateError>,
) -> Result<(Negotiated, Option<ClientConnection>), NegotiateError> {
    let mut tls: Option<ClientConnection> = None;
    let mut buf = Vec::new();
    loop {
        if hs.has_output() {
            let during = hs.phase();
            let out = hs.take_output();
            let sent = match &mut tls {
                Some(c) => rustls::Stream::new(c, s).write_all(&out),
                None => s.write_all(&out),
            };
            sent.and_then(|()| s.flush())
                .map_err(|e| io_error(e, during, &hs))?;
        }
        if hs.take_starttls() {
            tls = Some(upgrade(s)?);
            continue;
        }
        if let Some(n) = hs.negotiated() {
            return Ok((*n, tls));
        }
        buf.resize(hs.want(), 0);
        let got = match &mut tls {
            Some(c) => rustls::Stream::new(c, s).read_exact(&mut buf),
            None => s.read_exact(&mut buf),
        };
        got.map_err(|e| io_error(e, hs.phase(), &hs))?;
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
