//! systemd's notify protocol, for real: the test is the service manager.
//! It binds the NOTIFY_SOCKET datagram socket, starts the runner with
//! WATCHDOG_USEC, and reads what the runner sends: READY=1 only once both
//! routes serve and the saved backstores are back, STATUS= lines that
//! follow the connections, WATCHDOG=1 while every shard runs (and none
//! while one shard thread is stopped under ptrace: a wedged shard gets the
//! runner restarted), STOPPING=1 on SIGTERM.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

struct Manager {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        let sock = UnixDatagram::bind(path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    /// The next datagram, within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                return Some(msg);
            }
        }
        None
    }

    /// Reads datagrams until one has a line `pred` accepts; returns it.
    fn until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(msg) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if msg.lines().any(&pred) {
                return msg;
            }
        }
        panic!("no {what} within {timeout:?}; seen {:?}", self.seen);
    }

    /// How many WATCHDOG=1 pings arrive in `window`.
    fn pings(&mut self, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        while let Some(msg) = self.next(deadline.saturating_duration_since(Instant::now())) {
            n += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
        n
    }
}

#[test]
fn notify_ready_status_watchdog_and_stopping() {
    let dir = scratch();
    let state = dir.path().join("state");
    let img = tmp_path(&dir, "saved.raw");
    let img = path_str(&img);
    // A backstore in the state file for the next runner to bring back.
    {
        let mut first = Runner::start_with(&["--threads", "2", "--state-dir", path_str(&state)]);
        cli_ok(&first, &["file", "create", img, "size", "4M"]);
        first.stop();
    }
    let notify = dir.path().join("notify.sock");
    let mut manager = Manager::bind(&notify);
    let log = dir.path().join("runner.log");
    // 400 ms: pings every 200 ms, shards beat every 50 ms.
    let mut r = Runner::start_env(
        &["--threads", "2", "--state-dir", path_str(&state)],
        &[
            ("NOTIFY_SOCKET", path_str(&notify)),
            ("WATCHDOG_USEC", "400000"),
        ],
        &log,
    );

    // READY=1 is the first thing said, and by then everything serves.
    let ready = manager.next(Duration::from_secs(10)).expect("READY=1");
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first message {ready:?}"
    );
    assert!(
        ready.contains("STATUS=serving 1 backstore(s), 0 NBD connection(s)"),
        "READY without the saved backstore: {ready:?}"
    );
    let info = run_ok("nbdinfo", &["--size", &r.uri(img)]);
    assert_eq!(info.trim(), (4u64 << 20).to_string());
    let list = cli_ok(&r, &["file", "list"]);
    assert!(list.contains(img), "control route after READY: {list}");

    // The watchdog: every shard beats, so pings come (about 5 a second).
    let pings = manager.pings(Duration::from_secs(2));
    assert!(
        pings >= 4,
        "{pings} WATCHDOG=1 in 2 s with a 400 ms watchdog"
    );

    // STATUS follows the connections.
    let conn = negotiate(&r.addr, img);
    manager.until("STATUS with the connection", Duration::from_secs(10), |l| {
        l == format!(
            "STATUS=serving 1 backstore(s), 1 NBD connection(s); io {}",
            r.addr
        )
    });
    drop(conn);

    // A wedged shard: one shard thread held in a ptrace stop while the
    // others run. The pings stop (systemd would restart the runner), the
    // log names the shard, and they resume once it runs again.
    let shard = r
        .threads()
        .into_iter()
        .find(|t| t.name.starts_with("nbd-shard"))
        .expect("a shard thread");
    let tid = shard.tid;
    // SAFETY: ptrace on one thread of our own child; detached below.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
            0,
            "PTRACE_SEIZE {tid}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
    }
    // One ping may have been on its way from before the stop.
    let _ = manager.pings(Duration::from_millis(400));
    let pings = manager.pings(Duration::from_secs(2));
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0), 0);
    }
    assert_eq!(pings, 0, "WATCHDOG=1 while shard thread {tid} was stopped");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("stopped running; not pinging the watchdog"),
        "no log line about the wedged shard: {logged}"
    );
    let pings = manager.pings(Duration::from_secs(2));
    assert!(
        pings >= 4,
        "{pings} WATCHDOG=1 in 2 s after the shard ran again"
    );
    r.assert_alive();

    // SIGTERM: STOPPING=1 at once, then a clean exit and a last status.
    r.signal(libc::SIGTERM);
    manager.until("STOPPING=1", Duration::from_secs(5), |l| l == "STOPPING=1");
    let st = r.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "runner exit {st}");
    manager.until("the last status", Duration::from_secs(5), |l| {
        l == "STATUS=stopped"
    });
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_runner_runs() {
    // WATCHDOG_USEC alone (no manager to tell): the runner starts, serves
    // and stops as usual.
    let dir = scratch();
    let log = dir.path().join("runner.log");
    let mut r = Runner::start_env(
        &["--threads", "1", "--export", "mem:m,size=1M"],
        &[("WATCHDOG_USEC", "100000")],
        &log,
    );
    assert_healthy(&r.addr, "m");
    r.stop();
}

