//! nbd_cli::kernel::negotiate against the real nbd-runner: the handshake
//! the kernel attach does before handing sockets over, then simple-reply IO
//! on the negotiated socket exactly as the kernel would do it.

mod common;

use common::*;
use nbd_cli::kernel::negotiate::{
    connect_export, connect_export_many, ClientError, NegotiateError,
};
use nbd_engine::protocol::consts as c;
use std::io::Write;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

#[test]
fn negotiates_and_serves_simple_replies() {
    let runner = Runner::start(&["mem:disk0,size=64M"]);
    let (mut s, info) = connect_export(&runner.addr, "disk0", T).unwrap();
    assert_eq!(info.size, 64 << 20);
    for (flag, name) in [
        (c::TF_HAS_FLAGS, "HAS_FLAGS"),
        (c::TF_SEND_FLUSH, "SEND_FLUSH"),
        (c::TF_SEND_FUA, "SEND_FUA"),
        (c::TF_SEND_TRIM, "SEND_TRIM"),
        (c::TF_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert!(
            info.flags & flag != 0,
            "{name} not advertised: {:#x}",
            info.flags
        );
    }
    assert!(!info.read_only());
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_block),
        (1, 4096, 32 << 20)
    );
    assert_eq!(info.kernel_block_size(), 4096);
    // Handed over without timeouts, as the kernel needs.
    assert_eq!(s.read_timeout().unwrap(), None);

    // Transmission phase with simple replies (no structured replies negotiated).
    s.set_read_timeout(Some(T)).unwrap();
    let data = pattern(8192, 5);
    assert_eq!(write_at(&mut s, 4096, &data), 0);
    assert_eq!(read_at(&mut s, 4096, 8192).unwrap(), data);
    s.write_all(&request(CMD_FLUSH, 0, 9, 0, 0)).unwrap();
    assert_eq!(read_simple_reply(&mut s), Some((9, 0)));
    s.write_all(&request(CMD_DISC, 0, 1, 0, 0)).unwrap();
}

#[test]
fn file_export_by_path_and_read_only_flag() {
    let dir = scratch();
    let img = tmp_path(&dir, "a.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let spec = format!("file:{},size=8M,readonly", path_str(&img));
    let runner = Runner::start(&[&spec]);
    let (_s, info) = connect_export(&runner.addr, path_str(&img), T).unwrap();
    assert_eq!(info.size, 8 << 20);
    assert!(info.read_only(), "flags {:#x}", info.flags);
}

#[test]
fn unknown_export_is_a_clear_error() {
    let runner = Runner::start(&["mem:disk0,size=1M"]);
    let err = connect_export(&runner.addr, "nope", T).unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::NoSuchExport { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("no such export \"nope\""),
        "{err}"
    );
    // The runner is unharmed.
    assert_healthy(&runner.addr, "disk0");
}

#[test]
fn several_connections_agree() {
    let runner = Runner::start(&["mem:disk0,size=16M"]);
    let (socks, info) = connect_export_many(&runner.addr, "disk0", 4, T, None).unwrap();
    assert_eq!(socks.len(), 4);
    assert_eq!(info.size, 16 << 20);
    // A write on one connection is visible on another.
    let mut socks = socks;
    for s in &socks {
        s.set_read_timeout(Some(T)).unwrap();
    }
    let data = pattern(4096, 11);
    assert_eq!(write_at(&mut socks[0], 0, &data), 0);
    assert_eq!(read_at(&mut socks[3], 0, 4096).unwrap(), data);
}

#[test]
fn nothing_listening_names_the_address() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let err = connect_export(&addr, "x", T).unwrap_err();
    assert!(err.to_string().contains(&addr), "{err}");
}
