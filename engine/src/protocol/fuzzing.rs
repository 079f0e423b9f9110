//! Fuzz drivers for the sans-IO protocol, and a deterministic smoke test.
//!
//! Built for tests and under `--cfg fuzzing` (cargo-fuzz sets it), so the
//! targets in `fuzz/` call [`drive_handshake`], [`drive_client`] and
//! [`drive_request`] through `nbd_engine::protocol::fuzzing`; the
//! `smoke` tests below feed the same drivers a few hundred thousand inputs
//! from a seeded xorshift generator, so CI runs these code paths without
//! cargo-fuzz. A driver panics when the protocol breaks one of its rules.

use super::codec::{Codec, Reader};
use super::consts::*;
use super::handshake::{MAX_OPTIONS, MAX_OPTION_LEN};
use super::msgs::{Descriptor, ExportNameReply, Greeting, OptionHeader, OptionReplyHeader};
use super::transmission::{Body, Close, Next, Outcome};
use super::*;

// Big-endian reads at fixed offsets, through the codec; callers checked lengths.
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::read(&mut Reader::new(&b[at..])).expect("length checked")
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::read(&mut Reader::new(&b[at..])).expect("length checked")
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::read(&mut Reader::new(&b[at..])).expect("length checked")
}

pub const DISK_SIZE: u64 = 1 << 30;
pub const DISK_FLAGS: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM;
pub const RO_SIZE: u64 = 4096;
pub const RO_FLAGS: u16 = TF_HAS_FLAGS | TF_READ_ONLY;

/// Exports for the drivers and the handshake tests: "disk" (also the
/// default, "") and a read-only "ro" with no description and 512-byte blocks.
pub struct TestCatalog;

impl ExportCatalog for TestCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let (name, description, size, flags, min_block) = match name {
            "" | "disk" => ("disk", "the test disk", DISK_SIZE, DISK_FLAGS, 1),
            "ro" => ("ro", "", RO_SIZE, RO_FLAGS, 512),
            _ => return None,
        };
        Some(ExportInfo {
            name: name.into(),
            description: description.into(),
            size,
            flags,
            min_block,
            preferred_block: 4096,
            max_block: MAX_PAYLOAD,
        })
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![
            ("disk".into(), "the test disk".into()),
            ("ro".into(), String::new()),
        ]
    }
}

/// One option reply as a client parses it.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub option: u32,
    pub kind: u32,
    pub body: Vec<u8>,
}

impl Reply {
    /// The information type of an NBD_REP_INFO body.
    pub fn info_type(&self) -> u16 {
        assert_eq!(self.kind, REP_INFO, "{self:?}");
        assert!(self.body.len() >= 2, "{self:?}");
        get_u16(&self.body, 0)
    }
}

/// Splits server output into option replies, panicking on bad framing.
pub fn parse_replies(out: &[u8]) -> Vec<Reply> {
    let mut r = Reader::new(out);
    let mut replies = Vec::new();
    while r.any_left() {
        let h = r
            .take(OptionReplyHeader::LEN)
            .and_then(OptionReplyHeader::from_bytes)
            .unwrap_or_else(|| panic!("bad reply header in {out:02x?}"));
        let body = r.take(h.len as usize).expect("truncated reply body");
        replies.push(Reply {
            option: h.option,
            kind: h.kind,
            body: body.to_vec(),
        });
    }
    replies
}

pub fn option_header(option: u32, len: u32) -> Vec<u8> {
    OptionHeader { option, len }.to_bytes()
}

/// INFO/GO payload; the name as raw bytes, so tests can send bad UTF-8.
pub fn info_request(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    (name.len() as u32).encode(&mut d);
    d.extend_from_slice(name);
    (infos.len() as u16).encode(&mut d);
    for i in infos {
        i.encode(&mut d);
    }
    d
}

/// LIST/SET_META_CONTEXT payload.
pub fn meta_request(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = Vec::new();
    (name.len() as u32).encode(&mut d);
    d.extend_from_slice(name);
    (queries.len() as u32).encode(&mut d);
    for q in queries {
        (q.len() as u32).encode(&mut d);
        d.extend_from_slice(q);
    }
    d
}

/// What one driven handshake came to.
#[derive(Debug, Default)]
pub struct HandshakeOutcome {
    pub negotiated: Option<Negotiated>,
    pub error: Option<HandshakeError>,
    /// The last option whose data the server read.
    pub last_option: Option<u32>,
    /// One bit per reply type sent: bit n for reply n, bit 16 + n for error 2^31 + n.
    pub replies: u32,
}

pub fn reply_bit(kind: u32) -> u32 {
    let n = kind & 0xf;
    1 << if kind & (1 << 31) != 0 { 16 + n } else { n }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Flags,
    Header,
    Data(u32),
}

