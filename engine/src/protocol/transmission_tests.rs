//! The transmission phase's decisions, in memory: the hostile inputs of
//! `tests/hostile.rs` (and more) without a socket.

use super::*;
use crate::protocol::codec::Reader;
use crate::protocol::consts::*;
use crate::protocol::msgs::{Descriptor, ReplyHead};

const SIZE: u64 = 8 << 30;
const FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN;

fn session(style: ReplyStyle) -> Transmission {
    let flags = if style == ReplyStyle::Extended {
        FLAGS | TF_BLOCK_STATUS_PAYLOAD
    } else {
        FLAGS
    };
    Transmission::with_session(
        Session {
            size: SIZE,
            flags,
            style,
            base_allocation: style != ReplyStyle::Simple,
        },
        1,
    )
}

fn req(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 42,
        offset,
        length,
    }
}

/// (error, cookie) of a reply header, whatever its form.
fn errno_of(reply: &ReplyHeader) -> (u32, u64) {
    let b = reply.as_bytes();
    match ReplyHead::read(&mut Reader::new(b)).unwrap() {
        ReplyHead::Simple { error, cookie } => (error, cookie),
        ReplyHead::Chunk { kind, cookie, .. } if kind == REPLY_TYPE_ERROR => {
            let at = b.len() - 6;
            (
                u32::from_be_bytes(b[at..at + 4].try_into().unwrap()),
                cookie,
            )
        }
        ReplyHead::Chunk { cookie, .. } => (0, cookie),
    }
}

#[test]
fn bad_magic_hangs_up() {
    let t = session(ReplyStyle::Simple);
    let mut b = req(CMD_READ, 0, 0, 512).to_bytes(HeaderMode::Compact);
    b[0] ^= 0xff;
    assert!(matches!(t.parse_header(&b), Err(Close::BadMagic(_))));
    // An extended header on a compact session is out of sync too.
    let x = req(CMD_READ, 0, 0, 512).to_bytes(HeaderMode::Extended);
    assert!(t.parse_header(&x[..28]).is_err());
    assert_eq!(session(ReplyStyle::Extended).header_len(), 32);
    assert_eq!(t.header_len(), 28);
}

#[test]
fn a_write_claiming_gigabytes_is_refused_and_closed_never_buffered() {
    for style in [ReplyStyle::Simple, ReplyStyle::Extended] {
        let t = session(style);
        let flags = if style == ReplyStyle::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let len = if style == ReplyStyle::Extended {
            1 << 40
        } else {
            u32::MAX as u64
        };
        match t.handle_header(&req(CMD_WRITE, flags, 0, len), SIZE) {
            Next::RefuseAndClose { reply, why, .. } => {
                assert_eq!(why, Close::Oversized(len));
                assert_eq!(errno_of(&reply), (Errno::Inval.wire(), 42));
            }
            other => panic!("{style:?}: {other:?}"),
        }
        // Reserving budget for it is capped at the largest payload.
        assert_eq!(
            t.reserve(&req(CMD_WRITE, flags, 0, len)),
            MAX_PAYLOAD as u64
        );
    }
}

#[test]
fn refused_writes_skip_their_payload_and_stay_in_sync() {
    let t = session(ReplyStyle::Simple);
    // Past the end: ENOSPC, then the 4 KiB of data is skipped.
    match t.handle_header(&req(CMD_WRITE, 0, SIZE, 4096), SIZE) {
        Next::Refuse { reply, skip, .. } => {
            assert_eq!(errno_of(&reply).0, Errno::NoSpc.wire());
            assert_eq!(skip, 4096);
        }
        other => panic!("{other:?}"),
    }
    // Out-of-range reads and unknown commands: EINVAL, nothing to skip.
    for h in [
        req(CMD_READ, 0, SIZE - 1, 2),
        req(99, 0, 0, 0),
        req(CMD_READ, 1 << 9, 0, 1),
    ] {
        match t.handle_header(&h, SIZE) {
            Next::Refuse { reply, skip: 0, .. } => {
                assert_eq!(errno_of(&reply).0, Errno::Inval.wire())
            }
            other => panic!("{h:?}: {other:?}"),
        }
    }
    // Offsets that overflow u64 are out of range, not wrapped.
    assert!(matches!(
        t.handle_header(&req(CMD_TRIM, 0, u64::MAX, 2), SIZE),
        Next::Refuse { .. }
    ));
}

#[test]
fn the_size_now_counts_not_the_handshakes() {
    let t = session(ReplyStyle::Simple);
    let h = req(CMD_READ, 0, SIZE, 4096);
    assert!(matches!(t.handle_header(&h, SIZE), Next::Refuse { .. }));
    assert!(matches!(
        t.handle_header(&h, SIZE * 2),
        Next::Start(Command::Read { .. })
    ));
}

#[test]
fn writes_read_their_payload_first() {
    let t = session(ReplyStyle::Simple);
    assert_eq!(
        t.handle_header(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 4096), SIZE),
        Next::Payload {
            len: 4096,
            cmd: Command::Write {
                offset: 0,
                len: 4096,
                fua: true
            }
        }
    );
}

