#![no_main]
// Feeds pullgate::fuzz::bucket; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::bucket(data));