/// Drives a handshake with `data`: byte 0 chooses when the server starts
/// shutting down (bit 7 set: before option number `data[0] & 0x7f`) or,
/// bit 7 clear, the TLS policy (bits 0-1: off, on, require, off); the rest
/// is the client's byte stream, fed exactly as [`Handshake::want`] asks.
/// An accepted STARTTLS counts as upgraded at once.
pub fn drive_handshake(data: &[u8]) -> HandshakeOutcome {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return HandshakeOutcome::default();
    };
    let shutdown_at = (ctl & 0x80 != 0).then_some(u32::from(ctl & 0x7f));
    let policy = match (shutdown_at, ctl & 3) {
        (None, 1) => TlsPolicy::On,
        (None, 2) => TlsPolicy::Require,
        _ => TlsPolicy::Off,
    };
    let mut hs = Handshake::new().tls(policy);
    let greeting = Greeting::newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_bytes();
    assert_eq!(hs.take_output(), greeting);

    let mut outcome = HandshakeOutcome::default();
    let mut phase = Phase::Flags;
    let mut options = 0u32;
    while !hs.is_done() && !hs.is_closed() {
        let want = hs.want();
        assert!(want <= MAX_OPTION_LEN as usize);
        if rest.len() < want {
            break;
        }
        let (chunk, tail) = rest.split_at(want);
        rest = tail;
        if phase == Phase::Header && shutdown_at == Some(options) {
            hs.begin_shutdown();
        }
        let plain = !hs.tls_active();
        let result = hs.receive(chunk, &TestCatalog);
        let out = hs.take_output();
        assert!(!hs.has_output());
        assert_eq!(result.is_err(), hs.is_closed(), "{result:?}");
        phase = match phase {
            Phase::Flags => check_client_flags(chunk, &result, &out),
            Phase::Header => {
                options += 1;
                if !out.is_empty() {
                    // Checked below to be a lone ERR_TOO_BIG.
                    outcome.replies |= reply_bit(REP_ERR_TOO_BIG);
                }
                check_option_header(chunk, options, &result, &out, &hs)
            }
            Phase::Data(option) => {
                outcome.last_option = Some(option);
                let bits = check_option_replies(option, &result, &out, &hs);
                check_tls(policy, plain, option, &result, bits, &mut hs);
                outcome.replies |= bits;
                Phase::Header
            }
        };
        outcome.error = result.err();
    }
    if hs.is_done() || hs.is_closed() {
        assert_eq!(hs.receive(&[], &TestCatalog), Err(HandshakeError::Finished));
        assert_eq!(hs.want(), 0);
    }
    outcome.negotiated = hs.negotiated().cloned();
    assert_eq!(outcome.negotiated.is_some(), hs.is_done());
    if let Some(n) = &outcome.negotiated {
        let mut served = n.export.clone();
        served.flags &= !TF_BLOCK_STATUS_PAYLOAD; // added for extended headers
        assert_eq!(TestCatalog.lookup(&n.export.name).as_ref(), Some(&served));
        assert!(n.base_allocation.is_none() || n.structured_replies, "{n:?}");
        assert!(matches!(
            n.base_allocation,
            None | Some(META_ID_BASE_ALLOCATION)
        ));
    }
    outcome
}

/// Under `Require`, nothing but STARTTLS and ABORT is served in the clear;
/// STARTTLS is accepted once, and only where TLS is configured.
fn check_tls(
    policy: TlsPolicy,
    plain: bool,
    option: u32,
    result: &Result<(), HandshakeError>,
    bits: u32,
    hs: &mut Handshake,
) {
    let upgraded = hs.take_starttls();
    assert!(!hs.take_starttls());
    if upgraded {
        assert!(policy != TlsPolicy::Off && plain && option == OPT_STARTTLS);
        assert_eq!(bits, reply_bit(REP_ACK));
    }
    if policy == TlsPolicy::Require && plain && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
        if option == OPT_EXPORT_NAME {
            assert_eq!(result, &Err(HandshakeError::TlsRequired));
        } else {
            assert_eq!(bits, reply_bit(REP_ERR_TLS_REQD));
        }
        assert!(hs.negotiated().is_none());
    }
}

fn check_client_flags(chunk: &[u8], result: &Result<(), HandshakeError>, out: &[u8]) -> Phase {
    assert!(out.is_empty());
    let flags = get_u32(chunk, 0);
    let valid = flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) == 0
        && flags & CLIENT_FIXED_NEWSTYLE != 0;
    assert_eq!(result.is_ok(), valid, "client flags {flags:#x}");
    Phase::Header
}

fn check_option_header(
    chunk: &[u8],
    options: u32,
    result: &Result<(), HandshakeError>,
    out: &[u8],
    hs: &Handshake,
) -> Phase {
    let (magic, option, len) = (get_u64(chunk, 0), get_u32(chunk, 8), get_u32(chunk, 12));
    let want = if OptionHeader::from_bytes(chunk).is_none() {
        Err(HandshakeError::BadOptionMagic(magic))
    } else if options > MAX_OPTIONS {
        Err(HandshakeError::TooManyOptions)
    } else if len > MAX_OPTION_LEN {
        Err(HandshakeError::OptionTooBig(len))
    } else {
        Ok(())
    };
    assert_eq!(result, &want);
    let too_big = matches!(result, Err(HandshakeError::OptionTooBig(_)));
    if too_big && option != OPT_EXPORT_NAME {
        let replies = parse_replies(out);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (replies[0].option, replies[0].kind),
            (option, REP_ERR_TOO_BIG)
        );
    } else {
        assert!(out.is_empty(), "no reply to a header");
    }
    if result.is_ok() {
        assert_eq!(hs.want(), len as usize);
    }
    Phase::Data(option)
}