#[test]
fn extended_headers_take_64_bit_effect_lengths() {
    let t = session(ReplyStyle::Extended);
    let five = 5u64 << 30;
    assert_eq!(
        t.handle_header(&req(CMD_WRITE_ZEROES, 0, 1 << 30, five), SIZE),
        Next::Start(Command::WriteZeroes {
            offset: 1 << 30,
            len: five,
            fua: false,
            no_hole: false,
            fast: false
        })
    );
    assert_eq!(
        t.handle_header(&req(CMD_TRIM, 0, 0, five), SIZE),
        Next::Start(Command::Trim {
            offset: 0,
            len: five,
            fua: false
        })
    );
    // WRITE carries its data with or without PAYLOAD_LEN (qemu 10 leaves
    // it out); other commands must not say it.
    for flags in [0, CMD_FLAG_PAYLOAD_LEN] {
        assert!(matches!(
            t.handle_header(&req(CMD_WRITE, flags, 0, 512), SIZE),
            Next::Payload { len: 512, .. }
        ));
    }
    match t.handle_header(&req(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 512), SIZE) {
        Next::Refuse { skip, .. } => assert_eq!(skip, 512, "consumed, then EINVAL"),
        other => panic!("{other:?}"),
    }
    // Compact sessions refuse the flag outright.
    let c = session(ReplyStyle::Structured);
    assert!(matches!(
        c.handle_header(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), SIZE),
        Next::Refuse { skip: 512, .. }
    ));
}

#[test]
fn block_status_payload_form() {
    let t = session(ReplyStyle::Extended);
    let h = req(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 4096, 12);
    let Next::Payload { len: 12, cmd } = t.handle_header(&h, SIZE) else {
        panic!("wants its payload");
    };
    let mut payload = (6u64 << 30).to_be_bytes().to_vec();
    payload.extend_from_slice(&1u32.to_be_bytes());
    assert_eq!(
        t.handle_payload(&h, cmd, &payload, SIZE),
        Next::Start(Command::BlockStatus {
            offset: 4096,
            len: 6 << 30,
            req_one: false
        })
    );
    // An id we never gave, no ids, a range past the end, a short payload.
    let bad: [Vec<u8>; 4] = [
        [
            (1u64 << 20).to_be_bytes().to_vec(),
            7u32.to_be_bytes().to_vec(),
        ]
        .concat(),
        (1u64 << 20).to_be_bytes().to_vec(),
        [SIZE.to_be_bytes().to_vec(), 1u32.to_be_bytes().to_vec()].concat(),
        vec![0, 1],
    ];
    for p in bad {
        match t.handle_payload(&h, cmd, &p, SIZE) {
            Next::Refuse { reply, skip: 0, .. } => {
                assert_eq!(errno_of(&reply).0, Errno::Inval.wire())
            }
            other => panic!("{p:?}: {other:?}"),
        }
    }
    // A payload longer than any context list is consumed and refused.
    let long = req(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 4096);
    assert!(matches!(
        t.handle_header(&long, SIZE),
        Next::Refuse { skip: 4096, .. }
    ));
}

#[test]
fn completions() {
    for style in [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ] {
        let t = session(style);
        let h = req(CMD_READ, 0, 4096, 4096);
        let read = Command::Read {
            offset: 4096,
            len: 4096,
        };
        let mut d = Vec::new();
        let (ok, none) = t.complete(&h, &read, Outcome::Read { got: 4096 }, &mut d);
        assert!(ok.ok() && none.is_none());
        assert_eq!(ok.body, Body::Data);
        // A backend that returns less than asked is a bug the client sees as EIO.
        let (short, anomaly) = t.complete(&h, &read, Outcome::Read { got: 10 }, &mut d);
        assert!(!short.ok() && short.body == Body::None);
        assert_eq!(
            anomaly,
            Some(Anomaly::ShortRead {
                wanted: 4096,
                got: 10
            })
        );
        assert_eq!(errno_of(&short.reply), (Errno::Io.wire(), 42));
        // Backend errors pass through.
        let (failed, _) = t.complete(&h, &read, Outcome::Failed(Errno::NoSpc), &mut d);
        assert_eq!(errno_of(&failed.reply).0, Errno::NoSpc.wire());
        if style == ReplyStyle::Simple {
            continue;
        }
        // Block status with no extents at all: EIO, never an empty chunk.
        let bs = Command::BlockStatus {
            offset: 0,
            len: 4096,
            req_one: false,
        };
        let hb = req(CMD_BLOCK_STATUS, 0, 0, 4096);
        let (empty, anomaly) = t.complete(&hb, &bs, Outcome::Extents(&[]), &mut d);
        assert!(!empty.ok() && anomaly == Some(Anomaly::NoExtents));
        let extents = [Extent {
            len: 4096,
            flags: STATE_HOLE,
        }];
        let (good, _) = t.complete(&hb, &bs, Outcome::Extents(&extents), &mut d);
        assert_eq!(good.body, Body::Descriptors);
        assert_eq!(d.len(), Descriptor::wire_len(style.headers()));
    }
}
