//! SIGTERM while clients are busy: in-flight requests complete, requests the
//! server has already received but not started get ESHUTDOWN, nothing is
//! garbled, and the daemon exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start_runner(export: &str) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-runner"))
        .args(["--iohost", "127.0.0.1", "--ioport", "0", "--rpcport", "0"])
        .args(["--threads", "2", "--export", export])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nbd-runner");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("nbd-runner ready io=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, addr)
}

/// Fixed newstyle + NBD_OPT_GO on `name`, no structured replies.
fn negotiate(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        assert!(kind < 0x8000_0000, "GO refused: {kind:#x}");
        if kind == 1 {
            return s; // ACK
        }
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// (cookie, error) of the next simple reply; None once the server has closed.
fn read_simple_reply(s: &mut TcpStream) -> Option<(u64, u32)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        0x6744_6698,
        "garbled reply"
    );
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    Some((u64::from_be_bytes(h[8..16].try_into().unwrap()), err))
}

#[test]
fn sigterm_finishes_in_flight_and_refuses_the_rest() {
    let (mut child, addr) = start_runner("mem:disk0,size=64M");
    let mut s = negotiate(&addr, "disk0");
    // A burst of writes, and SIGTERM while they are being served.
    let payload = vec![0x5au8; 4096];
    let mut burst = Vec::new();
    for i in 0..200u64 {
        burst.extend(request(1, i, i * 4096, 4096));
        burst.extend_from_slice(&payload);
    }
    s.write_all(&burst).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut answered = 0;
    while answered < 200 {
        let (cookie, err) = match read_simple_reply(&mut s) {
            Some(r) => r,
            None => break,
        };
        assert!(cookie < 200, "unknown cookie {cookie}");
        assert!(
            err == 0 || err == 108,
            "cookie {cookie}: error {err}, want 0 or ESHUTDOWN"
        );
        answered += 1;
    }
    assert!(answered >= 1, "no reply before the close");

    // Once the shard has noticed the signal, nothing new is executed.
    std::thread::sleep(Duration::from_millis(300));
    let mut late = Vec::new();
    for i in 200..300u64 {
        late.extend(request(0, i, i * 4096, 4096));
    }
    let _ = s.write_all(&late); // may fail: the server is closing
    while let Some((cookie, err)) = read_simple_reply(&mut s) {
        assert_eq!(err, 108, "cookie {cookie} was served after shutdown began");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "runner did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "runner exited with {status}");
}

#[test]
fn sigterm_with_idle_clients_exits_promptly() {
    let (mut child, addr) = start_runner("mem:disk0,size=1M");
    let idle: Vec<TcpStream> = (0..8).map(|_| negotiate(&addr, "disk0")).collect();
    let half_done = TcpStream::connect(&addr).unwrap(); // never negotiates
                                                        // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "idle clients kept the runner alive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success());
    drop((idle, half_done));
}
