//! The thread-per-core engine: one glommio executor per shard, each pinned
//! to its own core.
//!
//! Placement policy: shard 0 accepts every IO connection and hands it to the
//! shard with the fewest live connections, ties going round-robin, so the N
//! connections of one multi-conn client (the kernel via `nbd-cli map`,
//! `fio numjobs=N`) land on N different cores even when short-lived
//! connections (probes, `nbdinfo`) come and go between them. The handshake
//! and all IO then stay on that shard.

mod admission;
mod budget;
pub mod colocate;
mod connection;
pub mod directory;
pub mod heartbeat;
mod outbox;
pub mod placement;
mod recvbuf;
mod shard;
mod socket;
mod tls;

use crate::export::ExportTable;
use crate::protocol::TlsPolicy;
use admission::{Admission, Admitted};
use directory::{PeerKey, ShardDirectory, ShardThread};
use futures_lite::future::or;
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver};
use glommio::net::{AcceptedTcpStream, TcpListener, TcpStream};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use shard::ShardCtx;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::io::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// In-flight bounds and timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub conn_requests: u32,
    pub conn_bytes: u64,
    pub shard_requests: u32,
    pub shard_bytes: u64,
    /// A client that has not finished negotiating by then is dropped.
    pub handshake_timeout: Duration,
    /// NBD_OPT_LIST names the exports (off by default: names are host paths).
    pub list_exports: bool,
    /// IO connections in all, and from one peer address; more are closed
    /// at accept.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// A connection whose peer takes no reply bytes for this long is
    /// dropped, releasing what it held of the shard's budget.
    pub write_timeout: Option<Duration>,
    /// A connection with nothing in flight that sends no request for this
    /// long is closed (off by default: an idle kernel device is normal).
    pub idle_timeout: Option<Duration>,
    /// A lone reply to a peer on this host lends it the shard's CPU,
    /// returning to this policy after the send ([`colocate`]); None: off.
    pub colocate: Option<placement::SchedPolicy>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            conn_requests: 512,
            conn_bytes: 128 << 20,
            shard_requests: 8192,
            shard_bytes: 1 << 30,
            handshake_timeout: Duration::from_secs(30),
            list_exports: false,
            max_connections: 4096,
            max_connections_per_peer: 1024,
            write_timeout: Some(Duration::from_secs(60)),
            idle_timeout: None,
            colocate: None,
        }
    }
}

/// TLS on the IO route: the STARTTLS policy and the server's credentials.
#[derive(Clone, Debug)]
pub struct TlsServer {
    /// `On` or `Require`; with `Off` there is no TlsServer at all.
    pub policy: TlsPolicy,
    pub config: Arc<rustls::ServerConfig>,
}

#[derive(Debug)]
pub struct EngineConfig {
    pub threads: usize,
    pub limits: Limits,
    /// The CPU of each shard ([`placement::shard_cpus`]); `None` lets
    /// shards follow their clients around, which wins when clients share
    /// the cores.
    pub shard_cpus: Option<Vec<usize>>,
    /// Spin this long for new work before an idle shard sleeps: trades CPU
    /// for latency when clients wait on each reply (QD1).
    pub spin_before_park: Duration,
    pub tls: Option<TlsServer>,
    /// The local IO route ([`bind_private_unix`]): plain NBD for this
    /// host's kernel maps, who may connect being the file's business.
    pub unix: Option<std::os::unix::net::UnixListener>,
    /// Bytes each shard allocates, touches and frees before it serves: with
    /// the allocator keeping freed memory (and memory locked), the shard's
    /// IO then finds its pages already there, also under memory pressure.
    pub warm_reserve: usize,
    /// Shared with the control plane: where each shard runs, and where the
    /// connections of a map in progress go.
    pub directory: Arc<ShardDirectory>,
    /// Each shard bumps its counter here while its executor runs (for a
    /// supervisor's watchdog).
    pub heartbeats: Option<Arc<heartbeat::Heartbeats>>,
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Tcp,
    /// The unix socket: local, and only the runner's user (and root) can
    /// open it, so no TLS. AF_UNIX also matters for swap: the kernel sends
    /// swap writes from its memory reserves, and TCP drops such packets at
    /// any socket that is not itself a reserve user (every userspace one),
    /// while unix stream sockets deliver them.
    Unix,
}

