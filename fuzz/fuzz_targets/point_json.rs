//! Restore point documents (FORMAT.md §7) as a reader opens them: JSON, then the checks every
//! reader relies on, then map pages of the lengths the check promises. Oracle: a point that
//! passes its check has disk names safe in paths and page lengths that sum to its block count.
#![no_main]
use cairn_repo::map::{decode_page, PAGE_BLOCKS};
use cairn_repo::RestorePoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Sealed points (plain repositories) and their opened JSON alike.
    let opened = cairn_repo::crypto::Crypto::Plain.open(data, "point").ok();
    let data = opened.as_deref().unwrap_or(data);
    let Ok(p) = serde_json::from_slice::<RestorePoint>(data) else {
        let _ = decode_page(data);
        return;
    };
    // Retention reads the time and the group of every point (forget), checked or not.
    let _ = cairn_repo::retention::parse_point_time(&p.time);
    let _ = cairn_repo::forget::group_key(&p);
    if p.check().is_err() {
        return;
    }
    for d in &p.disks {
        assert!(cairn_repo::safe_name(&d.name));
        assert!(!d.name.contains('/') && d.name != ".." && d.name != ".");
        let total: u64 = (0..d.map.len()).map(|i| d.page_len(i) as u64).sum();
        assert_eq!(total, d.blocks());
        for i in 0..d.map.len() {
            assert!(d.page_len(i) <= PAGE_BLOCKS);
        }
    }
    if let Some(ids) = decode_page(data) {
        assert!(ids.len() <= PAGE_BLOCKS);
    }
});
