//! Byte 0 picks when the server starts shutting down; the rest is the
//! client's stream, fed to the handshake exactly as want() asks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::drive::drive_handshake(data);
});
