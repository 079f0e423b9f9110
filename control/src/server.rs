//! The control route: TCP on `--rpchost:--rpcport` and a unix socket (0600)
//! in the state directory. Control traffic is rare and small, so it runs on
//! plain threads, away from the IO shards.
//!
//! Access: every TCP peer must present the token, loopback included (any
//! local user can reach loopback), or it is refused and logged. The unix
//! socket is created 0600 and only peers running as the runner's user (or
//! root, checked with SO_PEERCRED) are served, without a token.
//!
//! With TLS credentials, a TCP peer whose first byte opens a TLS handshake
//! gets TLS (the token then never crosses the network in clear); a peer on
//! another host that speaks plain text is refused.

use crate::metrics::{RequestCounters, Sources};
use crate::registry::{CtlError, Registry};
use crate::wire::{
    read_frame, write_frame, ErrorCode, Hello, HelloReply, HelloStatus, Request, Response,
    WireError, PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Concurrent control connections; more are refused with `Busy`.
const MAX_CLIENTS: usize = 64;
/// Of those, slots only the unix socket may take: a crowd on the TCP port
/// cannot lock the operator out.
const UNIX_RESERVED: usize = 8;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

pub struct ControlConfig {
    pub tcp: SocketAddr,
    pub unix: Option<PathBuf>,
    /// Required from every TCP peer.
    pub token: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

pub struct ControlServer {
    pub tcp_addr: SocketAddr,
    pub unix_path: Option<PathBuf>,
    /// The IO route's unix socket, for the engine to serve.
    pub io_unix: Option<(PathBuf, std::os::unix::net::UnixListener)>,
    registry: Arc<Mutex<Registry>>,
    requests: Arc<RequestCounters>,
}

impl ControlServer {
    /// What `--metrics` reads.
    pub fn metrics_sources(&self, table: Arc<nbd_engine::export::ExportTable>) -> Sources {
        Sources {
            table,
            registry: self.registry.clone(),
            requests: self.requests.clone(),
        }
    }

    /// At shutdown: closes every backstore's storage (librbd images release
    /// their exclusive lock, gluster fds close) once the IO route has stopped.
    pub fn close_all(&self) {
        lock(&self.registry).close_all();
    }
}

struct Shared {
    registry: Arc<Mutex<Registry>>,
    requests: Arc<RequestCounters>,
    token: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    clients: AtomicUsize,
    /// Busy refusals are logged at most once a second.
    busy_log: nbd_engine::log_limit::LogLimit,
}

/// Binds both listeners and serves them on background threads until
/// `stop` is set.
pub fn start(
    cfg: ControlConfig,
    registry: Arc<Mutex<Registry>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<ControlServer> {
    let tcp = TcpListener::bind(cfg.tcp)?;
    let tcp_addr = tcp.local_addr()?;
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        requests: Default::default(),
        token: cfg.token,
        tls: cfg.tls,
        clients: AtomicUsize::new(0),
        busy_log: Default::default(),
    });
    let unix = match &cfg.unix {
        Some(path) => Some(nbd_engine::server::bind_private_unix(path)?),
        None => None,
    };
    spawn_named("nbd-ctl-tcp", {
        let shared = shared.clone();
        move || {
            for stream in tcp.incoming().flatten() {
                let label = stream.peer_addr().map_or("tcp:?".into(), |p| p.to_string());
                let limit = MAX_CLIENTS - UNIX_RESERVED;
                serve_in_thread(&shared, TcpConn::Plain(stream), label, Access::Token, limit);
            }
        }
    })?;
    if let Some(listener) = unix {
        let shared = shared.clone();
        spawn_named("nbd-ctl-unix", move || {
            for stream in listener.incoming().flatten() {
                let (label, access) = unix_peer(&stream);
                serve_in_thread(&shared, stream, label, access, MAX_CLIENTS);
            }
        })?;
    }
    spawn_named("nbd-ctl-reaper", move || {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(500));
            lock(&registry).reap_dead();
        }
    })?;
    Ok(ControlServer {
        tcp_addr,
        unix_path: cfg.unix,
        io_unix: None,
        registry: shared.registry.clone(),
        requests: shared.requests.clone(),
    })
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
}