/// Binds a unix socket with mode 0600 from the start: the mode is set on
/// the unbound socket, which bind() gives the new file, so there is no
/// moment when others may connect and no chmod that could follow a planted
/// path. A socket left at `path` by a killed runner is replaced; anything
/// else there is refused.
pub fn bind_private_unix(
    path: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket; remove it",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 128)?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shards: {0}")]
    Executor(String),
}

/// Set from a signal handler or another thread; shards notice within 50 ms.
#[derive(Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// The flag itself, for signal-hook to set.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds the IO route. Split from [`run`] so the caller can report the
/// address (port 0 picks one) before serving.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EngineError> {
    std::net::TcpListener::bind(addr).map_err(|source| EngineError::Bind { addr, source })
}

/// Serves until `shutdown` triggers and every connection has closed.
/// `on_ready` runs once every shard has started.
/// A unix peer: its uid and pid, and whether it may use the runner's local
/// routes (root or the runner's own user). None when the kernel cannot say.
pub fn unix_peer(fd: impl std::os::fd::AsFd) -> Option<(u32, i32, bool)> {
    let cred = rustix::net::sockopt::socket_peercred(fd).ok()?;
    let uid = cred.uid.as_raw();
    let trusted = uid == 0 || uid == rustix::process::geteuid().as_raw();
    Some((uid, cred.pid.as_raw_nonzero().get(), trusted))
}

/// With a warm reserve, at most half of it in flight per shard and per
/// connection: payload buffers in flight (and those kept for reuse) then
/// stay within the heap each shard warmed at start. Under memory pressure a
/// fresh page is a fault that waits on reclaim, which waits on our IO (seen
/// in the VM's swap test as a shard in reclaim).
fn within_reserve(mut limits: Limits, warm_reserve: usize) -> Limits {
    if warm_reserve > 0 {
        let cap = (warm_reserve / 2) as u64;
        limits.shard_bytes = limits.shard_bytes.min(cap);
        limits.conn_bytes = limits.conn_bytes.min(cap);
    }
    limits
}

/// Touches `bytes` of this thread's heap and frees it again (see
/// [`EngineConfig::warm_reserve`]), in chunks the allocator serves from its
/// heaps rather than with a mapping of their own.
fn warm_heap(bytes: usize) {
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<Vec<u8>> = (0..bytes.div_ceil(CHUNK))
        .map(|_| {
            let mut v = Vec::with_capacity(CHUNK);
            // Nonzero, so every page is written, not mapped to the zero page.
            v.resize(CHUNK, 1u8);
            v
        })
        .collect();
    std::hint::black_box(&chunks);
}

/// Warms a thread that runs direct IO (a shard, or one of its blocking
/// threads): `heap` bytes of its heap, its stack, and one pooled O_DIRECT
/// buffer for the largest swap request (the block layer's default cap,
/// 1280 KiB). A thread first used once swap writes begin would otherwise
/// fault these in then, under reclaim that may not start IO.
fn warm_io_thread(heap: usize) {
    const LARGEST_SWAP_IO: usize = 1280 << 10;
    warm_heap(heap);
    touch_stack();
    drop(crate::backend::AlignedBuf::take(LARGEST_SWAP_IO));
}

/// Writes 64 KiB of this thread's stack, far deeper than the IO path goes.
#[inline(never)]
fn touch_stack() {
    let mut probe = [1u8; 64 << 10];
    std::hint::black_box(&mut probe);
}

