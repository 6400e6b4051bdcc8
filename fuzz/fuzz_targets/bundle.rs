#![no_main]
// Feeds pullgate::fuzz::bundle; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::bundle(data));
