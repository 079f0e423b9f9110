use super::*;
use crate::protocol::msgs::{BadMagic, HeaderMode};
use Command::*;

const SIZE: u64 = 1 << 30;
const ALL: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_SEND_DF
    | TF_CAN_MULTI_CONN
    | TF_SEND_CACHE
    | TF_SEND_FAST_ZERO;
const INVAL: Result<Command, Errno> = Err(Errno::Inval);
const NOSPC: Result<Command, Errno> = Err(Errno::NoSpc);
const PERM: Result<Command, Errno> = Err(Errno::Perm);
const UNKNOWN_KINDS: [u16; 5] = [8, 9, 0x100, 0x8000, u16::MAX];

/// Everything advertised, structured replies and base:allocation negotiated.
fn full() -> Session {
    Session {
        size: SIZE,
        flags: ALL,
        style: ReplyStyle::Structured,
        base_allocation: true,
    }
}

fn without(flags: u16) -> Session {
    Session {
        flags: ALL & !flags,
        ..full()
    }
}

fn read_only() -> Session {
    Session {
        flags: ALL | TF_READ_ONLY,
        ..full()
    }
}

fn simple_replies() -> Session {
    Session {
        style: ReplyStyle::Simple,
        base_allocation: false,
        ..full()
    }
}

fn sized(size: u64) -> Session {
    Session { size, ..full() }
}

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 0x0123_4567_89ab_cdef,
        offset,
        length: length as u64,
    }
}

/// Checks each named constant against the spec's number.
macro_rules! assert_spec {
    ($($name:ident = $value:expr),* $(,)?) => {
        $(assert_eq!($name as u64, $value, stringify!($name));)*
    };
}

/// Every number in consts.rs, as doc/proto.md gives it.
#[test]
fn consts_match_spec() {
    assert_spec! {
        NBDMAGIC = 0x4e42444d41474943, IHAVEOPT = 0x49484156454F5054,
        OPT_REPLY_MAGIC = 0x3e889045565a9, REQUEST_MAGIC = 0x25609513,
        SIMPLE_REPLY_MAGIC = 0x67446698, STRUCTURED_REPLY_MAGIC = 0x668e33ef,

        FLAG_FIXED_NEWSTYLE = 1 << 0, FLAG_NO_ZEROES = 1 << 1,
        CLIENT_FIXED_NEWSTYLE = 1 << 0, CLIENT_NO_ZEROES = 1 << 1,

        OPT_EXPORT_NAME = 1, OPT_ABORT = 2, OPT_LIST = 3, OPT_STARTTLS = 5, OPT_INFO = 6,
        OPT_GO = 7, OPT_STRUCTURED_REPLY = 8, OPT_LIST_META_CONTEXT = 9,
        OPT_SET_META_CONTEXT = 10, OPT_EXTENDED_HEADERS = 11,

        REP_ACK = 1, REP_SERVER = 2, REP_INFO = 3, REP_META_CONTEXT = 4,
        REP_ERR_UNSUP = (1 << 31) + 1, REP_ERR_POLICY = (1 << 31) + 2,
        REP_ERR_INVALID = (1 << 31) + 3, REP_ERR_PLATFORM = (1 << 31) + 4,
        REP_ERR_TLS_REQD = (1 << 31) + 5, REP_ERR_UNKNOWN = (1 << 31) + 6,
        REP_ERR_SHUTDOWN = (1 << 31) + 7, REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8,
        REP_ERR_TOO_BIG = (1 << 31) + 9,

        INFO_EXPORT = 0, INFO_NAME = 1, INFO_DESCRIPTION = 2, INFO_BLOCK_SIZE = 3,

        TF_HAS_FLAGS = 1 << 0, TF_READ_ONLY = 1 << 1, TF_SEND_FLUSH = 1 << 2,
        TF_SEND_FUA = 1 << 3, TF_ROTATIONAL = 1 << 4, TF_SEND_TRIM = 1 << 5,
        TF_SEND_WRITE_ZEROES = 1 << 6, TF_SEND_DF = 1 << 7, TF_CAN_MULTI_CONN = 1 << 8,
        TF_SEND_CACHE = 1 << 10, TF_SEND_FAST_ZERO = 1 << 11,

        CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2, CMD_FLUSH = 3, CMD_TRIM = 4,
        CMD_CACHE = 5, CMD_WRITE_ZEROES = 6, CMD_BLOCK_STATUS = 7,

        CMD_FLAG_FUA = 1 << 0, CMD_FLAG_NO_HOLE = 1 << 1, CMD_FLAG_DF = 1 << 2,
        CMD_FLAG_REQ_ONE = 1 << 3, CMD_FLAG_FAST_ZERO = 1 << 4,

        REPLY_FLAG_DONE = 1 << 0, REPLY_TYPE_NONE = 0, REPLY_TYPE_OFFSET_DATA = 1,
        REPLY_TYPE_OFFSET_HOLE = 2, REPLY_TYPE_BLOCK_STATUS = 5,
        REPLY_TYPE_ERROR = (1 << 15) + 1, REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2,

        STATE_HOLE = 1 << 0, STATE_ZERO = 1 << 1,

        REQUEST_LEN = 28, SIMPLE_REPLY_LEN = 16, CHUNK_HEADER_LEN = 20, MAX_STRING = 4096,
        // Lengths under 2^25 must not be treated as an attack (spec, block sizes).
        MAX_PAYLOAD = 1 << 25,
    }
    assert_eq!(META_BASE_ALLOCATION, "base:allocation");
    assert_ne!(
        META_ID_BASE_ALLOCATION, 0,
        "LIST replies use the reserved id 0"
    );
}

