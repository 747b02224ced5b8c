//! S3 and Azure answers cairn parses itself (Object Lock: crates/cairn-storage/src/object_lock.rs): XML
//! from the store (errors, versioning, Object Lock settings, version listings) and retain-until
//! dates from headers. Oracle: no panic; a listing never yields more entries than it has
//! elements; a parsed date formats and parses back to itself.
#![no_main]
use cairn_storage::object_lock::{
    error_code, lock_configuration, parse_azure_versions, parse_date, parse_http_date, parse_versions, rfc3339,
    versioning_enabled,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = error_code(data);
    let _ = versioning_enabled(data);
    let _ = lock_configuration(data);
    if let Ok((entries, _next)) = parse_versions(data) {
        let elements = data.windows(5).filter(|w| *w == b"<Vers" || *w == b"<Dele").count();
        assert!(entries.len() <= elements, "{} entries from {elements} elements", entries.len());
    }
    if let Ok((entries, _next)) = parse_azure_versions(data) {
        let elements = data.windows(5).filter(|w| *w == b"<Blob").count();
        assert!(entries.len() <= elements, "{} entries from {elements} elements", entries.len());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_http_date(s);
        if let Some(t) = parse_date(s) {
            assert_eq!(parse_date(&rfc3339(t)), Some(t), "{s:?}");
        }
    }
});
