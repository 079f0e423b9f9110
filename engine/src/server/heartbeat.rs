//! Shard liveness for a supervisor (systemd's watchdog): every shard bumps
//! its own counter from a timer task on its own executor, so a shard whose
//! thread is wedged (a busy loop, a blocking call that never returns) stops
//! counting while the others go on. Each counter has its own cache line:
//! the shards never write a shared one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Beat(AtomicU64);

#[derive(Debug)]
pub struct Heartbeats {
    beats: Vec<Beat>,
    every: Duration,
}

impl Heartbeats {
    /// One counter per shard, bumped every `every`.
    pub fn new(shards: usize, every: Duration) -> Self {
        Heartbeats {
            beats: (0..shards).map(|_| Beat::default()).collect(),
            every,
        }
    }

    pub fn every(&self) -> Duration {
        self.every
    }

    /// Called by shard `shard` only.
    pub fn beat(&self, shard: usize) {
        if let Some(b) = self.beats.get(shard) {
            b.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every shard's count so far.
    pub fn counts(&self) -> Vec<u64> {
        self.beats
            .iter()
            .map(|b| b.0.load(Ordering::Relaxed))
            .collect()
    }
}

/// Compares two [`Heartbeats::counts`] readings taken at least a few beats
/// apart: the shards that did not beat in between.
pub fn stalled(before: &[u64], now: &[u64]) -> Vec<usize> {
    before
        .iter()
        .zip(now)
        .enumerate()
        .filter(|(_, (b, n))| n <= b)
        .map(|(i, _)| i)
        .collect()
}

/// A shard's beating task: runs until its executor ends.
pub(crate) async fn run(beats: std::sync::Arc<Heartbeats>, shard: usize) {
    loop {
        beats.beat(shard);
        glommio::timer::sleep(beats.every()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_stops_beating_is_named() {
        let h = Heartbeats::new(3, Duration::from_millis(10));
        let before = h.counts();
        h.beat(0);
        h.beat(2);
        h.beat(7); // no such shard: ignored
        assert_eq!(stalled(&before, &h.counts()), vec![1]);
        let before = h.counts();
        for s in 0..3 {
            h.beat(s);
        }
        assert!(stalled(&before, &h.counts()).is_empty());
    }
}
