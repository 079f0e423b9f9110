//! The runner's control plane assembly: state directory, registry, token,
//! and the control listeners.

use crate::runner_args::RunnerArgs;
use crate::token;
use anyhow::{Context, Result};
use nbd_control::registry::{IoRoute, Registry};
use nbd_control::saveconfig::StateStore;
use nbd_control::server::{self, ControlConfig, ControlServer};
use nbd_engine::export::ExportTable;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub const SOCKET_NAME: &str = "nbd-runner.sock";

/// Loads the saved backstores into `table` and starts serving control requests.
pub fn start(
    args: &RunnerArgs,
    table: Arc<ExportTable>,
    io: SocketAddr,
    shards: usize,
    stop: Arc<AtomicBool>,
) -> Result<ControlServer> {
    let (store, cfg) = StateStore::open(&args.state_dir).map_err(|e| {
        if e.permission_denied() {
            anyhow::anyhow!(
                "{e}: the state directory is not writable by this user; run nbd-runner as \
                 root (the default is /etc/nbd-runner) or give it --state-dir DIR"
            )
        } else {
            e.into()
        }
    })?;
    let path = store.path().to_owned();
    let count = cfg.backstores.len();
    let route = IoRoute {
        host: if io.ip().is_unspecified() {
            String::new()
        } else {
            io.ip().to_string()
        },
        port: io.port(),
        shards: shards as u32,
    };
    let registry = Registry::load(store, cfg, table, route, args.handler_defaults())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("restoring backstores from {}", path.display()))?;
    tracing::info!(state = %path.display(), backstores = count, "state loaded");

    let token = if args.rpchost.is_loopback() && args.token_file.is_none() {
        None
    } else {
        let path = args
            .token_file
            .clone()
            .unwrap_or_else(|| args.state_dir.join(token::FILE_NAME));
        let t = token::load_or_create(&path)?;
        tracing::info!(token_file = %path.display(), "control route over TCP requires this token");
        Some(t)
    };
    let tcp = match args.rpchost {
        std::net::IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, args.rpcport)),
        std::net::IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, args.rpcport, 0, 0)),
    };
    let config = ControlConfig {
        tcp,
        unix: Some(args.state_dir.join(SOCKET_NAME)),
        token,
    };
    server::start(config, Arc::new(Mutex::new(registry)), stop)
        .with_context(|| format!("cannot listen for control requests on {tcp}"))
}
