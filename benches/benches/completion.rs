//! The foreign-thread completion doorbell that librbd and libgfapi
//! callbacks use to hand results back to the issuing shard: one round trip
//! is "create a completion on the shard, complete it on another thread,
//! wake the awaiting task on the shard". Batches of 32 show the coalescing
//! (one poke per burst) that QD32 traffic gets.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::LocalExecutorBuilder;
use nbd_engine::backend::completion::{completion, Completer};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// `iters` batches of `batch` completions, completed by one foreign thread;
/// the time spent on the shard from first creation to last wake.
fn round_trips(iters: u64, batch: usize) -> Duration {
    LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (tx, rx) = std::sync::mpsc::channel::<Vec<Completer<u64>>>();
            let foreign = std::thread::spawn(move || {
                for burst in rx {
                    for c in burst {
                        c.complete(1);
                    }
                }
            });
            let start = Instant::now();
            for _ in 0..iters {
                let (waits, completers): (Vec<_>, Vec<_>) = (0..batch)
                    .map(|_| completion::<u64>().expect("completion"))
                    .unzip();
                tx.send(completers).expect("foreign thread alive");
                for w in waits {
                    black_box(w.await);
                }
            }
            let elapsed = start.elapsed();
            drop(tx);
            foreign.join().expect("foreign thread");
            elapsed
        })
        .expect("executor")
        .join()
        .expect("executor thread")
}

fn doorbell(c: &mut Criterion) {
    let mut g = c.benchmark_group("completion");
    for batch in [1usize, 32] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("foreign_thread_batch_{batch}"), |b| {
            b.iter_custom(|iters| round_trips(iters, batch))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = doorbell
}
criterion_main!(benches);