/// Checks what the server said to one complete option; returns reply bits.
fn check_option_replies(
    option: u32,
    result: &Result<(), HandshakeError>,
    out: &[u8],
    hs: &Handshake,
) -> u32 {
    if option == OPT_EXPORT_NAME {
        // No option replies here: either the export, or hang up in silence.
        match hs.negotiated() {
            Some(n) => {
                assert_eq!(out.len(), ExportNameReply::len(n.no_zeroes));
                let reply = ExportNameReply::from_bytes(out).unwrap();
                assert_eq!((reply.size, reply.flags), (n.export.size, n.export.flags));
                assert!(out[10..].iter().all(|&b| b == 0));
            }
            None => {
                assert!(out.is_empty(), "EXPORT_NAME refused with output");
                assert!(matches!(
                    result,
                    Err(HandshakeError::UnknownExport(_)
                        | HandshakeError::ShuttingDown
                        | HandshakeError::TlsRequired
                        | HandshakeError::ExportNameAfterExtended)
                ));
            }
        }
        return 0;
    }
    let replies = parse_replies(out);
    let (last, middle) = replies.split_last().expect("every option gets a reply");
    let mut bits = reply_bit(last.kind);
    assert!(
        last.kind == REP_ACK || last.kind & (1 << 31) != 0,
        "{last:?}"
    );
    for r in &replies {
        assert_eq!(r.option, option, "reply echoes the option");
    }
    for r in middle {
        bits |= reply_bit(r.kind);
        check_reply_body(option, r);
    }
    match result {
        Ok(()) => {}
        Err(HandshakeError::Aborted) => assert_eq!((option, last.kind), (OPT_ABORT, REP_ACK)),
        Err(e) => panic!("option {option} failed after its data: {e:?}"),
    }
    if let Some(n) = hs.negotiated() {
        assert_eq!((option, last.kind), (OPT_GO, REP_ACK));
        let export = middle
            .iter()
            .find(|r| r.info_type() == INFO_EXPORT)
            .unwrap();
        assert_eq!(get_u64(&export.body, 2), n.export.size);
        assert_eq!(get_u16(&export.body, 10), n.export.flags);
        if n.headers == HeaderMode::Extended {
            assert!(n.structured_replies);
            assert!(n.export.flags & TF_BLOCK_STATUS_PAYLOAD != 0);
        }
    }
    bits
}

fn check_reply_body(option: u32, r: &Reply) {
    match (option, r.kind) {
        (OPT_LIST, REP_SERVER) => {
            assert!(r.body.len() >= 4 && get_u32(&r.body, 0) as usize <= r.body.len() - 4);
        }
        (OPT_INFO | OPT_GO, REP_INFO) => {
            let want = match r.info_type() {
                INFO_EXPORT => Some(12),
                INFO_BLOCK_SIZE => Some(14),
                INFO_NAME | INFO_DESCRIPTION => None,
                other => panic!("unasked-for info type {other}"),
            };
            if let Some(len) = want {
                assert_eq!(r.body.len(), len, "{r:?}");
            }
        }
        (OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
            let id = if option == OPT_SET_META_CONTEXT {
                META_ID_BASE_ALLOCATION
            } else {
                0
            };
            assert_eq!(get_u32(&r.body, 0), id);
            assert_eq!(&r.body[4..], META_BASE_ALLOCATION.as_bytes());
        }
        _ => panic!("option {option} got an unexpected {r:?}"),
    }
}

/// Bytes [`drive_request`] reads before the extents: the session, then
/// room for an extended header.
pub const REQUEST_INPUT_LEN: usize = SESSION_INPUT_LEN + EXT_REQUEST_LEN;
const SESSION_INPUT_LEN: usize = 11;

/// What one driven request came to.
#[derive(Debug)]
pub struct RequestOutcome {
    pub result: Result<Command, Errno>,
    pub descriptors: u32,
    pub style: ReplyStyle,
}

