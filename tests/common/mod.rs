//! Shared helpers for the integration tests: a runner process per test, a
//! raw NBD client for the cases real clients refuse to produce, and
//! wrappers that run the real peers (qemu, libnbd, fio).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One thread of a runner, from /proc.
#[derive(Debug)]
pub struct ThreadInfo {
    pub tid: i32,
    pub name: String,
    /// The CPUs it may run on, as the kernel prints them: "0-1", "3".
    pub cpus: String,
    /// SCHED_OTHER 0, SCHED_BATCH 3.
    pub policy: u32,
}

/// A running nbd-runner, killed when dropped.
pub struct Runner {
    pub child: Child,
    /// IO route as HOST:PORT.
    pub addr: String,
    /// Control route as HOST:PORT.
    pub rpc: String,
    /// The IO route's unix socket (this host's maps).
    pub io_unix: PathBuf,
    /// The state directory, unless the test gave its own.
    pub state: Option<tempfile::TempDir>,
    /// The control token nbd-cli presents over TCP.
    pub token_file: PathBuf,
    /// `--metrics`: where /metrics is served.
    pub metrics: Option<String>,
}

impl Runner {
    /// Starts a runner on a free loopback port with two shards and `exports`.
    pub fn start(exports: &[&str]) -> Runner {
        let mut args = vec!["--threads", "2"];
        for e in exports {
            args.extend(["--export", e]);
        }
        Self::start_with(&args)
    }

    pub fn start_with(extra: &[&str]) -> Runner {
        Self::launch_at(extra, Stdio::inherit(), "warn", false, &[])
    }

