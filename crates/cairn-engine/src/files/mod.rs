//! File-level recovery: partitions and their filesystems (ext2/3/4, NTFS, FAT12/16/32) read
//! straight from a restore point's blocks, with nothing restored first. Only the blocks a
//! listing or a file needs are read, each checked against its hash.
//!
//! Each filesystem sits behind [`Filesystem`]; the readers are well-kept crates (`ext4-view`,
//! `ntfs`, `fatfs`) over a [`VolumeReader`] that reads the volume's range of the disk.

mod ext4;
mod fat;
mod ntfs;

use crate::partitions::{detect_filesystem, read_table};
use crate::serve::PointDisk;
use anyhow::{bail, Context, Result};
use cairn_repo::{Repository, RestorePoint};
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A disk, one of its partitions, or an LVM logical volume on one of them.
#[derive(Clone, Debug, Serialize)]
pub struct Volume {
    /// `vda` (a whole disk without a partition table), `vda1`, or `vg0/root` (LVM).
    pub name: String,
    pub disk: String,
    pub partition: Option<u32>,
    /// Where the volume starts on its disk.
    pub offset: u64,
    pub length: u64,
    pub filesystem: Option<&'static str>,
    /// Where its bytes are on the disk, in volume order: one run, or several for an LVM
    /// volume that was extended.
    pub runs: Vec<Run>,
}

/// `len` bytes at `at` in a volume are at `disk_offset` on its disk.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub at: u64,
    pub disk_offset: u64,
    pub len: u64,
}

impl Volume {
    /// A whole disk of a restore point as a volume.
    pub fn disk(img: &cairn_repo::DiskImage) -> Volume {
        Volume::whole(img.name.clone(), &img.name, None, 0, img.size)
    }

    fn whole(name: String, disk: &str, partition: Option<u32>, offset: u64, length: u64) -> Volume {
        let runs = vec![Run { at: 0, disk_offset: offset, len: length }];
        Volume { name, disk: disk.to_string(), partition, offset, length, filesystem: None, runs }
    }

    /// Reads `buf.len()` bytes at `at` of the volume from the restore point's disk, run by run.
    pub fn read_at(&self, disk: &PointDisk, mut at: u64, mut buf: &mut [u8]) -> Result<()> {
        if at.checked_add(buf.len() as u64).is_none_or(|end| end > self.length) {
            bail!("read past the end of volume {} at {at}", self.name);
        }
        for r in &self.runs {
            if buf.is_empty() {
                break;
            }
            if r.at + r.len <= at {
                continue;
            }
            let n = (r.at + r.len - at).min(buf.len() as u64) as usize;
            let (head, rest) = buf.split_at_mut(n);
            disk.read_exact_at(r.disk_offset + (at - r.at), head)?;
            (at, buf) = (at + n as u64, rest);
        }
        Ok(())
    }
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

/// Reads of up to `len` bytes at an offset of `vol` (shorter at its end), for the table and
/// filesystem probes.
fn probe<'a>(vol: &'a Volume, disk: &'a PointDisk) -> impl FnMut(u64, usize) -> Result<Vec<u8>> + 'a {
    move |at, len| {
        let mut b = vec![0u8; len.min(vol.length.saturating_sub(at) as usize)];
        vol.read_at(disk, at, &mut b)?;
        Ok(b)
    }
}

fn disk_volumes(disk: &PointDisk) -> Result<Vec<Volume>> {
    let img = disk.image();
    let whole = Volume::disk(img);
    let mut read = probe(&whole, disk);
    let table = read_table(&mut read, img.size)?;
    let mut out = if table.is_empty() {
        vec![Volume::whole(img.name.clone(), &img.name, None, 0, img.size)]
    } else {
        table
            .iter()
            .map(|p| Volume::whole(format!("{}{}", img.name, p.number), &img.name, Some(p.number), p.offset, p.length))
            .collect()
    };
    let mut lvs = Vec::new();
    for v in &mut out {
        v.filesystem = detect_filesystem(&mut read, v.offset, v.length)?;
        if v.filesystem != Some("lvm") {
            continue;
        }
        // A PV whose label or metadata cannot be read is listed as lvm, without volumes.
        let Ok(pv) = crate::lvm::read_pv(&mut read, v.offset, v.length) else { continue };
        for lv in pv.volumes {
            let runs: Vec<Run> =
                lv.runs.iter().map(|r| Run { at: r.at, disk_offset: v.offset + r.pv_offset, len: r.len }).collect();
            let mut vol = Volume {
                name: format!("{}/{}", lv.vg, lv.name),
                disk: img.name.clone(),
                partition: None,
                offset: runs[0].disk_offset,
                length: lv.size,
                filesystem: None,
                runs,
            };
            let fs = detect_filesystem(&mut probe(&vol, disk), 0, lv.size)?;
            vol.filesystem = fs;
            lvs.push(vol);
        }
    }
    out.extend(lvs);
    Ok(out)
}

/// A volume's bytes, read from a restore point's disk through its hash-checked block cache.
/// Positioned reads for ext4, `Read + Seek` for the NTFS and FAT readers.
pub(crate) struct VolumeReader {
    disk: Arc<PointDisk>,
    volume: Volume,
    pos: u64,
}

impl VolumeReader {
    pub(crate) fn read_at(&self, start: u64, dst: &mut [u8]) -> Result<()> {
        self.volume.read_at(&self.disk, start, dst)
    }
}

impl Read for VolumeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.volume.length.saturating_sub(self.pos)) as usize;
        self.read_at(self.pos, &mut buf[..n]).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for VolumeReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = seek_position(self.pos, self.volume.length, to)?;
        Ok(self.pos)
    }
}

