//! libFuzzer entry point: the frame decoder on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| saps_fabric_fuzz::decode(data));
