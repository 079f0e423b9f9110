//! The nbd-runner daemon: parses flags, sets up logging, and runs
//! (`nbd_cli::runner`) until SIGINT/SIGTERM.

use clap::Parser;
use nbd_cli::runner_args::{normalize, RunnerArgs};
use std::io::IsTerminal;

fn main() {
    let args = match nbd_cli::runner_config::with_config(normalize(std::env::args())) {
        Ok(args) => RunnerArgs::parse_from(args),
        Err(e) => {
            eprintln!("nbd-runner: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = nbd_cli::runner::run(args) {
        eprintln!("nbd-runner: {}", nbd_cli::one_line(&e));
        std::process::exit(1);
    }
}
