//! Shared pieces of the nbd-runner and nbd-cli binaries.

pub mod cli_args;
pub mod cli_output;
pub mod commands;
pub mod kernel;
pub mod map;
pub mod reclaim;
pub mod runner;
pub mod runner_args;
