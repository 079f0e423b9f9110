//! Fuzz drivers for the sans-IO protocol, and a deterministic smoke test.
//!
//! The cargo-fuzz targets in `fuzz/` include this file by path and call
//! [`drive_handshake`] and [`drive_request`] on libFuzzer's input; the
//! `smoke` tests below feed the same drivers a few hundred thousand inputs
//! from a seeded xorshift generator, so CI runs these code paths without
//! cargo-fuzz. A driver panics when the protocol breaks one of its rules.

use super::consts::*;
use super::handshake::{MAX_OPTIONS, MAX_OPTION_LEN};
use super::wire::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use super::*;

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
pub fn parse_replies(mut out: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated reply header: {out:02x?}");
        assert_eq!(get_u64(out, 0), OPT_REPLY_MAGIC);
        let len = get_u32(out, 16) as usize;
        assert!(out.len() - 20 >= len, "truncated reply body");
        replies.push(Reply {
            option: get_u32(out, 8),
            kind: get_u32(out, 12),
            body: out[20..20 + len].to_vec(),
        });
        out = &out[20 + len..];
    }
    replies
}

pub fn option_header(option: u32, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    put_u64(&mut h, IHAVEOPT);
    put_u32(&mut h, option);
    put_u32(&mut h, len);
    h
}

/// INFO/GO payload.
pub fn info_request(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    put_u32(&mut d, name.len() as u32);
    d.extend_from_slice(name);
    put_u16(&mut d, infos.len() as u16);
    for &i in infos {
        put_u16(&mut d, i);
    }
    d
}

