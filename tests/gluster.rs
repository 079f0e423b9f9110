//! The gluster handler against a real GlusterFS volume on loopback.
//!
//! tests/run.sh starts a single-brick volume with tests/gluster/start-gluster.sh
//! and exports NBD_TEST_GLUSTER_VOLUME (volume name), NBD_TEST_GLUSTER_BRICK
//! (its brick directory, to check what reached the server) and optionally
//! NBD_TEST_GLUSTER_SERVER (volfile server, default 127.0.0.1). Without
//! NBD_TEST_GLUSTER_VOLUME every test says why and passes; with it, a broken
//! volume fails them.

mod common;

use common::*;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::RwLock;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// The volume restart test stops the volume: it runs alone.
static VOLUME: RwLock<()> = RwLock::new(());

struct Gluster {
    volume: String,
    server: String,
    brick: PathBuf,
}

impl Gluster {
    /// The test volume, or None (with a note) when none is configured.
    fn get(test: &str) -> Option<Gluster> {
        let Ok(volume) = std::env::var("NBD_TEST_GLUSTER_VOLUME") else {
            eprintln!(
                "skipping {test}: NBD_TEST_GLUSTER_VOLUME is not set (tests/run.sh starts a volume)"
            );
            return None;
        };
        let brick = std::env::var("NBD_TEST_GLUSTER_BRICK")
            .expect("NBD_TEST_GLUSTER_BRICK must name the brick directory of the test volume");
        Some(Gluster {
            volume,
            server: std::env::var("NBD_TEST_GLUSTER_SERVER").unwrap_or_else(|_| "127.0.0.1".into()),
            brick: PathBuf::from(brick),
        })
    }

    /// A key unique to this process and test.
    fn key(&self, name: &str) -> String {
        format!("{}/nbd-test-{}-{name}.img", self.volume, std::process::id())
    }

    /// Where the brick keeps the file of `key`.
    fn on_brick(&self, key: &str) -> PathBuf {
        self.brick.join(key.split_once('/').unwrap().1)
    }

    fn runner(&self, extra: &[&str]) -> Runner {
        let mut args = vec!["--threads", "2", "--gluster-server", &self.server];
        args.extend_from_slice(extra);
        Runner::start_with(&args)
    }

    fn admin(&self, args: &[&str]) {
        let mut full = vec!["--mode=script", "volume"];
        full.extend_from_slice(args);
        full.push(&self.volume);
        run_ok("gluster", &full);
    }
}

/// nbd-cli against `runner`: Ok(stdout) or Err(stderr).
fn nbd_cli(runner: &Runner, args: &[&str]) -> Result<String, String> {
    let out = cli(runner, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        let err = text(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        Err(err)
    }
}

fn create(runner: &Runner, key: &str, size: &str) {
    nbd_cli(runner, &["gluster", "create", key, "size", size])
        .unwrap_or_else(|e| panic!("create {key}: {e}"));
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn qemu_io_nbdcopy_and_fio_through_the_io_route() {
    let Some(g) = Gluster::get("qemu_io_nbdcopy_and_fio_through_the_io_route") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    let mut runner = g.runner(&[]);
    let key = g.key("clients");
    create(&runner, &key, "16M");
    let uri = runner.uri(&key);

    qemu_io_patterns(&uri);

    // nbdcopy in and out: same checksum, and zero stretches become holes.
    let dir = scratch();
    let mut data = pattern(16 * MIB, 4);
    data[4 * MIB..8 * MIB].fill(0);
    data[12 * MIB..].fill(0);
    let (src, back) = (tmp_path(&dir, "src.raw"), tmp_path(&dir, "back.raw"));
    write_file(&src, &data);
    run_ok(
        "nbdcopy",
        &["--connections=4", "--requests=32", path_str(&src), &uri],
    );
    run_ok("nbdcopy", &[&uri, path_str(&back)]);
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));
    let holes = hole_bytes(&uri);
    assert!(holes >= 7 * MIB as u64, "only {holes} bytes of holes");

    fio_verify(&uri);
    runner.assert_alive();
    nbd_cli(&runner, &["gluster", "delete", &key]).unwrap();
    assert!(
        !g.on_brick(&key).exists(),
        "delete left the file on the brick"
    );
}

/// What FLUSH and FUA acknowledge has left gfapi's write-behind cache and
/// reached the brick, even when the FLUSH comes on another connection.
#[test]
fn flush_and_fua_reach_the_brick_with_write_behind_on() {
    let Some(g) = Gluster::get("flush_and_fua_reach_the_brick_with_write_behind_on") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    let wb = run_ok(
        "gluster",
        &["volume", "get", &g.volume, "performance.write-behind"],
    );
    assert!(wb.contains(" on"), "write-behind should be on: {wb}");
    let runner = g.runner(&[]);
    let key = g.key("flush");
    create(&runner, &key, "8M");
    let script = r#"
import nbd, sys
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[1])
assert a.can_multi_conn() and a.can_fua() and a.can_flush()
for i in range(64):
    a.pwrite(bytes([i + 1]) * 4096, i * 4096)
