//! Round trips and exact bytes for every wire type, and the malformed
//! inputs each reader must refuse.

use super::*;

fn round_trip<T: Codec + PartialEq + std::fmt::Debug>(v: T) {
    assert_eq!(T::from_bytes(&v.to_bytes()), Some(v));
}

#[test]
fn greeting_bytes_and_kinds() {
    let g = Greeting::newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mut want = b"NBDMAGICIHAVEOPT".to_vec();
    want.extend_from_slice(&[0, 3]);
    assert_eq!(g.to_bytes(), want);
    assert_eq!(g.kind(), GreetingKind::Newstyle);
    round_trip(g);
    let old = Greeting {
        style: OLDSTYLE_MAGIC,
        ..g
    };
    assert_eq!(old.kind(), GreetingKind::Oldstyle);
    assert_eq!(
        Greeting { style: 1, ..g }.kind(),
        GreetingKind::UnknownStyle
    );
    assert_eq!(Greeting { magic: 1, ..g }.kind(), GreetingKind::NotNbd);
    assert_eq!(Greeting::from_bytes(&want[..17]), None);
}

#[test]
fn option_header_checks_magic() {
    let h = OptionHeader {
        option: OPT_GO,
        len: 9,
    };
    let b = h.to_bytes();
    assert_eq!(&b[..8], b"IHAVEOPT");
    assert_eq!(b.len(), OptionHeader::LEN);
    round_trip(h);
    let mut bad = b.clone();
    bad[0] ^= 1;
    assert_eq!(OptionHeader::from_bytes(&bad), None);
    assert_eq!(OptionHeader::with_data(OPT_GO, b"abc")[16..], *b"abc");
}

