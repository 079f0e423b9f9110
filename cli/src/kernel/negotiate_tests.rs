//! The client handshake against an in-process fake server, one scripted
//! server thread per test.

use super::*;
use nbd_engine::protocol::codec::Codec;
use nbd_engine::protocol::consts as c;
use nbd_engine::protocol::msgs::{
    ExportNameReply, Greeting, InfoBlock, InfoRequest, OptionHeader, OptionReplyHeader,
};
use nbd_engine::protocol::{HeaderMode, RequestHeader};
use std::net::TcpListener;
use std::thread::JoinHandle;

const GO: u32 = c::OPT_GO;

/// Runs `script` as the server side of one connection; returns the address
/// to dial and the thread (joined to surface its assertion failures).
fn fake_server<F>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(TcpStream) + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        script(s);
    });
    (addr, t)
}

fn greeting(s: &mut TcpStream, flags: u16) {
    s.write_all(&Greeting::newstyle(flags).to_bytes()).unwrap();
}

fn read_u32(s: &mut TcpStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

/// Reads one option request: (option, data).
fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; OptionHeader::LEN];
    s.read_exact(&mut h).unwrap();
    let h = OptionHeader::from_bytes(&h).expect("an option header");
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data).unwrap();
    (h.option, data)
}

fn reply(s: &mut TcpStream, opt: u32, kind: u32, body: &[u8]) {
    s.write_all(&OptionReplyHeader::with_body(opt, kind, body))
        .unwrap();
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    InfoBlock::Export { size, flags }.to_bytes()
}

fn info_block(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    InfoBlock::BlockSize {
        min,
        preferred,
        max,
    }
    .to_bytes()
}

/// Parses NBD_OPT_GO data: (name, info requests).
fn parse_go(data: &[u8]) -> (String, Vec<u16>) {
    let r = InfoRequest::from_bytes(data).expect("well-formed GO data");
    (r.name, r.infos)
}

/// Greeting, client flags and the GO request, checked; returns the name.
fn accept_go(s: &mut TcpStream, hflags: u16, want_cflags: u32) -> String {
    greeting(s, hflags);
    assert_eq!(read_u32(s), want_cflags, "client flags");
    let (opt, data) = read_option(s);
    assert_eq!(opt, GO, "the client must use NBD_OPT_GO");
    let (name, reqs) = parse_go(&data);
    assert_eq!(
        reqs,
        vec![c::INFO_BLOCK_SIZE],
        "the client asks for block sizes"
    );
    name
}

const FLAGS: u16 = c::TF_HAS_FLAGS | c::TF_SEND_FLUSH | c::TF_SEND_FUA | c::TF_CAN_MULTI_CONN;
const BOTH: u16 = c::FLAG_FIXED_NEWSTYLE | c::FLAG_NO_ZEROES;

fn dial(addr: &str, export: &str) -> Result<(TcpStream, Negotiated), NegotiateError> {
    connect_export(addr, export, Duration::from_secs(5))
}

#[test]
fn go_with_block_sizes() {
    let (addr, t) = fake_server(|mut s| {
        assert_eq!(accept_go(&mut s, BOTH, 3), "disk0");
        reply(&mut s, GO, c::REP_INFO, &info_export(1 << 30, FLAGS));
        let name = InfoBlock::Name("disk0".into()).to_bytes();
        reply(&mut s, GO, c::REP_INFO, &name); // ignored
        reply(&mut s, GO, c::REP_INFO, &info_block(512, 4096, 1 << 25));
        reply(&mut s, GO, c::REP_ACK, &[]);
        // Transmission phase: the next bytes are a 28-byte request.
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        assert!(RequestHeader::parse(&req, HeaderMode::Compact).is_ok());
    });
    let (mut s, info) = dial(&addr, "disk0").unwrap();
    assert_eq!(
        info,
        Negotiated {
            size: 1 << 30,
            flags: FLAGS,
            min_block: 512,
            preferred_block: 4096,
            max_block: 1 << 25
        }
    );
    assert!(info.can_multi_conn() && !info.read_only());
    assert_eq!(info.kernel_block_size(), 4096);
    // The kernel takes the socket over: no timeouts may be left on it.
    assert_eq!(s.read_timeout().unwrap(), None);
    assert_eq!(s.write_timeout().unwrap(), None);
    assert!(s.nodelay().unwrap());
    let mut req = c::REQUEST_MAGIC.to_be_bytes().to_vec();
    req.resize(28, 0);
    s.write_all(&req).unwrap();
    t.join().unwrap();
}