pub fn run(
    listener: std::net::TcpListener,
    config: EngineConfig,
    table: Arc<ExportTable>,
    shutdown: Arc<Shutdown>,
    on_ready: impl FnOnce(),
) -> Result<(), EngineError> {
    let threads = config.threads.max(1);
    let listener_fd = listener.into_raw_fd();
    let unix_fd = config.unix.map(IntoRawFd::into_raw_fd);
    // Shard 0 keeps its own connections; channels feed shards 1..N.
    let (senders, receivers): (Vec<_>, Vec<_>) = (1..threads)
        .map(|_| shared_channel::new_bounded::<Handoff>(1024))
        .unzip();
    let senders = Arc::new(Mutex::new(Some(senders)));
    let receivers: Arc<Mutex<Vec<Option<SharedReceiver<Handoff>>>>> =
        Arc::new(Mutex::new(receivers.into_iter().map(Some).collect()));
    let started = Arc::new(StartOrder::new(threads));
    let load = ShardLoad::new(threads);
    let warm_reserve = config.warm_reserve;
    let limits = within_reserve(config.limits, warm_reserve);
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_peer);
    let tls = config.tls.clone();
    let shard_cpus = config.shard_cpus.clone();
    let directory = config.directory.clone();
    let heartbeats = config.heartbeats.clone();
    // Each shard reports once it is set up; "ready" waits for all of them.
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let up_tx = Arc::new(Mutex::new(up_tx));
    let placement = placement::pool_placement(threads, config.shard_cpus.as_deref());
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("nbd-shard")
        .spin_before_park(config.spin_before_park)
        // glommio's default binds every shard's blocking thread to the first
        // shard's CPUs; each shard puts its own on its CPUs instead (below):
        // direct IO runs there, one request per thread.
        .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_THREADS))
        .on_all_shards(move || {
            let admission = admission.clone();
            let up = up_tx.lock().unwrap().clone();
            let heartbeats = heartbeats.clone();
            let shard_cpus = shard_cpus.clone();
            let (senders, receivers, table, shutdown, started, load, tls, directory) = (
                senders.clone(),
                receivers.clone(),
                table.clone(),
                shutdown.clone(),
                started.clone(),
                load.clone(),
                tls.clone(),
                directory.clone(),
            );
            async move {
                if warm_reserve > 0 {
                    warm_io_thread(warm_reserve);
                }
                let index = started.index_of(glommio::executor().id());
                if let Ok(cpus) = placement::usable_cpus() {
                    directory.shard_started(
                        index,
                        ShardThread {
                            tid: rustix::thread::gettid().as_raw_nonzero().get(),
                            cpus: cpus.clone(),
                        },
                    );
                    confine_blocking_pool(&cpus, warm_reserve > 0).await;
                }
                let _ = up.send(());
                if let Some(beats) = heartbeats {
                    glommio::spawn_local(heartbeat::run(beats, index)).detach();
                }
                let follow = shard_cpus.as_ref().map(|cpus| {
                    let mut allowed = cpus.clone();
                    allowed.sort_unstable();
                    allowed.dedup();
                    colocate::Follow::new(cpus[index % cpus.len()], allowed)
                });
                let colocate = limits.colocate.is_some_and(|policy| {
                    colocate::enable(policy, follow)
                        .inspect_err(|e| {
                            // An optimisation the process may not use, not a
                            // fault: say it once, where operators look.
                            if index == 0 {
                                tracing::info!("QD1 co-location off: {e}");
                            }
                        })
                        .is_ok()
                });
                let shard = ShardCtx::new(index, table, limits, tls, colocate);
                glommio::spawn_local(watch_shutdown(shard.clone(), shutdown)).detach();
                if index == 0 {
                    let txs = senders.lock().unwrap().take().unwrap_or_default();
                    let mut peers = Vec::with_capacity(txs.len());
                    for s in txs {
                        peers.push(s.connect().await);
                    }
                    let peers = Rc::new(peers);
                    let accept = Acceptor {
                        peers: peers.clone(),
                        shard: shard.clone(),
                        load,
                        admission,
                        directory,
                        accepted: Default::default(),
                    };
                    let unix = unix_fd.map(|fd| {
                        let accept = accept.clone();
                        glommio::spawn_local(async move { accept.run(fd, Route::Unix).await })
                    });
                    accept.run(listener_fd, Route::Tcp).await;
                    if let Some(unix) = unix {
                        unix.await;
                    }
                    for p in peers.iter() {
                        p.close();
                    }
                } else {
                    let rx = receivers.lock().unwrap()[index - 1].take();
                    if let Some(rx) = rx {
                        receive_loop(rx, shard.clone()).await;
                    }
                }
                shard.idle().await;
            }
        })
        .map_err(|e| EngineError::Executor(e.to_string()))?;
    // The generator (and its sender) is gone once every shard has called
    // it; a shard that dies before reporting drops its own: stop waiting.
    for _ in 0..threads {
        if up_rx.recv().is_err() {
            break;
        }
    }
    on_ready();
    for r in handles.join_all() {
        r.map_err(|e| EngineError::Executor(e.to_string()))?;
    }
    Ok(())
}

