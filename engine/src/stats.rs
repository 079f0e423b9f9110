//! Per-export, per-operation latency (HDR histograms) and counters.
//!
//! Each shard records into its own slot, so the lock is never contended on
//! the hot path; readers merge the slots on request.

use crate::protocol::errno::Errno;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }
}

#[derive(Clone)]
pub struct OpStats {
    pub latency_ns: Histogram<u64>,
    pub errors: u64,
    /// Error replies by error, indexed by [`Errno::index`].
    pub errnos: [u64; Errno::ALL.len()],
    pub bytes: u64,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            // 1 ns .. 10 min at 2 significant digits: a few KiB per histogram.
            latency_ns: Histogram::new_with_bounds(1, 600_000_000_000, 2).expect("valid bounds"),
            errors: 0,
            errnos: [0; Errno::ALL.len()],
            bytes: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.latency_ns.len()
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency_ns.add(&other.latency_ns).expect("same bounds");
        self.errors += other.errors;
        for (m, o) in self.errnos.iter_mut().zip(other.errnos) {
            *m += o;
        }
        self.bytes += other.bytes;
    }
}

/// One shard's counters, on cache lines of their own: shards never write
/// each other's.
#[repr(align(128))]
struct ShardSlot {
    ops: Mutex<Vec<OpStats>>,
    connections: AtomicU64,
    /// Requests refused before they started (out of range, malformed), by
    /// error, indexed by [`Errno::index`].
    refused: [AtomicU64; Errno::ALL.len()],
    /// Requests started and not yet answered, and their read/write bytes.
    in_flight: AtomicU64,
    in_flight_bytes: AtomicU64,
}

/// One live connection of an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub shard: usize,
    /// Its address, or its unix credentials.
    pub peer: String,
}

pub struct ExportStats {
    shards: Vec<ShardSlot>,
    /// Live connections by accept order, for `nbd-cli info` (changed only
    /// at open and close).
    links: Mutex<std::collections::BTreeMap<u64, Link>>,
    /// Signalled on every close, for [`ExportStats::wait_idle`].
    closed: (Mutex<()>, Condvar),
}

/// Merged view: per-op stats plus live connections per shard.
pub struct StatsSnapshot {
    pub ops: Vec<(Op, OpStats)>,
    pub connections_per_shard: Vec<u64>,
    pub in_flight: u64,
    pub in_flight_bytes: u64,
    /// Requests refused before they started, by [`Errno::index`].
    pub refused: [u64; Errno::ALL.len()],
}

/// The payload a request moves (reads and writes), for in-flight bytes.
fn payload(op: Op, len: u64) -> u64 {
    if matches!(op, Op::Read | Op::Write) {
        len
    } else {
        0
    }
}

impl ExportStats {
    pub fn new(shards: usize) -> Self {
        ExportStats {
            shards: (0..shards.max(1))
                .map(|_| ShardSlot {
                    ops: Mutex::new(Op::ALL.iter().map(|_| OpStats::new()).collect()),
                    connections: AtomicU64::new(0),
                    refused: Default::default(),
                    in_flight: AtomicU64::new(0),
                    in_flight_bytes: AtomicU64::new(0),
                })
                .collect(),
            links: Mutex::new(Default::default()),
            closed: (Mutex::new(()), Condvar::new()),
        }
    }

    /// A request of `len` bytes was read and is under way on `shard`;
    /// [`record`](Self::record) of the same op and length ends it.
    pub fn started(&self, shard: usize, op: Op, len: u64) {
        let slot = &self.shards[shard % self.shards.len()];
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        slot.in_flight_bytes
            .fetch_add(payload(op, len), Ordering::Relaxed);
    }

    /// A request refused without starting.
    pub fn refused(&self, shard: usize, error: Errno) {
        self.shards[shard % self.shards.len()].refused[error.index()]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A request answered: its latency, and its bytes or its error.
    pub fn record(
        &self,
        shard: usize,
        op: Op,
        latency: Duration,
        bytes: u64,
        error: Option<Errno>,
    ) {
        let slot = &self.shards[shard % self.shards.len()];
        slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        slot.in_flight_bytes
            .fetch_sub(payload(op, bytes), Ordering::Relaxed);
        let mut ops = slot.ops.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut ops[op as usize];
        s.latency_ns
            .saturating_record((latency.as_nanos() as u64).max(1));
        match error {
            None => s.bytes += bytes,
            Some(e) => {
                s.errors += 1;
                s.errnos[e.index()] += 1;
            }
        }
    }

    /// Counts a connection on `shard`; `id` (unique, in accept order) is
    /// what [`connection_closed`](Self::connection_closed) takes.
    pub fn connection_opened(&self, shard: usize, peer: &str, id: u64) {
        self.shards[shard % self.shards.len()]
            .connections
            .fetch_add(1, Ordering::SeqCst);
        let link = Link {
            shard,
            peer: peer.to_owned(),
        };
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, link);
    }

