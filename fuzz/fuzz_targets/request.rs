//! A request header, a session and extents: parse, validate, encode replies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::drive::drive_request(data);
});
