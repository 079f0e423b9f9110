//! The ceph handler against a real Ceph cluster on loopback (started by
//! tests/ceph/start-ceph.sh; tests/run.sh does it and exports
//! NBD_TEST_CEPH_CONF). Real clients (qemu-io, nbdcopy, nbdinfo, fio,
//! libnbd) drive the IO route and `rbd` reads the image behind our back.
//!
//! Without NBD_TEST_CEPH_CONF these tests skip with a message. With it set,
//! a broken cluster fails them.

mod common;

use common::*;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// The cluster's ceph.conf, or None (skip) when no cluster was provided.
fn ceph_conf() -> Option<String> {
    match std::env::var("NBD_TEST_CEPH_CONF") {
        Ok(c) if !c.is_empty() => {
            assert!(
                std::path::Path::new(&c).exists(),
                "NBD_TEST_CEPH_CONF={c} does not exist: the cluster is expected but missing"
            );
            Some(c)
        }
        _ => {
            eprintln!(
                "SKIP: NBD_TEST_CEPH_CONF is not set (tests/run.sh starts a cluster with \
                 tests/ceph/start-ceph.sh and sets it)"
            );
            None
        }
    }
}

/// A fresh image name in pool `rbd`, unique per test and process.
fn image(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "rbd/t{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn runner(conf: &str, extra: &[&str]) -> Runner {
    let mut args = vec!["--threads", "2", "--ceph-conf", conf];
    args.extend_from_slice(extra);
    Runner::start_with(&args)
}

fn rbd(conf: &str, args: &[&str]) -> Output {
    let mut full = vec!["-c", conf];
    full.extend_from_slice(args);
    run("rbd", &full)
}