#[test]
fn a_manager_that_stops_reading_or_a_bad_notify_socket_cannot_stall_the_runner() {
    // A manager that binds NOTIFY_SOCKET and never reads: its queue (ten
    // datagrams by default) fills with pings within a second, and a
    // blocking send would then hold the supervisor, so the stop, for ever.
    let dir = scratch();
    let notify = dir.path().join("deaf.sock");
    let deaf = UnixDatagram::bind(&notify).expect("bind NOTIFY_SOCKET");
    let log = dir.path().join("runner.log");
    let mut r = Runner::start_env(
        &["--threads", "1", "--export", "mem:m,size=1M"],
        &[
            ("NOTIFY_SOCKET", path_str(&notify)),
            ("WATCHDOG_USEC", "40000"),
        ],
        &log,
    );
    // 20 ms pings: well past the queue's depth by now, and still serving.
    std::thread::sleep(Duration::from_millis(600));
    assert_healthy(&r.addr, "m");
    r.signal(libc::SIGTERM);
    let st = r.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "runner exit {st}");
    drop(deaf);

    // Nobody at the path, a path that is a regular file, an abstract name
    // nobody bound, a nonsense watchdog: each is ignored, and the runner
    // serves and stops as usual.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    for (socket, usec) in [
        (path_str(&dir.path().join("nobody.sock")), "100000"),
        (path_str(&file), "100000"),
        ("@nbd-runner-test-nobody", "100000"),
        (path_str(&notify), "soon"),
    ] {
        let mut r = Runner::start_env(
            &["--threads", "1", "--export", "mem:m,size=1M"],
            &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", usec)],
            &log,
        );
        assert_healthy(&r.addr, "m");
        r.stop();
    }
}

#[test]
fn a_config_file_sets_what_flags_do_and_flags_override_it() {
    // What the unit's /etc/nbd-runner/nbd-runner.toml does.
    let dir = scratch();
    let config = dir.path().join("nbd-runner.toml");
    std::fs::write(
        &config,
        "# settings are the long flags\nthreads = 1\nlist-exports = true\n\
         export = [\"mem:from-config,size=2M\"]\n",
    )
    .unwrap();
    let r = Runner::start_with(&[
        "--config",
        path_str(&config),
        "--threads",
        "2",
        "--export",
        "mem:from-flags,size=1M",
    ]);
    // Each shard's threads (executor and blocking pool) carry its name.
    let shards: std::collections::BTreeSet<String> = r
        .threads()
        .into_iter()
        .filter(|t| t.name.starts_with("nbd-shard"))
        .map(|t| t.name)
        .collect();
    assert_eq!(
        shards.len(),
        2,
        "--threads 2 overrides the file's 1: {shards:?}"
    );
    // list-exports from the file: NBD_OPT_LIST names both exports.
    let list = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", r.addr)],
    );
    assert!(
        list.contains("from-config") && list.contains("from-flags"),
        "{list}"
    );

    // A mistake: one line naming the file and the key, and no start.
    std::fs::write(&config, "threads = 2\niohots = \"::1\"\n").unwrap();
    let err = runner_refuses(&["--config", path_str(&config)]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(path_str(&config)) && err.contains("unknown setting \"iohots\""),
        "{err}"
    );
    let err = runner_refuses(&["--config", "/nonexistent/nbd-runner.toml"]);
    assert!(err.contains("No such file"), "{err}");

    // Hostile files: no end (read capped at 1 MiB), one byte too big, not
    // UTF-8, not TOML. Each is one line and no start.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "threads = [[[\n").unwrap();
    for (file, says) in [
        ("/dev/zero", "larger than 1048576 bytes"),
        (path_str(&big), "larger than 1048576 bytes"),
        (path_str(&binary), "UTF-8"),
        (path_str(&garbage), "line 1: unclosed array"),
    ] {
        let err = runner_refuses(&["--config", file]);
        assert_eq!(err.trim().lines().count(), 1, "{file}: {err}");
        assert!(err.contains(file) && err.contains(says), "{file}: {err}");
    }
}