/// Each shard's blocking threads: direct IO (one pread or pwrite per
/// thread at a time) and the rare calls io_uring cannot take. Enough for a
/// kernel device's usual queue depth; idle ones cost a stack.
const BLOCKING_THREADS: usize = 16;

/// Puts every thread of this shard's blocking pool on `cpus`: one job per
/// thread, each holding its thread until all have run, so no thread runs
/// two. Spawned as tasks: a blocking job is queued when first polled.
/// With a warm reserve, each thread is warmed too (stack and one buffer).
async fn confine_blocking_pool(cpus: &[usize], warm: bool) {
    let all = Arc::new(std::sync::Barrier::new(BLOCKING_THREADS));
    let jobs: Vec<_> = (0..BLOCKING_THREADS)
        .map(|_| {
            let (all, cpus) = (all.clone(), cpus.to_vec());
            glommio::spawn_local(glommio::executor().spawn_blocking(move || {
                let r = placement::confine_current_thread(&cpus);
                if warm {
                    warm_io_thread(0);
                }
                all.wait();
                r
            }))
        })
        .collect();
    for job in jobs {
        if let Err(e) = job.await {
            tracing::warn!("cannot keep a blocking thread on its shard's CPUs: {e}");
        }
    }
}

/// Shard indexes in placement order: shard i runs on the i-th CPU of
/// `--cpus` (or of the spread), whichever thread starts first. glommio
/// numbers its executors in the order it places them, so a shard's index
/// is its executor id's rank once every shard has reported. A shard that
/// never starts (its executor failed, which fails the runner) is waited
/// for a bounded time only.
struct StartOrder {
    shards: usize,
    ids: Mutex<Vec<usize>>,
    reported: std::sync::Condvar,
}

impl StartOrder {
    const PATIENCE: Duration = Duration::from_secs(10);

    fn new(shards: usize) -> Self {
        StartOrder {
            shards,
            ids: Mutex::new(Vec::with_capacity(shards)),
            reported: std::sync::Condvar::new(),
        }
    }

    /// Blocks the (not yet serving) shard thread until every shard started.
    fn index_of(&self, id: usize) -> usize {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.push(id);
        self.reported.notify_all();
        let (ids, _) = self
            .reported
            .wait_timeout_while(ids, Self::PATIENCE, |ids| ids.len() < self.shards)
            .unwrap_or_else(|e| e.into_inner());
        ids.iter().filter(|&&other| other < id).count()
    }
}

