#![no_main]
//! Fuzz target: see fuzz/checks.rs for what `config` checks.

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
