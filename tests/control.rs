//! nbd-cli against a running nbd-runner: create/list/info/stats/delete for
//! file and mem, persistence across kill -9, corrupt state files, bad
//! control frames, version mismatch, token refusal and an untrusted state
//! directory. (Kernel map/unmap
//! runs in the VM: tests/kernel.rs.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {e}: {s}"))
}

fn start_with_state(state: &str) -> Runner {
    Runner::start_with(&["--threads", "2", "--state-dir", state])
}

#[test]
fn create_list_info_stats_delete_for_file_and_mem() {
    let dir = scratch();
    let img = tmp_path(&dir, "a.raw");
    let img = path_str(&img);
    let r = Runner::start_with(&["--threads", "2"]);

    assert!(cli_ok(&r, &["list"]).contains("no backstores"));
    let out = cli_ok(&r, &["file", "create", img, "size", "1.5M"]);
    assert!(out.contains("created file"), "{out}");
    assert_eq!(std::fs::metadata(img).unwrap().len(), 1536 << 10);
    cli_ok(&r, &["mem", "create", "disk0", "--size", "64M"]);
    cli_fails(
        &r,
        &["mem", "create", "disk0", "size", "1M"],
        "already exists",
    );
    cli_fails(
        &r,
        &["file", "create", "rel.raw", "size", "1M"],
        "absolute path",
    );
    cli_fails(&r, &["mem", "create", "x", "size", "12Q"], "invalid size");
    // Without the feature the handler is missing; with it, the volume is.
    let want = if cfg!(feature = "gluster") {
        "no such volume"
    } else {
        "without the gluster handler"
    };
    cli_fails(&r, &["gluster", "create", "vol/x", "size", "1M"], want);

    let list = cli_ok(&r, &["list"]);
    assert!(
        list.contains("disk0") && list.contains(img) && list.contains("64 MiB"),
        "{list}"
    );
    let mem_only = json(&cli_ok(&r, &["mem", "list", "--json"]));
    assert_eq!(mem_only.as_array().unwrap().len(), 1);
    assert_eq!(mem_only[0]["key"], "disk0");
    assert_eq!(mem_only[0]["state"], "created");
    assert_eq!(
        json(&cli_ok(&r, &["list", "live", "--json"])),
        serde_json::json!([])
    );

    // A created backstore is served on the IO route at once.
    let mut c = negotiate(&r.addr, "disk0");
    assert_eq!(write_at(&mut c, 4096, &pattern(4096, 3)), 0);
    let info = json(&cli_ok(&r, &["info", "disk0", "--json"]));
    assert_eq!(info["size"], 64u64 << 20);
    let conns: u64 = info["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(conns, 1, "{info}");
    let human = cli_ok(&r, &["mem", "info", "disk0"]);
    assert!(
        human.contains("multi-conn") && human.contains("shard 0"),
        "{human}"
    );
    let stats = json(&cli_ok(&r, &["stats", "disk0", "--json"]));
    let write = stats["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == "write")
        .expect("write stats");
    assert_eq!(write["count"], 1);
    assert!(write["p99_us"].as_f64().unwrap() > 0.0);
    assert!(cli_ok(&r, &["stats", "disk0"]).contains("P99us"));

    cli_fails(&r, &["mem", "delete", "disk0"], "open NBD connection");
    drop(c);
    cli_fails(&r, &["file", "delete", "disk0"], "mem backstore");
    cli_ok(&r, &["mem", "delete", "disk0"]);
    cli_ok(&r, &["file", "delete", img]);
    assert!(
        !std::path::Path::new(img).exists(),
        "file we created was kept"
    );
    cli_fails(&r, &["info", "disk0"], "no backstore");
    cli_fails(&r, &["mem", "unmap", "/dev/nbd9"], "no backstore is mapped");
    assert!(cli_ok(&r, &["list"]).contains("no backstores"));
}

/// `delete` right after a client hangs up waits for the runner to see the
/// close instead of refusing (a CI flake once); a client still attached
/// keeps it refused, and the export keeps serving that client.
#[test]
fn delete_right_after_a_client_leaves_succeeds() {
    let r = Runner::start_with(&["--threads", "2"]);
    for i in 0..20 {
        let key = format!("churn{i}");
        cli_ok(&r, &["mem", "create", &key, "size", "1M"]);
        let mut c = negotiate(&r.addr, &key);
        assert_eq!(write_at(&mut c, 0, &pattern(4096, i)), 0);
        drop(c);
        cli_ok(&r, &["mem", "delete", &key]);
    }
    cli_ok(&r, &["mem", "create", "held", "size", "1M"]);
    let mut c = negotiate(&r.addr, "held");
    let started = std::time::Instant::now();
    cli_fails(&r, &["mem", "delete", "held"], "1 open NBD connection");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "refused without waiting"
    );
    // The refused delete put the export back: the client and new ones still reach it.
    assert_eq!(write_at(&mut c, 0, &pattern(4096, 9)), 0);
    assert_healthy(&r.addr, "held");
    drop(c);
    cli_ok(&r, &["mem", "delete", "held"]);
}

/// Backstores named like the grammar's keywords work end to end: the
/// seed's keywords count only after the KEY.
#[test]
fn backstores_named_like_keywords() {
    let r = Runner::start_with(&["--threads", "1"]);
    for key in ["size", "host", "json", "prealloc"] {
        cli_ok(&r, &["mem", "create", key, "size", "1M"]);
        let info = json(&cli_ok(&r, &["mem", "info", key, "--json"]));
        assert_eq!(
            (info["key"].as_str(), info["size"].as_u64()),
            (Some(key), Some(1 << 20))
        );
        assert_healthy(&r.addr, key);
    }
    // `host H` after the KEY still names the runner (here: the same one).
    cli_ok(&r, &["mem", "delete", "host", "host", &r.rpc]);
    for key in ["size", "json", "prealloc"] {
        cli_ok(&r, &["mem", "delete", key]);
    }
    assert!(cli_ok(&r, &["list"]).contains("no backstores"));
}

#[test]
fn kill_9_and_restart_brings_every_backstore_back() {
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    let state = path_str(&state);
    let img = tmp_path(&dir, "p.raw");
    let img = path_str(&img);
    let data = pattern(65536, 11);
    {
        let r = start_with_state(state);
        cli_ok(&r, &["file", "create", img, "size", "8M"]);
        for i in 0..5 {
            cli_ok(&r, &["mem", "create", &format!("m{i}"), "size", "1M"]);
        }
        let mut c = negotiate(&r.addr, img);
        assert_eq!(write_at(&mut c, 0, &data), 0);
        c.write_all(&request(CMD_FLUSH, 0, 9, 0, 0)).unwrap();
        assert_eq!(read_simple_reply(&mut c), Some((9, 0)));
        r.signal(libc::SIGKILL);
    }
    let doc = json(&std::fs::read_to_string(format!("{state}/saveconfig.json")).unwrap());
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["backstores"].as_array().unwrap().len(), 6);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(format!("{state}/saveconfig.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let r = start_with_state(state);
    let list = json(&cli_ok(&r, &["list", "all", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 6, "{list}");
    let mut c = negotiate(&r.addr, img);
    assert_eq!(
        read_at(&mut c, 0, 65536).unwrap(),
        data,
        "flushed data lost"
    );
    assert_healthy(&r.addr, "m3");
}

#[test]
fn corrupt_or_locked_state_stops_the_runner_with_a_clear_error() {
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    std::fs::create_dir(&state).unwrap();
    let file = state.join("saveconfig.json");
    let torn = "{\"schema\":1,\"backstores\":[{\"key\":\"m0\",\"hand";
    std::fs::write(&file, torn).unwrap();
    let refuse = || {
        runner_refuses(&[
            "--state-dir",
            path_str(&state),
            "--ioport",
            "0",
            "--rpcport",
            "0",
        ])
    };
    let err = refuse();
    assert!(
        err.contains(path_str(&file)) && err.contains("unreadable"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        torn,
        "state file was touched"
    );

    // Two runners on one state directory: the second refuses.
    std::fs::remove_file(&file).unwrap();
    let _first = start_with_state(path_str(&state));
    assert!(refuse().contains("in use by another nbd-runner"));
}

const VERSION: u16 = nbd_control::wire::PROTOCOL_VERSION;

fn hello(version: u16, token: &str) -> Vec<u8> {
    let mut h = b"NBDR".to_vec();
    h.extend_from_slice(&version.to_be_bytes());
    h.extend_from_slice(&(token.len() as u16).to_be_bytes());
    h.extend_from_slice(token.as_bytes());
    h
}

/// Status byte and message of the runner's hello reply.
fn hello_reply(s: &mut TcpStream) -> (u8, String) {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], b"NBDR");
    let len = u16::from_be_bytes([h[7], h[8]]) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).unwrap();
    (h[6], String::from_utf8(msg).unwrap())
}

#[test]
fn bad_frames_and_versions_are_answered_and_never_crash_the_runner() {
    let mut r = Runner::start_with(&["--threads", "1"]);
    let token = r.token();
    let connect = || {
        let s = TcpStream::connect(&r.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // Not our protocol at all.
    let mut s = connect();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed_by_peer(&mut s));
    // A future nbd-cli: refused with both versions named.
    let mut s = connect();
    s.write_all(&hello(99, "")).unwrap();
    let (status, msg) = hello_reply(&mut s);
    assert_eq!(status, 1);
    let speaks = format!("speaks {VERSION}");
    assert!(msg.contains("99") && msg.contains(&speaks), "{msg}");
    // A frame claiming 4 GiB: refused before any allocation.
    let mut s = connect();
    s.write_all(&hello(VERSION, &token)).unwrap();
    assert_eq!(hello_reply(&mut s).0, 0);
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(closed_by_peer(&mut s));
    // An undecodable frame gets an error and the connection stays usable.
    let mut s = connect();
    s.write_all(&hello(VERSION, &token)).unwrap();
    assert_eq!(hello_reply(&mut s).0, 0);
    s.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    assert!(String::from_utf8_lossy(&body).contains("undecodable"));
    // A client that connects and says nothing does not block others.
    let _silent = connect();
    r.assert_alive();
    cli_ok(&r, &["mem", "create", "ok", "size", "1M"]);
    assert!(cli_ok(&r, &["list"]).contains("ok"));
}

/// nbd-cli run as `nobody`, as any local user could.
fn as_nobody<S: AsRef<str>>(args: &[S]) -> std::process::Output {
    let mut full = vec!["-u", "nobody", "--", env!("CARGO_BIN_EXE_nbd-cli")];
    full.extend(args.iter().map(AsRef::as_ref));
    run("runuser", &full)
}

fn refused_one_line(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

#[test]
fn every_tcp_caller_needs_the_token_even_on_loopback_and_strangers_get_nothing() {
    let r = Runner::start_with(&["--threads", "1"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&r.token_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token file must be private");
    let cli = env!("CARGO_BIN_EXE_nbd-cli");
    let create = ["mem", "create", "evil", "size", "1M"];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![String::from("--host"), r.rpc.clone()];
        a.extend(extra.iter().chain(&create).map(|s| s.to_string()));
        a
    };
    // Loopback, no token (or only the machine's default one, which is not
    // this runner's): refused, and says how to get in.
    refused_one_line(&run(cli, &with(&[])), "access denied");
    // A wrong token.
    let dir = scratch();
    let wrong = tmp_path(&dir, "wrong");
    std::fs::write(&wrong, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    refused_one_line(
        &run(cli, &with(&["--token-file", path_str(&wrong)])),
        "access denied",
    );
    // A raw hello with an empty token.
    let mut s = TcpStream::connect(&r.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello(VERSION, "")).unwrap();
    assert_eq!(hello_reply(&mut s).0, 2, "empty token must be refused");
    // Any local user over TCP loopback: cannot read the token, is refused.
    refused_one_line(&as_nobody(&with(&[])), "access denied");
    let stolen = ["--token-file", path_str(&r.token_file)];
    refused_one_line(&as_nobody(&with(&stolen)), "token file");
    // ... and cannot reach the unix socket (0600 in a 0700 directory).
    let sock = r.token_file.with_file_name("nbd-runner.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let sock = path_str(&sock);
    let mut unix = vec!["--host", sock];
    unix.extend_from_slice(&create);
    refused_one_line(&as_nobody(&unix), "cannot reach nbd-runner");
    // Nothing was created by any of them.
    assert!(cli_ok(&r, &["list"]).contains("no backstores"));
    // The operator: the token over TCP, or the socket without one.
    cli_ok(&r, &["mem", "create", "ok", "size", "1M"]);
    run_ok(cli, &["--host", sock, "mem", "delete", "ok"]);
    // The local default token is never sent to another host.
    let out = run(cli, &["--host", "192.0.2.1", "list"]);
    refused_one_line(&out, "is another host");
}

#[test]
fn a_state_directory_others_can_write_is_refused_and_planted_links_write_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    std::fs::create_dir(&state).unwrap();
    let victim = tmp_path(&dir, "victim");
    std::fs::write(&victim, "keep").unwrap();
    // What another local user plants in a sticky, world-writable directory:
    // links at the names a runner writes, temp names included.
    for name in [
        "saveconfig.json.tmp.1",
        "saveconfig.json.tmp",
        "token",
        "saveconfig.lock",
    ] {
        std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let args = [
        "--state-dir",
        path_str(&state),
        "--ioport",
        "0",
        "--rpcport",
        "0",
    ];
    let err = runner_refuses(&args);
    assert!(err.contains("writable by group or others"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // Private again, a linked lock (or token) is still refused by name.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = runner_refuses(&args);
    assert!(err.contains("symbolic link"), "{err}");
    std::fs::remove_file(state.join("saveconfig.lock")).unwrap();
    let err = runner_refuses(&args);
    assert!(
        err.contains("token") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // Something that is not a socket where the socket goes: left alone.
    std::fs::remove_file(state.join("token")).unwrap();
    std::os::unix::fs::symlink(&victim, state.join("nbd-runner.sock")).unwrap();
    let err = runner_refuses(&args);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
}

#[test]
fn io_connections_dropping_under_a_mapped_backstore_make_it_dead() {
    use nbd_control::model::{Handler, State};
    use nbd_control::wire::{Request, Response};
    let r = Runner::start_with(&["--threads", "2"]);
    cli_ok(&r, &["mem", "create", "d0", "size", "1M"]);
    let mut c = r.control();
    // What nbd-cli map does, with raw sockets standing in for the kernel.
    let Response::Map(target) = c
        .call(&Request::MapBegin {
            handler: Handler::Mem,
            key: "d0".into(),
            shards: vec![],
        })
        .unwrap()
    else {
        panic!("no map target")
    };
    assert_eq!(target.reattach, None);
    let conns: Vec<_> = (0..2).map(|_| negotiate(&r.addr, "d0")).collect();
    c.call(&Request::MapDone {
        key: "d0".into(),
        device: "/dev/nbd7".into(),
        connections: 2,
    })
    .unwrap();
    let state = |c: &mut nbd_control::client::Client| match c
        .call(&Request::Info { key: "d0".into() })
        .unwrap()
    {
        Response::Backstore(b) => b.state,
        other => panic!("{other:?}"),
    };
    assert_eq!(state(&mut c), State::Mapped);
    cli_fails(&r, &["mem", "map", "d0"], "already mapped to /dev/nbd7");
    cli_fails(&r, &["mem", "delete", "d0"], "unmap it first");
    drop(conns);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while state(&mut c) != State::Dead {
        assert!(std::time::Instant::now() < deadline, "never marked dead");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cli_ok(&r, &["list", "dead"]).contains("/dev/nbd7"));
    // A reattach targets the same device with the same cookie.
    let Response::Map(again) = c
        .call(&Request::MapBegin {
            handler: Handler::Mem,
            key: "d0".into(),
            shards: vec![],
        })
        .unwrap()
    else {
        panic!("no map target")
    };
    assert_eq!(again.reattach.as_deref(), Some("/dev/nbd7"));
    assert_eq!(again.cookie, target.cookie);
}

#[test]
fn connections_spread_over_shards_despite_short_lived_probes() {
    let r = Runner::start_with(&["--threads", "2"]);
    cli_ok(&r, &["mem", "create", "p0", "size", "1M"]);
    let per_shard = || -> Vec<u64> {
        let info: serde_json::Value =
            serde_json::from_str(&cli_ok(&r, &["info", "p0", "--json"])).unwrap();
        info["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["connections"].as_u64().unwrap())
            .collect()
    };
    let settle = |total: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = per_shard();
            if now.iter().sum::<u64>() == total {
                return now;
            }
            assert!(std::time::Instant::now() < deadline, "stuck at {now:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A probe comes and goes before each long-lived connection, as fio does.
    let mut kept = Vec::new();
    for _ in 0..2 {
        drop(negotiate(&r.addr, "p0"));
        settle(kept.len() as u64);
        kept.push(negotiate(&r.addr, "p0"));
    }
    assert_eq!(
        settle(2),
        vec![1, 1],
        "both long-lived connections on one shard"
    );
}

/// Each shard's CPUs (`Cpus_allowed_list`), sorted: every thread of one
/// shard (its executor and its blocking pool) must agree.
fn shard_placement(r: &Runner) -> Vec<String> {
    let mut by_shard = std::collections::BTreeMap::<String, String>::new();
    for t in r
        .threads()
        .into_iter()
        .filter(|t| t.name.starts_with("nbd-shard"))
    {
        let cpus = by_shard.entry(t.name.clone()).or_insert(t.cpus.clone());
        assert_eq!(*cpus, t.cpus, "threads of {} disagree", t.name);
    }
    let mut v: Vec<String> = by_shard.into_values().collect();
    v.sort();
    v
}

#[test]
fn cpus_puts_the_shards_and_every_other_thread_on_the_listed_cpus() {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online < 2 {
        eprintln!("SKIP: one CPU, nothing to choose from");
        return;
    }
    // One shard per listed CPU; everything else on the list too.
    let r = Runner::start_with(&["--cpus", "1"]);
    cli_ok(&r, &["list"]);
    assert_eq!(shard_placement(&r), vec!["1"]);
    for t in r.threads() {
        assert_eq!(t.cpus, "1", "{t:?} left --cpus 1");
    }
    // --threads says how many: they take the list in order, round-robin.
    let r = Runner::start_with(&["--cpus", "0-1", "--threads", "3"]);
    cli_ok(&r, &["list"]);
    assert_eq!(shard_placement(&r), vec!["0", "0", "1"]);
    for t in r
        .threads()
        .iter()
        .filter(|t| !t.name.starts_with("nbd-shard"))
    {
        assert_eq!(t.cpus, "0-1", "{t:?} left --cpus 0-1");
    }
    // --no-pin: the shards float, over the listed CPUs only.
    let r = Runner::start_with(&["--cpus", "1", "--no-pin", "--threads", "2"]);
    cli_ok(&r, &["list"]);
    assert_eq!(shard_placement(&r), vec!["1", "1"]);
    // CPUs the runner cannot use, and lists that are no lists: refused
    // before anything starts, the reason on one line.
    let state = scratch();
    for (list, want) in [
        ("1000", "cannot use"),
        ("4096", "past the largest"),
        ("1-0", "runs backwards"),
        ("x", "not a CPU number"),
    ] {
        let err = runner_refuses(&[
            "--cpus",
            list,
            "--state-dir",
            path_str(state.path()),
            "--no-swap-safety",
            "--ioport",
            "0",
            "--rpcport",
            "0",
        ]);
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(want)).collect();
        assert_eq!(lines.len(), 1, "--cpus {list}: {err}");
        assert!(
            lines[0].contains("--cpus") || lines[0].contains("CPU"),
            "{err}"
        );
    }
    assert!(!state.path().join("saveconfig.json").exists());
}

#[test]
fn pinned_runners_keep_every_thread_on_the_shards_cpus_and_batch_scheduled() {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online < 2 {
        eprintln!("SKIP: one CPU, nothing to confine to");
        return;
    }
    let r = Runner::start_with(&["--threads", "1"]);
    // The control route starts threads of its own; touch it first.
    cli_ok(&r, &["list"]);
    let shard = r.shard_cpus();
    assert!(
        shard.parse::<usize>().is_ok(),
        "the shard is pinned to one CPU: {shard}"
    );
    let threads = r.threads();
    assert!(threads.len() > 3, "{threads:?}");
    for t in &threads {
        assert_eq!(t.cpus, shard, "{t:?} left the shard's CPU");
        assert_eq!(t.policy, 3, "{t:?} is not SCHED_BATCH");
    }
    // --sched normal: every thread SCHED_OTHER.
    let normal = Runner::start_with(&["--threads", "1", "--sched", "normal"]);
    for t in normal.threads() {
        assert_eq!(t.policy, 0, "{t:?} is not SCHED_OTHER with --sched normal");
    }

    // --no-pin leaves every thread free: as free as this test is.
    let all = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    let free = Runner::start_with(&["--threads", "1", "--no-pin"]);
    for t in free.threads() {
        assert_eq!(t.cpus, all, "{t:?} is confined without pinning");
    }
}

#[test]
fn startup_exports_are_listed_as_static_and_refuse_map_and_delete() {
    let r = Runner::start(&["mem:boot,size=1M"]);
    cli_ok(&r, &["mem", "create", "made", "size", "1M"]);
    let list = cli_ok(&r, &["list"]);
    let boot = list
        .lines()
        .find(|l| l.contains("boot"))
        .unwrap_or_else(|| panic!("no boot in {list}"));
    assert!(boot.contains("static"), "{list}");
    let info = json(&cli_ok(&r, &["info", "boot", "--json"]));
    assert_eq!(info["state"], "static", "{info}");
    assert_eq!(info["size"], 1 << 20, "{info}");
    // Traffic shows up in stats like any backstore's.
    qemu_io(&r.uri("boot"), &["write -P 7 0 64k"], 0);
    let stats = cli_ok(&r, &["stats", "boot"]);
    assert!(stats.contains("write"), "{stats}");
    cli_fails(&r, &["mem", "map", "boot"], "--export");
    cli_fails(&r, &["mem", "delete", "boot"], "--export");
    cli_fails(&r, &["mem", "create", "boot", "size", "1M"], "--export");
    // Filters: a static export has no device.
    assert!(cli_ok(&r, &["list", "unmap"]).contains("boot"));
    assert!(!cli_ok(&r, &["list", "map"]).contains("boot"));
    assert_healthy(&r.addr, "boot");
}

/// A block device on this machine (an unattached loop device will do).
fn some_block_device() -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir("/dev")
        .ok()?
        .flatten()
        .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        .map(|e| e.path().to_string_lossy().into_owned())
}

#[test]
fn control_clients_cannot_reach_host_files_devices_or_memory_beyond_their_bounds() {
    let root = scratch();
    let rootp = path_str(root.path());
    let outside = scratch();
    let secret = tmp_path(&outside, "secret");
    std::fs::write(&secret, vec![b's'; 692]).unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("dirlink")).unwrap();
    let mut r = Runner::start_with(&[
        "--threads",
        "1",
        "--file-root",
        rootp,
        "--file-root",
        "/dev",
        "--mem-limit",
        "64M",
        "--export",
        "mem:other,size=16M",
    ]);
    let escape = format!("{rootp}/../x");
    let link = format!("{rootp}/link");
    let via_dir = format!("{rootp}/dirlink/secret");
    let secret_s = path_str(&secret).to_owned();
    let mut cases: Vec<(String, &str)> = vec![
        ("/etc/shadow".into(), "not beneath a file root"),
        (secret_s.clone(), "not beneath a file root"),
        (escape, "'..'"),
        (link, "symbolic link"),
        (via_dir, "symbolic link"),
    ];
    let dev = some_block_device();
    if let Some(d) = &dev {
        cases.push((d.clone(), "--allow-block-devices"));
    } else {
        eprintln!("no block device on this machine: the block-device case is not run");
    }
    for (key, want) in &cases {
        for size in ["1", "692", "1M"] {
            let out = cli(&r, &["file", "create", key, "size", size]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{key} created");
            assert_eq!(err.trim_end().lines().count(), 1, "{key}: {err}");
            assert!(err.contains(want), "{key}: {err:?} lacks {want:?}");
            assert!(
                !err.contains("692") || size == "692",
                "{key}: size leaked: {err}"
            );
            assert!(
                !err.contains("exists with size"),
                "{key}: size leaked: {err}"
            );
        }
    }
    assert_eq!(std::fs::read(&secret).unwrap(), vec![b's'; 692]);
    assert!(!outside.path().join("x").exists());
    // Host files and hosts through ceph/gluster options: refused, naming
    // the flag, whether or not this build has the handler.
    for (h, key, opt) in [
        ("ceph", "rbd/x", "conf=/etc/shadow"),
        ("ceph", "rbd/x", "keyring=/root/.ssh/id_rsa"),
        ("gluster", "vol/x", "server=203.0.113.9:24007"),
    ] {
        let args = [h, "create", key, "size", "1M", "option", opt];
        cli_fails(&r, &args, "--allow-backstore-options");
    }
    // Memory: 1P and 1E are one line each, and nothing else suffers.
    for size in ["1P", "1E", "49M"] {
        cli_fails(
            &r,
            &["mem", "create", "huge", "size", size],
            "--mem-limit is 64 MiB",
        );
    }
    cli_ok(&r, &["mem", "create", "fits", "size", "48M"]);
    r.assert_alive();
    assert_healthy(&r.addr, "other");
    assert_healthy(&r.addr, "fits");
    cli_ok(&r, &["mem", "delete", "fits"]);
    cli_ok(&r, &["mem", "create", "fits-again", "size", "48M"]);
    // Inside the root everything works as before.
    let ok = format!("{rootp}/disk.raw");
    cli_ok(&r, &["file", "create", &ok, "size", "1M"]);
    assert_healthy(&r.addr, &ok);
    cli_ok(&r, &["file", "delete", &ok]);
    assert!(!root.path().join("disk.raw").exists());
}

#[test]
fn allow_block_devices_lets_the_operator_hand_devices_to_control_clients() {
    let Some(dev) = some_block_device() else {
        eprintln!("no block device on this machine: skipped");
        return;
    };
    let r = Runner::start_with(&["--threads", "1", "--allow-block-devices"]);
    // Outside every root, yet a block device: no longer refused for what it
    // is (an unattached loop device then fails on its size, 0).
    let out = cli(&r, &["file", "create", &dev, "size", "1M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("--allow-block-devices"), "{err}");
    assert!(!err.contains("not beneath a file root"), "{err}");
    // A regular file outside the roots is still refused.
    cli_fails(
        &r,
        &["file", "create", "/etc/hostname", "size", "1M"],
        "not beneath a file root",
    );
}

/// `map ... shards LIST` up to the kernel, with this test standing in for
/// it: nbd-cli's own connection code places each connection on its listed
/// shard, over TCP and over the unix socket; `info` names each one's shard
/// and that shard's thread, whose CPUs /proc confirms; a reattach places
/// them the same way, and so does one after a runner restart.
#[test]
fn map_shards_puts_each_connection_on_its_shard_and_a_reattach_keeps_them_there() {
    use nbd_cli::cli_args::IoRoute;
    use nbd_cli::map::{io_connections, MapOptions};
    use nbd_control::model::{Handler, LinkInfo, State};
    use nbd_control::wire::{Request, Response};
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    let img = tmp_path(&dir, "d0.raw");
    let key = path_str(&img).to_owned();
    // Two shards; with two CPUs, listed backwards: shard i runs on the
    // i-th listed CPU.
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let cpus: &[&str] = if two_cpus {
        &["--cpus", "1,0"]
    } else {
        &["--threads", "2"]
    };
    let start = || {
        let mut args = vec!["--state-dir", path_str(&state)];
        args.extend_from_slice(cpus);
        Runner::start_with(&args)
    };
    let mut r = start();
    cli_ok(&r, &["file", "create", &key, "size", "1M"]);
    // A shard the runner does not have, or no list: one line, nothing changes.
    cli_fails(
        &r,
        &["file", "map", &key, "shards", "0,2"],
        "shard 2 does not exist: the runner has 2 (0-1)",
    );
    cli_fails(
        &r,
        &["file", "map", &key, "shards", "x"],
        "not a shard index",
    );
    assert!(cli_ok(&r, &["info", &key]).contains("created"));

    let info = |c: &mut nbd_control::client::Client| match c
        .call(&Request::Info { key: key.clone() })
        .unwrap()
    {
        Response::Backstore(b) => b,
        other => panic!("{other:?}"),
    };
    // Each link on the shard asked for, and that shard's thread on the CPUs
    // the runner reports (read back from /proc).
    let check = |r: &Runner, links: &[LinkInfo], want: &[u32]| {
        let shards: Vec<u32> = links.iter().map(|l| l.shard).collect();
        assert_eq!(shards, want, "{links:?}");
        for l in links {
            let task = format!("/proc/{}/task/{}", r.pid(), l.thread);
            let comm = std::fs::read_to_string(format!("{task}/comm")).unwrap();
            assert!(comm.starts_with("nbd-shard"), "{l:?} runs on {comm}");
            let status = std::fs::read_to_string(format!("{task}/status")).unwrap();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim();
            assert_eq!(cpus, l.cpus, "{l:?}");
        }
        if two_cpus {
            for l in links {
                assert_eq!(l.cpus, if l.shard == 0 { "1" } else { "0" }, "{l:?}");
            }
        }
        let threads: std::collections::BTreeSet<i32> = links.iter().map(|l| l.thread).collect();
        let distinct: std::collections::BTreeSet<u32> = want.iter().copied().collect();
        assert_eq!(
            threads.len(),
            distinct.len(),
            "one thread per shard: {links:?}"
        );
    };
    let connect =
        |r: &Runner, c: &mut nbd_control::client::Client, shards: &[Option<u32>], route| {
            let Response::Map(target) = c
                .call(&Request::MapBegin {
                    handler: Handler::File,
                    key: key.clone(),
                    shards: shards.to_vec(),
                })
                .unwrap()
            else {
                panic!("no map target")
            };
            let opts = MapOptions {
                device: None,
                timeout: None,
                readonly: false,
                connections: None,
                shards: shards.to_vec(),
                route,
                tls: None,
            };
            let count = target.placement.len().max(1);
            let (socks, _) = io_connections(c, &target, count, &opts)
                .unwrap_or_else(|e| panic!("{route:?}: {e:#}"));
            let _ = r;
            (target, socks)
        };
    let mut c = r.control();
    for (route, ask) in [
        (IoRoute::Tcp, vec![Some(1), Some(0), Some(1)]),
        (IoRoute::Unix, vec![Some(1), Some(1), Some(0)]),
    ] {
        let (_, socks) = connect(&r, &mut c, &ask, route);
        c.call(&Request::MapDone {
            key: key.clone(),
            device: "/dev/nbd7".into(),
            connections: 3,
        })
        .unwrap();
        let b = info(&mut c);
        let want: Vec<u32> = ask.iter().map(|s| s.unwrap()).collect();
        check(&r, &b.links, &want);
        assert_eq!(b.placement, ask);
        let peer = if route == IoRoute::Unix {
            "unix:"
        } else {
            "127.0.0.1:"
        };
        assert!(
            b.links.iter().all(|l| l.peer.starts_with(peer)),
            "{route:?}: {b:?}"
        );
        // The operator's view.
        let shown = cli_ok(&r, &["info", &key]);
        assert!(
            shown.contains(&format!(
                "shards       {}",
                want.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            "{shown}"
        );
        assert!(shown.contains("link 2       shard "), "{shown}");
        // The connections die: dead; the reattach (no list: the saved one)
        // places them as before.
        drop(socks);
        while info(&mut c).state != State::Dead {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (target, socks) = connect(&r, &mut c, &[], route);
        assert_eq!(target.placement, ask);
        assert_eq!(target.reattach.as_deref(), Some("/dev/nbd7"));
        c.call(&Request::MapDone {
            key: key.clone(),
            device: "/dev/nbd7".into(),
            connections: 3,
        })
        .unwrap();
        check(&r, &info(&mut c).links, &want);
        drop(socks);
        while info(&mut c).state != State::Dead {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A restarted runner still knows where the device's connections go.
    drop(c);
    r.stop();
    let r = start();
    let mut c = r.control();
    let (target, _socks) = connect(&r, &mut c, &[], IoRoute::Unix);
    assert_eq!(target.placement, [Some(1), Some(1), Some(0)]);
    c.call(&Request::MapDone {
        key: key.clone(),
        device: "/dev/nbd7".into(),
        connections: 3,
    })
    .unwrap();
    check(&r, &info(&mut c).links, &[1, 1, 0]);
}