#[test]
fn no_zeroes_only_when_offered_and_defaults_without_block_info() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, c::FLAG_FIXED_NEWSTYLE, 1);
        reply(
            &mut s,
            GO,
            c::REP_INFO,
            &info_export(4096, c::TF_HAS_FLAGS | c::TF_READ_ONLY),
        );
        reply(&mut s, GO, c::REP_ACK, &[]);
    });
    let (_s, info) = dial(&addr, "").unwrap();
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_block),
        (1, 4096, 32 << 20)
    );
    assert!(info.read_only());
    t.join().unwrap();
}

#[test]
fn unknown_export_is_no_such_export() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(&mut s, GO, c::REP_ERR_UNKNOWN, b"export not found");
    });
    let err = dial(&addr, "/nope").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::NoSuchExport { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("no such export \"/nope\""), "{msg}");
    assert!(msg.contains("export not found"), "{msg}");
    t.join().unwrap();
}

#[test]
fn other_refusals_name_the_reason() {
    for (code, words) in [
        (c::REP_ERR_POLICY, "policy"),
        (c::REP_ERR_TLS_REQD, "TLS"),
        (c::REP_ERR_SHUTDOWN, "shutting down"),
        (c::REP_ERR + 77, "unknown error"),
    ] {
        let (addr, t) = fake_server(move |mut s| {
            accept_go(&mut s, BOTH, 3);
            reply(&mut s, GO, code, b"");
        });
        let err = dial(&addr, "x").unwrap_err();
        match &err {
            NegotiateError::Nbd(ClientError::Refused { code: got, .. }) => assert_eq!(*got, code),
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains(words), "{err}");
        t.join().unwrap();
    }
}

#[test]
fn bad_greeting_magic() {
    let (addr, t) = fake_server(|mut s| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(
            err,
            NegotiateError::Nbd(ClientError::BadMagic {
                what: "greeting",
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not an NBD server"), "{err}");
    t.join().unwrap();
}

#[test]
fn bad_option_reply_magic() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        s.write_all(&[0xAA; 20]).unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(
            err,
            NegotiateError::Nbd(ClientError::BadMagic {
                what: "option reply",
                ..
            })
        ),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn short_greeting_is_closed() {
    let (addr, t) = fake_server(|mut s| {
        s.write_all(&c::NBDMAGIC.to_be_bytes()[..5]).unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(
            err,
            NegotiateError::Nbd(ClientError::Closed {
                during: "the greeting"
            })
        ),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn short_reply_body_is_closed() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        let mut r = c::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&GO.to_be_bytes());
        r.extend_from_slice(&c::REP_INFO.to_be_bytes());
        r.extend_from_slice(&12u32.to_be_bytes());
        r.extend_from_slice(&[0, 0, 1]); // 3 of 12 bytes, then hang up
        s.write_all(&r).unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::Closed { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("closed the connection"), "{err}");
    t.join().unwrap();
}

#[test]
fn silent_server_times_out_and_timeout_is_cleared() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (addr, t) = fake_server(move |mut s| {
        greeting(&mut s, BOTH);
        let _ = rx.recv(); // say nothing more until the client gave up
    });
    let s = TcpStream::connect(&addr).unwrap();
    let t0 = std::time::Instant::now();
    let err = negotiate(&s, "x", Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, NegotiateError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.read_timeout().unwrap(),
        None,
        "timeout cleared on error too"
    );
    tx.send(()).unwrap();
    t.join().unwrap();
}

#[test]
fn not_fixed_newstyle() {
    let (addr, t) = fake_server(|mut s| {
        greeting(&mut s, 0);
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::NotFixedNewstyle(0))),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn oldstyle_server_is_explained() {
    let (addr, t) = fake_server(|mut s| {
        let g = Greeting {
            style: c::OLDSTYLE_MAGIC,
            ..Greeting::newstyle(0)
        };
        s.write_all(&g.to_bytes()).unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(err.to_string().contains("oldstyle"), "{err}");
    t.join().unwrap();
}

#[test]
fn huge_reply_length_is_refused_without_allocating() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        let mut r = c::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&GO.to_be_bytes());
        r.extend_from_slice(&c::REP_INFO.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&r).unwrap();
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::Protocol(_))),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn ack_without_export_info_is_an_error() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(&mut s, GO, c::REP_ACK, &[]);
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(err.to_string().contains("without NBD_INFO_EXPORT"), "{err}");
    t.join().unwrap();
}

#[test]
fn reply_for_another_option_is_an_error() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(&mut s, c::OPT_LIST, c::REP_ACK, &[]);
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::Protocol(_))),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn malformed_info_lengths_are_errors() {
    for body in [
        info_export(1, 1)[..11].to_vec(),
        info_block(1, 2, 3)[..13].to_vec(),
    ] {
        let (addr, t) = fake_server(move |mut s| {
            accept_go(&mut s, BOTH, 3);
            reply(&mut s, GO, c::REP_INFO, &body);
        });
        let err = dial(&addr, "x").unwrap_err();
        assert!(
            matches!(err, NegotiateError::Nbd(ClientError::Protocol(_))),
            "{err:?}"
        );
        t.join().unwrap();
    }
}

#[test]
fn nonsensical_block_sizes_are_errors() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(&mut s, GO, c::REP_INFO, &info_export(1 << 20, FLAGS));
        reply(&mut s, GO, c::REP_INFO, &info_block(3, 4096, 1 << 20));
        reply(&mut s, GO, c::REP_ACK, &[]);
    });
    let err = dial(&addr, "x").unwrap_err();
    assert!(err.to_string().contains("block sizes"), "{err}");
    t.join().unwrap();
}

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    for hflags in [BOTH, c::FLAG_FIXED_NEWSTYLE] {
        let (addr, t) = fake_server(move |mut s| {
            let cflags = if hflags & c::FLAG_NO_ZEROES != 0 {
                3
            } else {
                1
            };
            accept_go(&mut s, hflags, cflags);
            reply(&mut s, GO, c::REP_ERR_UNSUP, b"");
            let (opt, data) = read_option(&mut s);
            assert_eq!(opt, c::OPT_EXPORT_NAME);
            assert_eq!(data, b"old");
            let mut r = Vec::new();
            ExportNameReply {
                size: 7 << 20,
                flags: c::TF_HAS_FLAGS,
            }
            .put(&mut r, cflags == 3);
            s.write_all(&r).unwrap();
        });
        let (_s, info) = dial(&addr, "old").unwrap();
        assert_eq!((info.size, info.flags), (7 << 20, c::TF_HAS_FLAGS));
        t.join().unwrap();
    }
}

