//! The state file (saveconfig.json) as the runner loads it at start.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::control::drive_state(data);
});
