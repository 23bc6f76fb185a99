//! libFuzzer entry point: a channel (either role) fed arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| saps_fabric_fuzz::channel(data));