/// Where a seek from `pos` in something `len` bytes long lands (`Seek` for volume readers).
pub(crate) fn seek_position(pos: u64, len: u64, to: SeekFrom) -> std::io::Result<u64> {
    match to {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    }
    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the volume"))
}

/// The volume is read-only: the FAT reader wants a writable device type, and only ever writes
/// (its dirty flag) after a change, which we never make.
impl Write for VolumeReader {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "restore points are read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One filesystem reader. Paths are absolute, `/`-separated.
pub(crate) trait Filesystem {
    /// The entry at `path` itself (a symlink is not followed); its name is the last component.
    fn stat(&self, path: &str) -> Result<Entry>;
    /// The entries of directory `path`, without `.` and `..`, in any order.
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>>;
    /// Where the symlink at `path` points.
    fn read_link(&self, path: &str) -> Result<String>;
    /// Writes the content of file `path` to `out`; returns its length.
    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64>;
}

/// The filesystems file-level recovery reads, by the name [`detect_filesystem`] gives them.
const BROWSABLE: [&str; 3] = ["ext4", "ntfs", "fat"];

/// An open filesystem of a restore point.
pub struct Browser {
    pub volume: Volume,
    fs: Box<dyn Filesystem>,
    disk: Arc<PointDisk>,
}

/// One directory entry.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink`, `other`.
    pub kind: &'static str,
    pub size: u64,
    /// Unix permission bits (NTFS and FAT have none: 755 for folders, 644 for files, 444 for
    /// read-only files).
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
    /// Opens the volume `name` (`vda1`, `vda` for a disk without partitions, or `vg0/root`;
    /// may be omitted when the point has a single volume with a filesystem cairn reads).
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
                let with_fs: Vec<_> =
                    all.iter().filter(|v| v.filesystem.is_some_and(|f| BROWSABLE.contains(&f))).collect();
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
        let img = point.disks.iter().find(|d| d.name == volume.disk).context("disk vanished")?;
        let disk = Arc::new(PointDisk::new(repo.clone(), img.clone()));
        let reader = VolumeReader { disk: disk.clone(), volume: volume.clone(), pos: 0 };
        let fs: Box<dyn Filesystem> = match volume.filesystem {
            Some("ext4") => opened(&volume, ext4::Ext4Fs::open(reader))?,
            Some("ntfs") => opened(&volume, ntfs::NtfsFs::open(reader))?,
            Some("fat") => opened(&volume, fat::FatFs::open(reader))?,
            Some(other) => bail!(
                "volume {} holds {other}; file-level recovery reads ext2/3/4, NTFS and FAT (restore the disk, or `cairn mount` it and loop-mount the partition)",
                volume.name
            ),
            None => bail!("volume {} holds no filesystem cairn recognises", volume.name),
        };
        Ok(Browser { volume, fs, disk })
    }

    pub fn repository_bytes_read(&self) -> u64 {
        self.disk.stored_bytes_read()
    }

    /// The entries of directory `path` sorted by name, or the entry of file `path`.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let path = normalize(path);
        let me = self.fs.stat(&path)?;
        if me.kind != "dir" {
            return Ok(vec![me]);
        }
        let mut out = self.fs.read_dir(&path)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Copies a file, or a directory tree, to `dest` (a new path, or an existing folder to put
    /// it in). Files are written under a temporary name and renamed when complete.
    pub fn get(&self, path: &str, dest: &Path) -> Result<GetReport> {
        let path = normalize(path);
        let me = self.fs.stat(&path)?;
        let base = Path::new(&path).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "root".into());
        let target = if dest.is_dir() { dest.join(base) } else { dest.to_path_buf() };
        if target.exists() {
            bail!("{} already exists; choose another --to", target.display());
        }
        let mut report = GetReport::default();
        if me.kind == "dir" {
            self.get_dir(&path, &me, &target, &mut report)?;
        } else {
            self.get_one(&path, &me, &target, &mut report)?;
        }
        report.repository_bytes_read = self.repository_bytes_read();
        Ok(report)
    }

    fn get_dir(&self, path: &str, me: &Entry, target: &Path, report: &mut GetReport) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(target).with_context(|| format!("cannot create {}", target.display()))?;
        report.dirs += 1;
        for e in self.list(path)? {
            let from = join(path, &e.name);
            let to = target.join(&e.name);
            match e.kind {
                "dir" => self.get_dir(&from, &e, &to, report)?,
                _ => self.get_one(&from, &e, &to, report)?,
            }
        }
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(me.mode as u32 & 0o7777))?;
        Ok(())
    }

    fn get_one(&self, path: &str, me: &Entry, target: &Path, report: &mut GetReport) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        match me.kind {
            "symlink" => {
                std::os::unix::fs::symlink(self.fs.read_link(path)?, target)?;
                report.files += 1;
                return Ok(());
            }
            "file" => {}
            _ => return Ok(()), // devices, fifos, sockets: nothing to copy
        }
        let mut partial = target.as_os_str().to_owned();
        partial.push(".cairn-partial");
        let partial = PathBuf::from(partial);
        let result = (|| -> Result<u64> {
            let file =
                std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let n = self.fs.copy_to(path, &mut out).with_context(|| format!("reading {path}"))?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.set_permissions(std::fs::Permissions::from_mode(me.mode as u32 & 0o7777))?;
            file.sync_all()?;
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

fn opened<F: Filesystem + 'static>(volume: &Volume, fs: Result<F>) -> Result<Box<dyn Filesystem>> {
    let fs =
        fs.with_context(|| format!("reading the {} filesystem of {}", volume.filesystem.unwrap_or("?"), volume.name))?;
    Ok(Box::new(fs))
}

/// Copies a whole file out in 1 MiB reads (the readers fetch whole blocks anyway).
fn copy_all(src: &mut dyn Read, out: &mut dyn Write) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = src.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        out.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// `/a/b/` and `a/b` both become `/a/b`; the root is `/`.
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    format!("/{}", parts.join("/"))
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The last component of a normalized path (empty for the root).
fn base_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}
