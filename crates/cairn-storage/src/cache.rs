//! A size-capped local cache in front of a remote backend, for the objects every process
//! reads whole at start: index files and restore points. Both are immutable and named by the
//! BLAKE3 hash of their bytes, so a cached copy is checked against its name on every read (a
//! damaged or stale file is fetched again, never used), and nothing ever needs invalidating
//! except what a prune deletes.
//!
//! Packs are not cached: a backup never reads them, and a restore reads each byte once.
//!
//! The cache is a folder per repository location under [`cache_root`]`/objects/`, owner-only.
//! When it outgrows its cap, the least recently used files go first (their mtime is touched on
//! each hit). It is only an accelerator: every failure to read or write it falls back to the
//! store silently, and deleting the folder at any time is safe.

use crate::{Backend, Kind, Listed, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The default cap: index files of a repository of 17M blocks take about 600 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 2 << 30;

/// Where cairn keeps local state that can be rebuilt: `CAIRN_CACHE_DIR`, else
/// /var/cache/cairn for root, else `$XDG_CACHE_HOME/cairn` or ~/.cache/cairn, else
/// /var/tmp/cairn-UID.
pub fn cache_root() -> PathBuf {
    let uid = unsafe { libc::geteuid() };
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("CAIRN_CACHE_DIR")
        .or_else(|| (uid == 0).then(|| PathBuf::from("/var/cache/cairn")))
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("cairn")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/cairn")))
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/cairn-{uid}")))
}

/// The cap from `CAIRN_CACHE_MAX` (bytes, or with a K/M/G/T suffix, binary), else the default.
pub fn cache_cap_from_env() -> u64 {
    std::env::var("CAIRN_CACHE_MAX").ok().and_then(|v| parse_size(&v)).unwrap_or(DEFAULT_CACHE_BYTES)
}

/// A size or rate: bytes, or with a K/M/G/T suffix (binary; `B`, `iB` and `/s` allowed).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s");
    let s = s.trim().trim_end_matches(['B', 'b']).trim_end_matches(['i']);
    let (num, shift) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 10),
        'M' | 'm' => (&s[..s.len() - 1], 20),
        'G' | 'g' => (&s[..s.len() - 1], 30),
        'T' | 't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
    cap: u64,
    /// Bytes in the cache as this process believes (recounted when it trims).
    used: AtomicU64,
}

fn cached(kind: Kind) -> bool {
    // Catalog records too: content-named like the others, and read whole by every backup
    // into an immutable repository (its lock records).
    matches!(kind, Kind::Index | Kind::Point | Kind::Catalog)
}

impl CachedBackend {
    /// A cache for `inner` in `root/objects/<hash of its location and endpoint>`, capped at
    /// `cap` bytes. `endpoint` tells apart stores that show the same location (two S3
    /// services with a bucket of the same name).
    pub fn new(inner: Arc<dyn Backend>, endpoint: &str, root: &Path, cap: u64) -> CachedBackend {
        let key = blake3::hash(format!("{endpoint}\n{}", inner.location()).as_bytes()).to_hex();
        let dir = root.join("objects").join(&key[..16]);
        let used = dir_size(&dir);
        CachedBackend { inner, dir, cap, used: AtomicU64::new(used) }
    }

    fn path(&self, kind: Kind, name: &str) -> PathBuf {
        self.dir.join(kind.dir()).join(name)
    }

    /// The cached copy, if present and still the object its name says.
    fn read(&self, kind: Kind, name: &str) -> Option<Vec<u8>> {
        let p = self.path(kind, name);
        let bytes = std::fs::read(&p).ok()?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            let _ = std::fs::remove_file(&p);
            return None;
        }
        // Recently used: the trim keeps it.
        let _ =
            std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Some(bytes)
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) {
        if !crate::valid_name(name) || blake3::hash(data).to_hex().as_str() != name {
            return; // only content-named objects are cached
        }
        let p = self.path(kind, name);
        let result = (|| -> std::io::Result<()> {
            let folder = p.parent().unwrap();
            if !folder.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(folder)?;
            }
            let tmp = folder.join(format!(".tmp-{}", crate::random_name()));
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, &p)
        })();
        if result.is_ok() && self.used.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64 > self.cap {
            self.trim();
        }
    }

    /// Deletes the least recently used files until the cache is under 90% of its cap.
    fn trim(&self) {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        for kind in [Kind::Index, Kind::Point, Kind::Catalog] {
            let Ok(entries) = std::fs::read_dir(self.dir.join(kind.dir())) else { continue };
            for e in entries.flatten() {
                if let Ok(m) = e.metadata() {
                    files.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path()));
                }
            }
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (_, len, path) in files {
            if total <= self.cap / 10 * 9 {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        self.used.store(total, Ordering::Relaxed);
    }
}

fn dir_size(dir: &Path) -> u64 {
    [Kind::Index, Kind::Point, Kind::Catalog]
        .iter()
        .filter_map(|k| std::fs::read_dir(dir.join(k.dir())).ok())
        .flat_map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()))
        .sum()
}

