//! ext2/3/4 through `ext4-view`.

use super::{base_name, Entry, Filesystem, Ident, VolumeReader};
use anyhow::Result;
use ext4_view::{Ext4, Ext4Read};
use std::io::Write;

pub(super) struct Ext4Fs(Ext4);

struct At(VolumeReader);

impl Ext4Read for At {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(start, dst).map_err(|e| format!("{e:#}").into())
    }
}

impl Ext4Fs {
    pub(super) fn open(volume: VolumeReader) -> Result<Ext4Fs> {
        Ok(Ext4Fs(Ext4::load(Box::new(At(volume))).map_err(|e| anyhow::anyhow!("{e}"))?))
    }
}

fn err(path: &str) -> impl Fn(ext4_view::Ext4Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{path}: {e}")
}

impl Filesystem for Ext4Fs {
    fn stat(&self, path: &str) -> Result<Entry> {
        let md = self.0.symlink_metadata(path).map_err(err(path))?;
        let ft = md.file_type();
        Ok(Entry {
            name: base_name(path),
            kind: if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_regular_file() {
                "file"
            } else {
                "other"
            },
            size: md.len(),
            mode: md.mode(),
            modified: md.modified().seconds(),
            // ext4-view keeps inode numbers to itself; the whole inode metadata (times to the
            // nanosecond among it) stands in.
            ident: Ident::digest(&md),
        })
    }

    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in self.0.read_dir(path).map_err(err(path))? {
            let e = e.map_err(err(path))?;
            let name = e.file_name().display().to_string();
            if name == "." || name == ".." {
                continue;
            }
            if e.file_name().as_str().is_err() {
                // Paths here are UTF-8: such an entry can be listed, not read.
                out.push(Entry { name, kind: "other", size: 0, mode: 0, modified: 0, ident: Ident::Unknown });
                continue;
            }
            out.push(self.stat(&super::join(path, &name))?);
        }
        Ok(out)
    }

    fn read_link(&self, path: &str) -> Result<String> {
        Ok(self.0.read_link(path).map_err(err(path))?.display().to_string())
    }

    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut src = self.0.open(path).map_err(err(path))?;
        super::copy_all(&mut src, out)
    }
}
