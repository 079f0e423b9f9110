//! The per-request protocol work: request header parse + validate, reply
//! header construction, and block-status extent encoding.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_engine::backend::{Backend, MemBackend, MemBudget, DATA, HOLE};
use nbd_engine::protocol::consts::*;
use nbd_engine::protocol::transmission::Next;
use nbd_engine::protocol::{
    encode_extents, validate, Errno, Extent, HeaderMode, ReplyHeader, ReplyStyle, RequestHeader,
    Session, Transmission,
};
use std::hint::black_box;

/// Requests in one batch: what a QD32 client has in flight.
const BATCH: usize = 32;
const EXPORT: u64 = 1 << 30;

fn session(style: ReplyStyle) -> Session {
    let backend = MemBackend::new(EXPORT, false, &MemBudget::unlimited()).expect("mem backend");
    Session {
        size: EXPORT,
        flags: backend.capabilities().transmission_flags(),
        style,
        base_allocation: style.structured(),
    }
}

/// `BATCH` request headers back to back, as a pipelining client sends them
/// (payloads left out): mostly 4 KiB reads and writes at random offsets, with
/// a FUA write, a FLUSH and a BLOCK_STATUS mixed in.
fn request_batch(mode: HeaderMode) -> Vec<u8> {
    let mut offsets = common::Offsets::new(EXPORT, 4096);
    let mut wire = Vec::with_capacity(BATCH * REQUEST_LEN);
    for i in 0..BATCH {
        let (kind, flags, length) = match i {
            7 => (CMD_WRITE, CMD_FLAG_FUA, 4096),
            15 => (CMD_FLUSH, 0, 0),
            23 => (CMD_BLOCK_STATUS, 0, 1 << 20),
            _ if i % 2 == 0 => (CMD_READ, 0, 4096),
            _ => (CMD_WRITE, 0, 4096),
        };
        let flags = match mode {
            HeaderMode::Extended if kind == CMD_WRITE => flags | CMD_FLAG_PAYLOAD_LEN,
            _ => flags,
        };
        let offset = if kind == CMD_FLUSH {
            0
        } else {
            offsets.next_offset().min(EXPORT - length)
        };
        let h = RequestHeader {
            flags,
            kind,
            cookie: i as u64,
            offset,
            length,
        };
        wire.extend_from_slice(&h.to_bytes(mode));
    }
    wire
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, mode, style) in [
        ("", HeaderMode::Compact, ReplyStyle::Structured),
        ("_extended", HeaderMode::Extended, ReplyStyle::Extended),
    ] {
        let wire = request_batch(mode);
        let s = session(style);
        let len = mode.request_len();
        g.bench_function(format!("parse_batch32{name}"), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for raw in black_box(&wire).chunks_exact(len) {
                    let h = RequestHeader::parse(raw, mode).unwrap();
                    sum = sum.wrapping_add(h.offset ^ h.payload_len(mode));
                }
                sum
            })
        });
        g.bench_function(format!("parse_validate_batch32{name}"), |b| {
            b.iter(|| {
                let mut ok = 0u32;
                for raw in black_box(&wire).chunks_exact(len) {
                    let h = RequestHeader::parse(raw, mode).unwrap();
                    ok += validate(&h, black_box(&s)).is_ok() as u32;
                }
                assert_eq!(ok, BATCH as u32);
                ok
            })
        });
        // What the connection does per request: the state machine's
        // parse, reserve and decision.
        let t = Transmission::with_session(s, META_ID_BASE_ALLOCATION);
        g.bench_function(format!("transmission_batch32{name}"), |b| {
            b.iter(|| {
                let mut started = 0u32;
                for raw in black_box(&wire).chunks_exact(len) {
                    let h = t.parse_header(raw).unwrap();
                    black_box(t.reserve(&h));
                    started += matches!(
                        t.handle_header(&h, EXPORT),
                        Next::Start(_) | Next::Payload { .. }
                    ) as u32;
                }
                assert_eq!(started, BATCH as u32);
                started
            })
        });
    }
    g.finish();
}

/// Builds one reply header for a cookie.
type BuildReply = fn(u64) -> ReplyHeader;

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Elements(BATCH as u64));
    // Each case builds BATCH headers and touches their bytes, as the writer does
    // when it points an iovec at them.
    let cases: [(&str, BuildReply); 6] = [
        ("simple_ok", |c| ReplyHeader::simple(c, None)),
        ("read_data_simple", |c| {
            ReplyHeader::read_data(ReplyStyle::Simple, c, c << 12, 4096)
        }),
        ("read_data_structured", |c| {
            ReplyHeader::read_data(ReplyStyle::Structured, c, c << 12, 4096)
        }),
        ("read_data_extended", |c| {
            ReplyHeader::read_data(ReplyStyle::Extended, c, c << 12, 4096)
        }),
        ("error_simple", |c| {
            ReplyHeader::error(ReplyStyle::Simple, c, 0, Errno::Inval)
        }),
        ("error_structured", |c| {
            ReplyHeader::error(ReplyStyle::Structured, c, 0, Errno::Inval)
        }),
    ];
    for (name, build) in cases {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0usize;
                for cookie in 0..BATCH as u64 {
                    let h = build(black_box(cookie));
                    bytes += black_box(h.as_bytes()).len();
                }
                bytes
            })
        });
    }
    g.finish();
}

fn extents(c: &mut Criterion) {
    const N: usize = 1024;
    let chunk = 64 * 1024u64;
    // Worst case: alternating data/hole, nothing merges (1024 descriptors).
    let alternating: Vec<Extent> = (0..N)
        .map(|i| Extent {
            len: chunk,
            flags: if i % 2 == 0 { DATA } else { HOLE },
        })
        .collect();
    // Best case: all data, everything merges into one descriptor.
    let uniform: Vec<Extent> = (0..N)
        .map(|_| Extent {
            len: chunk,
            flags: DATA,
        })
        .collect();
    let limit = N as u64 * chunk;
    let mut g = c.benchmark_group("encode_extents");
    g.throughput(Throughput::Elements(N as u64));
    for (name, ext, req_one) in [
        ("alternating_1024", &alternating, false),
        ("uniform_1024", &uniform, false),
        ("alternating_req_one", &alternating, true),
    ] {
        let mut out = Vec::with_capacity(N * 8);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_extents(
                    black_box(ext),
                    limit,
                    req_one,
                    HeaderMode::Compact,
                    &mut out,
                )
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = requests, replies, extents
}
criterion_main!(benches);
