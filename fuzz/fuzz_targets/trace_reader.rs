//! The trace reader: `trace::parse` on arbitrary bytes and a write/read round trip (see `trireme::fuzzing::trace_reader`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = trireme::fuzzing::trace_reader(data) {
        panic!("property violated: {violation}");
    }
});