#[test]
fn option_reply_header() {
    let h = OptionReplyHeader {
        option: OPT_INFO,
        kind: REP_ERR_UNKNOWN,
        len: 3,
    };
    let b = h.to_bytes();
    assert_eq!(b[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
    assert_eq!(b.len(), OptionReplyHeader::LEN);
    round_trip(h);
    let mut bad = b;
    bad[7] ^= 1;
    assert_eq!(OptionReplyHeader::from_bytes(&bad), None);
    assert!(is_error_reply(REP_ERR_UNKNOWN) && !is_error_reply(REP_INFO));
}

#[test]
fn info_request_lengths_must_agree() {
    let r = InfoRequest {
        name: "disk".into(),
        infos: vec![INFO_NAME, INFO_BLOCK_SIZE],
    };
    let b = r.to_bytes();
    assert_eq!(b, [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 2, 0, 1, 0, 3]);
    round_trip(r);
    assert_eq!(InfoRequest::from_bytes(&b[..13]), None, "count says 2");
    let mut extra = b.clone();
    extra.push(0);
    assert_eq!(InfoRequest::from_bytes(&extra), None, "trailing byte");
    // A name length pointing past the data.
    assert_eq!(
        InfoRequest::from_bytes(&[0xff, 0xff, 0xff, 0xff, 0, 0]),
        None
    );
}

#[test]
fn meta_context_request_limits() {
    let r = MetaContextRequest {
        name: "disk".into(),
        queries: vec!["base:allocation".into(), "base:".into()],
    };
    round_trip(r.clone());
    let many = MetaContextRequest {
        queries: vec![String::new(); MAX_QUERIES as usize + 1],
        ..r
    };
    assert_eq!(MetaContextRequest::from_bytes(&many.to_bytes()), None);
    // A count far beyond the data is refused without allocating.
    let mut b = Vec::new();
    super::super::codec::put_string(&mut b, "d");
    u32::MAX.encode(&mut b);
    assert_eq!(MetaContextRequest::from_bytes(&b), None);
}

#[test]
fn info_blocks() {
    for block in [
        InfoBlock::Export {
            size: 1 << 40,
            flags: 0x1234,
        },
        InfoBlock::Name("disk".into()),
        InfoBlock::Description("a disk".into()),
        InfoBlock::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        InfoBlock::Unknown(99),
    ] {
        round_trip(block);
    }
    let export = InfoBlock::Export { size: 1, flags: 1 }.to_bytes();
    assert_eq!(export.len(), 12);
    assert_eq!(InfoBlock::from_bytes(&export[..11]), None);
    let mut long = export.clone();
    long.push(0);
    assert_eq!(InfoBlock::from_bytes(&long), None, "EXPORT is exactly 12");
    let bs = InfoBlock::BlockSize {
        min: 1,
        preferred: 2,
        max: 3,
    };
    assert_eq!(bs.to_bytes().len(), 14);
}

#[test]
fn list_and_meta_replies() {
    round_trip(ServerEntry {
        name: "a".into(),
        description: "desc".into(),
    });
    round_trip(MetaContextReply {
        id: 1,
        name: "base:allocation".into(),
    });
    assert_eq!(ServerEntry::from_bytes(&[0, 0, 0, 9, b'a']), None);
}

#[test]
fn export_name_reply_with_and_without_zeroes() {
    let r = ExportNameReply {
        size: 4096,
        flags: 3,
    };
    for no_zeroes in [true, false] {
        let mut v = Vec::new();
        r.put(&mut v, no_zeroes);
        assert_eq!(v.len(), ExportNameReply::len(no_zeroes));
        assert_eq!(ExportNameReply::from_bytes(&v), Some(r));
    }
}

#[test]
fn request_headers_in_both_forms() {
    let h = RequestHeader {
        flags: CMD_FLAG_FUA,
        kind: CMD_WRITE,
        cookie: 7,
        offset: 1 << 33,
        length: 4096,
    };
    let compact = h.to_bytes(HeaderMode::Compact);
    assert_eq!(compact.len(), 28);
    assert_eq!(compact[..4], [0x25, 0x60, 0x95, 0x13]);
    assert_eq!(RequestHeader::parse(&compact, HeaderMode::Compact), Ok(h));
    let big = RequestHeader {
        length: 5 << 30,
        kind: CMD_WRITE_ZEROES,
        ..h
    };
    let ext = big.to_bytes(HeaderMode::Extended);
    assert_eq!(ext.len(), 32);
    assert_eq!(ext[..4], [0x21, 0xe4, 0x1c, 0x71]);
    assert_eq!(RequestHeader::parse(&ext, HeaderMode::Extended), Ok(big));
    // Each form's magic is wrong for the other, and lengths must match.
    assert_eq!(
        RequestHeader::parse(&ext, HeaderMode::Compact),
        Err(BadMagic(0x21e4_1c71))
    );
    assert!(RequestHeader::parse(&compact, HeaderMode::Extended).is_err());
    assert!(RequestHeader::parse(&compact[..27], HeaderMode::Compact).is_err());
    assert!(RequestHeader::parse(&[], HeaderMode::Compact).is_err());
}

#[test]
fn payload_lengths() {
    let h = |kind, flags, length| RequestHeader {
        flags,
        kind,
        cookie: 0,
        offset: 0,
        length,
    };
    use HeaderMode::*;
    assert_eq!(h(CMD_WRITE, 0, 9).payload_len(Compact), 9);
    assert_eq!(h(CMD_READ, 0, 9).payload_len(Compact), 0);
    assert_eq!(h(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 9).payload_len(Compact), 0);
    assert_eq!(
        h(CMD_WRITE, 0, 9).payload_len(Extended),
        9,
        "with or without PAYLOAD_LEN"
    );
    assert_eq!(
        h(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 9).payload_len(Extended),
        9
    );
    assert_eq!(
        h(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 9).payload_len(Extended),
        9
    );
}

#[test]
fn reply_heads_from_their_magic() {
    let mut simple = Vec::new();
    encode_simple_reply(&mut simple, 5, 22);
    let mut compact = Vec::new();
    let chunk = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_NONE,
        cookie: 6,
        offset: 77,
        len: 0,
    };
    chunk.encode_mode(HeaderMode::Compact, &mut compact);
    let mut ext = Vec::new();
    chunk.encode_mode(HeaderMode::Extended, &mut ext);
    for (b, len) in [(&simple, 16), (&compact, 20), (&ext, 32)] {
        assert_eq!(b.len(), len);
        assert_eq!(
            ReplyHead::len_from_magic(b[..4].try_into().unwrap()),
            Some(len)
        );
    }
    assert_eq!(
        ReplyHead::read(&mut Reader::new(&simple)),
        Some(ReplyHead::Simple {
            error: 22,
            cookie: 5
        })
    );
    let read = |b: &[u8]| ReplyHead::read(&mut Reader::new(b)).unwrap();
    assert_eq!(read(&compact), as_head(ChunkHeader { offset: 0, ..chunk }));
    assert_eq!(read(&ext), as_head(chunk));
    assert_eq!(read(&ext).cookie(), 6);
    assert_eq!(ReplyHead::len_from_magic([0; 4]), None);
}

fn as_head(c: ChunkHeader) -> ReplyHead {
    ReplyHead::Chunk {
        flags: c.flags,
        kind: c.kind,
        cookie: c.cookie,
        offset: c.offset,
        len: c.len,
    }
}

#[test]
fn descriptors_and_error_chunks() {
    let d = Descriptor {
        len: 5 << 30,
        flags: 3,
    };
    for mode in [HeaderMode::Compact, HeaderMode::Extended] {
        let mut b = Vec::new();
        d.encode_mode(mode, &mut b);
        assert_eq!(b.len(), Descriptor::wire_len(mode));
    }
    let mut b = Vec::new();
    d.encode_mode(HeaderMode::Extended, &mut b);
    assert_eq!(
        Descriptor::read_mode(&mut Reader::new(&b), HeaderMode::Extended),
        Some(d)
    );
    let e = ErrorChunk {
        error: 5,
        message: "bad".into(),
    };
    round_trip(e.clone());
    assert_eq!(ErrorChunk::from_bytes(&e.to_bytes()[..8]), None);
}
