//! ext2/3/4 through `ext4-view`.

use super::{base_name, Entry, Filesystem, Ident, VolumeReader};
use anyhow::{bail, Result};
use ext4_view::{Ext4, Ext4Read};
use std::io::Write;

pub(super) struct Ext4Fs(Ext4);

struct At(VolumeReader);

impl Ext4Read for At {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(start, dst).map_err(|e| format!("{e:#}").into())
    }
}

/// The longest symlink target read (Linux's PATH_MAX), and the most symlinks one path follows
/// (as Linux).
const MAX_SYMLINK: u64 = 4096;
const MAX_LINKS: usize = 40;

/// The most block groups a volume may have here: 128 TiB at 4 KiB blocks (8 TiB at 1 KiB).
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

impl Ext4Fs {
    pub(super) fn open(volume: VolumeReader) -> Result<Ext4Fs> {
        check_geometry(&volume)?;
        Ok(Ext4Fs(Ext4::load(Box::new(At(volume))).map_err(|e| anyhow::anyhow!("{e}"))?))
    }
}

/// ext4-view sizes its table of block groups from the superblock before reading any of them: a
/// guest's superblock claiming billions of groups would have it allocate gigabytes. A
/// filesystem larger than its volume (which Linux refuses to mount too), or with more than
/// [`MAX_BLOCK_GROUPS`], is refused first. The fields are read as ext4-view reads them.
fn check_geometry(volume: &VolumeReader) -> Result<()> {
    let mut sb = [0u8; 1024];
    volume.read_at(1024, &mut sb)?;
    let le32 = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()) as u64;
    let blocks = le32(0x150) << 32 | le32(0x4);
    let (first_data_block, log_block_size, per_group) = (le32(0x14), le32(0x18), le32(0x20));
    if log_block_size > 6 || per_group == 0 {
        bail!("the ext4 superblock is damaged (block size or blocks per group)");
    }
    let bytes = blocks.checked_mul(1024 << log_block_size);
    if bytes.is_none_or(|b| b > volume.volume.length) {
        bail!(
            "the ext4 superblock claims {blocks} blocks, more than its volume of {} bytes holds",
            volume.volume.length
        );
    }
    let groups = blocks.saturating_sub(first_data_block).div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        bail!("the ext4 superblock claims {groups} block groups (more than {MAX_BLOCK_GROUPS})");
    }
    Ok(())
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
        // ext4-view reads a target whole, at the size its inode claims: Linux makes none longer
        // than PATH_MAX.
        let len = self.0.symlink_metadata(path).map_err(err(path))?.len();
        if len > MAX_SYMLINK {
            bail!("{path}: a symlink whose target would be {len} bytes (more than {MAX_SYMLINK})");
        }
        Ok(self.0.read_link(path).map_err(err(path))?.display().to_string())
    }

    /// Resolves the symlinks before the last component here, through [`Self::read_link`], so
    /// that ext4-view never follows one itself (it would read a crafted target of any size).
    fn resolve(&self, path: &str) -> Result<String> {
        let mut pending: Vec<String> = path.split('/').filter(|c| !c.is_empty()).rev().map(String::from).collect();
        let (mut done, mut links) = (Vec::<String>::new(), 0);
        while let Some(part) = pending.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let here = format!("/{}", done.iter().chain([&part]).cloned().collect::<Vec<_>>().join("/"));
            let is_link = self.0.symlink_metadata(here.as_str()).map_err(err(&here))?.is_symlink();
            if !is_link || pending.is_empty() {
                done.push(part);
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                bail!("{path}: more than {MAX_LINKS} symlinks to follow");
            }
            let target = self.read_link(&here)?;
            if target.starts_with('/') {
                done.clear();
            }
            pending.extend(target.split('/').filter(|c| !c.is_empty()).rev().map(String::from));
            if pending.iter().map(|p| p.len() + 1).sum::<usize>() > 4096 {
                bail!("{path}: its symlinks make a path longer than 4096 bytes");
            }
        }
        Ok(format!("/{}", done.join("/")))
    }

    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut src = self.0.open(path).map_err(err(path))?;
        super::copy_all(&mut src, out)
    }
}
