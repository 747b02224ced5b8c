//! Catalog records (FORMAT.md §11) as opened from storage: a sealed envelope of JSON, checked
//! against its kind's type as `Repository::load_records` does, then read the way the readers
//! read them (quarantine, prune marks, the point a record is about, every typed body).
//! Oracles: a record that fits its kind reads back typed without error; every quarantine
//! entry returned is a valid (pack, block) pair taken from the record; every mark is a pack
//! the record names, with the earliest time it gives that pack; only marks records give marks.
#![no_main]
use cairn_repo::catalog::{self, BootVerification, ObjectLocks, Protection, PruneMarks, Quarantine, VerifyState};
use cairn_repo::crypto::Crypto;
use cairn_repo::RecordKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = Crypto::Plain.open(data, "record").unwrap_or_else(|_| data.to_vec());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else { return };
    let kind = RecordKind::of(&v);
    let _ = catalog::point_of(&v);
    if kind.and_then(|k| k.misfit(&v)).is_some() {
        return; // a damaged record: no reader sees it
    }
    let records = vec![("r".to_string(), v.clone())];
    let quarantines: Vec<(String, Quarantine)> = catalog::typed(&records).expect("a fitting quarantine reads back");
    for (_, q) in &quarantines {
        assert!(cairn_repo::quarantine_copies(q).len() <= q.copies.len());
    }
    let marks_records: Vec<(String, PruneMarks)> = catalog::typed(&records).expect("fitting marks read back");
    let marks = catalog::marks_in(&marks_records);
    if kind != Some(RecordKind::PruneMarks) {
        assert!(marks.is_empty());
    }
    for (pack, at) in &marks {
        let times: Vec<u64> = marks_records
            .iter()
            .flat_map(|(_, r)| r.packs.iter())
            .filter(|(p, _)| cairn_repo::index::pack_id_from_name(p) == Some(*pack))
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(times.iter().min(), Some(at), "a mark is not the earliest time given for its pack");
    }
    let _: Vec<(String, VerifyState)> = catalog::typed(&records).expect("a fitting verify state reads back");
    let _: Vec<(String, Protection)> = catalog::typed(&records).expect("a fitting protection reads back");
    let _: Vec<(String, ObjectLocks)> = catalog::typed(&records).expect("fitting object locks read back");
    let _: Vec<(String, BootVerification)> = catalog::typed(&records).expect("a fitting boot verification reads back");
});