    /// Like [`start_logged`](Self::start_logged), with more environment.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)], log: &Path) -> Runner {
        let file = std::fs::File::create(log).expect("log file");
        Self::launch_at(extra, file.into(), "info", false, env)
    }

    /// With the runner's default swap safety (mlockall, IO flusher, OOM
    /// shield), which other tests turn off so parallel runners lock nothing.
    pub fn start_swap_safe(extra: &[&str], log: &Path) -> Runner {
        let file = std::fs::File::create(log).expect("log file");
        Self::launch_at(extra, file.into(), "info", true, &[])
    }

    /// Like [`start_with`](Self::start_with), with the log (at info) in `log`.
    pub fn start_logged(extra: &[&str], log: &Path) -> Runner {
        let file = std::fs::File::create(log).expect("log file");
        Self::launch_at(extra, file.into(), "info", false, &[])
    }

    /// Like [`start_logged`](Self::start_logged), run through `program`
    /// (a wrapper script that ends in `exec nbd-runner "$@"`).
    pub fn start_program(program: &str, extra: &[&str], log: &Path) -> Runner {
        let file = std::fs::File::create(log).expect("log file");
        Self::launch(program, extra, file.into(), "info", false, &[])
    }

    fn launch_at(
        extra: &[&str],
        stderr: Stdio,
        level: &str,
        swap_safety: bool,
        env: &[(&str, &str)],
    ) -> Runner {
        let program = env!("CARGO_BIN_EXE_nbd-runner");
        Self::launch(program, extra, stderr, level, swap_safety, env)
    }

    fn launch(
        program: &str,
        extra: &[&str],
        stderr: Stdio,
        level: &str,
        swap_safety: bool,
        env: &[(&str, &str)],
    ) -> Runner {
        // Each runner gets its own state directory unless the test names one.
        let state = (!extra.contains(&"--state-dir")).then(scratch);
        let state_arg = state.as_ref().map(|d| path_str(d.path()).to_owned());
        let mut args: Vec<&str> = Vec::new();
        if let Some(dir) = &state_arg {
            args.extend(["--state-dir", dir]);
        }
        // Control-route file keys of the tests live in scratch directories.
        let tmp = std::env::temp_dir();
        for (flag, default) in [
            ("--iohost", "127.0.0.1"),
            ("--ioport", "0"),
            ("--rpcport", "0"),
            ("--file-root", path_str(&tmp)),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, default]);
            }
        }
        if !swap_safety {
            args.push("--no-swap-safety");
        }
        args.extend_from_slice(extra);
        let mut child = Command::new(program)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| level.into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn nbd-runner");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let (Some(addr), Some(rpc), Some(io_unix)) =
            (field("io="), field("rpc="), field("io-unix="))
        else {
            let status = child.wait().unwrap();
            panic!("nbd-runner did not start ({status}); first line {line:?}");
        };
        let flag = |name: &str| {
            let i = args.iter().position(|a| *a == name)?;
            args.get(i + 1).map(PathBuf::from)
        };
        let token_file = flag("--token-file")
            .or_else(|| flag("--state-dir").map(|d| d.join("token")))
            .expect("a state directory");
        Runner {
            child,
            addr,
            rpc,
            io_unix: io_unix.into(),
            state,
            token_file,
            metrics: field("metrics="),
        }
    }

    /// nbd URI of an export. The name is everything after the first '/', so
    /// a file key (an absolute path) gives `nbd://HOST:PORT//path`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// nbd+unix URI of an export on the unix IO route.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.io_unix.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control token, as nbd-cli reads it.
    pub fn token(&self) -> String {
        nbd_control::token::read(&self.token_file).expect("runner token")
    }

    /// A control-route client over TCP, presenting the token.
    pub fn control(&self) -> nbd_control::client::Client {
        nbd_control::client::Client::connect(
            &nbd_control::client::Endpoint::parse(&self.rpc).unwrap(),
            Some(self.token()),
            Duration::from_secs(10),
        )
        .expect("control connection")
    }

    /// The CPUs the (first) shard thread may run on.
    pub fn shard_cpus(&self) -> String {
        self.threads()
            .into_iter()
            .find(|t| t.name.starts_with("nbd-shard"))
            .expect("a shard thread")
            .cpus
    }

    /// Each of the daemon's threads: name, allowed CPUs, scheduling policy.
    pub fn threads(&self) -> Vec<ThreadInfo> {
        let tasks = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let tid = dir.file_name()?.to_str()?.parse().ok()?;
                let name = std::fs::read_to_string(dir.join("comm")).ok()?;
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                let cpus = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
                // stat's 41st field; the name (2nd) may hold spaces, so count
                // from after its closing parenthesis.
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                let after = &stat[stat.rfind(')')? + 2..];
                let policy = after.split_whitespace().nth(41 - 3)?.parse().ok()?;
                Some(ThreadInfo {
                    tid,
                    name: name.trim().to_owned(),
                    cpus: cpus.trim().to_owned(),
                    policy,
                })
            })
            .collect()
    }

    /// Panics if the daemon has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("nbd-runner exited: {status}");
        }
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, then waits for a clean exit (backstores closed).
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let st = self.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "nbd-runner stopped with {st}");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "nbd-runner did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed at drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbd-runner-test")
        .tempdir()
        .expect("temp dir")
}

/// Runs a real peer and returns its output; a missing tool fails the test
/// with the package to install (tests/run.sh installs them all).
pub fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Output {
    let out = Command::new(program)
        .args(args)
        .env(
            "PATH",
            format!(
                "/usr/bin:/usr/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (tests/run.sh installs the test dependencies)")
        });
    out
}

/// Like [`run`] but asserts success and returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a python3 script that has libnbd's `nbd` module (Debian's
/// python3-libnbd lives beside /usr/bin/python3) with `args` in sys.argv.
pub fn python(script: &str, args: &[&str]) -> String {
    let mut full = vec!["-c", script];
    full.extend_from_slice(args);
    run_ok("/usr/bin/python3", &full)
}

/// Deterministic bytes that differ at every 4 KiB block.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn tmp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

// ---- a raw NBD client, for what real clients never send ----
// Bytes come from the engine's one codec (nbd_engine::protocol), so the
// tests never spell a magic or a layout of their own.

