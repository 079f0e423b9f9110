//! Running under systemd (`Type=notify`, sd_notify(3)): READY=1 once both
//! routes listen and the saved backstores are back, STATUS= with what the
//! runner serves, WATCHDOG=1 only while every shard's executor runs (a
//! wedged shard stops the pings, and systemd restarts the runner; its
//! devices reattach), and STOPPING=1 as soon as a stop begins. Without
//! NOTIFY_SOCKET every message is dropped, so the supervisor runs only
//! when the watchdog or a status can be told to someone.

use nbd_engine::export::ExportTable;
use nbd_engine::server::heartbeat::{stalled, Heartbeats};
use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the supervisor looks at the stop flag: STOPPING=1 follows a
/// SIGTERM within this.
const TICK: Duration = Duration::from_millis(50);
/// How often STATUS= is refreshed when what it says changed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Shard heartbeats for the watchdog: four beats per ping interval (half
/// the watchdog), so one late timer is not a stall.
pub fn heartbeats(shards: usize) -> Option<Arc<Heartbeats>> {
    let every = (watchdog()? / 8).max(Duration::from_millis(10));
    Some(Arc::new(Heartbeats::new(shards, every)))
}

/// One datagram to NOTIFY_SOCKET, never waiting: a manager that stops
/// reading (its queue is ten datagrams deep by default) loses messages
/// instead of stalling the supervisor, and with it the runner's stop.
/// (sd_notify::notify sends blocking.)
fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    if let Err(e) = send_nonblocking(&path, msg.as_bytes()) {
        tracing::debug!("sd_notify to {}: {e}", path.to_string_lossy());
    }
}

fn send_nonblocking(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    // "@name" is an abstract socket (sd_notify(3)).
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    sock.connect_addr(&addr)?;
    sock.send(msg)?;
    Ok(())
}

fn status(table: &ExportTable, io: &str) -> String {
    let exports = table.all();
    let connections: u64 = exports.iter().map(|e| e.stats.connections()).sum();
    format!(
        "serving {} backstore(s), {connections} NBD connection(s); io {io}",
        exports.len()
    )
}

/// Tells systemd the runner is up (both routes listen, saved backstores
/// are served), then keeps it informed until [`Supervisor::finish`].
pub struct Supervisor {
    thread: Option<JoinHandle<()>>,
    done: Arc<AtomicBool>,
}

impl Supervisor {
    pub fn ready(
        table: Arc<ExportTable>,
        io: String,
        beats: Option<Arc<Heartbeats>>,
        stop: Arc<AtomicBool>,
    ) -> Supervisor {
        let first = status(&table, &io);
        send(&[NotifyState::Ready, NotifyState::Status(&first)]);
        let done = Arc::new(AtomicBool::new(false));
        let thread = std::env::var_os("NOTIFY_SOCKET").map(|_| {
            let done = done.clone();
            std::thread::Builder::new()
                .name("sd-notify".into())
                .spawn(move || supervise(&table, &io, beats.as_deref(), &stop, &done, first))
                .expect("spawning the sd-notify thread")
        });
        Supervisor { thread, done }
    }

    /// After the engine stopped: the last status, and the thread joined.
    pub fn finish(mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        send(&[NotifyState::Status("stopped")]);
    }
}

fn supervise(
    table: &ExportTable,
    io: &str,
    beats: Option<&Heartbeats>,
    stop: &AtomicBool,
    done: &AtomicBool,
    mut said: String,
) {
    let ping_every = watchdog().map(|w| w / 2);
    let mut last_counts = beats.map(Heartbeats::counts);
    let mut last_ping = Instant::now();
    let mut last_status = Instant::now();
    let mut stopping = false;
    let mut reported_stall = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        if !stopping && stop.load(Ordering::SeqCst) {
            stopping = true;
            send(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: finishing the requests in flight"),
            ]);
        }
        if let (Some(every), Some(beats)) = (ping_every, beats) {
            if last_ping.elapsed() >= every {
                let now = beats.counts();
                let stuck = stalled(last_counts.as_deref().unwrap_or(&[]), &now);
                if stuck.is_empty() {
                    send(&[NotifyState::Watchdog]);
                    reported_stall = false;
                } else if !reported_stall {
                    // No ping: systemd's watchdog restarts the runner.
                    tracing::error!(shards = ?stuck, "shard(s) stopped running; not pinging the watchdog");
                    reported_stall = true;
                }
                last_counts = Some(now);
                last_ping = Instant::now();
            }
        }
        if !stopping && last_status.elapsed() >= STATUS_EVERY {
            let now = status(table, io);
            if now != said {
                send(&[NotifyState::Status(&now)]);
                said = now;
            }
            last_status = Instant::now();
        }
    }
}
