//! What can be checked without the nbd module: message layout, parameter
//! checks, reply parsing, and (on a host without nbd.ko) the clear error for
//! a missing family. The real kernel is exercised in tests/kernel.rs (VM).

use super::*;
use std::io::Cursor;
use std::path::Path;

/// (type without flags, nested flag, payload) of each attribute in `bytes`.
fn split(bytes: &[u8]) -> Vec<(u16, bool, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= bytes.len() {
        let len = u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[i + 2], bytes[i + 3]]);
        assert!(len >= 4 && i + len <= bytes.len(), "attribute overruns");
        out.push((
            kind & 0x3fff,
            kind & 0x8000 != 0,
            bytes[i + 4..i + len].to_vec(),
        ));
        i += (len + 3) & !3;
    }
    assert_eq!(i, bytes.len(), "trailing bytes");
    out
}

fn serialize(buf: &GenlBuffer<u16, Buffer>) -> Vec<u8> {
    let mut cur = Cursor::new(Vec::new());
    buf.to_bytes(&mut cur).unwrap();
    cur.into_inner()
}

fn find(attrs: &[(u16, bool, Vec<u8>)], kind: u16) -> Option<&Vec<u8>> {
    attrs.iter().find(|a| a.0 == kind).map(|a| &a.2)
}

fn params() -> ConnectParams {
    ConnectParams {
        index: Some(3),
        size_bytes: 256 << 20,
        block_size: 4096,
        server_flags: u64::from(c::TF_HAS_FLAGS | c::TF_CAN_MULTI_CONN),
        timeout_secs: Some(30),
        dead_conn_timeout_secs: Some(120),
        backend_id: "/tmp/disk.raw".into(),
        sockets: vec![7, 9],
        client_flags: CFLAG_DESTROY_ON_DISCONNECT,
    }
}

#[test]
fn connect_message_layout() {
    let attrs = split(&serialize(&connect_attrs(&params()).unwrap()));
    let u64_of = |k| u64::from_ne_bytes(find(&attrs, k).unwrap()[..].try_into().unwrap());
    assert_eq!(u64_of(attr::SIZE_BYTES), 256 << 20);
    assert_eq!(u64_of(attr::BLOCK_SIZE_BYTES), 4096);
    assert_eq!(u64_of(attr::SERVER_FLAGS), 0x101);
    assert_eq!(u64_of(attr::TIMEOUT), 30);
    assert_eq!(u64_of(attr::DEAD_CONN_TIMEOUT), 120);
    assert_eq!(u64_of(attr::CLIENT_FLAGS), 1);
    assert_eq!(
        find(&attrs, attr::INDEX).unwrap(),
        &3u32.to_ne_bytes().to_vec()
    );
    assert_eq!(
        find(&attrs, attr::BACKEND_IDENTIFIER).unwrap(),
        b"/tmp/disk.raw\0",
        "NUL-terminated NLA_STRING"
    );
    // SOCKETS { SOCK_ITEM { SOCK_FD } x2 }, nested flags set.
    let socks = attrs.iter().find(|a| a.0 == attr::SOCKETS).unwrap();
    assert!(socks.1, "SOCKETS is nested");
    let items = split(&socks.2);
    assert_eq!(items.len(), 2);
    let fds: Vec<u32> = items
        .iter()
        .map(|(kind, nested, body)| {
            assert_eq!((*kind, *nested), (attr::SOCK_ITEM, true));
            let inner = split(body);
            assert_eq!(inner.len(), 1);
            assert_eq!(inner[0].0, attr::SOCK_FD);
            u32::from_ne_bytes(inner[0].2[..].try_into().unwrap())
        })
        .collect();
    assert_eq!(fds, vec![7, 9]);
}

