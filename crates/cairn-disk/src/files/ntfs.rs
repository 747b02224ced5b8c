//! NTFS (Windows guests) through the `ntfs` crate. Names are looked up case-insensitively, as
//! Windows does, with the volume's own $UpCase table.

use super::{base_name, Entry, Filesystem, Ident, VolumeReader};
use anyhow::{bail, Context, Result};
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};
use std::cell::RefCell;
use std::io::Write;

pub(super) struct NtfsFs {
    ntfs: Ntfs,
    volume: RefCell<VolumeReader>,
}

/// Records 0-15 are NTFS's own metadata files ($MFT, $LogFile, $Bitmap, ...), and 5 is the
/// root's `.`: not user files.
const FIRST_USER_RECORD: u64 = 16;

/// Seconds between 1601-01-01 (NTFS time zero, in 100 ns units) and the Unix epoch.
const EPOCH_DIFF_SECS: i64 = 11_644_473_600;

impl NtfsFs {
    pub(super) fn open(mut volume: VolumeReader) -> Result<NtfsFs> {
        let mut ntfs = Ntfs::new(&mut volume)?;
        ntfs.read_upcase_table(&mut volume)?;
        Ok(NtfsFs { ntfs, volume: RefCell::new(volume) })
    }

    fn walk<'n>(&'n self, path: &str, fs: &mut VolumeReader) -> Result<NtfsFile<'n>> {
        let mut file = self.ntfs.root_directory(fs)?;
        for part in path.split('/').filter(|c| !c.is_empty()) {
            if !file.is_directory() {
                bail!("{path}: {part} is inside a file");
            }
            let index = file.directory_index(fs)?;
            let mut finder = index.finder();
            let entry = NtfsFileNameIndex::find(&mut finder, &self.ntfs, fs, part)
                .with_context(|| format!("{path}: no such file or folder"))??;
            file = entry.to_file(&self.ntfs, fs)?;
        }
        Ok(file)
    }

    fn entry(&self, name: String, file: &NtfsFile, fs: &mut VolumeReader) -> Result<Entry> {
        let info = file.info()?;
        let read_only = info.file_attributes().contains(NtfsFileAttributeFlags::READ_ONLY);
        let (kind, size, mode) = if file.is_directory() {
            ("dir", 0, 0o755)
        } else {
            let size = match file.data(fs, "") {
                Some(item) => item?.to_attribute()?.value(fs)?.len(),
                None => 0,
            };
            ("file", size, if read_only { 0o444 } else { 0o644 })
        };
        let modified = (info.modification_time().nt_timestamp() / 10_000_000) as i64 - EPOCH_DIFF_SECS;
        Ok(Entry { name, kind, size, mode, modified, ident: Ident::Exact(file.file_record_number()) })
    }
}

impl Filesystem for NtfsFs {
    fn stat(&self, path: &str) -> Result<Entry> {
        let fs = &mut *self.volume.borrow_mut();
        let file = self.walk(path, fs)?;
        self.entry(base_name(path), &file, fs)
    }

    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let fs = &mut *self.volume.borrow_mut();
        let dir = self.walk(path, fs)?;
        if !dir.is_directory() {
            bail!("{path} is not a folder");
        }
        let index = dir.directory_index(fs)?;
        let mut entries = index.entries();
        let mut out = Vec::new();
        while let Some(e) = entries.next(fs) {
            let e = e?;
            let Some(key) = e.key() else { continue };
            let key = key?;
            // A long name that is not a valid 8.3 name has a second, DOS-only entry.
            if key.namespace() == NtfsFileNamespace::Dos || e.file_reference().file_record_number() < FIRST_USER_RECORD
            {
                continue;
            }
            let file = e.to_file(&self.ntfs, fs)?;
            out.push(self.entry(key.name().to_string_lossy(), &file, fs)?);
        }
        Ok(out)
    }

    fn read_link(&self, path: &str) -> Result<String> {
        bail!("{path}: NTFS reparse points are not followed")
    }

    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let fs = &mut *self.volume.borrow_mut();
        let file = self.walk(path, fs)?;
        let Some(item) = file.data(fs, "") else { return Ok(0) };
        let item = item?;
        let attribute = item.to_attribute()?;
        let mut value = attribute.value(fs)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = value.read(fs, &mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            out.write_all(&buf[..k])?;
            n += k as u64;
        }
    }
}
