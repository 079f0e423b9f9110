//! The server's byte stream, fed to the client handshake exactly as want()
//! asks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::drive::drive_client(data);
});
