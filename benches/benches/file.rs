//! The `file` backend through `BackendIo`, as a shard drives it: buffered
//! io_uring reads and writes from inside a glommio executor, on a file in
//! /dev/shm (page cache only, so this measures the submission/completion path,
//! not a disk) or, without /dev/shm, in cargo's target tmp dir.

mod common;

use common::Offsets;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder};
use nbd_engine::backend::{Backend, BackendIo, FileBackend};
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

const SPAN: u64 = 64 << 20;
const SIZES: [(&str, usize); 2] = [("4k", 4096), ("1m", 1 << 20)];

/// Removes the bench file however the bench ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file() -> TempFile {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() && !std::fs::metadata(shm).unwrap().permissions().readonly() {
        shm.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    let path = dir.join(format!("nbd-bench-file-{}.raw", std::process::id()));
    // Written through, not sparse: reads copy real page-cache data.
    let mut f = std::fs::File::create(&path).expect("create bench file");
    let block = vec![0xa5u8; 1 << 20];
    for _ in 0..SPAN / block.len() as u64 {
        f.write_all(&block).expect("fill bench file");
    }
    TempFile(path)
}

/// Runs `iters` sequential requests inside the executor and sums the time
/// each took from issue to completion (one in flight, so this is the
/// per-request cost of the path, not throughput under depth). `prepare` runs
/// outside the timed part and builds what the request consumes.
fn timed<P, T, F, Fut>(ex: &LocalExecutor, iters: u64, mut prepare: P, mut one: F) -> Duration
where
    P: FnMut() -> T,
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    ex.run(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let input = prepare();
            let start = Instant::now();
            one(input).await;
            total += start.elapsed();
        }
        total
    })
}

fn file_io(c: &mut Criterion) {
    let tmp = temp_file();
    let backend = FileBackend::open_or_create(&tmp.0, None, false, Default::default())
        .expect("open bench file");
    let ex = LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor");
    let io: Rc<dyn BackendIo> = ex.run(backend.attach()).expect("attach");
    let mut g = c.benchmark_group("file_io");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len as u64));
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("read_{name}"), |b| {
            b.iter_custom(|iters| {
                timed(
                    &ex,
                    iters,
                    || (),
                    |()| {
                        let fut = io.read(offs.next_offset(), len, Vec::new());
                        async move {
                            let got = fut.await.unwrap();
                            assert_eq!(black_box(&got).len(), len);
                        }
                    },
                )
            })
        });
        let data = vec![0x5au8; len];
        let mut offs = Offsets::new(SPAN, len as u64);
        g.bench_function(format!("write_{name}"), |b| {
            b.iter_custom(|iters| {
                // glommio takes the payload by value and keeps it, as the
                // engine's received buffer would be; its copy is not timed.
                timed(
                    &ex,
                    iters,
                    || data.clone(),
                    |payload| {
                        let fut = io.write(offs.next_offset(), payload, false);
                        async move {
                            fut.await.unwrap();
                        }
                    },
                )
            })
        });
    }
    g.finish();
    drop(io);
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = file_io
}
criterion_main!(benches);