/// Drives the transmission phase on one request. `data` is a session (u64
/// size, u16 flags, a byte whose bits 0, 1 and 2 are structured replies,
/// base:allocation and extended headers), a 28- or 32-byte request header
/// (a bad magic is checked, then patched), then extents of 9 bytes (u64
/// length, u8 flags) for encode_extents.
pub fn drive_request(data: &[u8]) -> Option<RequestOutcome> {
    if data.len() < REQUEST_INPUT_LEN {
        return None;
    }
    let (s, rest) = data.split_at(SESSION_INPUT_LEN);
    let style = match (s[10] & 4 != 0, s[10] & 1 != 0) {
        (true, _) => ReplyStyle::Extended,
        (false, true) => ReplyStyle::Structured,
        (false, false) => ReplyStyle::Simple,
    };
    let session = Session {
        size: get_u64(s, 0),
        flags: get_u16(s, 8),
        style,
        base_allocation: s[10] & 2 != 0,
    };
    let mode = style.headers();
    let t = Transmission::with_session(session, META_ID_BASE_ALLOCATION);
    assert_eq!(t.header_len(), mode.request_len());
    let mut raw = rest[..mode.request_len()].to_vec();
    if let Err(Close::BadMagic(magic)) = t.parse_header(&raw) {
        assert_eq!(magic, get_u32(&raw, 0));
        let magic_bytes = RequestHeader {
            flags: 0,
            kind: 0,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .to_bytes(mode);
        raw[..4].copy_from_slice(&magic_bytes[..4]);
    }
    let h = t.parse_header(&raw).expect("magic is right");
    assert_eq!(h.to_bytes(mode), raw);
    let payload = h.payload_len(mode);
    let flagged = mode == HeaderMode::Extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let want = if h.kind == CMD_WRITE || flagged {
        h.length
    } else {
        0
    };
    assert_eq!(payload, want);

    let result = validate(&h, &session);
    match result {
        Ok(cmd) => check_command(&h, &session, cmd),
        Err(errno) => check_refusal(&h, &session, errno),
    }
    check_next(&t, &h, &result, payload, session.size);

    let extents: Vec<Extent> = data[SESSION_INPUT_LEN + mode.request_len()..]
        .chunks_exact(9)
        .map(|e| Extent {
            len: get_u64(e, 0),
            flags: e[8].into(),
        })
        .collect();
    let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
    let descriptors = check_extents(&extents, h.length, req_one, mode);
    if let Ok(cmd @ Command::BlockStatus { len, .. }) = result {
        let mut out = Vec::new();
        let (done, anomaly) = t.complete(&h, &cmd, Outcome::Extents(&extents), &mut out);
        assert_eq!(anomaly.is_some(), !done.ok());
        if done.ok() {
            assert_eq!(done.body, Body::Descriptors);
            let n = (out.len() / Descriptor::wire_len(mode)) as u64;
            assert!(n > 0 && len > 0);
            let want_len = match mode {
                HeaderMode::Compact => 4 + 8 * n,
                HeaderMode::Extended => 8 + 16 * n,
            };
            let got = match mode {
                HeaderMode::Compact => get_u32(done.reply.as_bytes(), 16) as u64,
                HeaderMode::Extended => get_u64(done.reply.as_bytes(), 24),
            };
            assert_eq!(got, want_len);
        }
    }
    Some(RequestOutcome {
        result,
        descriptors,
        style,
    })
}

/// What the state machine does with a header must follow from validate().
fn check_next(
    t: &Transmission,
    h: &RequestHeader,
    result: &Result<Command, Errno>,
    payload: u64,
    size: u64,
) {
    let next = t.handle_header(h, size);
    match (result, next) {
        (Ok(Command::Disconnect), Next::Disconnect) => {}
        (Ok(cmd @ Command::Write { len, .. }), Next::Payload { len: l, cmd: c }) => {
            assert_eq!((*len as u64, *cmd), (payload, c));
            assert_eq!(l, *len);
        }
        (Ok(Command::BlockStatus { .. }), Next::Payload { len, .. }) => {
            assert_eq!(len as u64, payload);
            assert!(payload > 0 && payload <= request::MAX_BLOCK_STATUS_PAYLOAD);
        }
        (Ok(Command::BlockStatus { .. }), Next::Refuse { skip, .. }) => {
            assert!(payload > request::MAX_BLOCK_STATUS_PAYLOAD);
            assert_eq!(skip, payload);
        }
        (Ok(Command::BlockStatus { .. }), Next::RefuseAndClose { why, .. }) => {
            assert_eq!(why, Close::Oversized(payload));
            assert!(payload > MAX_PAYLOAD as u64);
        }
        (Ok(cmd), Next::Start(c)) => {
            assert_eq!(*cmd, c);
            assert_eq!(payload, 0, "{cmd:?} started with a payload to read");
        }
        (Err(errno), Next::Refuse { reply, skip, .. }) => {
            assert_eq!(skip, payload);
            assert!(payload <= MAX_PAYLOAD as u64);
            check_error_reply(t.style(), reply.as_bytes(), *errno);
        }
        (Err(errno), Next::RefuseAndClose { reply, why, .. }) => {
            assert_eq!(why, Close::Oversized(payload));
            assert!(payload > MAX_PAYLOAD as u64);
            check_error_reply(t.style(), reply.as_bytes(), *errno);
        }
        (r, n) => panic!("validate gave {r:?} but the state machine {n:?}"),
    }
}

fn check_error_reply(style: ReplyStyle, b: &[u8], errno: Errno) {
    match style {
        ReplyStyle::Simple => {
            assert_eq!(b.len(), SIMPLE_REPLY_LEN);
            assert_eq!(get_u32(b, 4), errno.wire());
        }
        ReplyStyle::Structured => {
            assert_eq!(get_u16(b, 6), REPLY_TYPE_ERROR);
            assert_eq!(get_u32(b, CHUNK_HEADER_LEN), errno.wire());
        }
        ReplyStyle::Extended => {
            assert_eq!(get_u16(b, 6), REPLY_TYPE_ERROR);
            assert_eq!(get_u64(b, 24), 6);
            assert_eq!(get_u32(b, EXT_CHUNK_HEADER_LEN), errno.wire());
        }
    }
}

fn check_command(h: &RequestHeader, s: &Session, cmd: Command) {
    let has = |flag: u16| s.flags & flag != 0;
    let flag = |f: u16| h.flags & f != 0;
    let (offset, len, fua) = (h.offset, h.length, flag(CMD_FLAG_FUA));
    let extended = s.style == ReplyStyle::Extended;
    let short = len as u32;
    #[rustfmt::skip]
    let (want, advertised) = match h.kind {
        CMD_READ => (Command::Read { offset, len: short }, TF_HAS_FLAGS),
        CMD_WRITE => (Command::Write { offset, len: short, fua }, TF_HAS_FLAGS),
        CMD_TRIM => (Command::Trim { offset, len, fua }, TF_SEND_TRIM),
        CMD_WRITE_ZEROES => {
            let (no_hole, fast) = (flag(CMD_FLAG_NO_HOLE), flag(CMD_FLAG_FAST_ZERO));
            assert!(!fast || has(TF_SEND_FAST_ZERO));
            (Command::WriteZeroes { offset, len, fua, no_hole, fast }, TF_SEND_WRITE_ZEROES)
        }
        CMD_CACHE => (Command::Cache { offset, len }, TF_SEND_CACHE),
        CMD_BLOCK_STATUS => {
            assert!(s.base_allocation && len > 0);
            (Command::BlockStatus { offset, len, req_one: flag(CMD_FLAG_REQ_ONE) }, TF_HAS_FLAGS)
        }
        CMD_FLUSH => (Command::Flush, TF_SEND_FLUSH),
        CMD_DISC => (Command::Disconnect, TF_HAS_FLAGS),
        other => panic!("unknown command {other} accepted"),
    };
    assert_eq!(cmd, want);
    // Advertised by a flag, if the command needs one (HAS_FLAGS stands for none).
    assert!(
        advertised == TF_HAS_FLAGS || has(advertised),
        "{cmd:?} not advertised"
    );
    assert!(
        h.flags & !0x3f == 0,
        "unknown flags {:#x} accepted",
        h.flags
    );
    // PAYLOAD_LEN: optional on an extended WRITE, else only on an extended
    // BLOCK_STATUS of a server that said so.
    match (h.kind, extended) {
        (CMD_WRITE, true) => {}
        (CMD_BLOCK_STATUS, true) => {
            assert!(!flag(CMD_FLAG_PAYLOAD_LEN) || has(TF_BLOCK_STATUS_PAYLOAD))
        }
        _ => assert!(!flag(CMD_FLAG_PAYLOAD_LEN)),
    }
    assert!(!fua || has(TF_SEND_FUA));
    assert!(!flag(CMD_FLAG_DF) || h.kind == CMD_READ && s.style.structured() && has(TF_SEND_DF));
    if matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        assert!(!has(TF_READ_ONLY), "write on a read-only export");
    }
    let payload_form = h.kind == CMD_BLOCK_STATUS && flag(CMD_FLAG_PAYLOAD_LEN);
    if !matches!(cmd, Command::Flush | Command::Disconnect) && !payload_form {
        assert!(offset.checked_add(len).is_some_and(|end| end <= s.size));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) {
        assert!(len <= MAX_PAYLOAD as u64);
    }
    if !extended {
        assert!(len <= u32::MAX as u64);
    }
    let data = ReplyHeader::read_data(s.style, h.cookie, offset, short.min(MAX_PAYLOAD));
    assert!(data.as_bytes().len() <= reply::MAX_HEADER);
    let done = ReplyHeader::done(s.style, h.cookie, offset);
    let want_len = match s.style {
        ReplyStyle::Extended => EXT_CHUNK_HEADER_LEN,
        _ => SIMPLE_REPLY_LEN,
    };
    assert_eq!(done.as_bytes().len(), want_len);
}

