//! Per-export, per-operation latency (HDR histograms) and counters.
//!
//! Each shard records into its own slot, so the lock is never contended on
//! the hot path; readers merge the slots on request.

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
    pub bytes: u64,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            // 1 ns .. 10 min at 2 significant digits: a few KiB per histogram.
            latency_ns: Histogram::new_with_bounds(1, 600_000_000_000, 2).expect("valid bounds"),
            errors: 0,
            bytes: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.latency_ns.len()
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency_ns.add(&other.latency_ns).expect("same bounds");
        self.errors += other.errors;
        self.bytes += other.bytes;
    }
}

struct ShardSlot {
    ops: Mutex<Vec<OpStats>>,
    connections: AtomicU64,
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
}

impl ExportStats {
    pub fn new(shards: usize) -> Self {
        ExportStats {
            shards: (0..shards.max(1))
                .map(|_| ShardSlot {
                    ops: Mutex::new(Op::ALL.iter().map(|_| OpStats::new()).collect()),
                    connections: AtomicU64::new(0),
                })
                .collect(),
            links: Mutex::new(Default::default()),
            closed: (Mutex::new(()), Condvar::new()),
        }
    }

    pub fn record(&self, shard: usize, op: Op, latency: Duration, bytes: u64, ok: bool) {
        let slot = &self.shards[shard % self.shards.len()];
        let mut ops = slot.ops.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut ops[op as usize];
        s.latency_ns
            .saturating_record((latency.as_nanos() as u64).max(1));
        if ok {
            s.bytes += bytes;
        } else {
            s.errors += 1;
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
        StatsSnapshot {
            ops: Op::ALL.iter().copied().zip(merged).collect(),
            connections_per_shard: self.snapshot_connections(),
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
        st.record(0, Op::Read, Duration::from_micros(10), 4096, true);
        st.record(1, Op::Read, Duration::from_micros(30), 4096, true);
        st.record(1, Op::Write, Duration::from_micros(5), 4096, false);
        let id = 3;
        st.connection_opened(1, "127.0.0.1:5000", id);
        let snap = st.snapshot();
        let read = &snap.ops[Op::Read as usize].1;
        assert_eq!(read.count(), 2);
        assert_eq!(read.bytes, 8192);
        assert!(read.latency_ns.max() >= 29_000);
        let write = &snap.ops[Op::Write as usize].1;
        assert_eq!((write.count(), write.errors, write.bytes), (1, 1, 0));
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
