//! The control route's client side, used by nbd-cli.

use crate::wire::{
    read_frame, write_frame, ErrorCode, Hello, HelloReply, HelloStatus, Request, Response,
    WireError, PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

pub const DEFAULT_PORT: u16 = 24110;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Endpoint {
    /// `HOST`, `HOST:PORT`, `[V6]:PORT`, `V6` or a socket path (starts with '/').
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(s.into()));
        }
        let bad = || format!("bad host {s:?} (HOST, HOST:PORT or [IPV6]:PORT)");
        let (host, port) = nbd_engine::config::hostport::split_host_port(s).map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => DEFAULT_PORT,
        };
        Ok(Endpoint::Tcp {
            host: host.to_owned(),
            port,
        })
    }

    /// This host: the unix socket or a loopback address. Only these get
    /// the local default token; another host needs its own.
    pub fn is_local(&self) -> bool {
        match self {
            Endpoint::Unix(_) => true,
            Endpoint::Tcp { host, .. } => {
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.to_canonical().is_loopback())
            }
        }
    }

    /// The host name to use for the IO route when the runner leaves it open.
    pub fn host(&self) -> Option<&str> {
        match self {
            Endpoint::Tcp { host, .. } => Some(host),
            Endpoint::Unix(_) => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach nbd-runner at {endpoint}: {source} (is nbd-runner running there?)")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("control route: {0}")]
    Wire(#[from] WireError),
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    #[error("unexpected answer from nbd-runner: {0}")]
    Unexpected(String),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Client {
    stream: Box<dyn Stream>,
    endpoint: Endpoint,
}

impl Client {
    pub fn connect(
        endpoint: &Endpoint,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_tls(endpoint, token, timeout, None)
    }

    /// Like [`connect`](Self::connect); with `tls`, TCP runs over TLS and
    /// the runner's certificate must match the host name.
    pub fn connect_tls(
        endpoint: &Endpoint,
        token: Option<String>,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let mut stream: Box<dyn Stream> = match endpoint {
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(connect_err)?
                    .collect();
                let mut last = std::io::Error::other("no address");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| connect_err(last))?;
                s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
                s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                match tls {
                    Some(config) => Box::new(tls_stream(config, host, s)?),
                    None => Box::new(s),
                }
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).map_err(connect_err)?;
                s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
                Box::new(s)
            }
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token,
        };
        stream.write_all(&hello.encode()).map_err(WireError::from)?;
        let answer = HelloReply::read_from(&mut stream)?;
        match answer.status {
            HelloStatus::Welcome => Ok(Client {
                stream,
                endpoint: endpoint.clone(),
            }),
            _ => Err(ClientError::Refused(format!(
                "nbd-runner at {endpoint} refused: {}",
                answer.message
            ))),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends a request; a runner-side error becomes [`ClientError::Remote`].
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.call_with_progress(request, &mut |_, _| {})
    }

    /// Like [`call`](Self::call), passing Progress frames to `progress`.
    pub fn call_with_progress(
        &mut self,
        request: &Request,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Response, ClientError> {
        write_frame(&mut self.stream, request)?;
        loop {
            match read_frame(&mut self.stream)? {
                Response::Progress { done, total } => progress(done, total),
                Response::Error { code, message } => {
                    return Err(ClientError::Remote { code, message })
                }
                r => return Ok(r),
            }
        }
    }
}

/// Runs the TLS handshake now, so a refused certificate is reported as such
/// rather than as a broken hello.
fn tls_stream(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    mut sock: TcpStream,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, ClientError> {
    let tls_err = |e: String| ClientError::Refused(format!("TLS with nbd-runner at {host}: {e}"));
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| tls_err(e.to_string()))?;
    let mut conn =
        rustls::ClientConnection::new(config, name).map_err(|e| tls_err(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| tls_err(e.to_string()))?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let tcp = |h: &str, p| Endpoint::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(Endpoint::parse("10.0.0.1").unwrap(), tcp("10.0.0.1", 24110));
        assert_eq!(Endpoint::parse("node1:9000").unwrap(), tcp("node1", 9000));
        assert_eq!(Endpoint::parse("::1").unwrap(), tcp("::1", 24110));
        assert_eq!(Endpoint::parse("[::1]:7").unwrap(), tcp("::1", 7));
        assert_eq!(
            Endpoint::parse("/run/nbd.sock").unwrap(),
            Endpoint::Unix("/run/nbd.sock".into())
        );
        for bad in ["", ":80", "host:notaport", "[::1", "[::1]x", "h:99999"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(tcp("::1", 7).to_string(), "[::1]:7");
        for local in [
            "127.0.0.1",
            "127.9.8.7",
            "localhost",
            "::1",
            "[::ffff:127.0.0.1]:5",
            "/s",
        ] {
            assert!(Endpoint::parse(local).unwrap().is_local(), "{local}");
        }
        for remote in [
            "10.0.0.1",
            "node1",
            "::2",
            "localhost.evil.example",
            "0.0.0.0",
        ] {
            assert!(!Endpoint::parse(remote).unwrap().is_local(), "{remote}");
        }
    }
}
