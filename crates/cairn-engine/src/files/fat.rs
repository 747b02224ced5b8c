//! FAT12/16/32 (EFI system partitions, USB images, old Windows guests) through `fatfs`.
//! Names are matched case-insensitively, long names preferred.

use super::{base_name, Entry, Filesystem, Ident, VolumeReader};
use anyhow::{bail, Context, Result};
use fatfs::{FileSystem, FsOptions};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(super) struct FatFs {
    fs: FileSystem<VolumeReader>,
    /// The volume reader's read budget: `fatfs` follows cluster chains without noticing a loop.
    budget: Arc<AtomicU64>,
}

/// What one folder may take to read: FAT folders hold at most 65536 entries of 32 bytes (2 MiB),
/// plus the FAT entries of their clusters.
const FOLDER_READ_BUDGET: u64 = 4 << 20;

impl FatFs {
    pub(super) fn open(volume: VolumeReader) -> Result<FatFs> {
        let budget = volume.budget.clone();
        Ok(FatFs { fs: FileSystem::new(volume, FsOptions::new())?, budget })
    }

    /// Runs a walk of `path` with reads bounded by what FAT folders can hold on the way, so that
    /// a folder whose cluster chain loops is an error, not an endless read.
    fn bounded<T>(&self, path: &str, walk: impl FnOnce() -> Result<T>) -> Result<T> {
        let folders = path.split('/').filter(|c| !c.is_empty()).count() as u64 + 1;
        self.budget.store(FOLDER_READ_BUDGET.saturating_mul(folders), Ordering::Relaxed);
        let result = walk();
        self.budget.store(u64::MAX, Ordering::Relaxed);
        result
    }

    fn find(&self, path: &str) -> Result<Option<fatfs::DirEntry<'_, VolumeReader>>> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        if name.is_empty() {
            return Ok(None); // the root has no entry of its own
        }
        self.bounded(path, || {
            let dir = self.open_dir(parent)?;
            for e in dir.iter() {
                let e = e?;
                if e.file_name().eq_ignore_ascii_case(name) || e.short_file_name().eq_ignore_ascii_case(name) {
                    return Ok(Some(e));
                }
            }
            bail!("{path}: no such file or folder")
        })
    }

    fn open_dir(&self, path: &str) -> Result<fatfs::Dir<'_, VolumeReader>> {
        let path = path.trim_start_matches('/');
        let root = self.fs.root_dir();
        if path.is_empty() {
            Ok(root)
        } else {
            root.open_dir(path).with_context(|| format!("/{path}: no such folder"))
        }
    }
}

fn entry(e: &fatfs::DirEntry<'_, VolumeReader>) -> Entry {
    let read_only = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
    let (kind, size, mode) =
        if e.is_dir() { ("dir", 0, 0o755) } else { ("file", e.len(), if read_only { 0o444 } else { 0o644 }) };
    // fatfs keeps an entry's first cluster to itself; its Debug output shows the raw entry,
    // cluster included, which is what identifies the file.
    let ident = Ident::digest(format!("{e:?}"));
    Entry { name: e.file_name(), kind, size, mode, modified: unix_time(e.modified()), ident }
}

/// FAT stores local time without a zone; it is read as UTC.
fn unix_time(t: fatfs::DateTime) -> i64 {
    let (y, m, d) = (t.date.year as i64, t.date.month as i64, t.date.day as i64);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + t.time.hour as i64 * 3600 + t.time.min as i64 * 60 + t.time.sec as i64
}

impl Filesystem for FatFs {
    fn stat(&self, path: &str) -> Result<Entry> {
        Ok(match self.find(path)? {
            Some(e) => Entry { name: base_name(path), ..entry(&e) },
            None => {
                Entry { name: String::new(), kind: "dir", size: 0, mode: 0o755, modified: 0, ident: Ident::Unknown }
            }
        })
    }

    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        self.bounded(path, || {
            let mut out = Vec::new();
            for e in self.open_dir(path)?.iter() {
                let e = e?;
                // Volume labels are entries too; `.` and `..` are in every folder but the root
                // (told by their short names: a long name `..` is a guest's, and is listed).
                let short = e.short_file_name_as_bytes();
                if short == b"." || short == b".." || e.attributes().contains(fatfs::FileAttributes::VOLUME_ID) {
                    continue;
                }
                out.push(entry(&e));
            }
            Ok(out)
        })
    }

    fn read_link(&self, path: &str) -> Result<String> {
        bail!("{path}: FAT has no symbolic links")
    }

    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let e = self.find(path)?.with_context(|| format!("{path} is a folder"))?;
        if e.is_dir() {
            bail!("{path} is a folder");
        }
        let mut file = e.to_file();
        super::copy_all(&mut file, out)
    }
}
