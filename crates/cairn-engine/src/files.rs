//! File-level recovery: partitions and ext2/3/4 filesystems read straight from a restore point's
//! blocks, with nothing restored first. Only the blocks a listing or a file needs are read.

use crate::partitions::{detect_filesystem, read_table};
use crate::serve::PointDisk;
use anyhow::{bail, Context, Result};
use cairn_repo::{Repository, RestorePoint};
use ext4_view::{Ext4, Ext4Read};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A disk or one of its partitions.
#[derive(Clone, Debug, Serialize)]
pub struct Volume {
    /// `vda` (a whole disk without a partition table) or `vda1`.
    pub name: String,
    pub disk: String,
    pub partition: Option<u32>,
    pub offset: u64,
    pub length: u64,
    pub filesystem: Option<&'static str>,
}

/// The volumes of every disk of a point (files it carries, such as kernels, are not disks).
pub fn volumes(repo: &Arc<Repository>, point: &RestorePoint) -> Result<Vec<Volume>> {
    let mut out = Vec::new();
    for img in point.disks.iter().filter(|d| d.is_disk()) {
        let disk = PointDisk::new(repo.clone(), img.clone());
        out.extend(disk_volumes(&disk)?);
    }
    Ok(out)
}

fn disk_volumes(disk: &PointDisk) -> Result<Vec<Volume>> {
    let img = disk.image();
    let mut read = |off: u64, len: usize| -> Result<Vec<u8>> {
        let len = len.min(img.size.saturating_sub(off) as usize);
        let mut b = vec![0u8; len];
        disk.read_exact_at(off, &mut b)?;
        Ok(b)
    };
    let table = read_table(&mut read, img.size)?;
    if table.is_empty() {
        let fs = detect_filesystem(&mut read, 0, img.size)?;
        return Ok(vec![Volume {
            name: img.name.clone(),
            disk: img.name.clone(),
            partition: None,
            offset: 0,
            length: img.size,
            filesystem: fs,
        }]);
    }
    let mut out = Vec::new();
    for p in table {
        out.push(Volume {
            name: format!("{}{}", img.name, p.number),
            disk: img.name.clone(),
            partition: Some(p.number),
            offset: p.offset,
            length: p.length,
            filesystem: detect_filesystem(&mut read, p.offset, p.length)?,
        });
    }
    Ok(out)
}

/// A volume's bytes, for the ext4 reader.
struct VolumeReader {
    disk: Arc<PointDisk>,
    offset: u64,
    length: u64,
}

impl Ext4Read for VolumeReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start.checked_add(dst.len() as u64).is_none_or(|end| end > self.length) {
            return Err(format!("read past the end of the volume at {start}").into());
        }
        self.disk.read_exact_at(self.offset + start, dst).map_err(|e| format!("{e:#}").into())
    }
}

/// An open filesystem of a restore point.
pub struct Browser {
    pub volume: Volume,
    fs: Ext4,
    disk: Arc<PointDisk>,
}

/// One directory entry.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink`, `other`.
    pub kind: &'static str,
    pub size: u64,
    pub mode: u16,
    /// Seconds since the epoch.
    pub modified: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GetReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Bytes read from the repository to do it.
    pub repository_bytes_read: u64,
}