async fn watch_shutdown(shard: Rc<ShardCtx>, shutdown: Arc<Shutdown>) {
    while !shutdown.is_triggered() {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    shard.begin_close();
}

/// Live connections per shard, counted from hand-off to close.
#[derive(Clone)]
struct ShardLoad(Arc<Vec<AtomicUsize>>);

/// One connection's share of its shard's load; released when dropped.
struct Placed {
    load: ShardLoad,
    shard: usize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.load.0[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

impl ShardLoad {
    fn new(shards: usize) -> Self {
        ShardLoad(Arc::new((0..shards).map(|_| AtomicUsize::new(0)).collect()))
    }

    /// The least-loaded shard, searching from `start` so ties rotate.
    fn place(&self, start: usize) -> Placed {
        let n = self.0.len();
        let shard = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| self.0[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.place_on(shard)
    }

    /// On `shard`, which a map asked for (checked against the shard count
    /// when it was reserved).
    fn place_on(&self, shard: usize) -> Placed {
        let shard = shard.min(self.0.len() - 1);
        self.0[shard].fetch_add(1, Ordering::Relaxed);
        Placed {
            load: self.clone(),
            shard,
        }
    }
}

/// Who a connection is, as accepted.
struct Peer {
    route: Route,
    /// For the logs and `info`: its address, or its unix credentials.
    name: String,
    /// Accept order across both routes: `info` lists a device's
    /// connections in the order they connected.
    seq: u64,
}

/// A connection on its way to its shard, with its admission and placement.
struct Handoff {
    fd: OwnedFd,
    peer: Peer,
    placed: Placed,
    admitted: Admitted,
}

impl Handoff {
    /// Serves it on the shard this runs on.
    fn serve(self, shard: Rc<ShardCtx>) {
        // SAFETY: the descriptor is ours; the stream owns it from here on.
        let stream = unsafe { TcpStream::from_raw_fd(self.fd.into_raw_fd()) };
        let (placed, admitted) = (self.placed, self.admitted);
        glommio::spawn_local(async move {
            connection::serve(stream, shard, self.peer).await;
            drop((placed, admitted));
        })
        .detach();
    }
}

/// The accepted socket as a descriptor any shard can take up (glommio's
/// accepted handle hides its own).
fn into_fd(stream: AcceptedTcpStream) -> std::io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let bound = stream.bind_to_executor();
    // SAFETY: `bound` owns the descriptor for the duration of the dup.
    let fd = unsafe { BorrowedFd::borrow_raw(bound.as_raw_fd()) };
    rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(Into::into)
}

/// Shard 0's accepting: admission, placement, and the hand-off to the
/// connection's shard, for either route.
#[derive(Clone)]
struct Acceptor {
    peers: Rc<Vec<ConnectedSender<Handoff>>>,
    shard: Rc<ShardCtx>,
    load: ShardLoad,
    admission: Arc<Admission>,
    directory: Arc<ShardDirectory>,
    accepted: Rc<std::cell::Cell<u64>>,
}

impl Acceptor {
    async fn run(&self, fd: RawFd, route: Route) {
        // SAFETY: the fd came from a bound std listener we own. glommio's
        // accept and streams work on the descriptor alone, so its TCP
        // listener serves the unix socket as well.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let mut turn = 0usize;
        loop {
            let accepted = or(async { Some(listener.shared_accept().await) }, async {
                self.shard.closing().await;
                None
            })
            .await;
            let stream = match accepted {
                None => break,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, ?route, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let fd = match into_fd(stream) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(error = %e, ?route, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Some((key, name)) = identify(&fd, route) else {
                continue; // gone already, or refused (logged)
            };
            // Unix peers count as this host.
            let ip = match key {
                PeerKey::Tcp(a) => a.ip(),
                PeerKey::Unix { .. } => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            let admitted = match self.admission.admit(ip) {
                Ok(a) => a,
                Err(why) => {
                    if let Some(suppressed) = self.admission.log.admit() {
                        tracing::warn!(peer = %name, ?route, %why, suppressed, "refused an IO connection");
                    }
                    continue;
                }
            };
            let placed = match self.directory.take(&key, std::time::Instant::now()) {
                Some(shard) => self.load.place_on(shard),
                None => {
                    let placed = self.load.place(turn);
                    turn = turn.wrapping_add(1);
                    placed
                }
            };
            let target = placed.shard;
            let seq = self.accepted.get();
            self.accepted.set(seq + 1);
            let handoff = Handoff {
                fd,
                peer: Peer { route, name, seq },
                placed,
                admitted,
            };
            if target == 0 {
                handoff.serve(self.shard.clone());
            } else if let Err(e) = self.peers[target - 1].send(handoff).await {
                tracing::warn!(error = %e, shard = target, "cannot hand connection to shard");
            }
        }
    }
}

/// Who is connecting: the key a map's reservation names, and a name for
/// the logs. On the unix socket, only root and the runner's own user get
/// in: the socket is 0600 in a 0700 directory, and the credentials check
/// stands behind that, as on the control socket.
fn identify(fd: &OwnedFd, route: Route) -> Option<(PeerKey, String)> {
    match route {
        Route::Tcp => {
            let addr = rustix::net::getpeername(fd).ok()??;
            let addr = std::net::SocketAddr::try_from(addr).ok()?;
            Some((PeerKey::Tcp(addr), addr.to_string()))
        }
        Route::Unix => {
            match unix_peer(fd) {
                Some((uid, pid, true)) => {
                    Some((PeerKey::Unix { pid }, format!("unix:uid={uid},pid={pid}")))
                }
                other => {
                    let uid = other.map(|(uid, _, _)| uid);
                    tracing::warn!(?uid, "refused an IO connection on the unix socket: not root or the runner's user");
                    None
                }
            }
        }
    }
}

async fn receive_loop(rx: SharedReceiver<Handoff>, shard: Rc<ShardCtx>) {
    let rx = rx.connect().await;
    while let Some(handoff) = rx.recv().await {
        handoff.serve(shard.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_reserve_bounds_what_is_in_flight_to_half_of_it() {
        let usual = Limits::default();
        let swap_safe = within_reserve(usual, 32 << 20);
        assert_eq!(swap_safe.shard_bytes, 16 << 20);
        assert_eq!(swap_safe.conn_bytes, 16 << 20);
        assert_eq!(swap_safe.shard_requests, usual.shard_requests);
        // A reserve larger than the usual bounds leaves them; none, too.
        assert_eq!(
            within_reserve(usual, 8 << 30).shard_bytes,
            usual.shard_bytes
        );
        assert_eq!(within_reserve(usual, 0).conn_bytes, usual.conn_bytes);
    }

    #[test]
    fn shard_indexes_follow_executor_ids_whatever_order_shards_start_in() {
        let order = Arc::new(StartOrder::new(3));
        let got: Vec<_> = [9, 5, 7]
            .into_iter()
            .map(|id| {
                let order = order.clone();
                std::thread::spawn(move || (id, order.index_of(id)))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let mut got = got;
        got.sort();
        assert_eq!(got, [(5, 0), (7, 1), (9, 2)]);
    }

    #[test]
    fn placement_fills_the_emptiest_shard_and_rotates_ties() {
        let load = ShardLoad::new(3);
        let a = load.place(0);
        let b = load.place(1);
        let c = load.place(2);
        assert_eq!([a.shard, b.shard, c.shard], [0, 1, 2]);
        // A short-lived connection leaves; the next one fills its place.
        drop(b);
        assert_eq!(load.place(0).shard, 1);
        // That one was released at once: shard 1 is still the emptiest.
        assert_eq!(load.place(2).shard, 1);
        drop((a, c));
        // All idle: ties follow `start`.
        assert_eq!(load.place(2).shard, 2);
        let kept: Vec<Placed> = (0..6).map(|i| load.place(i)).collect();
        let mut per = [0; 3];
        for p in &kept {
            per[p.shard] += 1;
        }
        assert_eq!(per, [2, 2, 2]);
    }
}
