//! The local-directory backend: one file per object, written to a temporary name, fsynced,
//! renamed into place, and the folder fsynced, so that a crash never exposes half an object.

use crate::{valid_name, Backend, Kind, Listed, Result, StorageError};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Temporary files are named `.tmp-*`; a crashed writer leaves them behind and they are never
/// listed. [`LocalBackend::remove_stale_temporaries`] deletes old ones.
const TMP_PREFIX: &str = ".tmp-";

/// Objects at least this large (packs) are written with O_DIRECT: on the machines we measured,
/// buffered writes followed by fsync cost ~2.6 s of CPU per GB in kernel writeback, O_DIRECT
/// 0.08 s (docs/BENCHMARKS.md). Small objects go through the page cache.
const DIRECT_MIN: usize = 1 << 20;
const DIRECT_ALIGN: usize = 4096;
/// O_DIRECT writes go out in pieces of this size (a multiple of [`DIRECT_ALIGN`]).
const DIRECT_CHUNK: usize = 4 << 20;

pub struct LocalBackend {
    root: PathBuf,
    /// Reused aligned buffer for O_DIRECT writes (one writer at a time; others fall back).
    direct_buf: std::sync::Mutex<crate::aligned::AlignedBuf>,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            direct_buf: std::sync::Mutex::new(crate::aligned::AlignedBuf::new(DIRECT_ALIGN)),
        }
    }

    fn path(&self, kind: Kind, name: &str) -> Result<PathBuf> {
        if kind == Kind::Config {
            return Ok(self.root.join("config"));
        }
        if !valid_name(name) {
            return Err(io_err(format!("invalid {kind} object name {name:?}"), ErrorKind::InvalidInput.into()));
        }
        let mut p = self.root.join(kind.dir());
        if kind == Kind::Pack {
            // 256 sub-folders keep folder sizes sane for multi-terabyte repositories.
            p.push(&name[..2]);
        }
        p.push(name);
        Ok(p)
    }

    fn write_atomic(&self, kind: Kind, path: &Path, data: &[u8], replace: bool) -> Result<()> {
        let dir = path.parent().expect("object paths have a parent");
        let tmp = dir.join(format!("{TMP_PREFIX}{}", crate::random_name()));
        let result = (|| {
            // Kinds newer than the repository (catalog/) get their folder on first use; the
            // new folder's entry is made durable before anything relies on it.
            if !dir.exists() {
                fs::create_dir_all(dir)?;
                if let Some(parent) = dir.parent() {
                    File::open(parent)?.sync_all()?;
                }
            }
            if !(data.len() >= DIRECT_MIN && self.write_direct(&tmp, data)?) {
                let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                f.write_all(data)?;
                f.sync_all()?;
            }
            crash_step(kind, "tmp_synced");
            if replace {
                fs::rename(&tmp, path)?;
            } else {
                // link() fails if the target exists: create-only without a race.
                fs::hard_link(&tmp, path)?;
                fs::remove_file(&tmp)?;
            }
            crash_step(kind, "renamed");
            File::open(dir)?.sync_all()?;
            crash_step(kind, "dir_synced");
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| io_err(format!("writing {}", path.display()), e))
    }

    /// Writes `data` to a new file with O_DIRECT. Returns false (and leaves no file) when
    /// O_DIRECT is unavailable here, so the caller writes through the page cache instead.
    fn write_direct(&self, path: &Path, data: &[u8]) -> std::io::Result<bool> {
        use std::os::unix::fs::OpenOptionsExt;
        let Ok(mut buf) = self.direct_buf.try_lock() else { return Ok(false) };
        let f = match OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        };
        let r = (|| {
            use std::os::unix::fs::FileExt;
            // Through one bounded aligned buffer, chunk by chunk: a whole-pack copy would hold
            // a second pack-sized buffer for the process's lifetime.
            for (i, chunk) in data.chunks(DIRECT_CHUNK).enumerate() {
                let padded = chunk.len().next_multiple_of(DIRECT_ALIGN);
                let b = buf.prepare(padded);
                b[..chunk.len()].copy_from_slice(chunk);
                b[chunk.len()..].fill(0);
                f.write_all_at(b, (i * DIRECT_CHUNK) as u64)?;
            }
            f.set_len(data.len() as u64)?;
            f.sync_all()
        })();
        match r {
            Ok(()) => Ok(true),
            // Some filesystems accept the open but refuse the write.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                drop(f);
                fs::remove_file(path)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes temporary files older than `max_age` left by crashed writers. Young ones may
    /// belong to a backup that is running now and are kept.
    fn remove_temporaries_older_than(&self, max_age: std::time::Duration) -> Result<usize> {
        let mut removed = 0;
        let mut dirs = vec![self.root.clone()];
        for kind in Kind::ALL {
            if kind != Kind::Config {
                dirs.push(self.root.join(kind.dir()));
            }
        }
        for sub in 0..=255u8 {
            dirs.push(self.root.join("packs").join(format!("{sub:02x}")));
        }
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                if !name.to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                if old.is_some_and(|age| age > max_age) && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// A crash point named after the kind of object being written (`pack.renamed`, ...).
fn crash_step(kind: Kind, step: &str) {
    #[cfg(debug_assertions)]
    crate::crash_point(&format!("{}.{step}", kind.to_string().trim_end_matches('s')));
    #[cfg(not(debug_assertions))]
    let _ = (kind, step);
}

fn io_err(what: String, source: std::io::Error) -> StorageError {
    StorageError::Io { what, source }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn remove_stale_temporaries(&self, max_age: std::time::Duration) -> Result<usize> {
        self.remove_temporaries_older_than(max_age)
    }

    fn create(&self) -> Result<()> {
        let mk = |p: PathBuf| fs::create_dir_all(&p).map_err(|e| io_err(format!("creating {}", p.display()), e));
        let sync = |p: &Path| {
            File::open(p).and_then(|d| d.sync_all()).map_err(|e| io_err(format!("syncing {}", p.display()), e))
        };
        mk(self.root.clone())?;
        for kind in Kind::ALL {
            if kind != Kind::Config {
                mk(self.root.join(kind.dir()))?;
            }
        }
        for sub in 0..=255u8 {
            mk(self.root.join("packs").join(format!("{sub:02x}")))?;
        }
        // Every new folder's entry is durable in its parent before any object goes in it (a
        // pack fsynced into a folder whose own entry is lost would be lost with it).
        sync(&self.root.join("packs"))?;
        sync(&self.root)?;
        if let Some(parent) = std::path::absolute(&self.root).ok().as_deref().and_then(Path::parent) {
            sync(parent)?;
        }
        Ok(())
    }

    fn exists(&self, kind: Kind, name: &str) -> Result<bool> {
        let p = self.path(kind, name)?;
        match fs::metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("checking {}", p.display()), e)),
        }
    }

    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        let p = self.path(kind, name)?;
        self.write_atomic(kind, &p, data, true)
    }

    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        let p = self.path(kind, name)?;
        match self.write_atomic(kind, &p, data, false) {
            Err(StorageError::Io { source, .. }) if source.kind() == ErrorKind::AlreadyExists => {
                Err(StorageError::AlreadyExists { kind, name: name.to_string() })
            }
            other => other,
        }
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let p = self.path(kind, name)?;
        let mut f = open(&p, kind, name)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| io_err(format!("reading {}", p.display()), e))?;
        Ok(buf)
    }

    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(kind, name, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, kind: Kind, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        let p = self.path(kind, name)?;
        let f = open(&p, kind, name)?;
        // Only grows (zeroing) when the reused buffer is smaller than ever before.
        buf.resize(len as usize, 0);
        read_fully(&f, buf, offset, len as usize).map_err(|e| read_error(e, &f, &p, kind, name, offset, len))
    }

    fn get_span(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path(kind, name)?;
        // Page-cache reads of packs cost more CPU (page allocation, copies, readahead) than
        // decoding them: a restore reads each byte once, so it goes around the cache.
        let f = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.get_range_into(kind, name, offset, len, buf)?;
                return Ok(0..len as usize);
            }
            Err(_) => open(&p, kind, name)?, // reports NotFound and others the usual way
        };
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + len).next_multiple_of(DIRECT_ALIGN as u64);
        let span = (end - start) as usize;
        // An aligned window inside the (unaligned) Vec; only grows when the span is larger
        // than ever before.
        if buf.len() < span + DIRECT_ALIGN {
            buf.resize(span + DIRECT_ALIGN, 0);
        }
        let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let window = &mut buf[pad..pad + span];
        let need = (offset + len - start) as usize;
        match read_fully(&f, window, start, need) {
            Ok(()) => {}
            // Some filesystems accept the open but refuse unbuffered reads.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.get_range_into(kind, name, offset, len, buf)?;
                return Ok(0..len as usize);
            }
            Err(e) => return Err(read_error(e, &f, &p, kind, name, offset, len)),
        }
        let at = pad + (offset - start) as usize;
        Ok(at..at + len as usize)
    }

    fn list(&self, kind: Kind) -> Result<Vec<Listed>> {
        if kind == Kind::Config {
            let exists = self.exists(kind, "")?;
            let size = if exists { fs::metadata(self.root.join("config")).map(|m| m.len()).unwrap_or(0) } else { 0 };
            return Ok(if exists { vec![Listed { name: "config".into(), size }] } else { vec![] });
        }
        let base = self.root.join(kind.dir());
        let mut dirs = vec![base.clone()];
        if kind == Kind::Pack {
            dirs = (0..=255u8).map(|s| base.join(format!("{s:02x}"))).collect();
        }
        let mut out = Vec::new();
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(format!("listing {}", dir.display()), e)),
            };
            for e in entries {
                let e = e.map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !valid_name(&name) {
                    continue;
                }
                // A file deleted between readdir and stat is simply gone; any other error is
                // an error (a listing that silently drops objects would make them look lost).
                match e.metadata() {
                    Ok(m) => out.push(Listed { name, size: m.len() }),
                    Err(err) if err.kind() == ErrorKind::NotFound => {}
                    Err(err) => return Err(io_err(format!("listing {}", e.path().display()), err)),
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        let p = self.path(kind, name)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("deleting {}", p.display()), e)),
        }
    }
}