/// The whole image as `rbd export` (a separate librbd client) sees it.
fn rbd_export(conf: &str, key: &str, dir: &tempfile::TempDir) -> Vec<u8> {
    let out = tmp_path(dir, "rbd-export.raw");
    let _ = std::fs::remove_file(&out);
    let o = rbd(conf, &["export", "--no-progress", key, path_str(&out)]);
    assert!(
        o.status.success(),
        "rbd export {key}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&out).unwrap()
}

fn sha256(data: &[u8], dir: &tempfile::TempDir) -> String {
    let p = tmp_path(dir, "sum.raw");
    write_file(&p, data);
    run_ok("sha256sum", &[path_str(&p)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {e}: {s}"))
}

fn nbdinfo(uri: &str) -> serde_json::Value {
    json(&run_ok("nbdinfo", &["--json", uri]))["exports"][0].clone()
}

#[test]
fn create_and_serve_with_qemu_io_nbdinfo_and_libnbd() {
    let Some(conf) = ceph_conf() else { return };
    let r = runner(&conf, &[]);
    let key = image("io");
    let out = cli_ok(&r, &["ceph", "create", &key, "size", "64M"]);
    assert!(out.contains("created ceph"), "{out}");
    let info = json(&cli_ok(&r, &["info", &key, "--json"]));
    assert_eq!(info["size"], 64u64 << 20);
    assert!(
        info["mode"].as_str().unwrap().contains("one image handle"),
        "{info}"
    );
    let uri = r.uri(&key);

    let e = nbdinfo(&uri);
    assert_eq!(e["export-size"], 64u64 << 20);
    for (k, want) in [
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_multi_conn", true),
        ("is_read_only", false),
    ] {
        assert_eq!(e[k], want, "{k} in {e}");
    }
    // A fresh image is one big hole.
    assert_eq!(hole_bytes(&uri), 64 << 20);

    let script = [
        "write -P 0xab 0 2M",
        "read -P 0xab 0 2M",
        "write -P 0xcd -f 3M 64k", // FUA
        "read -P 0xcd 3M 64k",
        "discard 8M 4M",
        "write -z 1M 512k",       // WRITE_ZEROES, NO_HOLE (thick)
        "write -z -u 1536k 512k", // WRITE_ZEROES, may deallocate
        "read -P 0 1M 1M",
        "read -P 0xab 0 1M",
        "write -P 0x5a 5000 3000", // unaligned
        "read -P 0x5a 5000 3000",
        "write -z 6000 1000", // unaligned zeroes (rbd discard would skip these)
        "read -P 0 6000 1000",
        "read -P 0x5a 7000 1000",
        "write -P 0x77 63M 1M", // the last MiB
        "read -P 0x77 63M 1M",
        "flush",
    ];
    qemu_io(&uri, &script, 8);

    // Beyond the end: EINVAL for reads, ENOSPC for writes, connection intact.
    let mut c = negotiate(&r.addr, &key);
    assert_eq!(read_at(&mut c, 64 << 20, 512), Err(EINVAL));
    assert_eq!(write_at(&mut c, (64 << 20) - 256, &[1; 512]), ENOSPC);
    assert_eq!(read_at(&mut c, 63 << 20, 4).unwrap(), [0x77; 4]);

    // Block status in whole 4 MiB objects: the first is data, the third
    // (discarded, never written) a hole.
    let map = json(&run_ok("nbdinfo", &["--map", "--json", &uri]));
    let first = &map.as_array().unwrap()[0];
    assert_eq!(first["offset"], 0, "{map}");
    assert_eq!(first["type"], 0, "{map}");
    assert!(hole_bytes(&uri) >= 4 << 20, "{map}");
    // 64 requests in flight, multi-conn + flush across connections.
    for script in [
        include_str!("py/in_flight.py"),
        include_str!("py/multi_conn.py"),
    ] {
        assert_eq!(python(script, &[&uri]).trim(), "ok");
    }
    drop(c);
    delete_when_idle(&r, &key);
}

/// Deletes a backstore whose clients have just hung up: the runner waits
/// for their connections to close instead of refusing.
fn delete_when_idle(r: &Runner, key: &str) {
    cli_ok(r, &["ceph", "delete", key]);
}

#[test]
fn nbdcopy_round_trip_is_sparse_and_rbd_export_reads_the_same_bytes() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let r = runner(&conf, &[]);
    let key = image("copy");
    cli_ok(&r, &["ceph", "create", &key, "size", "16M"]);
    let uri = r.uri(&key);
    // Whole 4 MiB objects of zeroes at [4M,8M) and [12M,16M).
    let mut data = pattern(16 * MIB, 7);
    data[4 * MIB..8 * MIB].fill(0);
    data[12 * MIB..].fill(0);
    let src = tmp_path(&dir, "src.raw");
    write_file(&src, &data);
    run_ok(
        "nbdcopy",
        &["--connections=4", "--requests=32", path_str(&src), &uri],
    );
    let back = tmp_path(&dir, "back.raw");
    run_ok("nbdcopy", &[&uri, path_str(&back)]);
    let want = sha256(&data, &dir);
    assert_eq!(
        sha256(&std::fs::read(&back).unwrap(), &dir),
        want,
        "nbdcopy round trip differs"
    );
    // The zero objects were never allocated, so sparse copies skip them.
    let holes = hole_bytes(&uri);
    assert!(holes >= 8 << 20, "only {holes} bytes of holes");
    // Another librbd client reads exactly what went through nbd-runner.
    assert_eq!(
        sha256(&rbd_export(&conf, &key, &dir), &dir),
        want,
        "rbd export differs"
    );
    delete_when_idle(&r, &key);
}

#[test]
fn fio_verify_through_the_ceph_export() {
    let Some(conf) = ceph_conf() else { return };
    let r = runner(&conf, &[]);
    let key = image("fio");
    cli_ok(&r, &["ceph", "create", &key, "size", "16M"]);
    fio_verify(&r.uri(&key));
    delete_when_idle(&r, &key);
}

#[test]
fn fua_and_flush_make_writes_visible_to_other_librbd_clients() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let r = runner(&conf, &[]);
    let key = image("fua");
    cli_ok(&r, &["ceph", "create", &key, "size", "8M"]);
    let mut c = negotiate(&r.addr, &key);
    // FUA write: durable (so visible to `rbd export`) when acknowledged.
    let a = pattern(65536, 3);
    assert_eq!(call(&mut c, CMD_WRITE, FLAG_FUA, 0, &a), 0);
    assert_eq!(&rbd_export(&conf, &key, &dir)[..65536], &a[..]);
    // Plain write on another connection, then FLUSH on this one.
    let b = pattern(65536, 4);
    let mut other = negotiate(&r.addr, &key);
    assert_eq!(write_at(&mut other, 1 << 20, &b), 0);
    assert_eq!(call(&mut c, CMD_FLUSH, 0, 0, &[]), 0);
    assert_eq!(
        &rbd_export(&conf, &key, &dir)[1 << 20..(1 << 20) + 65536],
        &b[..]
    );
    drop((c, other));
    delete_when_idle(&r, &key);
}

/// Sends one request (with its payload) and returns the reply's error.
fn call(c: &mut std::net::TcpStream, kind: u16, flags: u16, offset: u64, data: &[u8]) -> u32 {
    use std::io::Write;
    let mut msg = request(kind, flags, 42, offset, data.len() as u32);
    msg.extend_from_slice(data);
    c.write_all(&msg).unwrap();
    let (cookie, err) = read_simple_reply(c).expect("no reply");
    assert_eq!(cookie, 42);
    err
}

const FLAG_FUA: u16 = 1;

#[test]
fn resize_reaches_connected_and_new_clients_and_shrink_needs_a_flag() {
    let Some(conf) = ceph_conf() else { return };
    let r = runner(&conf, &[]);
    let key = image("resize");
    cli_ok(&r, &["ceph", "create", &key, "size", "16M"]);
    // Connected before the resize, like the kernel's sockets.
    let mut before = negotiate(&r.addr, &key);
    assert_eq!(write_at(&mut before, 20 << 20, &[9; 4096]), ENOSPC);

    let out = cli_ok(&r, &["ceph", "resize", &key, "size", "32M"]);
    assert!(out.contains("resized") && out.contains("32 MiB"), "{out}");
    // The connection that negotiated 16 MiB now reaches the new range (what
    // the kernel does after NBD_CMD_RECONFIGURE carries the new size).
    assert_eq!(write_at(&mut before, 20 << 20, &[9; 4096]), 0);
    assert_eq!(read_at(&mut before, 20 << 20, 4096).unwrap(), [9; 4096]);
    // New clients see the new size; so do nbd-cli and librbd.
    assert_eq!(nbdinfo(&r.uri(&key))["export-size"], 32u64 << 20);
    assert_eq!(
        json(&cli_ok(&r, &["info", &key, "--json"]))["size"],
        32u64 << 20
    );
    let rbd_info =
        json(&String::from_utf8(rbd(&conf, &["info", "--format=json", &key]).stdout).unwrap());
    assert_eq!(rbd_info["size"], 32u64 << 20);

    // Shrinking discards data: refused without allow-shrink.
    cli_fails(&r, &["ceph", "resize", &key, "size", "8M"], "allow-shrink");
    cli_ok(&r, &["ceph", "resize", &key, "size", "8M", "allow-shrink"]);
    assert_eq!(read_at(&mut before, 12 << 20, 512), Err(EINVAL));
    assert_eq!(write_at(&mut before, 12 << 20, &[1; 512]), ENOSPC);
    assert_eq!(write_at(&mut before, 4 << 20, &[1; 512]), 0);
    cli_fails(
        &r,
        &["file", "resize", &key, "size", "64M"],
        "is a ceph backstore",
    );
    drop(before);
    delete_when_idle(&r, &key);
}

#[test]
fn delete_is_refused_while_mapped_or_connected_and_removes_the_image() {
    use nbd_control::model::Handler;
    use nbd_control::wire::{Request, Response};
    let Some(conf) = ceph_conf() else { return };
    let r = runner(&conf, &[]);
    let key = image("del");
    cli_ok(&r, &["ceph", "create", &key, "size", "4M"]);
    let image_listed = || {
        let name = key.split('/').nth(1).unwrap();
        String::from_utf8(rbd(&conf, &["ls", "rbd"]).stdout)
            .unwrap()
            .lines()
            .any(|l| l == name)
    };
    assert!(image_listed());
    // What nbd-cli map does, with a raw socket standing in for the kernel.
    let mut c = r.control();
    let Response::Map(_) = c
        .call(&Request::MapBegin {
            handler: Handler::Ceph,
            key: key.clone(),
            shards: vec![],
        })
        .unwrap()
    else {
        panic!("no map target")
    };
    let sock = negotiate(&r.addr, &key);
    c.call(&Request::MapDone {
        key: key.clone(),
        device: "/dev/nbd5".into(),
        connections: 1,
    })
    .unwrap();
    cli_fails(&r, &["ceph", "delete", &key], "unmap it first");
    c.call(&Request::UnmapBegin {
        handler: Handler::Ceph,
        target: key.clone(),
    })
    .unwrap();
    c.call(&Request::UnmapDone { key: key.clone() }).unwrap();
    cli_fails(&r, &["ceph", "delete", &key], "open NBD connection");
    drop(sock);
    delete_when_idle(&r, &key);
    assert!(!image_listed(), "rbd image survived delete");
}

#[test]
fn restart_brings_the_ceph_backstore_back_with_its_data() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    let state = path_str(&state).to_owned();
    let key = image("persist");
    let data = pattern(1 << 20, 21);
    {
        let r = runner(&conf, &["--state-dir", &state]);
        cli_ok(&r, &["ceph", "create", &key, "size", "8M"]);
        let mut c = negotiate(&r.addr, &key);
        assert_eq!(write_at(&mut c, 3 << 20, &data), 0);
        assert_eq!(call(&mut c, CMD_FLUSH, 0, 0, &[]), 0);
        r.signal(libc::SIGKILL);
    }
    let saved = std::fs::read_to_string(format!("{state}/saveconfig.json")).unwrap();
    assert!(!saved.contains("AQ"), "a key leaked into saveconfig.json");
    let r = runner(&conf, &["--state-dir", &state]);
    let info = json(&cli_ok(&r, &["info", &key, "--json"]));
    assert_eq!(info["state"], "created", "{info}");
    assert!(info["error"].is_null(), "{info}");
    let mut c = negotiate(&r.addr, &key);
    assert_eq!(read_at(&mut c, 3 << 20, 1 << 20).unwrap(), data);
    drop(c);
    delete_when_idle(&r, &key);
}