#[allow(unused_imports)] // each test binary uses its own share
pub use nbd_engine::protocol::codec::Codec;
#[allow(unused_imports)]
pub use nbd_engine::protocol::consts::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, OPT_GO,
};
use nbd_engine::protocol::msgs::{
    Greeting, GreetingKind, InfoRequest, OptionHeader, OptionReplyHeader, ReplyHead,
};
use nbd_engine::protocol::{HeaderMode, RequestHeader};

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Connects and reads the 18-byte greeting.
pub fn connect(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; Greeting::LEN];
    s.read_exact(&mut greeting).unwrap();
    let g = Greeting::from_bytes(&greeting).unwrap();
    assert_eq!(g.kind(), GreetingKind::Newstyle);
    s
}

pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    OptionHeader::with_data(code, data)
}

/// An option header claiming `len` bytes of data (which may never come).
pub fn option_header(code: u32, len: u32) -> Vec<u8> {
    OptionHeader { option: code, len }.to_bytes()
}

/// One option reply: (option, reply type, body); None if the server closed.
pub fn read_option_reply(s: &mut TcpStream) -> Option<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut h).ok()?;
    let h = OptionReplyHeader::from_bytes(&h).expect("option reply magic");
    let mut body = vec![0u8; h.len as usize];
    s.read_exact(&mut body).ok()?;
    Some((h.option, h.kind, body))
}

/// NBD_OPT_GO's data for `name`, asking for no extra information.
pub fn go_data(name: &str) -> Vec<u8> {
    InfoRequest {
        name: name.into(),
        infos: vec![],
    }
    .to_bytes()
}

/// Fixed newstyle + NBD_OPT_GO on `name`, simple replies only.
pub fn negotiate(addr: &str, name: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&option(OPT_GO, &go_data(name))).unwrap();
    loop {
        let (_, kind, _) = read_option_reply(&mut s).expect("server closed during GO");
        assert!(kind < 0x8000_0000, "GO refused: {kind:#x}");
        if kind == 1 {
            return s; // ACK
        }
    }
}

pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length: len.into(),
    }
    .to_bytes(HeaderMode::Compact)
}

/// (cookie, error) of the next simple reply; None once the server has closed.
pub fn read_simple_reply(s: &mut TcpStream) -> Option<(u64, u32)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    match ReplyHead::read(&mut nbd_engine::protocol::codec::Reader::new(&h)) {
        Some(ReplyHead::Simple { error, cookie }) => Some((cookie, error)),
        other => panic!("garbled reply: {other:?}"),
    }
}

/// A READ on a negotiated simple-reply connection; Err(errno) on failure.
pub fn read_at(s: &mut TcpStream, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    s.write_all(&request(CMD_READ, 0, 0xfeed, offset, len))
        .unwrap();
    let (cookie, err) = read_simple_reply(s).expect("server closed");
    assert_eq!(cookie, 0xfeed);
    if err != 0 {
        return Err(err);
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    Ok(data)
}

pub fn write_at(s: &mut TcpStream, offset: u64, data: &[u8]) -> u32 {
    let mut b = request(CMD_WRITE, 0, 0xbeef, offset, data.len() as u32);
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    let (cookie, err) = read_simple_reply(s).expect("server closed");
    assert_eq!(cookie, 0xbeef);
    err
}

/// Fixed newstyle, NBD_OPT_EXTENDED_HEADERS, then NBD_OPT_GO on `name`:
/// a connection that speaks 32-byte requests and replies.
pub fn negotiate_extended(addr: &str, name: &str) -> TcpStream {
    use nbd_engine::protocol::consts::{OPT_EXTENDED_HEADERS, REP_ACK};
    let mut s = connect(addr);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_EXTENDED_HEADERS, &[])).unwrap();
    let (_, kind, _) = read_option_reply(&mut s).expect("server closed");
    assert_eq!(kind, REP_ACK, "extended headers refused");
    s.write_all(&option(OPT_GO, &go_data(name))).unwrap();
    loop {
        let (_, kind, _) = read_option_reply(&mut s).expect("server closed during GO");
        assert!(kind < 0x8000_0000, "GO refused: {kind:#x}");
        if kind == REP_ACK {
            return s;
        }
    }
}

