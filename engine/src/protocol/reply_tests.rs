use super::*;
use crate::protocol::codec::Codec;
use crate::protocol::codec::Reader;
use crate::protocol::request::MAX_PAYLOAD;

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::read(&mut Reader::new(&b[at..])).unwrap()
}

const COOKIE: u64 = 0x0102_0304_0506_0708;
const ALL_ERRNOS: [Errno; 8] = Errno::ALL;

/// Big-endian concatenation, for writing expected wire bytes readably.
enum Be {
    U16(u16),
    U32(u32),
    U64(u64),
}

fn be(fields: &[Be]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        match *f {
            Be::U16(v) => out.extend_from_slice(&v.to_be_bytes()),
            Be::U32(v) => out.extend_from_slice(&v.to_be_bytes()),
            Be::U64(v) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
    out
}

/// Expected structured chunk header bytes.
fn chunk_bytes(flags: u16, kind: u16, len: u32) -> Vec<u8> {
    be(&[
        Be::U32(STRUCTURED_REPLY_MAGIC),
        Be::U16(flags),
        Be::U16(kind),
        Be::U64(COOKIE),
        Be::U32(len),
    ])
}

fn simple_bytes(error: u32) -> Vec<u8> {
    be(&[Be::U32(SIMPLE_REPLY_MAGIC), Be::U32(error), Be::U64(COOKIE)])
}

#[test]
fn simple_reply_bytes() {
    let ok = ReplyHeader::simple(COOKIE, None);
    assert_eq!(ok.as_bytes(), simple_bytes(0));
    assert_eq!(ok.as_bytes().len(), SIMPLE_REPLY_LEN);
    assert_eq!(ReplyHeader::done(ReplyStyle::Simple, COOKIE, 0), ok);
    assert_eq!(
        ReplyHeader::simple(COOKIE, None).as_bytes()[..4],
        [0x67, 0x44, 0x66, 0x98]
    );
    for errno in ALL_ERRNOS {
        let h = ReplyHeader::simple(COOKIE, Some(errno));
        assert_eq!(h.as_bytes(), simple_bytes(errno.wire()), "{errno}");
    }
}

#[test]
fn chunk_header_bytes() {
    let h = ReplyHeader::chunk(
        ReplyStyle::Structured,
        COOKIE,
        0,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        12,
    );
    assert_eq!(
        h.as_bytes(),
        chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 12)
    );
    assert_eq!(h.as_bytes().len(), CHUNK_HEADER_LEN);
    assert_eq!(h.as_bytes()[..4], [0x66, 0x8e, 0x33, 0xef]);
    let h = ReplyHeader::chunk(
        ReplyStyle::Structured,
        COOKIE,
        0,
        0,
        u16::MAX,
        u32::MAX as u64,
    );
    assert_eq!(h.as_bytes(), chunk_bytes(0, u16::MAX, u32::MAX));
}

#[test]
fn read_data_headers() {
    // Simple replies: the data follows a plain success header.
    for len in [0, 1, MAX_PAYLOAD] {
        let h = ReplyHeader::read_data(ReplyStyle::Simple, COOKIE, 4096, len);
        assert_eq!(h.as_bytes(), simple_bytes(0));
    }
    // Structured: one final OFFSET_DATA chunk whose length covers the offset.
    let cases = [
        (0u64, 1u32),
        (4096, 4096),
        (u64::MAX - MAX_PAYLOAD as u64, MAX_PAYLOAD),
    ];
    for (offset, len) in cases {
        let h = ReplyHeader::read_data(ReplyStyle::Structured, COOKIE, offset, len);
        let mut want = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, len + 8);
        want.extend_from_slice(&offset.to_be_bytes());
        assert!(want.len() <= MAX_HEADER);
        assert_eq!(h.as_bytes(), want, "offset {offset} len {len}");
    }
    // A structured read of nothing: OFFSET_DATA must carry at least a byte,
    // so the reply is a lone NONE chunk.
    let h = ReplyHeader::read_data(ReplyStyle::Structured, COOKIE, 4096, 0);
    assert_eq!(
        h.as_bytes(),
        chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
    );
}

