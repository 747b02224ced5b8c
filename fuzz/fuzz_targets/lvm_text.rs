//! LVM2 text metadata (cairn_disk::lvm::volumes_in_text) as a guest's PV holds it, at most
//! 1 MiB like read_pv reads. Never a panic or a stack overflow; every volume returned is made
//! of runs that tile it from 0 without gaps and lie inside the PV.
#![no_main]
use cairn_disk::lvm::{volumes_in_text, MAX_METADATA_TEXT};
use libfuzzer_sys::fuzz_target;

/// The PV the seeds describe (fuzz/seeds/lvm.sh makes them with this UUID), and its length.
const PV_UUID: &str = "fuzzzz00000000000000000000000000";

fuzz_target!(|data: &[u8]| {
    if data.len() as u64 > MAX_METADATA_TEXT || data.is_empty() {
        return;
    }
    // The first byte picks the PV's length: from tiny to 2^63, for the overflow checks.
    let pv_length = 1u64 << (data[0] % 64);
    let text = String::from_utf8_lossy(&data[1..]);
    if let Ok(pv) = volumes_in_text(&text, PV_UUID, pv_length) {
        for lv in &pv.volumes {
            let mut next = 0u64;
            for r in &lv.runs {
                assert_eq!(r.at, next, "{lv:?}");
                assert!(r.len > 0 && r.pv_offset.checked_add(r.len).is_some_and(|end| end <= pv_length), "{lv:?}");
                next += r.len;
            }
            assert_eq!(next, lv.size, "{lv:?}");
        }
    }
});
