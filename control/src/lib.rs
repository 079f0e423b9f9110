//! nbd-runner's control plane: the wire protocol nbd-cli speaks, the
//! registry of backstores and their states, the `saveconfig.json`
//! persistence, the server the runner embeds, and the client nbd-cli uses.

pub mod client;
pub mod confine;
pub mod daemon;
pub mod factory;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod metrics;
pub mod metrics_http;
pub mod model;
pub mod registry;
pub mod saveconfig;
pub mod server;
pub mod tls;
pub mod token;
pub mod trust;
pub mod wire;
