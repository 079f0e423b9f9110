//! Shared pieces of the nbd-runner and nbd-cli binaries.

pub mod runner_args;