#[test]
fn cluster_errors_are_clear_and_other_backstores_keep_serving() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let state = tmp_path(&dir, "state");
    let state = path_str(&state).to_owned();
    // conf= below names another cluster: an operator's allowance.
    let r = runner(
        &conf,
        &[
            "--state-dir",
            &state,
            "--export",
            "mem:side,size=1M",
            "--allow-backstore-options",
        ],
    );
    cli_fails(
        &r,
        &["ceph", "create", "nopool/x", "size", "1M"],
        "no such pool",
    );
    cli_fails(
        &r,
        &["ceph", "create", "rbd/a/b/c", "size", "1M"],
        "POOL/IMAGE",
    );
    // A cluster nobody answers for: a mon address on a closed port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = tmp_path(&dir, "dead.conf");
    std::fs::write(
        &dead,
        format!("[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n"),
    )
    .unwrap();
    let conf_opt = format!("conf={}", path_str(&dead));
    let started = Instant::now();
    let create = std::thread::scope(|s| {
        let t = s.spawn(|| {
            cli(
                &r,
                &[
                    "ceph",
                    "create",
                    "rbd/unreachable",
                    "size",
                    "1M",
                    "option",
                    &conf_opt,
                    "option",
                    "mount_timeout=3",
                ],
            )
        });
        // The IO route keeps serving while the control plane waits, and so
        // does the control route: the slow create holds no lock. (Holding
        // it, at most one list could finish before the create does.)
        let mut answered_meanwhile = 0;
        while !t.is_finished() {
            assert_healthy(&r.addr, "side");
            let list = cli(&r, &["list"]);
            assert!(list.status.success());
            answered_meanwhile += usize::from(!t.is_finished());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            answered_meanwhile >= 3,
            "only {answered_meanwhile} lists during the create"
        );
        t.join().unwrap()
    });
    let err = String::from_utf8_lossy(&create.stderr);
    assert!(!create.status.success());
    assert!(err.contains("no monitor answered"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // An open image cannot be removed behind the runner's back...
    let key = image("gone");
    cli_ok(&r, &["ceph", "create", &key, "size", "1M"]);
    let o = rbd(&conf, &["rm", "--no-progress", &key]);
    assert!(
        !o.status.success(),
        "rbd rm of an image nbd-runner holds open"
    );
    drop(r);
    // ...but one that vanished while the runner was down (renamed here: a
    // killed client's watch blocks `rbd rm` for 30 s) comes back as an
    // error naming it, and the runner serves everything else.
    let o = rbd(&conf, &["mv", &key, &format!("{key}-moved")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = runner(
        &conf,
        &["--state-dir", &state, "--export", "mem:side,size=1M"],
    );
    let info = json(&cli_ok(&r, &["info", &key, "--json"]));
    let err = info["error"].as_str().unwrap_or_default();
    assert!(err.contains("no such image"), "{info}");
    assert_healthy(&r.addr, "side");
    cli_fails(&r, &["ceph", "map", &key], "no such image");
    cli_ok(&r, &["ceph", "delete", &key]);
}

#[test]
fn clients_vanishing_with_reads_and_writes_in_flight_hurt_nobody() {
    use std::io::Write;
    let Some(conf) = ceph_conf() else { return };
    let mut r = runner(&conf, &[]);
    let key = image("vanish");
    cli_ok(&r, &["ceph", "create", &key, "size", "64M"]);
    let payload = pattern(1 << 20, 5);
    for round in 0..10u64 {
        let mut c = negotiate(&r.addr, &key);
        let mut burst = Vec::new();
        for i in 0..16u64 {
            let offset = ((round * 16 + i) % 60) << 20;
            burst.extend(request(CMD_READ, 0, i, offset, 1 << 20));
            burst.extend(request(CMD_WRITE, 0, 100 + i, offset, 1 << 20));
            burst.extend_from_slice(&payload);
        }
        c.write_all(&burst).unwrap();
        // Gone before librbd has answered: its buffers must outlive us.
        drop(c);
    }
    r.assert_alive();
    let mut c = negotiate(&r.addr, &key);
    assert_eq!(write_at(&mut c, 0, &payload[..4096]), 0);
    assert_eq!(read_at(&mut c, 0, 4096).unwrap(), &payload[..4096]);
    drop(c);
    delete_when_idle(&r, &key);
}

#[test]
fn librados_threads_run_on_the_shards_cpus() {
    let Some(conf) = ceph_conf() else { return };
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("SKIP: one CPU, nothing to confine to");
        return;
    }
    let r = Runner::start_with(&["--threads", "1", "--ceph-conf", &conf]);
    let key = image("affinity");
    cli_ok(&r, &["ceph", "create", &key, "size", "16M"]);
    let shard = r.shard_cpus();
    // librados' messenger and librbd's completion threads carry the IO;
    // they must share the shard's CPU, not float over the machine.
    let threads = r.threads();
    let ceph: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with("msgr-worker") || t.name.starts_with("io_context"))
        .collect();
    assert!(!ceph.is_empty(), "no librados threads: {threads:?}");
    for t in ceph {
        assert_eq!(t.cpus, shard, "{t:?} is not on the shard's CPU");
    }
    delete_when_idle(&r, &key);
}

#[test]
fn cephx_failures_are_clear_and_other_backstores_keep_serving() {
    let Some(conf) = ceph_conf() else { return };
    if !std::fs::read_to_string(&conf)
        .unwrap()
        .contains("auth client required = cephx")
    {
        eprintln!("SKIP: the test cluster runs without cephx (tests/run.sh starts it with cephx)");
        return;
    }
    let dir = scratch();
    let r = runner(
        &conf,
        &["--export", "mem:side,size=1M", "--allow-backstore-options"],
    );
    let key = image("auth");
    let keyring = |name: &str, entity: &str| {
        let secret = run_ok("ceph-authtool", &["--gen-print-key"]);
        let path = tmp_path(&dir, name);
        write_file(
            &path,
            format!("[{entity}]\n\tkey = {}\n", secret.trim()).as_bytes(),
        );
        format!("keyring={}", path_str(&path))
    };
    // The right id with the wrong secret, and an id the cluster never heard of.
    let wrong_secret = keyring("wrong.keyring", "client.admin");
    let stranger = keyring("stranger.keyring", "client.stranger");
    for opts in [
        vec!["option", &wrong_secret],
        vec!["option", "id=stranger", "option", &stranger],
    ] {
        let mut args = vec!["ceph", "create", &key, "size", "1M"];
        args.extend(opts);
        cli_fails(
            &r,
            &args,
            "authentication failed; check the client id and its keyring",
        );
        assert_healthy(&r.addr, "side");
    }
    // A real user whose caps stop short of the pool: refused by the OSD.
    let weak = tmp_path(&dir, "weak.keyring");
    let o = run(
        "ceph",
        &[
            "-c",
            &conf,
            "auth",
            "get-or-create",
            "client.nbd-weak",
            "mon",
            "allow r",
            "-o",
            path_str(&weak),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weak_opt = format!("keyring={}", path_str(&weak));
    cli_fails(
        &r,
        &[
            "ceph",
            "create",
            &key,
            "size",
            "1M",
            "option",
            "id=nbd-weak",
            "option",
            &weak_opt,
        ],
        "caps do not allow this",
    );
    assert_healthy(&r.addr, "side");
    // Nothing half-made was left behind, and the admin still gets through.
    let list = cli_ok(&r, &["list"]);
    assert!(!list.contains(&key), "{list}");
    cli_ok(&r, &["ceph", "create", &key, "size", "1M"]);
    delete_when_idle(&r, &key);
    let _ = run("ceph", &["-c", &conf, "auth", "rm", "client.nbd-weak"]);
}

/// A throw-away cluster of its own (mon + memstore OSD, no mgr) for tests
/// that stop its daemons; stopped and removed on drop.
struct OwnCluster {
    dir: tempfile::TempDir,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let dir = scratch();
        let o = std::process::Command::new("bash")
            .arg(scripts().join("start-ceph.sh"))
            .arg(dir.path().join("c"))
            .env("CEPH_WITH_MGR", "0")
            .env("CEPH_OSD_BYTES", (512u64 << 20).to_string())
            .output()
            .expect("run start-ceph.sh");
        assert!(
            o.status.success(),
            "start-ceph.sh: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        OwnCluster { dir }
    }

    fn conf(&self) -> String {
        path_str(&self.dir.path().join("c/ceph.conf")).to_owned()
    }

    fn osd_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.path().join("c/run/osd.0.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// SIGSTOPs the OSD and returns once every one of its threads is stopped.
    /// kill(2) only starts a group stop: until the thread the kernel picked
    /// runs, the other threads still answer what arrives (CI saw a read served).
    fn stop_osd(&self) {
        let pid = self.osd_pid();
        // SAFETY: plain kill(2) on the OSD this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "osd {pid} never stopped");
            std::thread::yield_now();
        }
    }
}

/// Whether /proc shows every thread of `pid` in the stopped state (`T`).
fn all_threads_stopped(pid: i32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("osd tasks");
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name, which may hold spaces.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        // A thread that exited between the listing and the read is not answering.
        stat.is_empty() || state == Some('T')
    })
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on the OSD this test started; it may be stopped.
        unsafe { libc::kill(self.osd_pid(), libc::SIGCONT) };
        let _ = std::process::Command::new("bash")
            .arg(scripts().join("stop-ceph.sh"))
            .arg(self.dir.path().join("c"))
            .output();
    }
}

