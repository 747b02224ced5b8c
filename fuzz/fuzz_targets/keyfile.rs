//! Key files (FORMAT.md §3): JSON, then unwrapping with a password. Oracle: a key file never
//! makes unwrapping take long or much memory (costs are bounded before Argon2 runs; the
//! fuzzer's copies of the real costs are scaled down so each run stays fast).
#![no_main]
use cairn_repo::crypto::{unwrap_keys, KeyFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = serde_json::from_slice::<KeyFile>(data) else { return };
    let t = std::time::Instant::now();
    // Absurd costs must be refused before any work.
    let absurd = file.memory_kib > 1024 * 1024 || file.iterations > 32 || file.parallelism > 16;
    if absurd {
        assert!(unwrap_keys(&file, "pw").is_err());
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
        return;
    }
    // Plausible costs: keep the run cheap, but exercise the rest of the path.
    file.memory_kib = file.memory_kib.min(64);
    file.iterations = file.iterations.min(1);
    if let Ok(Some(opened)) = unwrap_keys(&file, "pw") {
        let _ = opened.authenticates(b"{}");
    }
});
