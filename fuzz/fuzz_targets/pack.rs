//! Pack files (FORMAT.md §5) as read back from storage: footer, trailer, tiling, frames.
//! Oracles: parsed frames tile the body exactly; every blob lies inside its frame's raw bytes;
//! every frame that opens has the raw length its entry claims.
#![no_main]
use cairn_repo::crypto::Crypto;
use cairn_repo::pack::{open_frame, parse_pack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for crypto in [Crypto::Plain, Crypto::with_raw_keys([7; 32], [9; 32])] {
        let Ok(frames) = parse_pack(&crypto, data, "fuzz") else { continue };
        let mut at = 0u64;
        for f in &frames {
            assert_eq!(f.offset as u64, at, "frames must tile the pack");
            at += f.stored_len as u64;
            for b in &f.blobs {
                assert!(b.raw_offset as u64 + b.len as u64 <= f.raw_len as u64);
            }
            let stored = &data[f.offset as usize..(f.offset + f.stored_len) as usize];
            if let Ok(raw) = open_frame(&crypto, stored, f.raw_len, "frame") {
                assert_eq!(raw.len(), f.raw_len as usize);
            }
        }
        assert!(at <= data.len() as u64);
    }
});