fn check_refusal(h: &RequestHeader, s: &Session, errno: Errno) {
    let end = h.offset.checked_add(h.length);
    let out_of_range = end.is_none() || end > Some(s.size);
    match errno {
        Errno::Inval => {}
        Errno::Perm => {
            assert!(s.flags & TF_READ_ONLY != 0);
            assert!(matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES));
        }
        Errno::NoSpc => {
            assert!(matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) && out_of_range);
        }
        other => panic!("validate() returned {other}"),
    }
    for style in [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ] {
        let reply = ReplyHeader::error(style, h.cookie, h.offset, errno);
        check_error_reply(style, reply.as_bytes(), errno);
    }
}

/// Runs encode_extents and checks its output; returns the descriptor count.
fn check_extents(extents: &[Extent], limit: u64, req_one: bool, mode: HeaderMode) -> u32 {
    let mut out = Vec::new();
    let n = encode_extents(extents, limit, req_one, mode, &mut out);
    let each = Descriptor::wire_len(mode);
    assert_eq!(out.len(), each * n as usize);
    let mut r = Reader::new(&out);
    let descriptors: Vec<Descriptor> = (0..n)
        .map(|_| Descriptor::read_mode(&mut r, mode).unwrap())
        .collect();
    let sum: u128 = descriptors.iter().map(|d| u128::from(d.len)).sum();
    let total: u128 = extents.iter().map(|e| u128::from(e.len)).sum();
    let first = extents.iter().find(|e| e.len > 0);
    assert!(descriptors.iter().all(|d| d.len > 0));
    assert!(sum <= limit.into());
    if mode == HeaderMode::Compact && limit <= u32::MAX as u64 {
        assert!(
            descriptors.windows(2).all(|w| w[0].flags != w[1].flags),
            "unmerged neighbours"
        );
    }
    assert_eq!(n == 0, limit == 0 || first.is_none());
    if let (Some(first), Some(d)) = (first, descriptors.first()) {
        assert_eq!(u64::from(first.flags), d.flags);
    }
    if req_one {
        assert!(n <= 1);
    } else {
        assert_eq!(sum, total.min(limit.into()));
    }
    n
}

