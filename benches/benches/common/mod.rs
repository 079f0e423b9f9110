//! Helpers shared by the bench files (each includes this with `mod common;`).
#![allow(dead_code)] // each bench file uses its own subset

use criterion::Criterion;
use std::time::Duration;

/// Short runs, so `cargo bench -p nbd-benches` takes a few minutes on 2 cores.
/// Criterion's command-line flags (`--measurement-time`, `--sample-size`, ...)
/// still override these: `criterion_group!` applies them on top.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

/// Deterministic pseudo-random block offsets, aligned to `block`, inside `span`
/// bytes (a 64-bit LCG: cheap enough not to show in the measurement).
pub struct Offsets {
    state: u64,
    blocks: u64,
    block: u64,
}

impl Offsets {
    pub fn new(span: u64, block: u64) -> Self {
        assert!(span >= block && block > 0);
        Offsets {
            state: 0x9e37_79b9_7f4a_7c15,
            blocks: span / block,
            block,
        }
    }

    #[inline]
    pub fn next_offset(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.state >> 33) % self.blocks) * self.block
    }
}