/// Who may use a connection without the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// The runner's own user or root on the unix socket.
    Local,
    /// Must present the token in its hello.
    Token,
    /// Another local user on the unix socket: always refused.
    Stranger,
}

fn unix_peer(stream: &UnixStream) -> (String, Access) {
    match nbd_engine::server::unix_peer(stream) {
        Some((uid, pid, trusted)) => (
            format!("unix:uid={uid},pid={pid}"),
            if trusted {
                Access::Local
            } else {
                Access::Stranger
            },
        ),
        None => ("unix:?".into(), Access::Stranger),
    }
}

fn lock(r: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads and writes that share one absolute deadline: a peer dribbling a
/// byte at a time cannot stretch the hello (or the TLS handshake) beyond it.
struct Deadline<'a, S> {
    inner: &'a mut S,
    at: Instant,
    set: fn(&S, Duration),
}

impl<S> Deadline<'_, S> {
    fn arm(&mut self) -> std::io::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        (self.set)(self.inner, left);
        Ok(())
    }
}

impl<S: Read> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn set_tcp_timeout(s: &TcpStream, t: Duration) {
    let _ = s.set_read_timeout(Some(t));
    let _ = s.set_write_timeout(Some(t));
}

trait Conn: Read + Write + Send + Sized + 'static {
    fn set_timeout(&self, t: Duration);
    /// Runs in the connection's thread before the hello.
    fn prepare(self, _shared: &Shared, _peer: &str) -> Result<Self, WireError> {
        Ok(self)
    }
}

/// A TCP peer, in plain text or after a TLS handshake.
enum TcpConn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

impl TcpConn {
    fn socket(&self) -> &TcpStream {
        match self {
            TcpConn::Plain(s) => s,
            TcpConn::Tls(t) => &t.sock,
        }
    }
}

impl Read for TcpConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            TcpConn::Plain(s) => s.read(buf),
            TcpConn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for TcpConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            TcpConn::Plain(s) => s.write(buf),
            TcpConn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            TcpConn::Plain(s) => s.flush(),
            TcpConn::Tls(t) => t.flush(),
        }
    }
}

impl Conn for TcpConn {
    fn set_timeout(&self, t: Duration) {
        set_tcp_timeout(self.socket(), t);
    }

    fn prepare(self, shared: &Shared, peer: &str) -> Result<Self, WireError> {
        let Some(config) = &shared.tls else {
            return Ok(self);
        };
        let sock = match self {
            TcpConn::Plain(sock) => sock,
            done => return Ok(done),
        };
        set_tcp_timeout(&sock, HELLO_TIMEOUT);
        let mut first = [0u8; 1];
        if sock.peek(&mut first)? == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            let conn = rustls::ServerConnection::new(config.clone())
                .map_err(|e| WireError::Io(std::io::Error::other(e)))?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let at = Instant::now() + HELLO_TIMEOUT;
            while tls.conn.is_handshaking() {
                let mut io = Deadline {
                    inner: &mut tls.sock,
                    at,
                    set: set_tcp_timeout,
                };
                if let Err(e) = tls.conn.complete_io(&mut io) {
                    tracing::warn!(%peer, error = %e, "refused control connection: TLS handshake failed");
                    return Err(e.into());
                }
            }
            return Ok(TcpConn::Tls(Box::new(tls)));
        }
        let local = sock
            .peer_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        if !local {
            tracing::warn!(%peer, "refused control connection: plain text from another host");
            let mut sock = sock;
            let msg = "access denied: this runner's control route needs TLS from other hosts: \
                       give nbd-cli --tls-certificates DIR";
            sock.write_all(&reply(HelloStatus::Unauthorized, msg).encode())?;
            return Err(WireError::Closed);
        }
        Ok(TcpConn::Plain(sock))
    }
}