/// Drives the client handshake with a server's byte stream, fed exactly
/// as [`ClientHandshake::want`] asks; panics when it breaks a rule.
pub fn drive_client(data: &[u8]) -> Option<ClientNegotiated> {
    let mut c = ClientHandshake::new("disk").expect("a short name");
    let mut rest = data;
    let mut sent = Vec::new();
    while c.negotiated().is_none() {
        sent.extend(c.take_output());
        let want = c.want();
        if want == 0 || rest.len() < want {
            let _ = c.on_eof();
            break;
        }
        assert!(want <= client::MAX_REPLY_LEN as usize);
        let (chunk, tail) = rest.split_at(want);
        rest = tail;
        if c.receive(chunk).is_err() {
            assert_eq!(c.want(), 0, "a failed handshake wants nothing more");
            assert!(c.receive(&[]).is_err());
            return None;
        }
    }
    let n = c.negotiated().copied()?;
    // What the client sent is a well-formed option stream a server accepts.
    let mut server = Handshake::new();
    server.take_output();
    let mut r = Reader::new(&sent);
    while server.want() > 0 && r.left() >= server.want() {
        let chunk = r.take(server.want()).unwrap();
        if server.receive(chunk, &TestCatalog).is_err() {
            break;
        }
    }
    assert!(n.min_block.is_power_of_two() && n.preferred_block >= n.min_block);
    assert!(n.max_block >= n.min_block);
    Some(n)
}

#[cfg(test)]
mod smoke {
    use super::msgs::InfoBlock;
    use super::*;
    use std::collections::HashSet;
    use std::mem::discriminant;

    /// xorshift64*: tiny, seeded, good enough to spread inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }

        fn bytes(&mut self, max: u64) -> Vec<u8> {
            let n = self.below(max + 1);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn name(rng: &mut Rng) -> Vec<u8> {
        match rng.below(8) {
            0 => rng.bytes(8),
            1 => vec![b'n'; MAX_STRING + 1],
            _ => rng
                .pick(&[&b""[..], b"disk", b"ro", b"nope", b"\xff"])
                .to_vec(),
        }
    }

    fn query(rng: &mut Rng) -> &'static [u8] {
        rng.pick(&[
            &b"base:allocation"[..],
            b"base:",
            b"base:other",
            b"qemu:dirty-bitmap:a",
            b"",
            b"base:\xff",
        ])
    }