/// Sends one payload-free extended request and reads its one reply chunk:
/// (cookie, offset, error), error 0 for a NONE chunk.
pub fn extended_call(s: &mut TcpStream, kind: u16, offset: u64, length: u64) -> (u64, u64, u32) {
    use nbd_engine::protocol::codec::Reader;
    use nbd_engine::protocol::consts::{EXT_CHUNK_HEADER_LEN, REPLY_TYPE_ERROR};
    use nbd_engine::protocol::msgs::ErrorChunk;
    let h = RequestHeader {
        flags: 0,
        kind,
        cookie: 0x5eed,
        offset,
        length,
    };
    s.write_all(&h.to_bytes(HeaderMode::Extended)).unwrap();
    let mut head = [0u8; EXT_CHUNK_HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let Some(ReplyHead::Chunk {
        kind,
        cookie,
        offset,
        len,
        ..
    }) = ReplyHead::read(&mut Reader::new(&head))
    else {
        panic!("not an extended reply: {head:02x?}");
    };
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    let error = if kind == REPLY_TYPE_ERROR {
        ErrorChunk::from_bytes(&body).expect("error chunk").error
    } else {
        0
    };
    (cookie, offset, error)
}

/// True once the peer has closed the connection (reads EOF or a reset).
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Asserts the runner still serves `export` correctly on a fresh connection.
pub fn assert_healthy(addr: &str, export: &str) {
    let mut s = negotiate(addr, export);
    let data = pattern(4096, 77);
    assert_eq!(write_at(&mut s, 0, &data), 0, "healthy write failed");
    assert_eq!(
        read_at(&mut s, 0, 4096).unwrap(),
        data,
        "healthy read differs"
    );
    s.write_all(&request(CMD_DISC, 0, 1, 0, 0)).unwrap();
}

/// nbd-cli against `runner`'s control route.
pub fn cli(runner: &Runner, args: &[&str]) -> Output {
    let token = path_str(&runner.token_file);
    let mut full = vec!["--host", runner.rpc.as_str(), "--token-file", token];
    full.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_nbd-cli"), &full)
}

/// nbd-cli that must succeed; its stdout.
pub fn cli_ok(runner: &Runner, args: &[&str]) -> String {
    let out = cli(runner, args);
    assert!(
        out.status.success(),
        "nbd-cli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts an nbd-cli failure with a one-line reason containing `want`.
pub fn cli_fails(runner: &Runner, args: &[&str], want: &str) {
    let out = cli(runner, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nbd-cli {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(want),
        "nbd-cli {args:?}: {err:?} lacks {want:?}"
    );
}

/// fio's nbd engine writes 16 MiB at `uri` (4k random at QD32, then 1M
/// sequential at QD8) and verifies every block's crc32c.
pub fn fio_verify(uri: &str) {
    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("write", "1M", "8")] {
        let out = run_ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ],
        );
        // fio may print notes before the JSON document.
        let json = &out[out.find('{').expect("fio printed no JSON")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "{uri} {rw}: {job}");
        assert_eq!(job["write"]["io_bytes"], 16u64 << 20, "{uri} {rw}");
        assert_eq!(
            job["read"]["io_bytes"],
            16u64 << 20,
            "{uri} {rw}: verify read"
        );
    }
}

/// Runs a qemu-io script (one `-c` per command) on a raw NBD export,
/// asserting that no command failed and that `reads` pattern reads ran.
/// The qemu-io script every zero-capable export must pass (needs 8 MiB):
/// patterns, FUA, discard and both WRITE_ZEROES forms reading back zeroes,
/// unaligned IO and a flush. `qemu_io_patterns` runs it.
pub const QEMU_IO_PATTERNS: [&str; 15] = [
    "write -P 0xab 0 2M",
    "read -P 0xab 0 2M",
    "write -P 0xcd -f 3M 64k", // FUA
    "read -P 0xcd 3M 64k",
    "discard 0 1M",
    "read -P 0 0 1M",
    "read -P 0xab 1M 1M",
    "write -z 1M 512k",       // WRITE_ZEROES, NO_HOLE
    "write -z -u 1536k 512k", // WRITE_ZEROES, may punch
    "read -P 0 1M 1M",
    "write -P 0x5a 5000 3000", // unaligned
    "read -P 0x5a 5000 3000",
    "read -P 0 8000 192",
    "flush",
    "read -P 0xcd 3M 64k",
];

pub fn qemu_io_patterns(uri: &str) -> String {
    qemu_io(uri, &QEMU_IO_PATTERNS, 8)
}

pub fn qemu_io(uri: &str, script: &[&str], reads: usize) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in script {
        args.extend(["-c", c]);
    }
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "{uri}: qemu-io reported a problem:\n{out}"
    );
    assert_eq!(out.matches("read ").count(), reads, "{uri}: {out}");
    out
}

