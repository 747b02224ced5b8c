//! Index files (FORMAT.md §6), decoded and loaded into the in-memory index. Oracle: lookups
//! agree with a plain map of what was added (first copy first, every copy kept).
#![no_main]
use cairn_repo::index::{decode_index, Index};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    // Sealed index files (plain repositories) and their opened contents alike.
    let raw = cairn_repo::crypto::Crypto::Plain.open(data, "index").unwrap_or_else(|_| data.to_vec());
    let Ok(packs) = decode_index(&raw) else { return };
    let mut idx = Index::default();
    let mut model: HashMap<[u8; 32], Vec<([u8; 32], u32, u32)>> = HashMap::new();
    let mut seen_packs = std::collections::HashSet::new();
    for (pack, frames) in &packs {
        idx.add_pack(*pack, frames);
        if !seen_packs.insert(*pack) {
            continue; // a pack listed twice is added once
        }
        for f in frames {
            for b in &f.blobs {
                model.entry(b.id.0).or_default().push((*pack, f.offset, b.raw_offset));
            }
        }
    }
    idx.seal();
    for (id, copies) in &model {
        let id = cairn_repo::BlockId(*id);
        let got: Vec<([u8; 32], u32, u32)> = idx.copies(&id).map(|l| (l.pack, l.frame_offset, l.raw_offset)).collect();
        assert_eq!(got.len(), copies.len());
        let mut a = got.clone();
        let mut b = copies.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert!(idx.contains(&id));
    }
});