b.flush()
a.pwrite(b"\xfa" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
"#;
    python(script, &[&runner.uri(&key)]);
    // Read at the brick while the connections' runner still runs.
    let brick = std::fs::read(g.on_brick(&key)).unwrap();
    for i in 0..64 {
        let block = &brick[i * 4096..(i + 1) * 4096];
        assert!(
            block.iter().all(|&b| b == i as u8 + 1),
            "block {i} not flushed"
        );
    }
    assert!(
        brick[MIB..MIB + 65536].iter().all(|&b| b == 0xfa),
        "FUA write not on the brick"
    );
    nbd_cli(&runner, &["gluster", "delete", &key]).unwrap();
}

/// Backstores survive a runner killed with SIGKILL, with their data.
#[test]
fn backstores_and_data_survive_a_runner_restart() {
    let Some(g) = Gluster::get("backstores_and_data_survive_a_runner_restart") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    let state = scratch();
    let key = g.key("restart");
    let data = pattern(MIB, 9);
    {
        let runner = g.runner(&["--state-dir", path_str(state.path())]);
        create(&runner, &key, "4M");
        let mut s = negotiate(&runner.addr, &key);
        assert_eq!(write_at(&mut s, 0, &data), 0);
        s.write_all(&request(CMD_FLUSH, 0, 7, 0, 0)).unwrap();
        assert_eq!(read_simple_reply(&mut s), Some((7, 0)));
        runner.signal(libc::SIGKILL);
    }
    let runner = g.runner(&["--state-dir", path_str(state.path())]);
    let list = nbd_cli(&runner, &["gluster", "list"]).unwrap();
    assert!(list.contains(&key) && list.contains("created"), "{list}");
    let mut s = negotiate(&runner.addr, &key);
    assert_eq!(read_at(&mut s, 0, MIB as u32).unwrap(), data);
    drop(s);
    nbd_cli(&runner, &["gluster", "delete", &key]).unwrap();
}

