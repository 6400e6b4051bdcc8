#![no_main]
// Feeds pullgate::fuzz::request_path; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::request_path(data));
