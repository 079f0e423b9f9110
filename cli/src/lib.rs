//! Shared pieces of the nbd-runner and nbd-cli binaries.

pub mod cli_args;
pub mod cli_docs;
pub mod cli_output;
pub mod commands;
pub mod kernel;
pub mod map;
pub mod reclaim;
pub mod runner;
pub mod runner_args;
pub mod runner_config;
pub mod service;
pub mod watch;

/// An error and its causes on one line, each cause once: many messages
/// already carry their source's text, which `{:#}` would print again.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if text.contains(&line) {
            line = text; // the cause repeats the context and says more
        } else {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::from_raw_os_error(111);
        let e = anyhow::Error::new(io)
            .context("cannot reach the runner: Connection refused (os error 111)")
            .context("control route");
        assert_eq!(
            super::one_line(&e),
            "control route: cannot reach the runner: Connection refused (os error 111)"
        );
        let e = anyhow::anyhow!("control route: connection: reset").context("control route");
        assert_eq!(super::one_line(&e), "control route: connection: reset");
        let e = anyhow::anyhow!("disk full").context("saving state");
        assert_eq!(super::one_line(&e), "saving state: disk full");
    }
}
