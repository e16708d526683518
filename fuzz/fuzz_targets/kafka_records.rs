#![no_main]
//! Fuzz target: see fuzz/checks.rs for what `kafka_records` checks.

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::kafka_records(data));
