//! `nbd-cli watch`: keeps one runner's kernel devices attached across its
//! restarts. Each pass asks the runner for its dead backstores and
//! reattaches every one whose device this host's kernel still holds with
//! the backstore's cookie; devices of other hosts are left alone. A pass
//! runs every interval, and at once when the kernel reports a device's
//! connection dead.

use crate::cli_args::IoRoute;
use crate::map::{self, MapOptions};
use anyhow::{bail, Context, Result};
use nbd_control::client::Client;
use nbd_control::model::{BackstoreInfo, ListFilter};
use nbd_control::wire::{Request, Response};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// After a link-dead event, how long passes come quickly (the runner is
/// probably restarting) and how quickly.
const QUICK_FOR: Duration = Duration::from_secs(30);
const QUICK_EVERY: Duration = Duration::from_millis(100);

/// What a pass needs from the runner and the kernel (a seam for tests).
pub trait Host {
    /// Connects to the runner and lists its dead backstores.
    fn dead(&mut self) -> Result<Vec<BackstoreInfo>>;
    /// The BACKEND_IDENTIFIER this host's kernel has for a device.
    fn cookie(&self, device: &str) -> Option<String>;
    /// Reattaches a dead backstore to its device; returns the device.
    fn reattach(&mut self, backstore: &BackstoreInfo) -> Result<String>;
}

/// The runner's control route and this host's kernel.
pub struct Live<'a> {
    connect: &'a dyn Fn() -> Result<Client>,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: Option<Client>,
}

impl<'a> Live<'a> {
    pub fn new(
        connect: &'a dyn Fn() -> Result<Client>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        Live {
            connect,
            tls,
            client: None,
        }
    }
}

impl Host for Live<'_> {
    fn dead(&mut self) -> Result<Vec<BackstoreInfo>> {
        // A fresh connection each pass: the last one died with the runner.
        self.client = None;
        let mut client = (self.connect)()?;
        let Response::List(items) = client.call(&Request::List {
            handler: None,
            filter: ListFilter::Dead,
        })?
        else {
            bail!("unexpected answer to list");
        };
        self.client = Some(client);
        Ok(items)
    }

    fn cookie(&self, device: &str) -> Option<String> {
        crate::kernel::netlink::parse_device(device).and_then(crate::kernel::netlink::backend_id)
    }

    fn reattach(&mut self, b: &BackstoreInfo) -> Result<String> {
        let client = self.client.as_mut().context("not connected")?;
        let opts = MapOptions {
            device: b.device.clone(),
            // A reattach keeps the device's timeout and connection count.
            timeout: None,
            readonly: b.read_only,
            connections: None,
            // Empty: the runner keeps the device's saved placement.
            shards: Vec::new(),
            route: IoRoute::Auto,
            tls: self.tls.clone(),
        };
        map::map(client, b.handler, &b.key, &opts)
    }
}

/// What the watch says on stderr: each reattach, and each problem once
/// until it changes or goes away, so a runner that is down for an hour
/// does not fill the journal.
pub struct Reports<W: Write> {
    out: W,
    /// The problem last reported per subject ("runner" or a key).
    open: BTreeMap<String, String>,
}

const RUNNER: &str = "\0runner";

impl<W: Write> Reports<W> {
    pub fn new(out: W) -> Self {
        Reports {
            out,
            open: BTreeMap::new(),
        }
    }

    pub fn say(&mut self, line: &str) {
        let _ = writeln!(self.out, "nbd-cli watch: {line}");
    }

    fn problem(&mut self, subject: &str, line: String) {
        if self.open.get(subject) != Some(&line) {
            self.say(&line);
            self.open.insert(subject.to_owned(), line);
        }
    }

