//! nbd-runner's data plane: the sans-IO NBD protocol, the backend trait and
//! its backends, and the thread-per-core glommio engine that joins them.

pub mod backend;
pub mod config;
pub mod export;
pub mod log_limit;
pub mod protocol;
pub mod server;
pub mod stats;
