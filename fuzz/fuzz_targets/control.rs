//! The control route as a stranger drives it: byte 0 even, a hello and
//! request frames as the runner reads them; odd, a hello reply as nbd-cli
//! reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::control::drive_control(data);
});