#[test]
fn export_name_refusal_is_a_hang_up() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(&mut s, GO, c::REP_ERR_UNSUP, b"");
        read_option(&mut s);
    });
    let err = dial(&addr, "gone").unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::NoSuchExport { .. })),
        "{err:?}"
    );
    t.join().unwrap();
}

#[test]
fn refused_connection_names_the_address() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let err = dial(&addr, "x").unwrap_err();
    assert!(matches!(err, NegotiateError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[test]
fn many_connections_need_multi_conn() {
    let (addr, t) = fake_server(|mut s| {
        accept_go(&mut s, BOTH, 3);
        reply(
            &mut s,
            GO,
            c::REP_INFO,
            &info_export(1 << 20, c::TF_HAS_FLAGS),
        );
        reply(&mut s, GO, c::REP_ACK, &[]);
    });
    let err = connect_export_many(&addr, "x", 2, Duration::from_secs(5), None).unwrap_err();
    assert!(
        matches!(err, NegotiateError::NoMultiConn { wanted: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("CAN_MULTI_CONN"), "{err}");
    t.join().unwrap();
}

#[test]
fn overlong_export_name_is_refused_locally() {
    let mut pipe = std::io::Cursor::new(Vec::new());
    let err = handshake(&mut pipe, &"x".repeat(c::MAX_STRING + 1)).unwrap_err();
    assert!(
        matches!(err, NegotiateError::Nbd(ClientError::Protocol(_))),
        "{err:?}"
    );
}

#[test]
fn kernel_block_size_is_a_power_of_two_the_kernel_accepts() {
    let n = |min, preferred| Negotiated {
        size: 0,
        flags: 0,
        min_block: min,
        preferred_block: preferred,
        max_block: 32 << 20,
    };
    assert_eq!(n(1, 4096).kernel_block_size(), 4096);
    assert_eq!(n(1, 1).kernel_block_size(), 512);
    assert_eq!(n(1, 65536).kernel_block_size(), 4096);
    assert_eq!(n(1024, 512).kernel_block_size(), 1024);
    assert_eq!(n(1, 3000).kernel_block_size(), 2048);
}