#[test]
fn optional_attributes_are_left_out() {
    let p = ConnectParams {
        index: None,
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        backend_id: String::new(),
        client_flags: 0,
        ..params()
    };
    let kinds: Vec<u16> = split(&serialize(&connect_attrs(&p).unwrap()))
        .iter()
        .map(|a| a.0)
        .collect();
    assert_eq!(
        kinds,
        vec![
            attr::SIZE_BYTES,
            attr::BLOCK_SIZE_BYTES,
            attr::SERVER_FLAGS,
            attr::SOCKETS
        ]
    );
}

#[test]
fn resize_message_has_no_sockets() {
    let p = ReconfigureParams {
        index: 3,
        sockets: vec![],
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        backend_id: "k".into(),
        size_bytes: Some(2 << 30),
    };
    let attrs = split(&serialize(&reconfigure_attrs(&p).unwrap()));
    let kinds: Vec<u16> = attrs.iter().map(|a| a.0).collect();
    assert_eq!(
        kinds,
        vec![attr::INDEX, attr::SIZE_BYTES, attr::BACKEND_IDENTIFIER]
    );
}

#[test]
fn reconfigure_message_layout() {
    let p = ReconfigureParams {
        index: 5,
        sockets: vec![11],
        timeout_secs: None,
        dead_conn_timeout_secs: Some(60),
        backend_id: "k".into(),
        size_bytes: None,
    };
    let attrs = split(&serialize(&reconfigure_attrs(&p).unwrap()));
    let kinds: Vec<u16> = attrs.iter().map(|a| a.0).collect();
    assert_eq!(
        kinds,
        vec![
            attr::INDEX,
            attr::DEAD_CONN_TIMEOUT,
            attr::BACKEND_IDENTIFIER,
            attr::SOCKETS
        ]
    );
    assert_eq!(
        find(&attrs, attr::INDEX).unwrap(),
        &5u32.to_ne_bytes().to_vec()
    );
}

#[test]
fn parses_a_device_list() {
    let item = |i: u32, up: u8| {
        attr_of(attr::DEVICE_ITEM, Vec::<u8>::new())
            .unwrap()
            .nest(&attr_of(attr::DEVICE_INDEX, i).unwrap())
            .unwrap()
            .nest(&attr_of(attr::DEVICE_CONNECTED, up).unwrap())
            .unwrap()
    };
    let list = attr_of(attr::DEVICE_LIST, Vec::<u8>::new())
        .unwrap()
        .nest(&item(0, 0))
        .unwrap()
        .nest(&item(7, 1))
        .unwrap();
    let buf: GenlBuffer<u16, Buffer> = std::iter::once(list).collect();
    assert_eq!(
        parse_device_list(&buf).unwrap(),
        vec![
            DeviceStatus {
                index: 0,
                connected: false
            },
            DeviceStatus {
                index: 7,
                connected: true
            }
        ]
    );
    // No such device: an empty list, or none at all.
    let empty: GenlBuffer<u16, Buffer> =
        std::iter::once(attr_of(attr::DEVICE_LIST, Vec::<u8>::new()).unwrap()).collect();
    assert!(parse_device_list(&empty).unwrap().is_empty());
    assert!(parse_device_list(&GenlBuffer::new()).unwrap().is_empty());
}

fn invalid(p: ConnectParams) -> String {
    match connect(&p) {
        Err(e @ NetlinkError::InvalidParams { .. }) => e.to_string(),
        other => panic!("expected InvalidParams, got {other:?}"),
    }
}

#[test]
fn bad_parameters_are_refused_before_the_kernel() {
    assert!(invalid(ConnectParams {
        sockets: vec![],
        ..params()
    })
    .contains("no sockets"));
    assert!(invalid(ConnectParams {
        size_bytes: 0,
        ..params()
    })
    .contains("size is 0"));
    for bs in [0, 256, 1000, 8192] {
        assert!(invalid(ConnectParams {
            block_size: bs,
            ..params()
        })
        .contains("block size"));
    }
    assert!(invalid(ConnectParams {
        client_flags: CFLAG_DISCONNECT_ON_CLOSE,
        ..params()
    })
    .contains("DISCONNECT_ON_CLOSE"));
    assert!(invalid(ConnectParams {
        server_flags: u64::from(c::TF_HAS_FLAGS),
        ..params()
    })
    .contains("multi-conn"));
    let e = reconfigure(&ReconfigureParams {
        index: 0,
        sockets: vec![],
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        backend_id: String::new(),
        size_bytes: None,
    })
    .unwrap_err();
    assert!(matches!(e, NetlinkError::InvalidParams { .. }), "{e:?}");
}