#[test]
fn parse_reads_big_endian_fields_and_encode_writes_them_back() {
    let wire: [u8; REQUEST_LEN] = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 1, 0, 0, 0x10, 0, // offset
        0, 0x01, 0, 0, // length
    ];
    let want = RequestHeader {
        flags: CMD_FLAG_FUA,
        kind: CMD_WRITE,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1_0000_1000,
        length: 0x1_0000,
    };
    assert_eq!(RequestHeader::parse(&wire, HeaderMode::Compact), Ok(want));
    assert_eq!(want.to_bytes(HeaderMode::Compact), wire);
}

#[test]
fn encode_then_parse_round_trips() {
    let table = [
        req(CMD_READ, 0, 0, 0),
        req(CMD_WRITE, CMD_FLAG_FUA, SIZE, MAX_PAYLOAD),
        req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 1, 1),
        RequestHeader {
            flags: u16::MAX,
            kind: u16::MAX,
            cookie: u64::MAX,
            offset: u64::MAX,
            length: u32::MAX as u64,
        },
    ];
    for h in table {
        assert_eq!(
            RequestHeader::parse(&h.to_bytes(HeaderMode::Compact), HeaderMode::Compact),
            Ok(h)
        );
    }
}

#[test]
fn bad_magic_is_refused() {
    let magics = [
        0,
        SIMPLE_REPLY_MAGIC,
        STRUCTURED_REPLY_MAGIC,
        REQUEST_MAGIC.swap_bytes(),
        REQUEST_MAGIC ^ 1,
        u32::MAX,
    ];
    for magic in magics {
        let mut wire = req(CMD_READ, 0, 0, 512).to_bytes(HeaderMode::Compact);
        wire[..4].copy_from_slice(&magic.to_be_bytes());
        assert_eq!(
            RequestHeader::parse(&wire, HeaderMode::Compact),
            Err(BadMagic(magic)),
            "{magic:#x}"
        );
    }
}

#[test]
fn only_writes_carry_a_payload() {
    for kind in (0..=7).chain(UNKNOWN_KINDS) {
        for length in [0, 1, MAX_PAYLOAD + 1, u32::MAX] {
            let want = if kind == CMD_WRITE { length as u64 } else { 0 };
            // Whatever validate() will say: the caller skips this much.
            assert_eq!(
                req(kind, u16::MAX, 0, length).payload_len(HeaderMode::Compact),
                want,
                "kind {kind}"
            );
        }
    }
}

/// Every command flag on every command: the documented ones (and FUA,
/// which the spec makes valid on all commands) pass, the rest get EINVAL.
#[test]
fn flags_allowed_per_command() {
    let table = [
        (CMD_READ, CMD_FLAG_FUA | CMD_FLAG_DF),
        (CMD_WRITE, CMD_FLAG_FUA),
        (CMD_DISC, CMD_FLAG_FUA),
        (CMD_FLUSH, CMD_FLAG_FUA),
        (CMD_TRIM, CMD_FLAG_FUA),
        (CMD_CACHE, CMD_FLAG_FUA),
        (
            CMD_WRITE_ZEROES,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        ),
        (CMD_BLOCK_STATUS, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE),
    ];
    for (kind, allowed) in table {
        assert!(
            validate(&req(kind, 0, 0, 512), &full()).is_ok(),
            "kind {kind}"
        );
        assert!(
            validate(&req(kind, allowed, 0, 512), &full()).is_ok(),
            "kind {kind}"
        );
        for bit in 0..16 {
            let flag = 1u16 << bit;
            let got = validate(&req(kind, flag, 0, 512), &full());
            assert_eq!(
                got.is_ok(),
                allowed & flag != 0,
                "kind {kind} flag {flag:#x}"
            );
            if allowed & flag == 0 {
                assert_eq!(got, INVAL, "kind {kind} flag {flag:#x}");
            }
        }
    }
}

