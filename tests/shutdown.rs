//! SIGTERM while clients are busy: requests already started finish and are
//! answered with success, requests received but not started are never
//! answered (no error reply: the kernel fails those, but requeues what a
//! dead connection left unanswered), what was answered is in the backstore,
//! and the daemon exits 0 without waiting on clients that do not read.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Waits until the runner's IO listener is gone: the (only) shard has
/// begun its stop, so nothing it receives from now on starts.
fn wait_stopping(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "the runner never began its stop");
        std::thread::yield_now();
    }
}

fn set_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: setsockopt with an int on our own socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUF");
}

#[test]
fn sigterm_answers_what_it_started_and_nothing_with_an_error() {
    let dir = scratch();
    let file = tmp_path(&dir, "disk.img");
    let spec = format!("file:{},size=8M", path_str(&file));
    let mut runner = Runner::start(&[&spec]);
    let mut s = negotiate(&runner.addr, path_str(&file));
    // A burst of writes, and SIGTERM while they are being served.
    let mut burst = Vec::new();
    for i in 0..400u64 {
        burst.extend(request(CMD_WRITE, 0, i, i * 4096, 4096));
        burst.extend_from_slice(&pattern(4096, i));
    }
    s.write_all(&burst).unwrap();
    runner.signal(libc::SIGTERM);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answered = Vec::new();
    while let Some((cookie, err)) = read_simple_reply(&mut s) {
        assert!(cookie < 400, "unknown cookie {cookie}");
        assert_eq!(err, 0, "cookie {cookie} was answered with an error");
        assert!(
            !answered.contains(&cookie),
            "cookie {cookie} answered twice"
        );
        answered.push(cookie);
    }
    let status = runner.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "runner exited with {status}");
    assert!(!answered.is_empty(), "no reply before the close");
    // Every write the runner answered is in the file.
    let image = std::fs::read(&file).unwrap();
    for &i in &answered {
        let at = (i * 4096) as usize;
        assert!(
            image[at..at + 4096] == pattern(4096, i)[..],
            "answered write {i} is not in the backstore"
        );
    }
}

#[test]
fn requests_waiting_for_budget_at_the_stop_are_not_failed() {
    let mut runner = Runner::start_with(&["--threads", "1", "--export", "mem:disk0,size=256M"]);
    let mut s = negotiate(&runner.addr, "disk0");
    // A small receive window: the runner's last bytes stay in its queue.
    set_rcvbuf(&s, 64 << 10);
    // Eight 32 MiB reads, replies unread: the connection's 128 MiB budget
    // admits four, the others wait for budget (received, not started).
    const LEN: u32 = 32 << 20;
    for i in 0..8u64 {
        s.write_all(&request(CMD_READ, 0, i, i * u64::from(LEN), LEN))
            .unwrap();
    }
    runner.signal(libc::SIGTERM);
    wait_stopping(&runner.addr);
    // Requests the runner will never read: closing a socket with unread
    // data resets it, which must not cost the replies still queued.
    for i in 8..1000u64 {
        s.write_all(&request(CMD_READ, 0, i, 0, 4096)).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answered = 0;
    let mut payload = vec![0u8; LEN as usize];
    while let Some((cookie, err)) = read_simple_reply(&mut s) {
        assert!(cookie < 8, "read {cookie} was sent after the stop began");
        assert_eq!(err, 0, "read {cookie} was failed at the stop");
        // The last reply's tail waits in the runner's send queue while we
        // pause; the close must not throw it away.
        let (head, tail) = payload.split_at_mut(LEN as usize - (1 << 20));
        s.read_exact(head).expect("the read's data");
        if answered == 3 {
            std::thread::sleep(Duration::from_millis(300));
        }
        s.read_exact(tail).expect("the end of the read's data");
        answered += 1;
    }
    assert!(
        (1..8).contains(&answered),
        "{answered} of 8 reads answered: the budget should hold some back"
    );
    drop(s);
    assert!(runner.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn nothing_received_after_the_stop_begins_is_started_or_answered() {
    let dir = scratch();
    let file = tmp_path(&dir, "disk.img");
    let spec = format!("file:{},size=1M", path_str(&file));
    let mut runner = Runner::start_with(&["--threads", "1", "--export", &spec]);
    let mut s = negotiate(&runner.addr, path_str(&file));
    assert_eq!(write_at(&mut s, 0, &pattern(4096, 1)), 0);
    runner.signal(libc::SIGTERM);
    wait_stopping(&runner.addr);
    // The shard stops at once, so this may already meet a closed socket.
    let mut late = Vec::new();
    for i in 0..64u64 {
        late.extend(request(CMD_WRITE, 0, 100 + i, 4096 * (1 + i), 4096));
        late.extend_from_slice(&pattern(4096, 2));
    }
    let _ = s.write_all(&late);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "{} reply bytes to requests sent after the stop began",
        rest.len()
    );
    assert!(runner.wait_exit(Duration::from_secs(20)).success());
    let image = std::fs::read(&file).unwrap();
    assert_eq!(&image[..4096], &pattern(4096, 1)[..], "the answered write");
    assert!(
        image[4096..].iter().all(|&b| b == 0),
        "a request received after the stop began was executed"
    );
}

#[test]
fn sigterm_with_idle_clients_exits_promptly() {
    let mut runner = Runner::start(&["mem:disk0,size=1M"]);
    let addr = runner.addr.clone();
    let idle: Vec<TcpStream> = (0..8).map(|_| negotiate(&addr, "disk0")).collect();
    let half_done = TcpStream::connect(&addr).unwrap(); // never negotiates
    runner.signal(libc::SIGTERM);
    assert!(runner.wait_exit(Duration::from_secs(10)).success());
    drop((idle, half_done));
}

#[test]
fn a_client_that_reads_no_replies_cannot_hold_the_stop() {
    let mut runner = Runner::start_with(&[
        "--threads",
        "1",
        "--write-timeout",
        "2",
        "--export",
        "mem:disk0,size=64M",
    ]);
    let mut stalled = negotiate(&runner.addr, "disk0");
    // 64 MiB of read replies, far beyond both socket buffers, never read.
    for i in 0..32u64 {
        stalled
            .write_all(&request(CMD_READ, 0, i, i << 21, 2 << 20))
            .unwrap();
    }
    let mut fine = negotiate(&runner.addr, "disk0");
    assert_eq!(write_at(&mut fine, 0, &pattern(4096, 3)), 0);
    let stop = Instant::now();
    runner.signal(libc::SIGTERM);
    let status = runner.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "runner exited with {status}");
    // The write timeout (2 s) bounds it, with room for a slow machine.
    assert!(
        stop.elapsed() < Duration::from_secs(20),
        "stop took {:?}",
        stop.elapsed()
    );
    drop(stalled);
}
