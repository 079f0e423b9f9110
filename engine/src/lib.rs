//! nbd-runner's data plane: the sans-IO NBD protocol, the backend trait and
//! its backends, and the thread-per-core glommio engine that joins them.

pub mod backend;
pub mod export;
pub mod hostport;
pub mod protocol;
pub mod server;
pub mod size;
pub mod stats;
