//! Catalog records (FORMAT.md §11) as opened from storage: a sealed envelope of JSON, then
//! the quarantine, verify-state and prune-marks readings. Oracles: every quarantine entry
//! returned is a valid (pack, block) pair taken from the record; every mark is a pack the
//! record names, with the earliest time it gives that pack.
#![no_main]
use cairn_repo::crypto::Crypto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = Crypto::Plain.open(data, "record").unwrap_or_else(|_| data.to_vec());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else { return };
    let copies = cairn_repo::quarantine_copies(&v);
    assert!(copies.len() <= v["copies"].as_array().map(|a| a.len()).unwrap_or(0));
    let _ = serde_json::from_value::<std::collections::HashMap<String, String>>(v["packs"].clone());
    let records = vec![("r".to_string(), v.clone())];
    let marks = cairn_repo::prune::marks_in(&records);
    let listed = v["packs"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
    if v["kind"] != cairn_repo::prune::MARKS_KIND {
        assert!(marks.is_empty());
    }
    for (pack, at) in &marks {
        let times: Vec<u64> = listed
            .iter()
            .filter(|e| e.get(0).and_then(|p| p.as_str()).and_then(cairn_repo::index::pack_id_from_name) == Some(*pack))
            .filter_map(|e| e.get(1).and_then(|t| t.as_u64()))
            .collect();
        assert_eq!(times.iter().min(), Some(at), "a mark is not the earliest time given for its pack");
    }
});