#[test]
fn error_headers() {
    for errno in ALL_ERRNOS {
        let simple = ReplyHeader::error(ReplyStyle::Simple, COOKIE, 0, errno);
        assert_eq!(simple.as_bytes(), simple_bytes(errno.wire()), "{errno}");

        // ERROR chunk: u32 error, u16 message length (0), no message.
        let structured = ReplyHeader::error(ReplyStyle::Structured, COOKIE, 0, errno);
        let mut want = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6);
        want.extend_from_slice(&be(&[Be::U32(errno.wire()), Be::U16(0)]));
        assert_eq!(structured.as_bytes(), want, "{errno}");
    }
}

#[test]
fn block_status_header() {
    for (context, descriptors) in [(1u32, 1u32), (7, 3), (u32::MAX, 1000)] {
        let h = ReplyHeader::block_status(ReplyStyle::Structured, COOKIE, 0, context, descriptors);
        let mut want = chunk_bytes(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * descriptors,
        );
        want.extend_from_slice(&context.to_be_bytes());
        assert_eq!(h.as_bytes(), want);
    }
}

fn ext(len: u64, flags: u32) -> Extent {
    Extent { len, flags }
}

/// Decodes block descriptors back into (length, flags) pairs.
fn descriptors(bytes: &[u8]) -> Vec<(u32, u32)> {
    assert_eq!(bytes.len() % 8, 0);
    bytes
        .chunks(8)
        .map(|d| (get_u32(d, 0), get_u32(d, 4)))
        .collect()
}