    pub fn connection_closed(&self, shard: usize, id: u64) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.shards[shard % self.shards.len()]
            .connections
            .fetch_sub(1, Ordering::SeqCst);
        // Taking the lock orders this wakeup after a waiter's check.
        let _g = self.closed.0.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.1.notify_all();
    }

    /// Live connections across all shards.
    pub fn connections(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Ordering::SeqCst))
            .sum()
    }

    /// Waits up to `timeout` for every connection to close; true if none is left.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.closed.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.connections() == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .closed
                .1
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Live connections, in accept order.
    pub fn links(&self) -> Vec<Link> {
        let l = self.links.lock().unwrap_or_else(|e| e.into_inner());
        l.values().cloned().collect()
    }

    /// Live connections per shard.
    pub fn snapshot_connections(&self) -> Vec<u64> {
        self.shards
            .iter()
            .map(|s| s.connections.load(Ordering::SeqCst))
            .collect()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut merged: Vec<OpStats> = Op::ALL.iter().map(|_| OpStats::new()).collect();
        for slot in &self.shards {
            let ops = slot.ops.lock().unwrap_or_else(|e| e.into_inner());
            for (m, s) in merged.iter_mut().zip(ops.iter()) {
                m.merge(s);
            }
        }
        let sum = |f: fn(&ShardSlot) -> &AtomicU64| {
            self.shards
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        StatsSnapshot {
            ops: Op::ALL.iter().copied().zip(merged).collect(),
            connections_per_shard: self.snapshot_connections(),
            // A request starts and ends on its connection's shard's slot.
            in_flight: sum(|s| &s.in_flight),
            in_flight_bytes: sum(|s| &s.in_flight_bytes),
            refused: std::array::from_fn(|i| {
                self.shards
                    .iter()
                    .map(|s| s.refused[i].load(Ordering::Relaxed))
                    .sum()
            }),
        }
    }
}

impl StatsSnapshot {
    /// One line per operation that saw traffic: count, errors, p50/p99/p99.9 in µs.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (op, s) in &self.ops {
            if s.count() == 0 {
                continue;
            }
            let us = |q: f64| s.latency_ns.value_at_quantile(q) as f64 / 1000.0;
            out.push_str(&format!(
                "{:<12} count={} errors={} bytes={} p50={:.1}us p99={:.1}us p99.9={:.1}us max={:.1}us\n",
                op.name(),
                s.count(),
                s.errors,
                s.bytes,
                us(0.5),
                us(0.99),
                us(0.999),
                s.latency_ns.max() as f64 / 1000.0
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_on_snapshot() {
        let st = ExportStats::new(2);
        for shard in [0, 1] {
            st.started(shard, Op::Read, 4096);
        }
        st.started(1, Op::Write, 4096);
        st.started(1, Op::Flush, 0);
        let snap = st.snapshot();
        assert_eq!((snap.in_flight, snap.in_flight_bytes), (4, 3 * 4096));
        st.record(0, Op::Read, Duration::from_micros(10), 4096, None);
        st.record(1, Op::Read, Duration::from_micros(30), 4096, None);
        st.record(
            1,
            Op::Write,
            Duration::from_micros(5),
            4096,
            Some(Errno::NoSpc),
        );
        st.record(1, Op::Flush, Duration::from_micros(5), 0, None);
        st.refused(0, Errno::Inval);
        st.refused(1, Errno::Inval);
        let id = 3;
        st.connection_opened(1, "127.0.0.1:5000", id);
        let snap = st.snapshot();
        let read = &snap.ops[Op::Read as usize].1;
        assert_eq!(read.count(), 2);
        assert_eq!(read.bytes, 8192);
        assert!(read.latency_ns.max() >= 29_000);
        let write = &snap.ops[Op::Write as usize].1;
        assert_eq!((write.count(), write.errors, write.bytes), (1, 1, 0));
        assert_eq!(write.errnos[Errno::NoSpc.index()], 1);
        assert_eq!((snap.in_flight, snap.in_flight_bytes), (0, 0));
        assert_eq!(snap.refused[Errno::Inval.index()], 2);
        assert_eq!(snap.connections_per_shard, vec![0, 1]);
        assert!(snap.render().contains("read"));
        let link = Link {
            shard: 1,
            peer: "127.0.0.1:5000".into(),
        };
        assert_eq!(st.links(), [link]);
        st.connection_closed(1, id);
        assert!(st.links().is_empty());
        assert_eq!(st.connections(), 0);
    }
}