    /// The subject's problem is over; `line` says so if one was reported.
    fn over(&mut self, subject: &str, line: Option<&str>) {
        if self.open.remove(subject).is_some() {
            if let Some(line) = line {
                self.say(line);
            }
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// What a pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub answered: bool,
    pub reattached: usize,
    /// Dead backstores of this host still not reattached.
    pub failed: usize,
}

/// One pass: reattach every dead backstore whose device is here.
pub fn pass<W: Write>(host: &mut dyn Host, runner: &str, reports: &mut Reports<W>) -> Pass {
    let mut found = Pass::default();
    let dead = match host.dead() {
        Ok(d) => d,
        Err(e) => {
            reports.problem(
                RUNNER,
                format!(
                    "the runner at {runner} does not answer: {}",
                    crate::one_line(&e)
                ),
            );
            return found;
        }
    };
    found.answered = true;
    reports.over(
        RUNNER,
        Some(&format!("the runner at {runner} answers again")),
    );
    for b in &dead {
        let Some(device) = b.device.as_deref() else {
            continue;
        };
        match host.cookie(device) {
            Some(c) if c == b.cookie => {}
            // Another host's device, unmapped by hand, or taken by
            // another backstore: not ours to touch.
            _ => {
                reports.problem(
                    &b.key,
                    format!(
                        "{} {} is dead, but {device} here does not carry its cookie: left alone",
                        b.handler, b.key
                    ),
                );
                continue;
            }
        }
        match host.reattach(b) {
            Ok(dev) => {
                reports.over(&b.key, None);
                reports.say(&format!("reattached {dev} to {} {}", b.handler, b.key));
                found.reattached += 1;
            }
            Err(e) => {
                reports.problem(
                    &b.key,
                    format!(
                        "cannot reattach {device} to {}: {}",
                        b.key,
                        crate::one_line(&e)
                    ),
                );
                found.failed += 1;
            }
        }
    }
    // A backstore no longer dead has no open problem: a new one is news.
    reports
        .open
        .retain(|k, _| k == RUNNER || dead.iter().any(|b| &b.key == k));
    found
}

enum Wake {
    Stop,
    LinkDead(u32),
}

/// Runs passes until SIGTERM or SIGINT; a second signal exits at once.
pub fn run(host: &mut dyn Host, runner: &str, interval: Duration) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let stop = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = signals.forever();
            if seen.next().is_some() {
                let _ = stop.send(Wake::Stop);
            }
            if seen.next().is_some() {
                eprintln!("nbd-cli watch: second signal, exiting now");
                std::process::exit(130);
            }
        })
        .context("starting the signal thread")?;
    crate::kernel::netlink::link_dead_events(move |i| tx.send(Wake::LinkDead(i)).is_ok())
        .context("listening for the kernel's NBD link-dead events")?;
    let mut reports = Reports::new(std::io::stderr());
    reports.say(&format!(
        "watching the runner at {runner} (every {}, and on link-dead events)",
        humantime(interval)
    ));
    let mut quick_until: Option<Instant> = None;
    loop {
        let found = pass(host, runner, &mut reports);
        let settled = found.answered && found.failed == 0;
        let wait = match quick_until {
            Some(t) if !settled && Instant::now() < t => QUICK_EVERY.min(interval),
            _ => interval,
        };
        let mut wake = rx.recv_timeout(wait);
        loop {
            match wake {
                Ok(Wake::Stop) => {
                    reports.say("stopped");
                    return Ok(());
                }
                Ok(Wake::LinkDead(i)) => {
                    reports.say(&format!("/dev/nbd{i} lost a connection"));
                    quick_until = Some(Instant::now() + QUICK_FOR);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the kernel's link-dead subscription broke")
                }
            }
            // Events come in bursts (one per connection): one pass for all.
            wake = rx.recv_timeout(Duration::ZERO);
        }
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_control::model::{Handler, State};

    fn dead(key: &str, device: &str) -> BackstoreInfo {
        BackstoreInfo {
            key: key.into(),
            handler: Handler::File,
            size: 1 << 20,
            state: State::Dead,
            device: Some(device.into()),
            read_only: false,
            flags: 0,
            mode: String::new(),
            error: None,
            connections: Vec::new(),
            links: Vec::new(),
            placement: Vec::new(),
            options: BTreeMap::new(),
            reattaches: 0,
            reattached_at: None,
            cookie: format!("nbd-runner:{key}"),
        }
    }

    /// A runner that is down for `down` passes, with dead backstores whose
    /// reattach fails `fails` times each; the kernel holds `here`.
    struct Fake {
        down: usize,
        dead: Vec<BackstoreInfo>,
        here: BTreeMap<String, String>,
        fails: usize,
        reattached: Vec<String>,
    }

    impl Fake {
        /// Backstore `a` dead on /dev/nbd0, which carries `cookie` here.
        fn one(cookie: &str) -> Fake {
            Fake {
                down: 0,
                dead: vec![dead("a", "/dev/nbd0")],
                here: [("/dev/nbd0".to_owned(), cookie.to_owned())].into(),
                fails: 0,
                reattached: Vec::new(),
            }
        }
    }

    impl Host for Fake {
        fn dead(&mut self) -> Result<Vec<BackstoreInfo>> {
            if self.down > 0 {
                self.down -= 1;
                bail!("connection refused");
            }
            Ok(self.dead.clone())
        }
        fn cookie(&self, device: &str) -> Option<String> {
            self.here.get(device).cloned()
        }
        fn reattach(&mut self, b: &BackstoreInfo) -> Result<String> {
            if self.fails > 0 {
                self.fails -= 1;
                bail!("negotiation timed out");
            }
            self.dead.retain(|d| d.key != b.key);
            self.reattached.push(b.key.clone());
            Ok(b.device.clone().unwrap())
        }
    }

    fn lines(r: Reports<Vec<u8>>) -> Vec<String> {
        String::from_utf8(r.into_inner())
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn waits_for_the_runner_then_reattaches_what_is_here() {
        let mut host = Fake {
            down: 3,
            dead: vec![dead("a", "/dev/nbd0"), dead("b", "/dev/nbd1")],
            here: [("/dev/nbd0".to_owned(), "nbd-runner:a".to_owned())].into(),
            fails: 0,
            reattached: Vec::new(),
        };
        let mut r = Reports::new(Vec::new());
        for _ in 0..3 {
            assert!(!pass(&mut host, "R", &mut r).answered);
        }
        let found = pass(&mut host, "R", &mut r);
        assert_eq!((found.reattached, found.failed), (1, 0));
        pass(&mut host, "R", &mut r);
        assert_eq!(host.reattached, ["a"], "b's device is not here");
        assert_eq!(
            lines(r),
            [
                "nbd-cli watch: the runner at R does not answer: connection refused",
                "nbd-cli watch: the runner at R answers again",
                "nbd-cli watch: reattached /dev/nbd0 to file a",
                "nbd-cli watch: file b is dead, but /dev/nbd1 here does not carry its cookie: left alone",
            ]
        );
    }

    #[test]
    fn a_failing_reattach_is_retried_and_reported_once() {
        let mut host = Fake::one("nbd-runner:a");
        host.fails = 4;
        let mut r = Reports::new(Vec::new());
        for _ in 0..4 {
            assert_eq!(pass(&mut host, "R", &mut r).failed, 1);
        }
        assert_eq!(pass(&mut host, "R", &mut r).reattached, 1);
        assert_eq!(
            lines(r),
            [
                "nbd-cli watch: cannot reattach /dev/nbd0 to a: negotiation timed out",
                "nbd-cli watch: reattached /dev/nbd0 to file a",
            ]
        );
    }

    #[test]
    fn a_device_taken_by_another_backend_is_left_alone() {
        let mut host = Fake::one("nbd-runner:other");
        let mut r = Reports::new(Vec::new());
        pass(&mut host, "R", &mut r);
        pass(&mut host, "R", &mut r);
        assert!(host.reattached.is_empty());
        assert_eq!(lines(r).len(), 1, "reported once");
    }
}
