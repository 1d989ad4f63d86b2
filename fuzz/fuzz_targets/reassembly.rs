//! Fragment reassembly: a reliable endpoint driven by steps read off the input (see `trireme::fuzzing::reassembly`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = trireme::fuzzing::reassembly(data) {
        panic!("property violated: {violation}");
    }
});