impl Backend for CachedBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> Result<()> {
        self.inner.create()
    }
    fn exists(&self, kind: Kind, name: &str) -> Result<bool> {
        self.inner.exists(kind, name)
    }
    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        // Not cached on the way in: a writer reads what it stored back from the store (an
        // index file is confirmed whole before older ones are deleted), never from here.
        self.inner.put(kind, name, data)
    }
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_new(kind, name, data)
    }
    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        if cached(kind) {
            if let Some(bytes) = self.read(kind, name) {
                return Ok(bytes);
            }
            let bytes = self.inner.get(kind, name)?;
            self.write(kind, name, &bytes);
            return Ok(bytes);
        }
        self.inner.get(kind, name)
    }
    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(kind, name, offset, len)
    }
    fn get_range_into(&self, kind: Kind, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.get_range_into(kind, name, offset, len, buf)
    }
    fn get_span(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>> {
        self.inner.get_span(kind, name, offset, len, buf)
    }
    fn list(&self, kind: Kind) -> Result<Vec<Listed>> {
        let listed = self.inner.list(kind)?;
        if cached(kind) {
            // What the store no longer holds (a prune deleted it) leaves the cache too.
            let present: std::collections::HashSet<&str> = listed.iter().map(|l| l.name.as_str()).collect();
            if let Ok(entries) = std::fs::read_dir(self.dir.join(kind.dir())) {
                for e in entries.flatten() {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if !present.contains(name.as_ref()) && !name.starts_with(".tmp-") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(listed)
    }
    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        if cached(kind) {
            let _ = std::fs::remove_file(self.path(kind, name));
        }
        self.inner.delete(kind, name)
    }
    fn remove_stale_temporaries(&self, max_age: std::time::Duration) -> Result<usize> {
        self.inner.remove_stale_temporaries(max_age)
    }
    fn reads_in_flight(&self) -> usize {
        self.inner.reads_in_flight()
    }
    fn object_lock(&self) -> Option<&dyn crate::ObjectLock> {
        self.inner.object_lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faulty::{FaultyBackend, Op};
    use crate::LocalBackend;

    fn named(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    #[test]
    fn a_second_process_reads_index_files_and_points_from_the_cache() {
        let store = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let counting = Arc::new(FaultyBackend::counting(LocalBackend::new(store.path())));
        counting.create().unwrap();
        let first = CachedBackend::new(counting.clone(), "", cache.path(), 1 << 20);
        let (index, point) = (b"index file bytes".to_vec(), b"point bytes".to_vec());
        first.put(Kind::Index, &named(&index), &index).unwrap();
        first.put(Kind::Point, &named(&point), &point).unwrap();
        // A writer's read-back goes to the store; that read fills the cache.
        let reads = counting.calls(Op::Read);
        assert_eq!(first.get(Kind::Index, &named(&index)).unwrap(), index);
        assert_eq!(first.get(Kind::Point, &named(&point)).unwrap(), point);
        assert_eq!(counting.calls(Op::Read), reads + 2, "read from the store, not the cache");
        let reads = counting.calls(Op::Read);
        // A new process (a new cache object on the same folder) reads them without the store.
        let second = CachedBackend::new(counting.clone(), "", cache.path(), 1 << 20);
        assert_eq!(second.get(Kind::Index, &named(&index)).unwrap(), index);
        assert_eq!(second.get(Kind::Point, &named(&point)).unwrap(), point);
        assert_eq!(counting.calls(Op::Read), reads, "served from the cache");

        // A damaged cached copy is noticed by its name and fetched again.
        let p = second.path(Kind::Index, &named(&index));
        std::fs::write(&p, b"garbage").unwrap();
        assert_eq!(second.get(Kind::Index, &named(&index)).unwrap(), index);
        assert_eq!(counting.calls(Op::Read), reads + 1);
        assert_eq!(std::fs::read(&p).unwrap(), index, "the cache was mended");

        // Deleted from the store (a prune): gone from the cache; a listing drops strays too.
        second.delete(Kind::Index, &named(&index)).unwrap();
        assert!(!p.exists());
        counting.delete(Kind::Point, &named(&point)).unwrap();
        assert!(second.list(Kind::Point).unwrap().is_empty());
        assert!(!second.path(Kind::Point, &named(&point)).exists());
    }

    #[test]
    fn the_cache_stays_under_its_cap_dropping_the_least_recently_used() {
        let store = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(store.path()));
        local.create().unwrap();
        let c = CachedBackend::new(local, "", cache.path(), 10_000);
        let objects: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000]).collect();
        for (i, o) in objects.iter().enumerate() {
            c.put(Kind::Index, &named(o), o).unwrap();
            let _ = c.get(Kind::Index, &named(o)).unwrap(); // cached by the read
            if i == 0 {
                // Make the first one old, then use it again: it must survive the trims.
                let p = c.path(Kind::Index, &named(o));
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(std::time::UNIX_EPOCH).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            let _ = c.get(Kind::Index, &named(&objects[0])).unwrap();
        }
        assert!(dir_size(&c.dir) <= 10_000, "{} bytes cached", dir_size(&c.dir));
        assert!(c.path(Kind::Index, &named(&objects[0])).exists(), "the most used stayed");
        assert!(!c.path(Kind::Index, &named(&objects[1])).exists(), "the least recently used went");
        // Everything still reads (from the store).
        for o in &objects {
            assert_eq!(&c.get(Kind::Index, &named(o)).unwrap(), o);
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