fn scripts() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/ceph")
}

#[test]
fn a_hung_osd_fails_requests_with_eio_after_op_timeout_and_service_resumes() {
    if ceph_conf().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let conf = cluster.conf();
    let r = runner(&conf, &["--export", "mem:side,size=1M"]);
    let key = "rbd/hung";
    cli_ok(
        &r,
        &[
            "ceph",
            "create",
            key,
            "size",
            "16M",
            "option",
            "op_timeout=3",
        ],
    );
    let mut s = negotiate(&r.addr, key);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let data = pattern(64 << 10, 11);
    assert_eq!(write_at(&mut s, 0, &data), 0);
    assert_eq!(call(&mut s, CMD_FLUSH, 0, 0, &[]), 0);

    // The OSD stops answering (SIGSTOP: a hung host, not a refused connection).
    cluster.stop_osd();
    let started = Instant::now();
    // A read of written data (librbd answers unwritten ranges from its object
    // map without asking the OSD).
    assert_eq!(
        read_at(&mut s, 0, 4096).map(|v| v.len()),
        Err(5),
        "a read must fail with EIO"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "EIO after {waited:?}, op_timeout is 3 s"
    );
    // A write is acknowledged by librbd's cache; its FLUSH must not be.
    assert_eq!(write_at(&mut s, 4 << 20, &data), 0);
    assert_eq!(
        call(&mut s, CMD_FLUSH, 0, 0, &[]),
        5,
        "FLUSH must fail with EIO"
    );
    // Other exports and the control route do not wait on the cluster.
    assert_healthy(&r.addr, "side");
    cli_ok(&r, &["list"]);

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(cluster.osd_pid(), libc::SIGCONT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read_at(&mut s, 0, data.len() as u32) {
            Ok(back) => {
                assert!(back == data, "data written before the outage changed");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "still failing ({e}) after SIGCONT"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The connection survived the outage; new writes are durable again.
    assert_eq!(write_at(&mut s, 4 << 20, &data), 0);
    assert_eq!(call(&mut s, CMD_FLUSH, 0, 0, &[]), 0);
    assert!(read_at(&mut s, 4 << 20, data.len() as u32) == Ok(data));
    drop(s);
    delete_when_idle(&r, key);
}

/// `--export ceph:POOL/IMAGE,size=` creates the image and serves it from
/// startup with the runner's --ceph-conf; without size= a restart serves
/// it again with its data; a bad spec is refused in one line.
#[test]
fn export_flag_serves_a_ceph_image() {
    let Some(conf) = ceph_conf() else { return };
    let key = image("export");
    let spec = format!("ceph:{key},size=32M");
    let mut r = runner(&conf, &["--export", &spec]);
    let info = rbd(&conf, &["info", "--format", "json", &key]);
    assert!(info.status.success(), "the image was not created");
    let uri = r.uri(&key);
    qemu_io(
        &uri,
        &["write -P 0x3c 1M 1M", "read -P 0x3c 1M 1M", "flush"],
        1,
    );
    assert!(cli_ok(&r, &["list"]).contains("static"));
    r.stop();
    let mut r = runner(&conf, &["--export", &format!("ceph:{key}")]);
    qemu_io(&r.uri(&key), &["read -P 0x3c 1M 1M", "read -P 0 0 1M"], 2);
    r.stop();
    let err = runner_refuses(&[
        "--ceph-conf",
        &conf,
        "--export",
        &format!("ceph:{key},size=1M,bogus=1"),
    ]);
    assert!(err.contains("unknown ceph option \"bogus\""), "{err}");
    let err = runner_refuses(&[
        "--ceph-conf",
        &conf,
        "--export",
        "ceph:rbd/no-such-image-here",
    ]);
    // Logs may come first; the refusal is one line that names the image.
    let refusal: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("nbd-runner:"))
        .collect();
    assert_eq!(refusal.len(), 1, "{err}");
    assert!(
        refusal[0].contains("no-such-image-here") && refusal[0].contains("no such image"),
        "{err}"
    );
    assert!(rbd(&conf, &["rm", &key]).status.success());
}

#[test]
fn a_snapshot_serves_read_only_the_bytes_it_was_taken_with() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let r = runner(&conf, &[]);
    let key = image("snap");
    cli_ok(&r, &["ceph", "create", &key, "size", "8M"]);
    let before = pattern(8 * MIB, 11);
    let src = tmp_path(&dir, "before.raw");
    write_file(&src, &before);
    run_ok("nbdcopy", &[path_str(&src), &r.uri(&key)]);
    let o = rbd(&conf, &["snap", "create", &format!("{key}@s1")]);
    assert!(
        o.status.success(),
        "rbd snap create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The image changes after the snapshot.
    let after = pattern(8 * MIB, 12);
    write_file(&src, &after);
    run_ok("nbdcopy", &[path_str(&src), &r.uri(&key)]);

    // Adopted at its size, served read-only, reading the snapshot's bytes.
    let snap = format!("{key}@s1");
    let made = cli_ok(&r, &["ceph", "create", &snap, "size", "8M"]);
    assert!(made.contains(&snap), "{made}");
    let info = json(&cli_ok(&r, &["--json", "ceph", "info", &snap]));
    assert_eq!(info["read_only"], true, "{info}");
    assert_eq!(
        (info["image"].as_str(), info["snapshot"].as_str()),
        (key.split('/').nth(1), Some("s1"))
    );
    assert!(
        info["mode"]
            .as_str()
            .unwrap()
            .contains("snapshot s1, read-only"),
        "{info}"
    );
    let back = tmp_path(&dir, "snap.raw");
    run_ok("nbdcopy", &[&r.uri(&snap), path_str(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == before,
        "the snapshot reads other bytes"
    );
    assert_eq!(nbdinfo(&r.uri(&snap))["is_read_only"], true);
    // A write is refused by the protocol (EPERM), not attempted.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 0 4k", &r.uri(&snap)],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "a write to the snapshot: {text}"
    );
    // The head still has the new bytes; the snapshot was not touched.
    assert!(rbd_export(&conf, &snap, &dir) == before);
    // Deleting a snapshot backstore forgets it and removes nothing.
    cli_ok(&r, &["ceph", "delete", &snap]);
    let o = rbd(&conf, &["snap", "ls", &key]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("s1"),
        "the snapshot is gone"
    );
    // Creating a snapshot that does not exist is refused, in one line.
    cli_fails(
        &r,
        &["ceph", "create", &format!("{key}@nope"), "size", "8M"],
        "no such image or snapshot",
    );
    let o = rbd(&conf, &["snap", "purge", &key]);
    assert!(o.status.success());
    delete_when_idle(&r, &key);
}

#[test]
fn an_encrypted_image_reads_back_through_the_runner_and_not_without_the_key() {
    let Some(conf) = ceph_conf() else { return };
    let dir = scratch();
    let pass = tmp_path(&dir, "pass");
    std::fs::write(&pass, b"correct horse battery staple").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = runner(&conf, &["--allow-backstore-options"]);
    let key = image("luks");
    let enc = ["option", "encryption=luks2", "option"];
    let passopt = format!("passphrase_file={}", path_str(&pass));
    let mut create = vec!["ceph", "create", key.as_str(), "size", "32M"];
    create.extend(enc);
    create.push(&passopt);
    cli_ok(&r, &create);
    let info = json(&cli_ok(&r, &["--json", "ceph", "info", &key]));
    // The size is what librbd reports with the encryption loaded (Pacific
    // keeps the raw size; later releases take the header off).
    assert!(info["size"].as_u64().unwrap() > 8 << 20, "{info}");
    assert!(
        info["mode"]
            .as_str()
            .unwrap()
            .contains("LUKS2 encryption by librbd"),
        "{info}"
    );
    // A recognisable plaintext, through the runner.
    let mut plain = Vec::new();
    while plain.len() < 4 * MIB {
        plain.extend_from_slice(b"NBD-RUNNER-PLAINTEXT-MARKER ");
    }
    plain.truncate(4 * MIB);
    let src = tmp_path(&dir, "plain.raw");
    write_file(&src, &plain);
    run_ok("nbdcopy", &[path_str(&src), &r.uri(&key)]);
    let back = tmp_path(&dir, "back.raw");
    run_ok("nbdcopy", &[&r.uri(&key), path_str(&back)]);
    assert!(
        std::fs::read(&back).unwrap()[..4 * MIB] == plain[..],
        "read back differs"
    );
    // Without the key, another librbd client sees ciphertext only.
    let raw = rbd_export(&conf, &key, &dir);
    let marker = b"NBD-RUNNER-PLAINTEXT-MARKER";
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "the plaintext is readable in rbd export"
    );
    assert!(
        raw.starts_with(b"LUKS\xba\xbe"),
        "no LUKS header at the start"
    );
    // After a restart the runner loads the key again and reads the same.
    let mut r = r;
    r.stop();
    let state = r.state.take().unwrap();
    let r = runner(
        &conf,
        &[
            "--allow-backstore-options",
            "--state-dir",
            path_str(state.path()),
        ],
    );
    run_ok("nbdcopy", &[&r.uri(&key), path_str(&back)]);
    assert!(
        std::fs::read(&back).unwrap()[..4 * MIB] == plain[..],
        "differs after a restart"
    );
    // A passphrase file others can read is refused, in one line.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key2 = image("luks-open");
    let mut c2 = vec!["ceph", "create", key2.as_str(), "size", "32M"];
    c2.extend(enc);
    c2.push(&passopt);
    cli_fails(&r, &c2, "readable by others");
    // The wrong passphrase: adopting the image is refused, in one line.
    let wrong = tmp_path(&dir, "wrong");
    std::fs::write(&wrong, b"wrong").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let other = runner(&conf, &["--allow-backstore-options"]);
    let wrongopt = format!("passphrase_file={}", path_str(&wrong));
    let mut adopt = vec!["ceph", "create", key.as_str(), "size", "32M"];
    adopt.extend(enc);
    adopt.push(&wrongopt);
    cli_fails(&other, &adopt, "wrong passphrase");
    drop(other);
    delete_when_idle(&r, &key);
    drop(state);
}
