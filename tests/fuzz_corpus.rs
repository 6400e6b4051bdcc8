//! Replays every saved fuzz input (fuzz/corpus/<target>/*, the seeds and
//! what `cargo fuzz` found) through the same entry points the fuzz targets
//! use, so a fixed finding stays fixed. Fuzzing itself needs nightly and
//! cargo-fuzz; see docs/fuzzing.md.

use std::path::Path;

#[test]
fn every_saved_fuzz_input_is_handled_without_a_panic() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for (target, run) in pullgate::fuzz::TARGETS {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
            n += 1;
        }
        assert!(n > 0, "{target} has an empty corpus");
        total += n;
    }
    eprintln!("replayed {total} inputs");
}
