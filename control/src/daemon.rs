//! The runner's control plane bootstrap: lock and load the state
//! directory, restore the saved backstores, load or create the token, and
//! start the control listeners. The binary only turns flags into a
//! [`DaemonConfig`].

use crate::factory::Settings;
use crate::registry::{IoRoute, Registry};
use crate::saveconfig::{PersistError, StateStore};
use crate::server::{self, ControlConfig, ControlServer};
use crate::token::{self, TokenError};
use nbd_engine::export::ExportTable;
use nbd_engine::server::directory::ShardDirectory;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// The unix socket's name in the state directory.
pub const SOCKET_NAME: &str = "nbd-runner.sock";
/// The IO route's unix socket in the state directory (0600): this host's
/// kernel maps connect here (see [`nbd_engine::server::Route::Unix`]).
pub const IO_SOCKET_NAME: &str = "nbd-io.sock";

pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub rpchost: IpAddr,
    pub rpcport: u16,
    /// Where the control token lives; default `STATE_DIR/token`.
    pub token_file: Option<PathBuf>,
    pub settings: Settings,
    /// TCP peers may (from other hosts: must) speak TLS.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(
        "{0}: the state directory is not writable by this user; run nbd-runner as root \
         (the default is /etc/nbd-runner) or give it --state-dir DIR"
    )]
    StateDirDenied(PersistError),
    #[error(transparent)]
    State(PersistError),
    #[error("restoring backstores from {}: {message}", path.display())]
    Restore { path: PathBuf, message: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot listen for local IO on {}: {source}", path.display())]
    ListenUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for control requests on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Loads the saved backstores into `table` and starts serving control requests.
pub fn start(
    cfg: &DaemonConfig,
    table: Arc<ExportTable>,
    io: SocketAddr,
    directory: Arc<ShardDirectory>,
    stop: Arc<AtomicBool>,
) -> Result<ControlServer, DaemonError> {
    let (store, saved) = StateStore::open(&cfg.state_dir).map_err(|e| {
        if e.permission_denied() {
            DaemonError::StateDirDenied(e)
        } else {
            DaemonError::State(e)
        }
    })?;
    let path = store.path().to_owned();
    let count = saved.backstores.len();
    let route = IoRoute {
        host: if io.ip().is_unspecified() {
            String::new()
        } else {
            io.ip().to_string()
        },
        port: io.port(),
        shards: directory.shards() as u32,
        unix: Some(cfg.state_dir.join(IO_SOCKET_NAME)),
        directory,
    };
    let registry =
        Registry::load(store, saved, table, route, cfg.settings.clone()).map_err(|e| {
            DaemonError::Restore {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    tracing::info!(state = %path.display(), backstores = count, "state loaded");

    // Every TCP caller presents the token, loopback included: any local
    // user can reach loopback. The unix socket needs none (0600, peer uid).
    let token_path = cfg
        .token_file
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join(token::FILE_NAME));
    let token = token::load_or_create(&token_path)?;
    tracing::info!(token_file = %token_path.display(), "control route over TCP requires this token");
    let tcp = SocketAddr::new(cfg.rpchost, cfg.rpcport);
    let config = ControlConfig {
        tcp,
        unix: Some(cfg.state_dir.join(SOCKET_NAME)),
        token,
        tls: cfg.tls.clone(),
    };
    let io_unix = cfg.state_dir.join(IO_SOCKET_NAME);
    let io_listener = nbd_engine::server::bind_private_unix(&io_unix).map_err(|source| {
        DaemonError::ListenUnix {
            path: io_unix.clone(),
            source,
        }
    })?;
    let mut control = server::start(config, Arc::new(Mutex::new(registry)), stop)
        .map_err(|source| DaemonError::Listen { addr: tcp, source })?;
    control.io_unix = Some((io_unix, io_listener));
    Ok(control)
}
