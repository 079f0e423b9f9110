//! Holder crate for the criterion benches in benches/benches/:
//!
//! - `codec`: request header parse + validate, reply header construction,
//!   block-status extent encoding (the per-request protocol work);
//! - `mem`: the `mem` backend, directly and through `BackendIo`;
//! - `file`: the `file` backend through `BackendIo` in a glommio executor
//!   (buffered io_uring on a file in /dev/shm, or the target dir).
//!
//! `cargo bench -p nbd-benches [-- FILTER]` runs them; `cargo test` runs each
//! once. The end-to-end comparison with other NBD servers is `fio/bench.sh`.