/// Bytes an export reports as holes (base:allocation, via nbdinfo --map).
pub fn hole_bytes(uri: &str) -> u64 {
    let map = run_ok("nbdinfo", &["--map", "--json", uri]);
    serde_json::from_str::<serde_json::Value>(&map)
        .expect("nbdinfo --map json")
        .as_array()
        .expect("a list of extents")
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 != 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// Test TLS credentials (tests/tls/make-certs.sh, with openssl) in a new
/// directory: a CA, a server certificate for localhost/127.0.0.1/::1 and a
/// client certificate.
pub fn make_certs() -> tempfile::TempDir {
    make_certs_for("DNS:localhost,IP:127.0.0.1,IP:::1")
}

/// [`make_certs`] with the server certificate for `names` (a SAN list).
pub fn make_certs_for(names: &str) -> tempfile::TempDir {
    let dir = scratch();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tls/make-certs.sh");
    run_ok("bash", &[script, path_str(dir.path()), names]);
    dir
}

/// A network namespace joined to this one by a veth pair: this side is
/// `host_ip`, the namespace's side `peer_ip`, a real non-loopback network
/// for "another host". Removed (with its veth) when dropped.
pub struct NetNs {
    pub name: String,
    pub host_ip: String,
    pub peer_ip: String,
}

impl NetNs {
    /// Fails (with the reason) where namespaces cannot be made (not root).
    pub fn new() -> Result<NetNs, String> {
        let id = std::process::id() % 200 + 20;
        let ns = NetNs {
            name: format!("nbdt{}", std::process::id()),
            host_ip: format!("10.213.{id}.1"),
            peer_ip: format!("10.213.{id}.2"),
        };
        let (a, b) = (format!("{}a", ns.name), format!("{}b", ns.name));
        let host_cidr = format!("{}/24", ns.host_ip);
        let peer_cidr = format!("{}/24", ns.peer_ip);
        let steps: [&[&str]; 7] = [
            &["netns", "add", &ns.name],
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
            &["link", "set", &b, "netns", &ns.name],
            &["addr", "add", &host_cidr, "dev", &a],
            &["link", "set", &a, "up"],
            &["-n", &ns.name, "addr", "add", &peer_cidr, "dev", &b],
            &["-n", &ns.name, "link", "set", &b, "up"],
        ];
        for step in steps {
            let out = run("ip", step);
            if !out.status.success() {
                return Err(format!(
                    "ip {step:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(ns)
    }

    /// Runs `program` inside the namespace.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Runs nbd-runner with `args` expecting it to refuse to start; its stderr.
pub fn runner_refuses(args: &[&str]) -> String {
    let out = run(env!("CARGO_BIN_EXE_nbd-runner"), args);
    assert!(!out.status.success(), "nbd-runner {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One HTTP/1.0 GET; (status line, body).
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// A counter's value in the runner's `/metrics` (0 when absent).
pub fn metric_value(metrics: &str, name: &str) -> u64 {
    let (_, body) = http_get(metrics, "/metrics", None);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}
