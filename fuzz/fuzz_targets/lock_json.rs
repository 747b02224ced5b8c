//! Lock files (FORMAT.md §9): JSON from any host, judged stale or live. Oracle: no panic,
//! and a lock refreshed in the future or just now is never judged stale by time alone.
#![no_main]
use cairn_repo::lock::LockInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = serde_json::from_slice::<LockInfo>(data) else { return };
    let ours = "0123456789abcdef:fedcba9876543210:pid[4026531836]";
    let _ = info.is_stale("host", Some(ours));
    let _ = info.is_stale(&info.hostname.clone(), None);
    let mut fresh = info.clone();
    fresh.time = u64::MAX;
    fresh.hostname = "another-host".into();
    fresh.host_id = None;
    assert!(!fresh.is_stale("host", Some(ours)));
});
