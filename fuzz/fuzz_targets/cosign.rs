#![no_main]
// Feeds pullgate::fuzz::cosign_formats; see src/fuzz.rs for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzz::cosign_formats(data));
