//! The fuzz drivers, shared with the engine's deterministic smoke test
//! (`engine/src/protocol/fuzz_smoke_tests.rs`, included here by path) so that
//! CI runs the very code the fuzz targets run.

pub use nbd_engine::protocol::*;

#[path = "../../engine/src/protocol/fuzz_smoke_tests.rs"]
pub mod drive;
