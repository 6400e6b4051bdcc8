#![no_main]
// Feeds pullgate::fuzz::response_head; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::response_head(data));
