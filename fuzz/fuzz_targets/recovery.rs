#![no_main]
//! Fuzz target: see fuzz/checks.rs for what `recovery` checks.

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::recovery(data));