/// LIST/SET_META_CONTEXT payload.
pub fn meta_request(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = Vec::new();
    put_u32(&mut d, name.len() as u32);
    d.extend_from_slice(name);
    put_u32(&mut d, queries.len() as u32);
    for q in queries {
        put_u32(&mut d, q.len() as u32);
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
/// shutting down (bit 7 set: before option number `data[0] & 0x7f`), the rest
/// is the client's byte stream, fed exactly as [`Handshake::want`] asks.
pub fn drive_handshake(data: &[u8]) -> HandshakeOutcome {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return HandshakeOutcome::default();
    };
    let shutdown_at = (ctl & 0x80 != 0).then_some(u32::from(ctl & 0x7f));
    let mut hs = Handshake::new();
    let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
    put_u16(&mut greeting, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
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
                outcome.replies |= check_option_replies(option, &result, &out, &hs);
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
        assert_eq!(TestCatalog.lookup(&n.export.name).as_ref(), Some(&n.export));
        assert!(n.base_allocation.is_none() || n.structured_replies, "{n:?}");
        assert!(matches!(
            n.base_allocation,
            None | Some(META_ID_BASE_ALLOCATION)
        ));
    }
    outcome
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
    let want = if magic != IHAVEOPT {
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
                let zeroes = if n.no_zeroes { 0 } else { 124 };
                assert_eq!(out.len(), 10 + zeroes);
                assert_eq!(get_u64(out, 0), n.export.size);
                assert_eq!(get_u16(out, 8), n.export.flags);
                assert!(out[10..].iter().all(|&b| b == 0));
            }
            None => {
                assert!(out.is_empty(), "EXPORT_NAME refused with output");
                assert!(matches!(
                    result,
                    Err(HandshakeError::UnknownExport(_) | HandshakeError::ShuttingDown)
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

/// Bytes [`drive_request`] reads before the extents.
pub const REQUEST_INPUT_LEN: usize = REQUEST_LEN + 11;

/// What one driven request came to.
#[derive(Debug)]
pub struct RequestOutcome {
    pub result: Result<Command, Errno>,
    pub descriptors: u32,
}

/// Drives request parsing and validation. `data` is a 28-byte request header
/// (a bad magic is checked, then patched), a session (u64 size, u16 flags, a
/// byte whose bits 0 and 1 are structured replies and base:allocation), then
/// extents of 9 bytes (u64 length, u8 flags) for encode_extents.
pub fn drive_request(data: &[u8]) -> Option<RequestOutcome> {
    if data.len() < REQUEST_INPUT_LEN {
        return None;
    }
    let mut raw: [u8; REQUEST_LEN] = data[..REQUEST_LEN].try_into().unwrap();
    if let Err(BadMagic(magic)) = RequestHeader::parse(&raw) {
        assert_eq!(magic, get_u32(&raw, 0));
        assert_ne!(magic, REQUEST_MAGIC);
        raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let h = RequestHeader::parse(&raw).expect("magic is right");
    assert_eq!(h.encode(), raw);
    assert_eq!(
        h.payload_len(),
        if h.kind == CMD_WRITE { h.length } else { 0 }
    );

    let s = &data[REQUEST_LEN..];
    let session = Session {
        size: get_u64(s, 0),
        flags: get_u16(s, 8),
        structured: s[10] & 1 != 0,
        base_allocation: s[10] & 2 != 0,
    };
    let result = validate(&h, &session);
    match result {
        Ok(cmd) => check_command(&h, &session, cmd),
        Err(errno) => check_refusal(&h, &session, errno),
    }

    let extents: Vec<Extent> = data[REQUEST_INPUT_LEN..]
        .chunks_exact(9)
        .map(|e| Extent {
            len: get_u64(e, 0),
            flags: e[8].into(),
        })
        .collect();
    let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
    let descriptors = check_extents(&extents, h.length, req_one);
    if let Ok(Command::BlockStatus { .. }) = result {
        if descriptors > 0 {
            let header = ReplyHeader::block_status(h.cookie, META_ID_BASE_ALLOCATION, descriptors);
            assert_eq!(get_u32(header.as_bytes(), 16), 4 + 8 * descriptors);
        }
    }
    Some(RequestOutcome {
        result,
        descriptors,
    })
}

fn check_command(h: &RequestHeader, s: &Session, cmd: Command) {
    let has = |flag: u16| s.flags & flag != 0;
    let flag = |f: u16| h.flags & f != 0;
    let (offset, len, fua) = (h.offset, h.length, flag(CMD_FLAG_FUA));
    #[rustfmt::skip]
    let (want, advertised) = match h.kind {
        CMD_READ => (Command::Read { offset, len }, TF_HAS_FLAGS),
        CMD_WRITE => (Command::Write { offset, len, fua }, TF_HAS_FLAGS),
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
        h.flags & !0x1f == 0,
        "unknown flags {:#x} accepted",
        h.flags
    );
    assert!(!fua || has(TF_SEND_FUA));
    assert!(!flag(CMD_FLAG_DF) || h.kind == CMD_READ && s.structured && has(TF_SEND_DF));
    if matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        assert!(!has(TF_READ_ONLY), "write on a read-only export");
    }
    if !matches!(cmd, Command::Flush | Command::Disconnect) {
        assert!(offset
            .checked_add(len.into())
            .is_some_and(|end| end <= s.size));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) {
        assert!(len <= MAX_PAYLOAD);
    }
    let data = ReplyHeader::read_data(h.cookie, offset, len.min(MAX_PAYLOAD), s.structured);
    assert!(data.as_bytes().len() <= reply::MAX_HEADER);
    assert_eq!(
        ReplyHeader::done(h.cookie).as_bytes().len(),
        SIMPLE_REPLY_LEN
    );
}

fn check_refusal(h: &RequestHeader, s: &Session, errno: Errno) {
    let end = h.offset.checked_add(h.length.into());
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
    let simple = ReplyHeader::error(h.cookie, errno, false);
    assert_eq!(simple.as_bytes().len(), SIMPLE_REPLY_LEN);
    let chunk = ReplyHeader::error(h.cookie, errno, true);
    assert_eq!(get_u32(chunk.as_bytes(), CHUNK_HEADER_LEN), errno.wire());
}

/// Runs encode_extents and checks its output; returns the descriptor count.
fn check_extents(extents: &[Extent], limit: u32, req_one: bool) -> u32 {
    let mut out = Vec::new();
    let n = encode_extents(extents, limit, req_one, &mut out);
    assert_eq!(out.len(), 8 * n as usize);
    let descriptors: Vec<(u32, u32)> = out
        .chunks_exact(8)
        .map(|d| (get_u32(d, 0), get_u32(d, 4)))
        .collect();
    let sum: u64 = descriptors.iter().map(|&(len, _)| u64::from(len)).sum();
    let total: u128 = extents.iter().map(|e| u128::from(e.len)).sum();
    let first = extents.iter().find(|e| e.len > 0);
    assert!(descriptors.iter().all(|&(len, _)| len > 0));
    assert!(sum <= limit.into());
    assert!(
        descriptors.windows(2).all(|w| w[0].1 != w[1].1),
        "unmerged neighbours"
    );
    assert_eq!(n == 0, limit == 0 || first.is_none());
    if let (Some(first), Some(&(_, flags))) = (first, descriptors.first()) {
        assert_eq!(first.flags, flags);
    }
    if req_one {
        assert!(n <= 1);
    } else {
        assert_eq!(u128::from(sum), total.min(limit.into()));
    }
    n
}

#[cfg(test)]
mod smoke {
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
        let ctl = if rng.chance(80) {
            0
        } else {
            0x80 | rng.below(6) as u8
        };
        let mut d = vec![ctl];
        let flags = match rng.below(20) {
            0 => rng.next() as u32 & 0x8000_0007,
            1..=5 => CLIENT_FIXED_NEWSTYLE,
            _ => CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
        };
        put_u32(&mut d, flags);
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
            let magic = if long || rng.chance(99) {
                IHAVEOPT
            } else {
                rng.next()
            };
            let len = match rng.below(100) {
                _ if long => data.len() as u32,
                0 => MAX_OPTION_LEN + 1,
                1 => u32::MAX,
                2 => data.len() as u32 + 1,
                _ => data.len() as u32,
            };
            put_u64(&mut d, magic);
            put_u32(&mut d, option);
            put_u32(&mut d, len);
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
        let room = size.saturating_sub(offset).min(u32::MAX.into()) as u32;
        let length = rng.pick(&[
            0,
            1,
            4096,
            room,
            room.wrapping_add(1),
            MAX_PAYLOAD,
            MAX_PAYLOAD + 1,
            u32::MAX,
        ]);
        let header = RequestHeader {
            flags: if rng.chance(90) {
                rng.below(32) as u16
            } else {
                rng.next() as u16
            },
            kind: if rng.chance(95) {
                rng.below(8) as u16
            } else {
                rng.next() as u16
            },
            cookie: rng.next(),
            offset,
            length,
        };
        let mut d = header.encode().to_vec();
        if rng.chance(2) {
            d[rng.below(4) as usize] ^= 1 << rng.below(8);
        }
        put_u64(&mut d, size);
        put_u16(
            &mut d,
            if rng.chance(90) {
                rng.next() as u16 & 0x0dff
            } else {
                rng.next() as u16
            },
        );
        d.push(rng.next() as u8);
        let count = if rng.chance(5) {
            rng.below(200)
        } else {
            rng.below(8)
        };
        for _ in 0..count {
            let small = rng.below(1 << 20);
            let len = rng.pick(&[0, 1, 512, 4096, small, u32::MAX.into(), 1 << 32, u64::MAX]);
            put_u64(&mut d, len);
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
        for _ in 0..300_000 {
            let outcome = drive_request(&request_input(&mut rng)).unwrap();
            match outcome.result {
                Ok(cmd) => commands.insert(discriminant(&cmd)),
                Err(e) => errnos.insert(e),
            };
            multi_descriptor += usize::from(outcome.descriptors > 1);
        }
        assert_eq!(commands.len(), 8, "every command validated at least once");
        assert_eq!(
            errnos,
            HashSet::from([Errno::Inval, Errno::Perm, Errno::NoSpc])
        );
        assert!(multi_descriptor > 1000);
    }

    #[test]
    fn drivers_accept_short_and_empty_input() {
        assert!(drive_request(&[0; REQUEST_INPUT_LEN - 1]).is_none());
        assert!(drive_handshake(&[]).negotiated.is_none());
        let mut rng = Rng(7);
        for len in 0..64 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            drive_handshake(&data);
            drive_request(&data);
        }
    }
}
