//! The client handshake against the server handshake, in memory, no
//! sockets (quinn-proto's `Pair` is the model): each side's output is the
//! other's input, fed exactly as `want()` asks.

use super::*;
use crate::protocol::fuzzing::{TestCatalog, DISK_FLAGS, DISK_SIZE, RO_FLAGS, RO_SIZE};
use crate::protocol::handshake::{Handshake, Negotiated};
use crate::protocol::HeaderMode;

struct Pair {
    client: ClientHandshake,
    server: Handshake,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// Times each side was told to upgrade (TLS itself is transparent here).
    upgrades: (u32, u32),
}

impl Pair {
    fn new(export: &str) -> Self {
        Pair {
            client: ClientHandshake::new(export).unwrap(),
            server: Handshake::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
            upgrades: (0, 0),
        }
    }

    fn with_tls(export: &str, policy: crate::protocol::TlsPolicy) -> Self {
        let mut p = Pair::new(export);
        p.client = ClientHandshake::new(export).unwrap().with_tls();
        p.server = Handshake::new().tls(policy);
        p
    }

    /// Moves bytes both ways until neither side can make progress; the
    /// client's result, and what the server negotiated (if it did).
    fn drive(&mut self) -> (Result<ClientNegotiated, ClientError>, Option<Negotiated>) {
        loop {
            self.to_client.extend(self.server.take_output());
            self.to_server.extend(self.client.take_output());
            self.upgrades.0 += u32::from(self.client.take_starttls());
            self.upgrades.1 += u32::from(self.server.take_starttls());
            if let Some(n) = self.client.negotiated() {
                return (Ok(*n), self.server.negotiated().cloned());
            }
            let mut progress = false;
            let want = self.server.want();
            if !self.server.is_done() && !self.server.is_closed() && self.to_server.len() >= want {
                let chunk: Vec<u8> = self.to_server.drain(..want).collect();
                let _ = self.server.receive(&chunk, &TestCatalog);
                progress = true;
            }
            let want = self.client.want();
            if want > 0 && self.to_client.len() >= want {
                let chunk: Vec<u8> = self.to_client.drain(..want).collect();
                if let Err(e) = self.client.receive(&chunk) {
                    return (Err(e), None);
                }
                progress = true;
            }
            if !progress && !self.server.has_output() && !self.client.has_output() {
                // The server hung up, or both wait: what the client makes of EOF.
                return (Err(self.client.on_eof()), None);
            }
        }
    }
}

#[test]
fn negotiates_an_export_for_the_kernel() {
    let mut p = Pair::new("disk");
    let (client, server) = p.drive();
    let c = client.unwrap();
    assert_eq!((c.size, c.flags), (DISK_SIZE, DISK_FLAGS));
    assert_eq!((c.min_block, c.preferred_block), (1, 4096));
    // What the kernel needs: simple replies, compact headers.
    let s = server.expect("the server finished too");
    assert!(!s.structured_replies && s.base_allocation.is_none());
    assert_eq!(s.headers, HeaderMode::Compact);
    assert!(s.no_zeroes);
    assert!(p.to_server.is_empty() && p.to_client.is_empty());
}

#[test]
fn default_export_and_block_sizes() {
    let (c, _) = Pair::new("").drive();
    assert_eq!(c.unwrap().size, DISK_SIZE);
    let (c, _) = Pair::new("ro").drive();
    let c = c.unwrap();
    assert_eq!((c.size, c.flags, c.min_block), (RO_SIZE, RO_FLAGS, 512));
    assert!(c.read_only() && !c.can_multi_conn());
    assert_eq!(c.kernel_block_size(), 4096);
}

