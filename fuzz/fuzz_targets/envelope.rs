//! Sealed envelopes (FORMAT.md §4) as read from a repository: plain and AES-GCM, and frames
//! checked against the raw length an index claims. Never a panic, never more than raw_len out.
#![no_main]
use cairn_repo::crypto::Crypto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let plain = Crypto::Plain;
    if let Ok(out) = plain.open(data, "fuzz") {
        if data.len() >= 5 {
            let raw_len = u32::from_le_bytes(data[1..5].try_into().unwrap()) as usize;
            assert_eq!(out.len(), raw_len);
        }
    }
    let claimed = data.first().map(|b| (*b as u32) << 12).unwrap_or(0);
    let _ = cairn_repo::pack::open_frame(&plain, data, claimed, "fuzz");
    let aes = Crypto::with_raw_keys([7; 32], [9; 32]);
    let _ = aes.open(data, "fuzz");
});
