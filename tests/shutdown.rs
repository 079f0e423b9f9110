//! SIGTERM while clients are busy: in-flight requests complete, requests the
//! server has already received but not started get ESHUTDOWN, nothing is
//! garbled, and the daemon exits 0.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn sigterm_finishes_in_flight_and_refuses_the_rest() {
    let mut runner = Runner::start(&["mem:disk0,size=64M"]);
    let addr = runner.addr.clone();
    let mut s = negotiate(&addr, "disk0");
    // A burst of writes, and SIGTERM while they are being served.
    let payload = vec![0x5au8; 4096];
    let mut burst = Vec::new();
    for i in 0..200u64 {
        burst.extend(request(CMD_WRITE, 0, i, i * 4096, 4096));
        burst.extend_from_slice(&payload);
    }
    s.write_all(&burst).unwrap();
    runner.signal(libc::SIGTERM);
    let mut answered = 0;
    while answered < 200 {
        let (cookie, err) = match read_simple_reply(&mut s) {
            Some(r) => r,
            None => break,
        };
        assert!(cookie < 200, "unknown cookie {cookie}");
        assert!(
            err == 0 || err == ESHUTDOWN,
            "cookie {cookie}: error {err}, want 0 or ESHUTDOWN"
        );
        answered += 1;
    }
    assert!(answered >= 1, "no reply before the close");

    // Once the shard has noticed the signal, nothing new is executed.
    std::thread::sleep(Duration::from_millis(300));
    let mut late = Vec::new();
    for i in 200..300u64 {
        late.extend(request(CMD_READ, 0, i, i * 4096, 4096));
    }
    let _ = s.write_all(&late); // may fail: the server is closing
    while let Some((cookie, err)) = read_simple_reply(&mut s) {
        assert_eq!(
            err, ESHUTDOWN,
            "cookie {cookie} was served after shutdown began"
        );
    }
    let status = runner.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "runner exited with {status}");
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