/// A file nbd-cli did not create is adopted when the size matches, and
/// deleting the backstore leaves it; delete is refused while a client is
/// connected; preallocation allocates.
#[test]
fn adopt_prealloc_and_delete_rules() {
    let Some(g) = Gluster::get("adopt_prealloc_and_delete_rules") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    let key = g.key("adopt");
    {
        // Another runner (another gfapi client) makes the file.
        let other = g.runner(&[]);
        let out = cli(
            &other,
            &["gluster", "create", &key, "prealloc", "size", "8M"],
        );
        let progress = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{progress}");
        // Progress reaches the operator (stderr), not just the runner's log.
        assert!(
            progress.contains("preallocating: 100% (8 MiB of 8 MiB)"),
            "{progress}"
        );
        let meta = std::fs::metadata(g.on_brick(&key)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 8 << 20, "prealloc left it sparse");
        let mut s = negotiate(&other.addr, &key);
        assert_eq!(write_at(&mut s, 4096, &pattern(4096, 3)), 0);
        let err = nbd_cli(&other, &["gluster", "delete", &key]).unwrap_err();
        assert!(err.contains("open NBD connection"), "{err}");
    }
    let runner = g.runner(&[]);
    let err = nbd_cli(&runner, &["gluster", "create", &key, "size", "4M"]).unwrap_err();
    assert!(err.contains("exists with size 8388608"), "{err}");
    create(&runner, &key, "8M");
    let mut s = negotiate(&runner.addr, &key);
    assert_eq!(read_at(&mut s, 4096, 4096).unwrap(), pattern(4096, 3));
    drop(s);
    // The connection's close reaches the runner asynchronously.
    let mut deleted = Err(String::new());
    for _ in 0..50 {
        deleted = nbd_cli(&runner, &["gluster", "delete", &key]);
        if deleted.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    deleted.unwrap();
    assert!(
        g.on_brick(&key).exists(),
        "an adopted file must survive delete"
    );
    std::fs::remove_file(g.on_brick(&key)).ok();
}

#[test]
fn gluster_failures_are_one_clear_line() {
    let Some(g) = Gluster::get("gluster_failures_are_one_clear_line") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    // Without the operator's allowance a control client names no glusterd.
    let strict = g.runner(&[]);
    let err = nbd_cli(
        &strict,
        &[
            "gluster",
            "create",
            "x/a.img",
            "size",
            "1M",
            "server",
            "127.0.0.1:1",
        ],
    )
    .unwrap_err();
    assert!(err.contains("--allow-backstore-options"), "{err}");
    drop(strict);
    let runner = g.runner(&["--allow-backstore-options"]);
    let cases = [
        (
            vec!["gluster", "create", "no-such-volume/a.img", "size", "1M"],
            "cannot mount the volume",
        ),
        (
            vec![
                "gluster",
                "create",
                "x/a.img",
                "size",
                "1M",
                "server",
                "127.0.0.1:1",
            ],
            "is glusterd running",
        ),
        (
            vec![
                "gluster", "create", "x/a.img", "size", "1M", "server", "h:0",
            ],
            "bad gluster server",
        ),
    ];
    for (args, want) in &cases {
        let err = nbd_cli(&runner, args).unwrap_err();
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let missing_dir = format!("{}/no/such/dir.img", g.volume);
    let err = nbd_cli(&runner, &["gluster", "create", &missing_dir, "size", "1M"]).unwrap_err();
    assert!(err.contains("does its directory exist"), "{err}");
    assert!(nbd_cli(&runner, &["gluster", "list"])
        .unwrap()
        .contains("no backstores"));
}

/// Stopping and starting the volume under an open connection: IO waits
/// for the volume instead of failing, and nothing acknowledged is lost.
#[test]
fn volume_restart_under_a_connection_loses_nothing() {
    let Some(g) = Gluster::get("volume_restart_under_a_connection_loses_nothing") else {
        return;
    };
    let _alone = VOLUME.write().unwrap();
    let runner = g.runner(&[]);
    let key = g.key("volrestart");
    create(&runner, &key, "4M");
    let (before, during) = (pattern(65536, 1), pattern(65536, 2));
    let mut s = negotiate(&runner.addr, &key);
    s.set_read_timeout(Some(Duration::from_secs(100))).unwrap();
    assert_eq!(write_at(&mut s, 0, &before), 0);

    g.admin(&["stop"]);
    let starter = {
        let volume = g.volume.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(5));
            run_ok("gluster", &["--mode=script", "volume", "start", &volume])
        })
    };
    // Issued while the volume is down; answered once it is back.
    assert_eq!(write_at(&mut s, 65536, &during), 0);
    s.write_all(&request(CMD_FLUSH, 0, 9, 0, 0)).unwrap();
    assert_eq!(
        read_simple_reply(&mut s),
        Some((9, 0)),
        "flush after restart"
    );
    starter.join().unwrap();
    assert_eq!(read_at(&mut s, 0, 65536).unwrap(), before);
    assert_eq!(read_at(&mut s, 65536, 65536).unwrap(), during);
    let brick = std::fs::read(g.on_brick(&key)).unwrap();
    assert!(brick[..65536] == before[..] && brick[65536..131072] == during[..]);
    // New connections work too.
    assert_healthy(&runner.addr, &key);
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    nbd_cli(&runner, &["gluster", "delete", &key]).unwrap();
}

/// `--export gluster:VOLUME/FILE,size=` creates the file through gfapi and
/// serves it from startup with the runner's --gluster-server; without
/// size= a restart serves it again with its data.
#[test]
fn export_flag_serves_a_gluster_file() {
    let Some(g) = Gluster::get("export_flag_serves_a_gluster_file") else {
        return;
    };
    let _shared = VOLUME.read().unwrap();
    let key = g.key("export");
    let mut runner = g.runner(&["--export", &format!("gluster:{key},size=16M")]);
    assert_eq!(
        std::fs::metadata(g.on_brick(&key)).unwrap().len(),
        16 * MIB as u64,
        "the file on the brick"
    );
    qemu_io_patterns(&runner.uri(&key));
    runner.stop();
    let mut runner = g.runner(&["--export", &format!("gluster:{key}")]);
    qemu_io(
        &runner.uri(&key),
        &[
            "read -P 0 1M 1M", // zeroed by the patterns
            "read -P 0xcd 3M 64k",
            "read -P 0x5a 5000 3000",
        ],
        3,
    );
    // Startup exports are the operator's: nbd-cli will not delete them.
    let err = nbd_cli(&runner, &["gluster", "delete", &key]).unwrap_err();
    assert!(err.contains("--export"), "{err}");
    runner.stop();
    let err = runner_refuses(&["--export", &format!("gluster:{key},size=1M,nope=1")]);
    assert!(err.contains("unknown gluster option \"nope\""), "{err}");
    let server: nbd_engine::backend::gluster::VolfileServer = g.server.parse().unwrap();
    nbd_engine::backend::gluster::GlusterBackend::remove(&server, &key).unwrap();
    assert!(!g.on_brick(&key).exists());
}