impl Conn for UnixStream {
    fn set_timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
        let _ = self.set_write_timeout(Some(t));
    }
}

fn serve_in_thread<C: Conn>(
    shared: &Arc<Shared>,
    mut stream: C,
    peer: String,
    access: Access,
    limit: usize,
) {
    if shared.clients.fetch_add(1, Ordering::SeqCst) >= limit {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        if let Some(suppressed) = shared.busy_log.admit() {
            tracing::warn!(%peer, suppressed, "control route busy; refusing");
        }
        let _ =
            stream.write_all(&reply(HelloStatus::Busy, "too many control connections").encode());
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("nbd-ctl-conn".into())
        .spawn({
            let shared = shared.clone();
            move || {
                let prepared = stream.prepare(&shared, &peer);
                let result = prepared.and_then(|mut s| serve(&shared, &mut s, &peer, access));
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "control connection ended");
                }
                shared.clients.fetch_sub(1, Ordering::SeqCst);
            }
        });
    if spawned.is_err() {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reply(status: HelloStatus, message: &str) -> HelloReply {
    HelloReply {
        version: PROTOCOL_VERSION,
        status,
        message: message.to_owned(),
    }
}

fn serve<C: Conn>(
    shared: &Shared,
    stream: &mut C,
    peer: &str,
    access: Access,
) -> Result<(), WireError> {
    let hello = Hello::read_from(&mut Deadline {
        inner: stream,
        at: Instant::now() + HELLO_TIMEOUT,
        set: |s: &C, t| s.set_timeout(t),
    });
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "refused control connection: bad hello");
            return Err(e);
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "control protocol mismatch: nbd-cli speaks version {}, this nbd-runner speaks {PROTOCOL_VERSION}; use matching releases",
            hello.version
        );
        tracing::warn!(%peer, "{msg}");
        stream.write_all(&reply(HelloStatus::VersionMismatch, &msg).encode())?;
        return Ok(());
    }
    let refusal = match access {
        Access::Local => None,
        Access::Token if token_ok(&shared.token, hello.token.as_deref()) => None,
        Access::Token => Some((
            "missing or wrong token",
            "access denied: this runner requires its token over TCP: run nbd-cli as root \
             (it reads /etc/nbd-runner/token), pass --token-file STATE_DIR/token, or use the \
             unix socket (--host STATE_DIR/nbd-runner.sock)",
        )),
        Access::Stranger => Some((
            "unix socket peer is neither root nor the runner's user",
            "access denied: the control socket is for root and the runner's user",
        )),
    };
    if let Some((why, msg)) = refusal {
        tracing::warn!(%peer, "refused control connection: {why}");
        stream.write_all(&reply(HelloStatus::Unauthorized, msg).encode())?;
        return Ok(());
    }
    stream.write_all(&reply(HelloStatus::Welcome, env!("CARGO_PKG_VERSION")).encode())?;
    stream.set_timeout(IDLE_TIMEOUT);
    loop {
        let request: Request = match read_frame(stream) {
            Ok(r) => r,
            Err(WireError::Closed) => return Ok(()),
            Err(WireError::Decode(e)) => {
                // The frame was consumed whole, so the stream is still in sync.
                tracing::warn!(%peer, error = %e, "undecodable control request");
                let msg = format!("undecodable request: {e}");
                write_frame(stream, &error(ErrorCode::InvalidArgument, msg))?;
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad control frame; closing");
                let _ = write_frame(stream, &error(ErrorCode::InvalidArgument, e.to_string()));
                return Err(e);
            }
        };
        tracing::debug!(%peer, ?request, "control request");
        let kind = request.kind();
        let response = dispatch(&shared.registry, request, &mut |done, total| {
            // A client that went away shows up at the final write.
            let _ = write_frame(&mut *stream, &Response::Progress { done, total });
        });
        let result = match &response {
            Response::Error { code, .. } => code.name(),
            _ => "ok",
        };
        shared.requests.count(kind, result);
        write_frame(stream, &response)?;
    }
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

