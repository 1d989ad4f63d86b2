//! Datagram decoding: header, ack and message-body decoders on arbitrary bytes (see `trireme::fuzzing::datagram`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = trireme::fuzzing::datagram(data) {
        panic!("property violated: {violation}");
    }
});