impl Browser {
    /// Opens the volume `name` (`vda1`, or `vda` for a disk without partitions; may be omitted
    /// when the point has a single volume with a filesystem).
    pub fn open(repo: &Arc<Repository>, point: &RestorePoint, name: Option<&str>) -> Result<Browser> {
        let all = volumes(repo, point)?;
        let volume = match name {
            Some(n) => all.iter().find(|v| v.name == n).cloned().with_context(|| {
                format!(
                    "no volume {n} in this restore point; volumes: {}",
                    all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?,
            None => {
                let with_fs: Vec<_> = all.iter().filter(|v| v.filesystem == Some("ext4")).collect();
                match with_fs.as_slice() {
                    [one] => (*one).clone(),
                    _ => bail!(
                        "say which volume to open: {}",
                        all.iter()
                            .map(|v| format!("{} ({})", v.name, v.filesystem.unwrap_or("unknown")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
        };
        match volume.filesystem {
            Some("ext4") => {}
            Some(other) => bail!("volume {} holds {other}; file-level recovery reads ext2/3/4 (restore the disk, or `cairn mount` it and loop-mount the partition)", volume.name),
            None => bail!("volume {} holds no filesystem cairn recognises", volume.name),
        }
        let img = point.disks.iter().find(|d| d.name == volume.disk).context("disk vanished")?;
        let disk = Arc::new(PointDisk::new(repo.clone(), img.clone()));
        let reader = VolumeReader { disk: disk.clone(), offset: volume.offset, length: volume.length };
        let fs = Ext4::load(Box::new(reader))
            .map_err(|e| anyhow::anyhow!("reading the ext4 filesystem of {}: {e}", volume.name))?;
        Ok(Browser { volume, fs, disk })
    }

    pub fn repository_bytes_read(&self) -> u64 {
        self.disk.stored_bytes_read()
    }

    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let md = self.fs.metadata(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        if !md.is_dir() {
            return Ok(vec![self.entry(
                path,
                Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            )?]);
        }
        let mut out = Vec::new();
        for e in self.fs.read_dir(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))? {
            let e = e.map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            let name = e.file_name().display().to_string();
            if name == "." || name == ".." {
                continue;
            }
            let full = join(path, &name);
            out.push(self.entry(&full, name)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn entry(&self, path: &str, name: String) -> Result<Entry> {
        let md = self.fs.symlink_metadata(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        let ft = md.file_type();
        Ok(Entry {
            name,
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
        })
    }

    /// Copies a file, or a directory tree, to `dest` (a new path, or an existing folder to put
    /// it in). Files are written under a temporary name and renamed when complete.
    pub fn get(&self, path: &str, dest: &Path) -> Result<GetReport> {
        let md = self.fs.symlink_metadata(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        let base = Path::new(path).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "root".into());
        let target = if dest.is_dir() { dest.join(base) } else { dest.to_path_buf() };
        if target.exists() {
            bail!("{} already exists; choose another --to", target.display());
        }
        let mut report = GetReport::default();
        if md.is_dir() {
            self.get_dir(path, &target, &mut report)?;
        } else {
            self.get_one(path, &target, &mut report)?;
        }
        report.repository_bytes_read = self.repository_bytes_read();
        Ok(report)
    }

    fn get_dir(&self, path: &str, target: &Path, report: &mut GetReport) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(target).with_context(|| format!("cannot create {}", target.display()))?;
        report.dirs += 1;
        for e in self.list(path)? {
            let from = join(path, &e.name);
            let to = target.join(&e.name);
            match e.kind {
                "dir" => self.get_dir(&from, &to, report)?,
                _ => self.get_one(&from, &to, report)?,
            }
        }
        let mode = self.fs.metadata(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?.mode();
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode as u32 & 0o7777))?;
        Ok(())
    }

    fn get_one(&self, path: &str, target: &Path, report: &mut GetReport) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let md = self.fs.symlink_metadata(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        if md.is_symlink() {
            let link = self.fs.read_link(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            std::os::unix::fs::symlink(PathBuf::from(link.display().to_string()), target)?;
            report.files += 1;
            return Ok(());
        }
        if !md.file_type().is_regular_file() {
            return Ok(()); // devices, fifos, sockets: nothing to copy
        }
        let mut partial = target.as_os_str().to_owned();
        partial.push(".cairn-partial");
        let partial = PathBuf::from(partial);
        let result = (|| -> Result<u64> {
            let mut src = self.fs.open(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            let mut out =
                std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let k = src.read(&mut buf).with_context(|| format!("reading {path}"))?;
                if k == 0 {
                    break;
                }
                out.write_all(&buf[..k])?;
                n += k as u64;
            }
            out.set_permissions(std::fs::Permissions::from_mode(md.mode() as u32 & 0o7777))?;
            out.sync_all()?;
            Ok(n)
        })();
        match result {
            Ok(n) => {
                std::fs::rename(&partial, target)?;
                report.files += 1;
                report.bytes += n;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}
