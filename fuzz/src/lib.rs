//! The fuzz drivers live in the engine (`nbd_engine::protocol::fuzzing`,
//! built under `--cfg fuzzing`, which cargo-fuzz sets), where the engine's
//! seeded smoke tests run the very same code in CI.

pub use nbd_control::fuzzing as control;
pub use nbd_engine::protocol::fuzzing as drive;