#[test]
fn unknown_export_is_named() {
    let (c, _) = Pair::new("nope").drive();
    match c {
        Err(ClientError::NoSuchExport { name, message }) => {
            assert_eq!(name, "nope");
            assert_eq!(message, "no such export");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_server_shutting_down_refuses_go() {
    let mut p = Pair::new("disk");
    p.server.begin_shutdown();
    match p.drive().0 {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, REP_ERR_SHUTDOWN),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_over_long_name_never_reaches_the_wire() {
    let e = ClientHandshake::new(&"n".repeat(MAX_STRING + 1)).unwrap_err();
    assert!(e.to_string().contains("4097 bytes"), "{e}");
}

#[test]
fn export_name_fallback_and_its_refusal() {
    // A server from before NBD_OPT_GO answers UNSUP; the client falls back.
    let mut c = ClientHandshake::new("disk").unwrap();
    c.receive(&Greeting::newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_bytes())
        .unwrap();
    let sent = c.take_output();
    // NO_ZEROES was offered, so it is taken.
    assert_eq!(
        sent[..4],
        (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()
    );
    c.receive(&OptionReplyHeader::with_body(OPT_GO, REP_ERR_UNSUP, &[]))
        .unwrap();
    let fallback = c.take_output();
    assert_eq!(fallback, OptionHeader::with_data(OPT_EXPORT_NAME, b"disk"));
    assert_eq!(c.want(), 10);
    // Hanging up now is how a server refuses EXPORT_NAME.
    assert!(matches!(c.on_eof(), ClientError::NoSuchExport { .. }));
    let mut reply = Vec::new();
    ExportNameReply { size: 9, flags: 1 }.put(&mut reply, true);
    c.receive(&reply).unwrap();
    assert_eq!(c.negotiated().unwrap().size, 9);
    assert_eq!(c.want(), 0);
}

#[test]
fn hostile_servers_get_one_clear_error() {
    let greet = Greeting::newstyle(FLAG_FIXED_NEWSTYLE).to_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not nbd",
            b"HTTP/1.1 200 OK\r\n\r\n"[..18].to_vec(),
            "bad greeting magic",
        ),
        (
            "oldstyle",
            Greeting {
                style: OLDSTYLE_MAGIC,
                ..Greeting::newstyle(0)
            }
            .to_bytes(),
            "oldstyle",
        ),
        (
            "not fixed",
            Greeting::newstyle(0).to_bytes(),
            "fixed newstyle",
        ),
        (
            "huge reply",
            [
                greet.clone(),
                OptionReplyHeader {
                    option: OPT_GO,
                    kind: REP_INFO,
                    len: u32::MAX,
                }
                .to_bytes(),
            ]
            .concat(),
            "limit",
        ),
        (
            "other option",
            [
                greet.clone(),
                OptionReplyHeader::with_body(OPT_LIST, REP_ACK, &[]),
            ]
            .concat(),
            "while waiting",
        ),
        (
            "ack without export",
            [
                greet.clone(),
                OptionReplyHeader::with_body(OPT_GO, REP_ACK, &[]),
            ]
            .concat(),
            "without NBD_INFO_EXPORT",
        ),
        (
            "short export info",
            [
                greet.clone(),
                OptionReplyHeader::with_body(OPT_GO, REP_INFO, &[0, 0, 1]),
            ]
            .concat(),
            "expected 12",
        ),
        (
            "bad reply magic",
            [greet.clone(), vec![0; 20]].concat(),
            "option reply magic",
        ),
        (
            "policy",
            [
                greet.clone(),
                OptionReplyHeader::with_body(OPT_GO, REP_ERR_POLICY, b"go away"),
            ]
            .concat(),
            "go away",
        ),
        (
            "zero block size",
            [
                greet.clone(),
                OptionReplyHeader::with_body(
                    OPT_GO,
                    REP_INFO,
                    &InfoBlock::Export { size: 1, flags: 1 }.to_bytes(),
                ),
                OptionReplyHeader::with_body(
                    OPT_GO,
                    REP_INFO,
                    &InfoBlock::BlockSize {
                        min: 0,
                        preferred: 1,
                        max: 1,
                    }
                    .to_bytes(),
                ),
                OptionReplyHeader::with_body(OPT_GO, REP_ACK, &[]),
            ]
            .concat(),
            "nonsensical",
        ),
    ];
    for (what, stream, want) in cases {
        let mut c = ClientHandshake::new("disk").unwrap();
        let mut rest = &stream[..];
        let err = loop {
            let n = c.want();
            if rest.len() < n {
                break c.on_eof();
            }
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            if let Err(e) = c.receive(chunk) {
                break e;
            }
            assert!(c.negotiated().is_none(), "{what}: negotiated");
        };
        let msg = err.to_string();
        assert!(msg.contains(want), "{what}: {msg:?} lacks {want:?}");
        assert!(!msg.contains('\n'), "{what}: one line");
        assert_eq!(c.want(), 0, "{what}: a failed handshake wants nothing");
    }
}

#[test]
fn tls_comes_first_and_the_export_is_asked_for_only_inside_it() {
    use crate::protocol::TlsPolicy;
    for policy in [TlsPolicy::On, TlsPolicy::Require] {
        let mut p = Pair::with_tls("disk", policy);
        let (c, s) = p.drive();
        assert_eq!(c.unwrap().size, DISK_SIZE);
        assert!(s.is_some());
        assert_eq!(p.upgrades, (1, 1));
        assert!(p.server.tls_active());
    }
    // A server without TLS: one clear error, and no export is asked for.
    let mut p = Pair::with_tls("disk", TlsPolicy::Off);
    let (c, s) = p.drive();
    let e = c.unwrap_err();
    assert!(matches!(e, ClientError::NoTls { .. }), "{e:?}");
    assert!(e.to_string().contains("does not offer TLS"), "{e}");
    assert!(s.is_none() && p.upgrades == (0, 0));
}

#[test]
fn a_server_that_acks_starttls_again_inside_tls_is_refused() {
    use crate::protocol::msgs::OptionReplyHeader;
    let mut c = ClientHandshake::new("disk").unwrap().with_tls();
    let mut greeting = Vec::new();
    crate::protocol::msgs::Greeting::newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .encode(&mut greeting);
    c.receive(&greeting).unwrap();
    c.take_output();
    let mut ack = Vec::new();
    OptionReplyHeader::put(&mut ack, OPT_STARTTLS, REP_ACK, &[]);
    c.receive(&ack).unwrap();
    assert_eq!(c.want(), 0);
    assert!(
        c.receive(&[]).is_err(),
        "nothing may be read before the upgrade"
    );
    assert!(c.take_starttls() && !c.take_starttls());
    assert!(c.has_output(), "GO goes out inside TLS");
    let e = c.receive(&ack).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
}