    fn payload(rng: &mut Rng, option: u32) -> Vec<u8> {
        let mut data = match option {
            OPT_EXPORT_NAME => name(rng),
            OPT_INFO | OPT_GO => {
                let infos: Vec<u16> = (0..rng.below(5)).map(|_| rng.below(6) as u16).collect();
                info_request(&name(rng), &infos)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT if rng.chance(40) => {
                meta_request(b"disk", &[b"base:allocation"])
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let queries: Vec<&[u8]> = (0..rng.below(4)).map(|_| query(rng)).collect();
                meta_request(&name(rng), &queries)
            }
            _ if rng.chance(80) => vec![],
            _ => rng.bytes(40),
        };
        if rng.chance(5) && !data.is_empty() {
            let at = rng.below(data.len() as u64) as usize;
            data[at] = rng.next() as u8;
        }
        if rng.chance(3) {
            data.truncate(rng.below(data.len() as u64 + 1) as usize);
        }
        data
    }

    const OPTIONS: [u32; 14] = [
        OPT_EXPORT_NAME,
        OPT_ABORT,
        OPT_LIST,
        OPT_STARTTLS,
        OPT_INFO,
        OPT_GO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        0x99,
    ];

    fn handshake_input(rng: &mut Rng) -> Vec<u8> {
        // Mostly no TLS, then TLS offered or required, then a shutdown.
        let ctl = match rng.below(10) {
            0..=5 => 0,
            6..=7 => 1 + rng.below(2) as u8,
            _ => 0x80 | rng.below(6) as u8,
        };
        let mut d = vec![ctl];
        let flags = match rng.below(20) {
            0 => rng.next() as u32 & 0x8000_0007,
            1..=5 => CLIENT_FIXED_NEWSTYLE,
            _ => CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
        };
        flags.encode(&mut d);
        // Now and then a long, clean run of options that never end the handshake.
        let long = rng.chance(1);
        let (count, options) = if long {
            (
                MAX_OPTIONS as u64 + 2,
                &[OPT_LIST, OPT_STRUCTURED_REPLY, 0x99][..],
            )
        } else {
            (rng.below(10), &OPTIONS[..])
        };
        for _ in 0..count {
            let option = rng.pick(options);
            let data = payload(rng, option);
            let len = match rng.below(100) {
                _ if long => data.len() as u32,
                0 => MAX_OPTION_LEN + 1,
                1 => u32::MAX,
                2 => data.len() as u32 + 1,
                _ => data.len() as u32,
            };
            let at = d.len();
            OptionHeader { option, len }.encode(&mut d);
            if !long && rng.chance(1) {
                d[at + rng.below(8) as usize] ^= 1 << rng.below(8);
            }
            d.extend_from_slice(&data);
        }
        if rng.chance(5) {
            d.truncate(rng.below(d.len() as u64 + 1) as usize);
        }
        d
    }

    fn request_input(rng: &mut Rng) -> Vec<u8> {
        let any = rng.next();
        let size = rng.pick(&[0, 1, 4096, 1 << 30, 1 << 40, u64::MAX, any]);
        let (inside, any) = (rng.below(size.max(1)), rng.next());
        let offset = rng.pick(&[
            0,
            1,
            size.wrapping_sub(4096),
            size,
            size.wrapping_add(1),
            u64::MAX,
            inside,
            any,
        ]);
        let session_bits = rng.next() as u8;
        let mode = if session_bits & 4 != 0 {
            HeaderMode::Extended
        } else {
            HeaderMode::Compact
        };
        let room = size.saturating_sub(offset);
        let short_room = room.min(u32::MAX.into());
        let mut length = rng.pick(&[
            0,
            1,
            4096,
            12,
            short_room,
            short_room.wrapping_add(1),
            room,
            room.wrapping_add(1),
            MAX_PAYLOAD.into(),
            u64::from(MAX_PAYLOAD) + 1,
            u32::MAX.into(),
            5 << 30,
            u64::MAX,
        ]);
        if mode == HeaderMode::Compact {
            length &= u32::MAX as u64;
        }
        let mut flags = if rng.chance(90) {
            rng.below(32) as u16
        } else {
            rng.next() as u16
        };
        let kind = if rng.chance(95) {
            rng.below(8) as u16
        } else {
            rng.next() as u16
        };
        // Mostly the right PAYLOAD_LEN use, so commands get through.
        if mode == HeaderMode::Extended && rng.chance(90) {
            let with = kind == CMD_WRITE || kind == CMD_BLOCK_STATUS && rng.chance(30);
            flags = if with {
                flags | CMD_FLAG_PAYLOAD_LEN
            } else {
                flags & !CMD_FLAG_PAYLOAD_LEN
            };
        }
        let header = RequestHeader {
            flags,
            kind,
            cookie: rng.next(),
            offset,
            length,
        };
        let mut d = Vec::new();
        size.encode(&mut d);
        let tflags = if rng.chance(90) {
            rng.next() as u16 & 0x1dff
        } else {
            rng.next() as u16
        };
        tflags.encode(&mut d);
        d.push(session_bits);
        let at = d.len();
        header.encode_mode(mode, &mut d);
        if rng.chance(2) {
            d[at + rng.below(4) as usize] ^= 1 << rng.below(8);
        }
        if mode == HeaderMode::Compact {
            d.extend_from_slice(&[0; 4]); // room for an extended header
        }
        let count = if rng.chance(5) {
            rng.below(200)
        } else {
            rng.below(8)
        };
        for _ in 0..count {
            let small = rng.below(1 << 20);
            let len = rng.pick(&[0, 1, 512, 4096, small, u32::MAX.into(), 1 << 32, u64::MAX]);
            len.encode(&mut d);
            d.push(if rng.chance(90) {
                rng.below(4) as u8
            } else {
                rng.next() as u8
            });
        }
        d
    }

    #[test]
    fn handshake_driver_on_pseudo_random_streams() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut via_go, mut via_name, mut with_meta) = (0, 0, 0);
        let mut errors = HashSet::new();
        let mut replies = 0;
        for _ in 0..300_000 {
            let outcome = drive_handshake(&handshake_input(&mut rng));
            replies |= outcome.replies;
            if let Some(e) = &outcome.error {
                errors.insert(discriminant(e));
            }
            if let Some(n) = outcome.negotiated {
                match outcome.last_option {
                    Some(OPT_GO) => via_go += 1,
                    Some(OPT_EXPORT_NAME) => via_name += 1,
                    other => panic!("finished by {other:?}"),
                }
                with_meta += usize::from(n.base_allocation.is_some());
            }
        }
        // The generator must reach every corner, or the test proves little.
        use HandshakeError::*;
        let every_error = [
            BadClientFlags(0),
            NotFixedNewstyle,
            BadOptionMagic(0),
            OptionTooBig(0),
            TooManyOptions,
            UnknownExport(String::new()),
            Aborted,
            ShuttingDown,
            TlsRequired,
        ];
        for e in &every_error {
            assert!(errors.contains(&discriminant(e)), "never saw {e:?}");
        }
        let every_reply = [
            REP_ACK,
            REP_SERVER,
            REP_INFO,
            REP_META_CONTEXT,
            REP_ERR_UNSUP,
            REP_ERR_INVALID,
            REP_ERR_UNKNOWN,
            REP_ERR_SHUTDOWN,
            REP_ERR_TOO_BIG,
            REP_ERR_POLICY,
            REP_ERR_TLS_REQD,
        ];
        for kind in every_reply {
            assert!(replies & reply_bit(kind) != 0, "never saw reply {kind:#x}");
        }
        assert!(
            via_go > 1000 && via_name > 1000 && with_meta > 200,
            "{via_go} {via_name} {with_meta}"
        );
    }

    #[test]
    fn request_driver_on_pseudo_random_inputs() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut commands = HashSet::new();
        let mut errnos = HashSet::new();
        let mut multi_descriptor = 0;
        let mut extended_commands = HashSet::new();
        for _ in 0..300_000 {
            let outcome = drive_request(&request_input(&mut rng)).unwrap();
            match outcome.result {
                Ok(cmd) if outcome.style == ReplyStyle::Extended => {
                    extended_commands.insert(discriminant(&cmd))
                }
                Ok(cmd) => commands.insert(discriminant(&cmd)),
                Err(e) => errnos.insert(e),
            };
            multi_descriptor += usize::from(outcome.descriptors > 1);
        }
        assert_eq!(commands.len(), 8, "every command validated at least once");
        assert_eq!(extended_commands.len(), 8, "also with extended headers");
        assert_eq!(
            errnos,
            HashSet::from([Errno::Inval, Errno::Perm, Errno::NoSpc])
        );
        assert!(multi_descriptor > 1000);
    }

    /// A server stream: a greeting (mostly right), then option replies
    /// to GO (mostly well-formed), or an EXPORT_NAME answer.
    fn server_input(rng: &mut Rng) -> Vec<u8> {
        let mut d = Vec::new();
        let flags = match rng.below(10) {
            0 => rng.next() as u16,
            1 => FLAG_FIXED_NEWSTYLE,
            _ => FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        let mut g = Greeting::newstyle(flags);
        if rng.chance(3) {
            g.magic = rng.next();
        }
        if rng.chance(3) {
            let any = rng.next();
            g.style = rng.pick(&[OLDSTYLE_MAGIC, any]);
        }
        g.encode(&mut d);
        for _ in 0..rng.below(6) {
            let option = if rng.chance(95) {
                OPT_GO
            } else {
                rng.below(12) as u32
            };
            let (kind, body) = match rng.below(12) {
                0..=2 => (
                    REP_INFO,
                    InfoBlock::Export {
                        size: rng.next(),
                        flags: rng.next() as u16,
                    }
                    .to_bytes(),
                ),
                3 | 4 => (
                    REP_INFO,
                    InfoBlock::BlockSize {
                        min: rng.pick(&[0, 1, 512, 4096, 3]),
                        preferred: rng.pick(&[0, 512, 4096, 1 << 20]),
                        max: rng.pick(&[0, 4096, 32 << 20]),
                    }
                    .to_bytes(),
                ),
                5 => (REP_INFO, rng.bytes(20)),
                6 => (REP_ACK, vec![]),
                7 => (REP_ERR_UNSUP, vec![]),
                8 => (
                    rng.pick(&[REP_ERR_UNKNOWN, REP_ERR_POLICY, REP_ERR_TLS_REQD]),
                    rng.bytes(10),
                ),
                9 => (rng.next() as u32, rng.bytes(8)),
                _ => (REP_ACK, vec![]),
            };
            let mut reply = OptionReplyHeader::with_body(option, kind, &body);
            if rng.chance(2) {
                let at = rng.below(reply.len() as u64) as usize;
                reply[at] ^= 1 << rng.below(8);
            }
            d.extend(reply);
        }
        if rng.chance(20) {
            ExportNameReply {
                size: rng.next(),
                flags: rng.next() as u16,
            }
            .put(&mut d, rng.chance(50));
        }
        if rng.chance(5) {
            d.truncate(rng.below(d.len() as u64 + 1) as usize);
        }
        d
    }

    #[test]
    fn client_driver_on_pseudo_random_streams() {
        let mut rng = Rng(0x51_7cc1_b727_220a);
        let mut negotiated = 0;
        for _ in 0..100_000 {
            negotiated += usize::from(drive_client(&server_input(&mut rng)).is_some());
        }
        assert!(negotiated > 1000, "{negotiated}");
    }

    #[test]
    fn drivers_accept_short_and_empty_input() {
        assert!(drive_request(&[0; REQUEST_INPUT_LEN - 1]).is_none());
        assert!(drive_handshake(&[]).negotiated.is_none());
        assert!(drive_client(&[]).is_none());
        let mut rng = Rng(7);
        for len in 0..64 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            drive_handshake(&data);
            drive_request(&data);
            drive_client(&data);
        }
    }
}