#[test]
fn from_negotiated_sets_read_only_and_block_size() {
    let info = Negotiated {
        size: 1 << 30,
        flags: c::TF_HAS_FLAGS | c::TF_SEND_FLUSH,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
    };
    let rw = ConnectParams::from_negotiated(&info, false, "key", vec![3]);
    assert_eq!(rw.server_flags, u64::from(info.flags));
    assert_eq!((rw.size_bytes, rw.block_size), (1 << 30, 4096));
    assert_eq!((rw.client_flags, rw.index), (0, None));
    let ro = ConnectParams::from_negotiated(&info, true, "key", vec![3]);
    assert_eq!(ro.server_flags, u64::from(info.flags | c::TF_READ_ONLY));
    assert_eq!(ro.backend_id, "key");
}

#[test]
fn device_names() {
    assert_eq!(parse_device("/dev/nbd12"), Some(12));
    assert_eq!(parse_device("nbd0"), Some(0));
    assert_eq!(parse_device("3"), Some(3));
    for bad in ["/dev/sda", "/dev/nbd", "nbd1p1", "", "/dev/nbd-1"] {
        assert_eq!(parse_device(bad), None, "{bad}");
    }
    assert_eq!(device_path(4), Path::new("/dev/nbd4"));
    assert_eq!(backend_id(u32::MAX), None);
}

/// The nbd family is missing on a host without nbd.ko: every netlink call
/// says so, and how to fix it.
#[test]
fn missing_module_is_explained() {
    if Path::new("/sys/module/nbd").exists() {
        // A host with nbd: the family resolves and status works unprivileged.
        assert!(status(0).is_ok());
        return;
    }
    let e = status(0).unwrap_err();
    assert!(matches!(e, NetlinkError::ModuleNotLoaded), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the nbd kernel module is not loaded (modprobe nbd)"
    );
    assert!(matches!(devices(), Err(NetlinkError::ModuleNotLoaded)));
    assert!(matches!(disconnect(0), Err(NetlinkError::ModuleNotLoaded)));
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    let p = ConnectParams {
        sockets: vec![a.as_raw_fd()],
        ..params()
    };
    assert!(matches!(connect(&p), Err(NetlinkError::ModuleNotLoaded)));
    let r = ReconfigureParams {
        index: 0,
        sockets: vec![a.as_raw_fd()],
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        backend_id: String::new(),
        size_bytes: None,
    };
    assert!(matches!(
        reconfigure(&r),
        Err(NetlinkError::ModuleNotLoaded)
    ));
}

#[test]
fn errors_read_well() {
    let e = NetlinkError::PermissionDenied { op: Op::Connect };
    assert_eq!(
        e.to_string(),
        "nbd connect: permission denied: attaching NBD devices needs root (CAP_SYS_ADMIN)"
    );
    let e = NetlinkError::Busy {
        op: Op::Connect,
        device: "/dev/nbd2".into(),
    };
    assert!(e.to_string().contains("/dev/nbd2 is busy"));
    let e = NetlinkError::Kernel {
        op: Op::Reconfigure,
        errno: libc::EBADF,
    };
    assert!(
        e.to_string()
            .starts_with("nbd reconfigure: Bad file descriptor"),
        "{e}"
    );
    let e = router_error::<u16, Buffer>(Op::Disconnect, RouterError::NoAck);
    assert!(matches!(e, NetlinkError::Netlink { .. }));
}
