#![no_main]
// Feeds pullgate::fuzz::manifest; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::manifest(data));
