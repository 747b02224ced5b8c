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
    // What the entry records of its file, its first cluster above all (the rest tells apart
    // little: equal names, sizes and times are common in separate folders).
    let recorded = (e.short_file_name_as_bytes(), e.attributes().bits(), e.len(), unix_time(e.created()));
    let ident = Ident::digest((recorded, unix_time(e.modified()), first_cluster(e)));
    Entry { name: e.file_name(), kind, size, mode, modified: unix_time(e.modified()), ident }
}

/// The entry's first cluster, which identifies its file or folder. `fatfs` (0.3.6, its latest
/// release) keeps it to itself and offers nothing else that identifies an entry; its Debug
/// output of the raw entry shows the two cluster fields, so they are read from there, by name.
/// None if an upgrade changes that (a unit test then fails: `fat_entries_are_told_apart_by_
/// their_first_cluster`).
fn first_cluster(e: &fatfs::DirEntry<'_, VolumeReader>) -> Option<u32> {
    let raw = format!("{e:?}");
    let field = |name: &str| -> Option<u32> {
        let value = raw.split(&format!("{name}: ")).nth(1)?;
        value.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let (hi, lo) = (field("first_cluster_hi")?, field("first_cluster_lo")?);
    (hi <= 0xffff && lo <= 0xffff).then_some(hi << 16 | lo)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{Browser, DiskRead, MemoryDisk};
    use std::process::Command;

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (dosfstools and mtools are needed)"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Two entries alike in everything but their first cluster (same short name, size, times
    /// and attributes, in two folders) get different identities, and the cluster read from
    /// `fatfs` is the one on the disk: this fails if a `fatfs` upgrade stops showing it.
    #[test]
    fn fat_entries_are_told_apart_by_their_first_cluster() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("fat.img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        run(Command::new("mkfs.vfat").args(["-F", "16"]).arg(&img));
        let src = t.path().join("same.txt");
        std::fs::write(&src, b"same\n").unwrap();
        let i = img.to_str().unwrap();
        run(Command::new("mmd").args(["-i", i, "::/a", "::/b"]));
        run(Command::new("mcopy").args(["-m", "-i", i]).arg(&src).arg("::/a/"));
        run(Command::new("mcopy").args(["-m", "-i", i]).arg(&src).arg("::/b/"));
        // Make the second entry the first's twin but for its cluster (bytes 20-21 and 26-27).
        let mut bytes = std::fs::read(&img).unwrap();
        let at: Vec<usize> =
            (0..bytes.len() - 32).step_by(32).filter(|&p| &bytes[p..p + 11] == b"SAME    TXT").collect();
        assert_eq!(at.len(), 2, "{at:?}");
        let first = bytes[at[0]..at[0] + 32].to_vec();
        for (k, b) in first.iter().enumerate().filter(|(k, _)| !matches!(k, 20 | 21 | 26 | 27)) {
            bytes[at[1] + k] = *b;
        }
        let clusters: Vec<u32> =
            at.iter().map(|&p| u16::from_le_bytes([bytes[p + 26], bytes[p + 27]]) as u32).collect();
        assert_ne!(clusters[0], clusters[1]);

        let disk: Arc<dyn DiskRead> = Arc::new(MemoryDisk { name: "fat".into(), bytes });
        let b = Browser::open_disks(&[disk], None).unwrap();
        let (a, bb) = (b.list("/a").unwrap(), b.list("/b").unwrap());
        let (x, y) = (&a[0], &bb[0]);
        assert_eq!((x.name.as_str(), x.size, x.modified), (y.name.as_str(), y.size, y.modified));
        assert_ne!(x.ident, y.ident, "entries differing only by cluster look the same");
        assert_eq!(b.list("/a").unwrap()[0].ident, x.ident, "the same entry read twice");

        let budget = Arc::new(AtomicU64::new(u64::MAX));
        let reader = VolumeReader { disk: b.disk.clone(), volume: b.volume.clone(), pos: 0, budget };
        let fat = FatFs::open(reader).unwrap();
        for (dir, cluster) in [("a", clusters[0]), ("b", clusters[1])] {
            let e = fat.find(&format!("/{dir}/same.txt")).unwrap().unwrap();
            assert_eq!(first_cluster(&e), Some(cluster), "/{dir}/same.txt");
        }
    }
}