/// Compares without an early exit, so timing does not leak the token.
fn token_ok(want: &str, got: Option<&str>) -> bool {
    let Some(got) = got else {
        return false;
    };
    let (a, b) = (want.as_bytes(), got.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Holds a key reserved by a create or delete until its commit; frees it
/// if the request ends any other way (mini-redis's drop guards).
struct Reserved<'a> {
    registry: &'a Mutex<Registry>,
    key: Option<String>,
}

impl<'a> Reserved<'a> {
    /// The lock again, for the commit, which frees the key itself.
    fn commit(mut self) -> std::sync::MutexGuard<'a, Registry> {
        self.key = None;
        lock(self.registry)
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            lock(self.registry).release(&key);
        }
    }
}

/// Answers one request; `progress` streams Progress frames for long ones.
/// Create and delete check and reserve under the registry lock, do their
/// storage work (cluster connects, preallocation, progress writes, waiting
/// for closing connections) without it, and commit under it again, so one
/// slow create never stalls other nbd-cli calls.
fn dispatch(
    registry: &Mutex<Registry>,
    request: Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Response {
    let reserve = |key: &str| Reserved {
        registry,
        key: Some(key.to_owned()),
    };
    // Each lock() below is its own statement: a guard kept alive to the end
    // of a longer expression would still be held at the commit.
    let result: Result<Response, CtlError> = match request {
        Request::Create(req) => {
            let begun = lock(registry).create_begin(req);
            begun.and_then(|pending| {
                let held = reserve(pending.key());
                let opened = pending.open(progress);
                let mut reg = held.commit();
                reg.create_commit(pending, opened).map(Response::Backstore)
            })
        }
        Request::Delete { handler, key } => {
            let begun = lock(registry).delete_begin(handler, &key);
            begun.and_then(|pending| {
                let held = reserve(pending.key());
                let idle = pending.wait_idle();
                let removal = held.commit().delete_commit(pending, idle)?;
                removal.run();
                Ok(Response::Done)
            })
        }
        other => dispatch_locked(&mut lock(registry), other),
    };
    result.unwrap_or_else(|e| error(e.code, e.message))
}

/// Every other request: quick, under the lock.
fn dispatch_locked(reg: &mut Registry, request: Request) -> Result<Response, CtlError> {
    match request {
        Request::Create(_) | Request::Delete { .. } => unreachable!("dispatched above"),
        Request::MapBegin {
            handler,
            key,
            shards,
        } => reg.map_begin(handler, &key, &shards).map(Response::Map),
        Request::MapPeers { key, peers } => reg.map_peers(&key, &peers).map(|()| Response::Done),
        Request::MapDone {
            key,
            device,
            connections,
        } => reg
            .map_done(&key, &device, connections)
            .map(|()| Response::Done),
        Request::MapAbort { key, reason } => reg.map_abort(&key, &reason).map(|()| Response::Done),
        Request::UnmapBegin { handler, target } => {
            reg.unmap_begin(handler, &target).map(Response::Unmap)
        }
        Request::UnmapDone { key } => reg.unmap_done(&key).map(|()| Response::Done),
        Request::List { handler, filter } => Ok(Response::List(reg.list(handler, filter))),
        Request::Info { key } => reg.info(&key).map(Response::Backstore),
        Request::Stats { key } => reg.stats(&key).map(Response::Stats),
        Request::Resize {
            handler,
            key,
            size,
            shrink,
        } => reg
            .resize(handler, &key, size, shrink)
            .map(|(info, cookie)| Response::Resized { info, cookie }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_ok("abc", Some("abc")));
        assert!(!token_ok("abc", Some("abd")));
        assert!(!token_ok("abc", Some("abcd")));
        assert!(!token_ok("abc", Some("")));
        assert!(!token_ok("abc", None));
    }
}