/// Reads at least `need` bytes into `buf` from `offset` (more when the file and buffer have
/// them); end of file first is an `UnexpectedEof` error.
fn read_fully(f: &File, buf: &mut [u8], offset: u64, need: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < need {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The storage error for a failed read of `[offset, offset + len)`.
fn read_error(e: std::io::Error, f: &File, p: &Path, kind: Kind, name: &str, offset: u64, len: u64) -> StorageError {
    if e.kind() == ErrorKind::UnexpectedEof {
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        StorageError::ShortRead { kind, name: name.to_string(), offset, end: offset + len, size }
    } else {
        io_err(format!("reading {}", p.display()), e)
    }
}

fn open(p: &Path, kind: Kind, name: &str) -> Result<File> {
    File::open(p).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            StorageError::NotFound { kind, name: name.to_string() }
        } else {
            io_err(format!("opening {}", p.display()), e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create().unwrap();
        let name = "ab".repeat(32);
        b.put(Kind::Pack, &name, b"hello world").unwrap();
        assert_eq!(b.get(Kind::Pack, &name).unwrap(), b"hello world");
        assert_eq!(b.get_range(Kind::Pack, &name, 6, 5).unwrap(), b"world");
        assert!(matches!(b.get_range(Kind::Pack, &name, 6, 50), Err(StorageError::ShortRead { .. })));
        assert_eq!(b.list(Kind::Pack).unwrap(), vec![Listed { name: name.clone(), size: 11 }]);
        assert!(dir.path().join("packs/ab").join(&name).exists());
        b.delete(Kind::Pack, &name).unwrap();
        b.delete(Kind::Pack, &name).unwrap();
        assert!(b.get(Kind::Pack, &name).unwrap_err().is_not_found());
    }

    #[test]
    fn spans_are_read_around_the_cache_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create().unwrap();
        let name = "cd".repeat(32);
        let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        b.put(Kind::Pack, &name, &data).unwrap();
        let mut buf = Vec::new();
        // Unaligned start and end, one ending exactly at the end of the object, one tiny.
        for (off, len) in [(1, 100_000), (4095, 2 << 20), (5000, (3 << 20) - 5000), (3 << 20, 0), (12_345, 1)] {
            let r = b.get_span(Kind::Pack, &name, off as u64, len as u64, &mut buf).unwrap();
            assert!(buf[r] == data[off..off + len], "span {off}+{len}");
        }
        assert!(matches!(
            b.get_span(Kind::Pack, &name, (3 << 20) - 10, 20, &mut buf),
            Err(StorageError::ShortRead { .. })
        ));
        assert!(b.get_span(Kind::Pack, &"ee".repeat(32), 0, 10, &mut buf).unwrap_err().is_not_found());
    }

    #[test]
    fn put_new_refuses_existing_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create().unwrap();
        b.put_new(Kind::Config, "", b"one").unwrap();
        assert!(matches!(b.put_new(Kind::Config, "", b"two"), Err(StorageError::AlreadyExists { .. })));
        assert_eq!(b.get(Kind::Config, "").unwrap(), b"one");
        assert!(b.put(Kind::Point, "../../etc/passwd", b"x").is_err());
        assert!(b.put(Kind::Point, "ABCDEF0123", b"x").is_err());
    }

    #[test]
    fn temporaries_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create().unwrap();
        fs::write(dir.path().join("index/.tmp-deadbeef"), b"partial").unwrap();
        assert!(b.list(Kind::Index).unwrap().is_empty());
        assert_eq!(b.remove_stale_temporaries(std::time::Duration::ZERO).unwrap(), 1);
    }
}