fn zeroes(offset: u64, len: u64, fua: bool, no_hole: bool, fast: bool) -> Result<Command, Errno> {
    Ok(WriteZeroes {
        offset,
        len,
        fua,
        no_hole,
        fast,
    })
}

/// One row per case: what, session, request, what validate() must say.
#[test]
#[rustfmt::skip]
fn validate_outcomes() {
    const FUA: u16 = CMD_FLAG_FUA;
    const MAX: u32 = MAX_PAYLOAD;
    let end = SIZE - 4096;
    let big = sized(1 << 40);
    let no_base = Session { base_allocation: false, ..full() };
    let minimal = Session { size: 0, flags: TF_HAS_FLAGS, style: ReplyStyle::Simple, base_allocation: false };
    let cases: Vec<(&str, Session, RequestHeader, Result<Command, Errno>)> = vec![
        ("read", full(), req(CMD_READ, 0, 0, 4096), Ok(Read { offset: 0, len: 4096 })),
        ("read last block", full(), req(CMD_READ, 0, end, 4096), Ok(Read { offset: end, len: 4096 })),
        ("read empty at end", full(), req(CMD_READ, 0, SIZE, 0), Ok(Read { offset: SIZE, len: 0 })),
        ("read past end", full(), req(CMD_READ, 0, end, 4097), INVAL),
        ("read offset past end", full(), req(CMD_READ, 0, SIZE + 1, 0), INVAL),
        ("read wrapping u64", full(), req(CMD_READ, 0, u64::MAX, 1), INVAL),
        ("read max payload", full(), req(CMD_READ, 0, 0, MAX), Ok(Read { offset: 0, len: MAX })),
        ("read over max payload", full(), req(CMD_READ, 0, 0, MAX + 1), INVAL),
        ("read u32::MAX", sized(u64::MAX), req(CMD_READ, 0, 0, u32::MAX), INVAL),
        ("read DF", full(), req(CMD_READ, CMD_FLAG_DF, 0, 1), Ok(Read { offset: 0, len: 1 })),
        ("read DF, simple replies", simple_replies(), req(CMD_READ, CMD_FLAG_DF, 0, 1), INVAL),
        ("read DF, not advertised", without(TF_SEND_DF), req(CMD_READ, CMD_FLAG_DF, 0, 1), INVAL),
        ("read FUA", full(), req(CMD_READ, FUA, 0, 1), Ok(Read { offset: 0, len: 1 })),
        ("read FUA, not advertised", without(TF_SEND_FUA), req(CMD_READ, FUA, 0, 1), INVAL),
        ("read, read-only", read_only(), req(CMD_READ, 0, 0, 1), Ok(Read { offset: 0, len: 1 })),
        ("read, empty export", sized(0), req(CMD_READ, 0, 0, 1), INVAL),

        ("write", full(), req(CMD_WRITE, 0, end, 4096), Ok(Write { offset: end, len: 4096, fua: false })),
        ("write FUA", full(), req(CMD_WRITE, FUA, 0, 1), Ok(Write { offset: 0, len: 1, fua: true })),
        ("write FUA, not advertised", without(TF_SEND_FUA), req(CMD_WRITE, FUA, 0, 1), INVAL),
        ("write, read-only", read_only(), req(CMD_WRITE, 0, 0, 1), PERM),
        ("write past end", full(), req(CMD_WRITE, 0, end, 4097), NOSPC),
        ("write offset past end", full(), req(CMD_WRITE, 0, SIZE, 1), NOSPC),
        ("write wrapping u64", full(), req(CMD_WRITE, 0, u64::MAX - 10, 4096), NOSPC),
        ("write over max payload", full(), req(CMD_WRITE, 0, 0, MAX + 1), INVAL),
        ("write, empty export", sized(0), req(CMD_WRITE, 0, 0, 1), NOSPC),

        ("trim", full(), req(CMD_TRIM, 0, 0, 4096), Ok(Trim { offset: 0, len: 4096, fua: false })),
        ("trim FUA", full(), req(CMD_TRIM, FUA, 0, 1), Ok(Trim { offset: 0, len: 1, fua: true })),
        ("trim, not advertised", without(TF_SEND_TRIM), req(CMD_TRIM, 0, 0, 1), INVAL),
        ("trim, read-only", read_only(), req(CMD_TRIM, 0, 0, 1), PERM),
        ("trim past end", full(), req(CMD_TRIM, 0, end, 4097), INVAL),
        ("trim wrapping u64", full(), req(CMD_TRIM, 0, u64::MAX, u32::MAX), INVAL),
        ("trim beyond max payload", big, req(CMD_TRIM, 0, 0, u32::MAX), Ok(Trim { offset: 0, len: u32::MAX as u64, fua: false })),

        ("zero", full(), req(CMD_WRITE_ZEROES, 0, 0, 1), zeroes(0, 1, false, false, false)),
        ("zero NO_HOLE", full(), req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1), zeroes(0, 1, false, true, false)),
        ("zero FAST_ZERO", full(), req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), zeroes(0, 1, false, false, true)),
        ("zero all flags", full(), req(CMD_WRITE_ZEROES, 0x13, end, 4096), zeroes(end, 4096, true, true, true)),
        ("zero FAST_ZERO, not advertised", without(TF_SEND_FAST_ZERO), req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), INVAL),
        ("zero NO_HOLE, FAST_ZERO not advertised", without(TF_SEND_FAST_ZERO), req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1), zeroes(0, 1, false, true, false)),
        ("zero, not advertised", without(TF_SEND_WRITE_ZEROES), req(CMD_WRITE_ZEROES, 0, 0, 1), INVAL),
        ("zero FUA, not advertised", without(TF_SEND_FUA), req(CMD_WRITE_ZEROES, FUA, 0, 1), INVAL),
        ("zero, read-only", read_only(), req(CMD_WRITE_ZEROES, 0, 0, 1), PERM),
        ("zero past end", full(), req(CMD_WRITE_ZEROES, 0, end, 4097), NOSPC),
        ("zero wrapping u64", full(), req(CMD_WRITE_ZEROES, 0, u64::MAX, 1), NOSPC),
        ("zero beyond max payload", big, req(CMD_WRITE_ZEROES, 0, 0, u32::MAX), zeroes(0, u32::MAX as u64, false, false, false)),

        ("flush", full(), req(CMD_FLUSH, 0, 0, 0), Ok(Flush)),
        ("flush FUA", full(), req(CMD_FLUSH, FUA, 0, 0), Ok(Flush)),
        ("flush, read-only", read_only(), req(CMD_FLUSH, 0, 0, 0), Ok(Flush)),
        ("flush, not advertised", without(TF_SEND_FLUSH), req(CMD_FLUSH, 0, 0, 0), INVAL),

        ("cache", full(), req(CMD_CACHE, 0, end, 4096), Ok(Cache { offset: end, len: 4096 })),
        ("cache, read-only", read_only(), req(CMD_CACHE, 0, 0, 1), Ok(Cache { offset: 0, len: 1 })),
        ("cache, not advertised", without(TF_SEND_CACHE), req(CMD_CACHE, 0, 0, 1), INVAL),
        ("cache past end", full(), req(CMD_CACHE, 0, end, 4097), INVAL),
        ("cache wrapping u64", full(), req(CMD_CACHE, 0, u64::MAX, 2), INVAL),

        ("status", big, req(CMD_BLOCK_STATUS, 0, 0, u32::MAX), Ok(BlockStatus { offset: 0, len: u32::MAX as u64, req_one: false })),
        ("status REQ_ONE", full(), req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, end, 4096), Ok(BlockStatus { offset: end, len: 4096, req_one: true })),
        ("status, read-only", read_only(), req(CMD_BLOCK_STATUS, 0, 0, 1), Ok(BlockStatus { offset: 0, len: 1, req_one: false })),
        ("status without base:allocation", no_base, req(CMD_BLOCK_STATUS, 0, 0, 1), INVAL),
        ("status, simple replies", simple_replies(), req(CMD_BLOCK_STATUS, 0, 0, 1), INVAL),
        ("status, length 0", full(), req(CMD_BLOCK_STATUS, 0, 0, 0), INVAL),
        ("status past end", full(), req(CMD_BLOCK_STATUS, 0, end, 4097), INVAL),
        ("status wrapping u64", full(), req(CMD_BLOCK_STATUS, 0, u64::MAX, 1), INVAL),

        ("disconnect", full(), req(CMD_DISC, 0, 0, 0), Ok(Disconnect)),
        ("disconnect, read-only", read_only(), req(CMD_DISC, 0, 0, 0), Ok(Disconnect)),
        ("disconnect, minimal export", minimal, req(CMD_DISC, 0, 0, 0), Ok(Disconnect)),
    ];
    for (what, session, header, want) in cases {
        assert_eq!(validate(&header, &session), want, "{what}");
    }
}

#[test]
fn unknown_commands_get_einval() {
    for kind in UNKNOWN_KINDS {
        for session in [full(), read_only(), sized(0)] {
            assert_eq!(
                validate(&req(kind, 0, 0, 0), &session),
                INVAL,
                "kind {kind}"
            );
        }
    }
}