/// What, extents, limit, REQ_ONE, the (length, flags) descriptors expected.
type ExtentCase = (&'static str, Vec<Extent>, u32, bool, Vec<(u32, u32)>);

#[test]
#[rustfmt::skip]
fn encode_extents_table() {
    const H: u32 = STATE_HOLE;
    const HZ: u32 = STATE_HOLE | STATE_ZERO;
    const BIG: u64 = u32::MAX as u64;
    let cases: &[ExtentCase] = &[
        ("one extent, exact", vec![ext(4096, 0)], 4096, false, vec![(4096, 0)]),
        ("nothing", vec![], 4096, false, vec![]),
        ("limit 0", vec![ext(4096, 0)], 0, false, vec![]),
        ("only empty extents", vec![ext(0, H), ext(0, 0)], 4096, false, vec![]),
        ("equal neighbours merge", vec![ext(100, 0), ext(200, 0), ext(50, H), ext(50, H), ext(1, 0)], 1000, false, vec![(300, 0), (100, H), (1, 0)]),
        ("different flags stay apart", vec![ext(1, H), ext(1, HZ), ext(1, STATE_ZERO), ext(1, 0)], 10, false, vec![(1, H), (1, HZ), (1, STATE_ZERO), (1, 0)]),
        ("cut at the limit", vec![ext(100, 0), ext(200, H), ext(300, 0)], 150, false, vec![(100, 0), (50, H)]),
        ("first extent longer than the limit", vec![ext(1000, HZ)], 10, false, vec![(10, HZ)]),
        ("limit on a boundary drops the rest", vec![ext(100, 0), ext(100, H)], 100, false, vec![(100, 0)]),
        ("empty extents are skipped, not merge breakers", vec![ext(0, H), ext(10, 0), ext(0, H), ext(10, 0), ext(0, 0)], 100, false, vec![(20, 0)]),
        ("REQ_ONE keeps the first (merged) extent", vec![ext(100, 0), ext(100, 0), ext(50, H)], 1000, true, vec![(200, 0)]),
        ("REQ_ONE, one extent", vec![ext(10, H)], 1000, true, vec![(10, H)]),
        ("REQ_ONE, clipped", vec![ext(1000, H)], 10, true, vec![(10, H)]),
        ("REQ_ONE skips leading empties", vec![ext(0, 0), ext(5, H), ext(5, 0)], 10, true, vec![(5, H)]),
        ("longer than u32", vec![ext(1 << 40, HZ)], u32::MAX, false, vec![(u32::MAX, HZ)]),
        ("u32::MAX + 1 then more", vec![ext(BIG + 1, 0), ext(5, H)], u32::MAX, false, vec![(u32::MAX, 0)]),
        ("merging up to exactly u32::MAX", vec![ext(BIG - 1, 0), ext(1, 0), ext(1, H)], u32::MAX, false, vec![(u32::MAX, 0)]),
        ("u64::MAX extents", vec![ext(u64::MAX, 0), ext(u64::MAX, H)], 4096, false, vec![(4096, 0)]),
    ];
    for (what, extents, limit, req_one, want) in cases {
        // The output is appended to, never cleared.
        let mut out = vec![0xaa];
        let n = encode_extents(extents, *limit as u64, *req_one, HeaderMode::Compact, &mut out);
        assert_eq!(out[0], 0xaa, "{what}");
        assert_eq!(descriptors(&out[1..]), *want, "{what}");
        assert_eq!(n as usize, want.len(), "{what}");
    }
}

#[test]
fn block_status_header_matches_encoded_extents() {
    let extents = [ext(512, 0), ext(512, STATE_HOLE), ext(1024, STATE_ZERO)];
    let mut body = Vec::new();
    let n = encode_extents(&extents, 4096, false, HeaderMode::Compact, &mut body);
    let h = ReplyHeader::block_status(
        ReplyStyle::Structured,
        COOKIE,
        0,
        META_ID_BASE_ALLOCATION,
        n,
    );
    let bytes = h.as_bytes();
    assert_eq!(bytes.len(), CHUNK_HEADER_LEN + 4);
    // The chunk length covers the context id and every descriptor.
    assert_eq!(get_u32(bytes, 16) as usize, 4 + body.len());
    assert_eq!(get_u32(bytes, 20), META_ID_BASE_ALLOCATION);
}

/// Expected extended chunk header bytes.
fn ext_chunk_bytes(flags: u16, kind: u16, offset: u64, len: u64) -> Vec<u8> {
    be(&[
        Be::U32(EXT_REPLY_MAGIC),
        Be::U16(flags),
        Be::U16(kind),
        Be::U64(COOKIE),
        Be::U64(offset),
        Be::U64(len),
    ])
}

#[test]
fn extended_replies_are_always_chunks_that_echo_the_offset() {
    const X: ReplyStyle = ReplyStyle::Extended;
    let at = 5 << 30;
    assert_eq!(
        ReplyHeader::done(X, COOKIE, at).as_bytes(),
        ext_chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_NONE, at, 0)
    );
    assert_eq!(
        ReplyHeader::done(X, COOKIE, at).as_bytes()[..4],
        [0x6e, 0x8a, 0x27, 0x8c]
    );
    let mut want = ext_chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, at, 4096 + 8);
    want.extend_from_slice(&at.to_be_bytes());
    assert_eq!(ReplyHeader::read_data(X, COOKIE, at, 4096).as_bytes(), want);
    assert_eq!(want.len(), MAX_HEADER, "the longest header there is");
    for errno in ALL_ERRNOS {
        let mut want = ext_chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, at, 6);
        want.extend_from_slice(&be(&[Be::U32(errno.wire()), Be::U16(0)]));
        assert_eq!(ReplyHeader::error(X, COOKIE, at, errno).as_bytes(), want);
    }
    // BLOCK_STATUS_EXT: context id and descriptor count, then 16-byte descriptors.
    let mut want = ext_chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, at, 8 + 16 * 3);
    want.extend_from_slice(&be(&[Be::U32(1), Be::U32(3)]));
    assert_eq!(
        ReplyHeader::block_status(X, COOKIE, at, 1, 3).as_bytes(),
        want
    );
}

#[test]
fn extended_descriptors_are_64_bit_and_not_split() {
    let extents = [ext(5 << 30, STATE_HOLE | STATE_ZERO), ext(1 << 20, 0)];
    let mut out = Vec::new();
    let n = encode_extents(&extents, 6 << 30, false, HeaderMode::Extended, &mut out);
    assert_eq!(n, 2);
    assert_eq!(
        out,
        be(&[
            Be::U64(5 << 30),
            Be::U64((STATE_HOLE | STATE_ZERO) as u64),
            Be::U64(1 << 20),
            Be::U64(0)
        ])
    );
    // The same extents on a compact session: cut to what 32 bits hold.
    let mut out = Vec::new();
    let n = encode_extents(
        &extents,
        u32::MAX as u64,
        false,
        HeaderMode::Compact,
        &mut out,
    );
    assert_eq!((n, out.len()), (1, 8));
}
