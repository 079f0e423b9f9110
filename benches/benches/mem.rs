//! The `mem` backend's request path: the store itself (`read_into` /
//! `write_from`), then the same through `BackendIo` as the engine drives it
//! (boxed future, completed on first poll, buffer lent and handed back).

mod common;

use common::Offsets;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_lite::future::block_on;
use nbd_engine::backend::{Backend, BackendIo, MemBackend, MemBudget};
use std::hint::black_box;
use std::rc::Rc;

/// Span the benches touch: every chunk written once up front, so reads copy
/// real data (holes would just be zero-filled) and writes never allocate.
const SPAN: u64 = 64 << 20;
const SIZES: [(&str, usize); 2] = [("4k", 4096), ("1m", 1 << 20)];

fn filled() -> std::sync::Arc<MemBackend> {
    let m = MemBackend::new(1 << 30, false, &MemBudget::unlimited()).expect("mem backend");
    let block = vec![0xa5u8; 1 << 20];
    for off in (0..SPAN).step_by(block.len()) {
        m.write_from(off, &block);
    }
    m
}

fn store(c: &mut Criterion) {
    let m = filled();
    let mut g = c.benchmark_group("mem_store");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = vec![0u8; len];
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("read_into_{name}"), |b| {
            b.iter(|| m.read_into(offs.next_offset(), black_box(&mut buf)))
        });
        let data = vec![0x5au8; len];
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("write_from_{name}"), |b| {
            b.iter(|| m.write_from(offs.next_offset(), black_box(&data)))
        });
    }
    g.finish();
}

fn backend_io(c: &mut Criterion) {
    let m = filled();
    let io: Rc<dyn BackendIo> = block_on(m.attach()).expect("attach");
    let mut g = c.benchmark_group("mem_io");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len as u64));
        // The engine lends a pooled buffer to each read and gets it back.
        let mut spare = Some(Vec::with_capacity(len));
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("read_{name}"), |b| {
            b.iter(|| {
                let buf = spare.take().unwrap_or_default();
                let got = block_on(io.read(offs.next_offset(), len, buf)).unwrap();
                assert_eq!(black_box(&got).len(), len);
                spare = got.into_vec();
            })
        });
        // Writes hand the payload buffer back for reuse.
        let mut payload = Some(vec![0x5au8; len]);
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("write_{name}"), |b| {
            b.iter(|| {
                let data = payload.take().expect("mem hands the buffer back");
                payload = block_on(io.write(offs.next_offset(), data, false)).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = store, backend_io
}
criterion_main!(benches);
