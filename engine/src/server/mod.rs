//! The thread-per-core engine: one glommio executor per shard, each pinned
//! to its own core.
//!
//! Placement policy: shard 0 accepts every IO connection and deals them to
//! shards round-robin in accept order, so the N connections of one
//! multi-conn client (the kernel via `nbd-cli map`, `fio numjobs=N`) land on
//! N different cores. The handshake and all IO then stay on that shard.

mod budget;
mod connection;
mod outbox;
mod recvbuf;
mod shard;

pub use outbox::send_all;

use crate::export::ExportTable;
use futures_lite::future::or;
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::net::{AcceptedTcpStream, TcpListener};
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};
use shard::ShardCtx;
use std::net::SocketAddr;
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            conn_requests: 512,
            conn_bytes: 128 << 20,
            shard_requests: 8192,
            shard_bytes: 1 << 30,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub threads: usize,
    pub limits: Limits,
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
pub fn run(
    listener: std::net::TcpListener,
    config: EngineConfig,
    table: Arc<ExportTable>,
    shutdown: Arc<Shutdown>,
    on_ready: impl FnOnce(),
) -> Result<(), EngineError> {
    let threads = config.threads.max(1);
    let listener_fd = listener.into_raw_fd();
    // Shard 0 keeps its own connections; channels feed shards 1..N.
    let (senders, receivers): (Vec<_>, Vec<_>) = (1..threads)
        .map(|_| shared_channel::new_bounded::<AcceptedTcpStream>(1024))
        .unzip();
    let senders = Arc::new(Mutex::new(Some(senders)));
    let receivers: Arc<Mutex<Vec<Option<SharedReceiver<AcceptedTcpStream>>>>> =
        Arc::new(Mutex::new(receivers.into_iter().map(Some).collect()));
    let next_index = Arc::new(AtomicUsize::new(0));
    let limits = config.limits;
    let handles = LocalExecutorPoolBuilder::new(placement(threads))
        .name("nbd-shard")
        .on_all_shards(move || {
            let (senders, receivers, table, shutdown, next_index) = (
                senders.clone(),
                receivers.clone(),
                table.clone(),
                shutdown.clone(),
                next_index.clone(),
            );
            async move {
                let index = next_index.fetch_add(1, Ordering::SeqCst);
                let shard = ShardCtx::new(index, table, limits);
                glommio::spawn_local(watch_shutdown(shard.clone(), shutdown)).detach();
                if index == 0 {
                    let txs = senders.lock().unwrap().take().unwrap_or_default();
                    accept_loop(listener_fd, txs, shard.clone()).await;
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
    on_ready();
    for r in handles.join_all() {
        r.map_err(|e| EngineError::Executor(e.to_string()))?;
    }
    Ok(())
}

/// One core per shard, spread across packages and cores first; with more
/// shards than cores, shards share cores round-robin rather than float.
fn placement(threads: usize) -> PoolPlacement {
    let Ok(online) = CpuSet::online() else {
        return PoolPlacement::Unbound(threads);
    };
    let cpus: Vec<usize> = online.iter().map(|l| l.cpu).collect();
    if cpus.is_empty() {
        return PoolPlacement::Unbound(threads);
    }
    if threads <= cpus.len() {
        return PoolPlacement::MaxSpread(threads, None);
    }
    PoolPlacement::Custom(
        (0..threads)
            .map(|i| {
                let cpu = cpus[i % cpus.len()];
                online.clone().filter(|l| l.cpu == cpu)
            })
            .collect(),
    )
}

async fn watch_shutdown(shard: Rc<ShardCtx>, shutdown: Arc<Shutdown>) {
    while !shutdown.is_triggered() {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    shard.begin_close();
}

async fn accept_loop(
    fd: RawFd,
    senders: Vec<SharedSender<AcceptedTcpStream>>,
    shard: Rc<ShardCtx>,
) {
    // SAFETY: the fd came from a bound std listener we own.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let mut peers: Vec<ConnectedSender<AcceptedTcpStream>> = Vec::with_capacity(senders.len());
    for s in senders {
        peers.push(s.connect().await);
    }
    let mut turn = 0usize;
    loop {
        let accepted = or(async { Some(listener.shared_accept().await) }, async {
            shard.closing().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let target = turn % (peers.len() + 1);
        turn = turn.wrapping_add(1);
        if target == 0 {
            glommio::spawn_local(connection::serve(stream.bind_to_executor(), shard.clone()))
                .detach();
        } else if let Err(e) = peers[target - 1].send(stream).await {
            tracing::warn!(error = %e, shard = target, "cannot hand connection to shard");
        }
    }
    for p in &peers {
        p.close();
    }
}

async fn receive_loop(rx: SharedReceiver<AcceptedTcpStream>, shard: Rc<ShardCtx>) {
    let rx = rx.connect().await;
    while let Some(stream) = rx.recv().await {
        glommio::spawn_local(connection::serve(stream.bind_to_executor(), shard.clone())).detach();
    }
}
