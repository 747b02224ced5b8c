//! FAT12/16/32 (EFI system partitions, USB images, old Windows guests) through `fatfs`.
//! Names are matched case-insensitively, long names preferred.

use super::{base_name, Entry, Filesystem, VolumeReader};
use anyhow::{bail, Context, Result};
use fatfs::{FileSystem, FsOptions};
use std::io::Write;

pub(super) struct FatFs(FileSystem<VolumeReader>);

impl FatFs {
    pub(super) fn open(volume: VolumeReader) -> Result<FatFs> {
        Ok(FatFs(FileSystem::new(volume, FsOptions::new())?))
    }

    fn find(&self, path: &str) -> Result<Option<fatfs::DirEntry<'_, VolumeReader>>> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        if name.is_empty() {
            return Ok(None); // the root has no entry of its own
        }
        let dir = self.open_dir(parent)?;
        for e in dir.iter() {
            let e = e?;
            if e.file_name().eq_ignore_ascii_case(name) || e.short_file_name().eq_ignore_ascii_case(name) {
                return Ok(Some(e));
            }
        }
        bail!("{path}: no such file or folder")
    }

    fn open_dir(&self, path: &str) -> Result<fatfs::Dir<'_, VolumeReader>> {
        let path = path.trim_start_matches('/');
        let root = self.0.root_dir();
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
    Entry { name: e.file_name(), kind, size, mode, modified: unix_time(e.modified()) }
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
            None => Entry { name: String::new(), kind: "dir", size: 0, mode: 0o755, modified: 0 },
        })
    }

    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in self.open_dir(path)?.iter() {
            let e = e?;
            let name = e.file_name();
            // Volume labels are entries too; `.` and `..` are in every folder but the root.
            if name == "." || name == ".." || e.attributes().contains(fatfs::FileAttributes::VOLUME_ID) {
                continue;
            }
            out.push(entry(&e));
        }
        Ok(out)
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
