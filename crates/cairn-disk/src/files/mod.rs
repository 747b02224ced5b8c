//! File-level recovery: partitions and their filesystems (ext2/3/4, NTFS, FAT12/16/32) read
//! straight from a restore point's blocks, with nothing restored first. Only the blocks a
//! listing or a file needs are read, each checked against its hash.
//!
//! Each filesystem sits behind [`Filesystem`]; the readers are well-kept crates (`ext4-view`,
//! `ntfs`, `fatfs`) over a [`VolumeReader`] that reads the volume's range of the disk.
//!
//! Everything a filesystem says comes from the guest, and `files get` writes it on the host (as
//! root, often). So names are checked before they become host paths, every file and folder is
//! created beneath the destination through folder descriptors that never follow a symlink,
//! modes lose their setuid, setgid and sticky bits, and folders that loop or repeat are copied
//! once: see [`Browser::get`].

mod ext4;
mod fat;
mod ntfs;

use crate::partitions::{detect_filesystem, read_table};
use anyhow::{bail, Context, Result};
use cairn_engine::serve::PointDisk;
use cairn_repo::{Repository, RestorePoint};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A volume whose filesystem cairn does not read (file-level recovery reads ext2/3/4, NTFS and
/// FAT); the disk itself restores and mounts like any other.
#[derive(Debug, thiserror::Error)]
#[error("volume {volume} holds {filesystem}; file-level recovery reads ext2/3/4, NTFS and FAT")]
pub struct UnsupportedFilesystem {
    pub volume: String,
    pub filesystem: String,
}

/// The bytes of a disk, read at any offset: a restore point's disk ([`PointDisk`]), or an image
/// held in memory ([`MemoryDisk`], for tests and fuzzing).
pub trait DiskRead: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a read past the end is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Bytes read from the repository so far, for read amplification.
    fn stored_bytes_read(&self) -> u64 {
        0
    }
}

impl DiskRead for PointDisk {
    fn name(&self) -> &str {
        &self.image().name
    }
    fn size(&self) -> u64 {
        self.image().size
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        PointDisk::read_exact_at(self, offset, buf)
    }
    fn stored_bytes_read(&self) -> u64 {
        PointDisk::stored_bytes_read(self)
    }
}

impl<D: DiskRead + ?Sized> DiskRead for Arc<D> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_exact_at(offset, buf)
    }
    fn stored_bytes_read(&self) -> u64 {
        (**self).stored_bytes_read()
    }
}

/// A raw disk image in memory.
pub struct MemoryDisk {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl DiskRead for MemoryDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|r| r.end <= self.bytes.len());
        let Some(range) = range else {
            bail!("read of {} bytes at {offset} is past the end of {}", buf.len(), self.name)
        };
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }
}

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
    /// What could not be read of it (a partition table, LVM metadata, volumes left out): the
    /// rest is listed all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
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
        Volume { name, disk: disk.to_string(), partition, offset, length, filesystem: None, runs, problem: None }
    }

    /// Reads `buf.len()` bytes at `at` of the volume from its disk, run by run.
    pub fn read_at(&self, disk: &dyn DiskRead, mut at: u64, mut buf: &mut [u8]) -> Result<()> {
        if at.checked_add(buf.len() as u64).is_none_or(|end| end > self.length) {
            bail!("read past the end of volume {} at {at}", self.name);
        }
        for r in &self.runs {
            if buf.is_empty() {
                break;
            }
            // Runs come from a partition table or LVM metadata that checked them against the
            // disk; the checked sums keep a wrong one an error rather than a wrap.
            let run_end = r.at.checked_add(r.len).context("volume run overflows")?;
            if run_end <= at {
                continue;
            }
            let n = (run_end - at).min(buf.len() as u64) as usize;
            let (head, rest) = buf.split_at_mut(n);
            let from = r.disk_offset.checked_add(at - r.at).context("volume run overflows")?;
            disk.read_exact_at(from, head)?;
            (at, buf) = (at + n as u64, rest);
        }
        if !buf.is_empty() {
            bail!("volume {} has no data at {at}", self.name);
        }
        Ok(())
    }
}

/// The volumes of every disk of a point (files it carries, such as kernels, are not disks).
pub fn volumes(repo: &Arc<Repository>, point: &RestorePoint) -> Result<Vec<Volume>> {
    volumes_of_disks(&point_disks(repo, point))
}

fn point_disks(repo: &Arc<Repository>, point: &RestorePoint) -> Vec<Arc<dyn DiskRead>> {
    point
        .disks
        .iter()
        // A disk only the guest saw is browsed like any other.
        .filter(|d| d.is_disk() || d.role.as_deref() == Some(cairn_repo::vm_record::ROLE_GUEST_DISK))
        .map(|img| Arc::new(PointDisk::new(repo.clone(), img.clone())) as Arc<dyn DiskRead>)
        .collect()
}

/// The volumes of these disks: partitions, LVM logical volumes, or whole disks.
pub fn volumes_of_disks(disks: &[Arc<dyn DiskRead>]) -> Result<Vec<Volume>> {
    let mut out = Vec::new();
    for disk in disks {
        out.extend(disk_volumes(&**disk)?);
    }
    Ok(out)
}

/// The most one table or filesystem probe reads (a GPT entry array is at most 4 MiB).
const MAX_PROBE: usize = 4 << 20;

/// Reads of up to `len` bytes at an offset of `vol` (shorter at its end), for the table and
/// filesystem probes.
fn probe<'a>(vol: &'a Volume, disk: &'a dyn DiskRead) -> impl FnMut(u64, usize) -> Result<Vec<u8>> + 'a {
    move |at, len| {
        if len > MAX_PROBE {
            bail!("a probe of {len} bytes of volume {} (more than {MAX_PROBE})", vol.name);
        }
        let mut b = vec![0u8; (len as u64).min(vol.length.saturating_sub(at)) as usize];
        vol.read_at(disk, at, &mut b)?;
        Ok(b)
    }
}

fn disk_volumes(disk: &dyn DiskRead) -> Result<Vec<Volume>> {
    let (name, size) = (disk.name().to_string(), disk.size());
    let whole = Volume::whole(name.clone(), &name, None, 0, size);
    let mut read = probe(&whole, disk);
    // A table the guest damaged (or crafted) leaves the disk listed whole, saying why.
    let (table, problem) = match read_table(&mut read, size) {
        Ok(table) => (table, None),
        Err(e) => (vec![], Some(format!("partition table: {e:#}"))),
    };
    let mut out = if table.is_empty() {
        vec![Volume { problem, ..whole.clone() }]
    } else {
        table
            .iter()
            .map(|p| Volume::whole(format!("{name}{}", p.number), &name, Some(p.number), p.offset, p.length))
            .collect()
    };
    let mut lvs = Vec::new();
    for v in &mut out {
        v.filesystem = detect_filesystem(&mut read, v.offset, v.length)?;
        if v.filesystem != Some("lvm") {
            continue;
        }
        // A PV whose label or metadata cannot be read is listed as lvm, without volumes.
        let pv = match crate::lvm::read_pv(&mut read, v.offset, v.length) {
            Ok(pv) => pv,
            Err(e) => {
                v.problem = Some(format!("{e:#}"));
                continue;
            }
        };
        if !pv.skipped.is_empty() {
            v.problem = Some(format!("volumes not read: {}", pv.skipped.join("; ")));
        }
        for lv in pv.volumes {
            // read_pv checked every run against the PV, which lies inside the disk.
            let runs: Vec<Run> =
                lv.runs.iter().map(|r| Run { at: r.at, disk_offset: v.offset + r.pv_offset, len: r.len }).collect();
            let mut vol = Volume {
                name: format!("{}/{}", lv.vg, lv.name),
                disk: name.clone(),
                partition: None,
                offset: runs[0].disk_offset,
                length: lv.size,
                filesystem: None,
                runs,
                problem: None,
            };
            let fs = detect_filesystem(&mut probe(&vol, disk), 0, lv.size)?;
            vol.filesystem = fs;
            lvs.push(vol);
        }
    }
    out.extend(lvs);
    Ok(out)
}

/// A volume's bytes, read from its disk (for a restore point, through its hash-checked block
/// cache). Positioned reads for ext4, `Read + Seek` for the NTFS and FAT readers.
pub(crate) struct VolumeReader {
    disk: Arc<dyn DiskRead>,
    volume: Volume,
    pos: u64,
    /// Bytes `Read` may still return before failing; `u64::MAX` when unbounded. A reader whose
    /// crate cannot tell a looping structure (a FAT cluster chain that loops) sets it around
    /// work whose size the format bounds.
    budget: Arc<AtomicU64>,
}

impl VolumeReader {
    pub(crate) fn read_at(&self, start: u64, dst: &mut [u8]) -> Result<()> {
        self.volume.read_at(&*self.disk, start, dst)
    }
}

impl Read for VolumeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.volume.length.saturating_sub(self.pos)) as usize;
        let spent = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(n as u64));
        if spent.is_err() {
            return Err(std::io::Error::other("more read than this filesystem structure can hold (a loop?)"));
        }
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
    /// `path` with the symlinks before its last component resolved, for readers that follow
    /// symlinks in paths (the others return it as it is). Paths the walks of `get` build from
    /// listings hold none: only a path given by the user needs this.
    fn resolve(&self, path: &str) -> Result<String> {
        Ok(path.to_string())
    }
}

/// The filesystems file-level recovery reads, by the name [`detect_filesystem`] gives them.
const BROWSABLE: [&str; 3] = ["ext4", "ntfs", "fat"];

/// An open filesystem of a restore point.
pub struct Browser {
    pub volume: Volume,
    fs: Box<dyn Filesystem>,
    disk: Arc<dyn DiskRead>,
}

/// One directory entry.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink`, `other` (devices, FIFOs, sockets, and names that are not
    /// UTF-8: listed, not copied).
    pub kind: &'static str,
    pub size: u64,
    /// Unix permission bits (NTFS and FAT have none: 755 for folders, 644 for files, 444 for
    /// read-only files).
    pub mode: u16,
    /// Seconds since the epoch.
    pub modified: i64,
    /// What the entry points at, for telling folders apart (loops, shared folders).
    #[serde(skip)]
    pub(crate) ident: Ident,
}

/// What a directory entry points at, as far as its filesystem reader tells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) enum Ident {
    /// A number unique to the file in its volume (NTFS: its MFT record).
    Exact(u64),
    /// A digest of what the entry records about its file (ext4: the inode's metadata; FAT: the
    /// directory entry's fields, first cluster included), because `ext4-view` and `fatfs` do
    /// not expose inode or cluster numbers: the same for the same file, and rarely for another.
    Digest(u64),
    #[default]
    Unknown,
}

impl Ident {
    pub(crate) fn digest(what: impl Hash) -> Ident {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        what.hash(&mut h);
        Ident::Digest(h.finish())
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GetReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Bytes read from the repository to do it.
    pub repository_bytes_read: u64,
    /// Entries not copied (a name that cannot be a file name here, a folder loop, ...).
    pub skipped: u64,
    /// One line per entry skipped, naming it and why.
    pub warnings: Vec<String>,
}

/// How many folders deep `files get` goes (Linux paths stop at 4096 bytes; real trees are far
/// shallower): a deeper folder is skipped.
pub const MAX_DEPTH: usize = 256;

/// A folder known only by its listing (ext4, FAT) is a loop when the same listing repeats this
/// many times on one path: a folder that contains itself repeats forever, real trees do not.
const LOOP_REPEATS: usize = 4;

/// How many times a folder (with subfolders) known only by its listing is copied before further
/// copies count as the same folder reached again: folders shared by several parents (a crafted
/// filesystem) would otherwise grow the copy exponentially with depth.
const SAME_LISTING_COPIES: u32 = 256;

/// Where a folder came from, to tell loops and folders met twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FolderKey {
    Exact(u64),
    Listing(u64),
}

/// The state of one `get`: the folders on the current path and those already copied.
#[derive(Default)]
struct Walk {
    report: GetReport,
    ancestors: Vec<FolderKey>,
    copied: HashMap<FolderKey, (u32, String)>,
}

impl Walk {
    fn skip(&mut self, path: &str, why: impl std::fmt::Display) {
        self.report.skipped += 1;
        self.report.warnings.push(format!("{path:?} skipped: {why}"));
    }
}

/// Why a name from the guest cannot be a file name under the destination, if it cannot.
fn unsafe_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("its name is empty")
    } else if name == "." || name == ".." {
        Some("its name means a folder itself or its parent")
    } else if name.contains('/') {
        Some("its name contains '/'")
    } else if name.contains('\0') {
        Some("its name contains a NUL byte")
    } else {
        None
    }
}

/// Errors of creating a name under the destination that are the guest's doing (a name twice in
/// a folder, a name longer than the host allows): the entry is skipped, the copy goes on.
fn skippable(e: Errno) -> Option<&'static str> {
    match e {
        Errno::EXIST => Some("an entry of the same name is already there"),
        Errno::NAMETOOLONG => Some("its name is too long for this host"),
        Errno::ILSEQ => Some("its name is not valid on this host's filesystem"),
        _ => None,
    }
}

impl Browser {
    /// Opens the volume `name` (`vda1`, `vda` for a disk without partitions, or `vg0/root`;
    /// may be omitted when the point has a single volume with a filesystem cairn reads).
    pub fn open(repo: &Arc<Repository>, point: &RestorePoint, name: Option<&str>) -> Result<Browser> {
        Browser::open_disks(&point_disks(repo, point), name)
    }

    /// Opens the volume `name` of these disks (a restore point's, or images in memory).
    pub fn open_disks(disks: &[Arc<dyn DiskRead>], name: Option<&str>) -> Result<Browser> {
        let all = volumes_of_disks(disks)?;
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
        let disk = disks.iter().find(|d| d.name() == volume.disk).context("disk vanished")?.clone();
        let budget = Arc::new(AtomicU64::new(u64::MAX));
        let reader = VolumeReader { disk: disk.clone(), volume: volume.clone(), pos: 0, budget };
        let fs: Box<dyn Filesystem> = match volume.filesystem {
            Some("ext4") => opened(&volume, || ext4::Ext4Fs::open(reader))?,
            Some("ntfs") => opened(&volume, || ntfs::NtfsFs::open(reader))?,
            Some("fat") => opened(&volume, || fat::FatFs::open(reader))?,
            Some(other) => {
                return Err(UnsupportedFilesystem { volume: volume.name.clone(), filesystem: other.to_string() }.into())
            }
            None => bail!("volume {} holds no filesystem cairn recognises", volume.name),
        };
        Ok(Browser { volume, fs, disk })
    }

    pub fn repository_bytes_read(&self) -> u64 {
        self.disk.stored_bytes_read()
    }

    /// The entries of directory `path` sorted by name, or the entry of file `path`.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let path = self.fs.resolve(&normalize(path))?;
        self.list_resolved(&path)
    }

    /// [`Browser::list`] of a path without symlinks before its last component.
    fn list_resolved(&self, path: &str) -> Result<Vec<Entry>> {
        let me = self.fs.stat(path)?;
        if me.kind != "dir" {
            return Ok(vec![me]);
        }
        let mut out = self.fs.read_dir(path)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Copies a file, or a directory tree, to `dest` (a new path, or an existing folder to put
    /// it in). Each file takes its name only when complete (written nameless where the
    /// filesystem allows, O_TMPFILE, else under a short random name), so a guest name of any
    /// length the host allows fits, and the filesystem holding the copy is synced once at the
    /// end (syncfs), not file by file: only then is the copy reported done.
    ///
    /// The guest chooses every name and mode, so: entries whose name cannot be a file name here
    /// (empty, `.`, `..`, with `/` or NUL) are skipped with a warning in the report; everything
    /// is created beneath `dest` relative to folder descriptors, never following a symlink
    /// (`O_NOFOLLOW`, exclusive creation, no-replace renames), so neither a symlink the copy
    /// made nor one already there leads outside; modes are masked to 0o777 (no setuid, setgid
    /// or sticky bit); folders deeper than [`MAX_DEPTH`], and folders met again (a loop, or one
    /// folder under two parents), are skipped with a warning.
    pub fn get(&self, path: &str, dest: &Path) -> Result<GetReport> {
        let path = self.fs.resolve(&normalize(path))?;
        let me = self.fs.stat(&path)?;
        let (parent, name): (&Path, OsString) = if dest.is_dir() {
            let base = Path::new(&path).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "root".into());
            (dest, base)
        } else {
            let name =
                dest.file_name().with_context(|| format!("{} does not name a file to create", dest.display()))?;
            (dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")), name.to_os_string())
        };
        let target = parent.join(&name);
        let dir = rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open {}", parent.display()))?;
        if rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            return Err(cairn_engine::target::TargetRefusal::Exists { path: target, replaceable: false }.into());
        }
        let mut walk = Walk::default();
        let skipped = if me.kind == "dir" {
            let entries = self.list_resolved(&path)?;
            walk.ancestors.push(folder_key(&me, &entries));
            self.get_dir(&path, &me, entries, dir.as_fd(), &name, &mut walk)?
        } else {
            self.get_one(&path, &me, dir.as_fd(), &name, &mut walk.report)?
        };
        if let Some(why) = skipped {
            bail!("cannot create {}: {why}", target.display());
        }
        // One sync for everything: data, modes and names of the whole tree (a tree of many
        // small files would spend most of its time in one fsync per file and folder).
        rustix::fs::syncfs(&dir).with_context(|| format!("syncing the filesystem of {}", parent.display()))?;
        let mut report = walk.report;
        report.repository_bytes_read = self.repository_bytes_read();
        Ok(report)
    }

    /// Copies folder `path` (listed as `entries`) to `name` in `parent`; Ok(Some(why)) when
    /// `name` cannot be created there.
    fn get_dir(
        &self,
        path: &str,
        me: &Entry,
        entries: Vec<Entry>,
        parent: BorrowedFd,
        name: &OsStr,
        walk: &mut Walk,
    ) -> Result<Option<&'static str>> {
        let display = || Path::new(name).display().to_string();
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(e) => match skippable(e) {
                Some(why) => return Ok(Some(why)),
                None => return Err(e).with_context(|| format!("cannot create folder {}", display())),
            },
        }
        let dir = open_beneath(parent, name, OFlags::RDONLY | OFlags::DIRECTORY)
            .with_context(|| format!("cannot open folder {}", display()))?;
        walk.report.dirs += 1;
        for e in entries {
            let from = join(path, &e.name);
            if let Some(why) = unsafe_name(&e.name) {
                walk.skip(&from, why);
                continue;
            }
            let skipped = if e.kind == "dir" {
                self.get_subdir(&from, &e, dir.as_fd(), walk)?
            } else {
                self.get_one(&from, &e, dir.as_fd(), OsStr::new(&e.name), &mut walk.report)?
            };
            if let Some(why) = skipped {
                walk.skip(&from, why);
            }
        }
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(me.mode as u32 & 0o777))
            .with_context(|| format!("setting the mode of {}", display()))?;
        Ok(None)
    }

    /// A folder inside the copy: unless it is too deep, loops, or was copied already.
    fn get_subdir(&self, path: &str, me: &Entry, parent: BorrowedFd, walk: &mut Walk) -> Result<Option<&'static str>> {
        if walk.ancestors.len() >= MAX_DEPTH {
            walk.skip(path, format_args!("it is more than {MAX_DEPTH} folders deep"));
            return Ok(None);
        }
        let entries = self.list_resolved(path)?;
        let key = folder_key(me, &entries);
        let has_subfolders = entries.iter().any(|e| e.kind == "dir");
        let repeats = walk.ancestors.iter().filter(|k| **k == key).count();
        let (copies, first) = walk.copied.get(&key).cloned().unwrap_or_default();
        let why: Option<String> = match key {
            FolderKey::Exact(_) if repeats > 0 => Some("it is a folder that contains it (a loop)".into()),
            FolderKey::Exact(_) if copies > 0 => Some(format!("it is the folder {first:?}, copied already")),
            FolderKey::Listing(_) if has_subfolders && repeats + 1 >= LOOP_REPEATS => {
                Some("it repeats the folders that contain it (a loop)".into())
            }
            FolderKey::Listing(_) if has_subfolders && copies >= SAME_LISTING_COPIES => {
                Some(format!("it is the folder {first:?} met {copies} times already"))
            }
            _ => None,
        };
        if let Some(why) = why {
            walk.skip(path, why);
            return Ok(None);
        }
        walk.ancestors.push(key);
        let done = self.get_dir(path, me, entries, parent, OsStr::new(&me.name), walk);
        walk.ancestors.pop();
        let entry = walk.copied.entry(key).or_insert((0, path.to_string()));
        entry.0 += 1;
        done
    }

    /// Copies one non-folder entry to `name` in `dir`; Ok(Some(why)) when it cannot be created
    /// there (nothing is left behind then).
    fn get_one(
        &self,
        path: &str,
        me: &Entry,
        dir: BorrowedFd,
        name: &OsStr,
        report: &mut GetReport,
    ) -> Result<Option<&'static str>> {
        match me.kind {
            "symlink" => {
                let to = self.fs.read_link(path)?;
                if to.is_empty() || to.contains('\0') {
                    return Ok(Some("its symlink target is empty or contains a NUL byte"));
                }
                // The link is created, never followed: every later creation is exclusive and
                // every folder is opened with O_NOFOLLOW.
                return match rustix::fs::symlinkat(to.as_str(), dir, name) {
                    Ok(()) => {
                        report.files += 1;
                        Ok(None)
                    }
                    Err(e) => match skippable(e) {
                        Some(why) => Ok(Some(why)),
                        None => Err(e).with_context(|| format!("cannot create symlink {}", Path::new(name).display())),
                    },
                };
            }
            "file" => {}
            _ => {
                return Ok(Some(
                    "it is not a file, folder or symlink (a device, FIFO or socket), or its name is not UTF-8",
                ))
            }
        }
        let file = match NewFile::create(dir) {
            Ok(f) => f,
            Err(e) => return Err(e).context("cannot create a file to copy into"),
        };
        let written = (|| -> Result<u64> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(file.fd.try_clone()?));
            let n = self.fs.copy_to(path, &mut out).with_context(|| format!("reading {path}"))?;
            let out = out.into_inner().map_err(|e| e.into_error())?;
            rustix::fs::fchmod(&out, Mode::from_raw_mode(me.mode as u32 & 0o777))?;
            Ok(n)
        })();
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                file.discard(dir);
                return Err(e);
            }
        };
        match file.name(dir, name)? {
            None => {
                report.files += 1;
                report.bytes += written;
                Ok(None)
            }
            Some(why) => Ok(Some(why)),
        }
    }
}

/// A file being written beneath a folder, without its final name until it is complete.
struct NewFile {
    fd: OwnedFd,
    /// Its temporary name; None when it has none (O_TMPFILE).
    temporary: Option<OsString>,
}

impl NewFile {
    /// A new file in `dir`: nameless where the filesystem allows (O_TMPFILE), else under a short
    /// random name (a guest name plus a suffix could exceed the host's 255 bytes, or be a
    /// guest's own name). Created 0600 until its mode is set.
    fn create(dir: BorrowedFd) -> rustix::io::Result<NewFile> {
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        match rustix::fs::openat(dir, ".", flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok(NewFile { fd, temporary: None }),
            // Not supported by this filesystem (EOPNOTSUPP) or kernel (EISDIR, EINVAL).
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(e),
        }
        for _ in 0..64 {
            let name = OsString::from(format!(".cairn-{:016x}", random_u64()));
            match open_beneath(dir, &name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL) {
                Ok(fd) => return Ok(NewFile { fd, temporary: Some(name) }),
                Err(Errno::EXIST) => continue, // taken (by a guest's file): another
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EXIST)
    }

    /// Gives the complete file its name `to` in `dir`, unless that name exists: Ok(Some(why))
    /// then, and the file is gone.
    fn name(self, dir: BorrowedFd, to: &OsStr) -> Result<Option<&'static str>> {
        let Some(temporary) = &self.temporary else {
            return match link_anonymous(&self.fd, dir, to) {
                Ok(()) => Ok(None),
                Err(e) => match skippable(e) {
                    Some(why) => Ok(Some(why)),
                    None => Err(e).with_context(|| format!("cannot name {}", Path::new(to).display())),
                },
            };
        };
        let placed = rename_new(dir, temporary, to);
        if !matches!(placed, Ok(None)) {
            let _ = rustix::fs::unlinkat(dir, temporary, AtFlags::empty());
        }
        placed
    }

    /// Removes what was written (a nameless file goes with its descriptor).
    fn discard(self, dir: BorrowedFd) {
        if let Some(temporary) = &self.temporary {
            let _ = rustix::fs::unlinkat(dir, temporary, AtFlags::empty());
        }
    }
}

/// Links the nameless file `fd` (O_TMPFILE) as `to` in `dir`; an existing `to` is refused
/// (EEXIST), never replaced. By the descriptor itself where we may (AT_EMPTY_PATH needs
/// CAP_DAC_READ_SEARCH), else through /proc/self/fd.
fn link_anonymous(fd: &OwnedFd, dir: BorrowedFd, to: &OsStr) -> rustix::io::Result<()> {
    match rustix::fs::linkat(fd, "", dir, to, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => {}
        other => return other,
    }
    use rustix::fd::AsRawFd;
    let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::linkat(rustix::fs::CWD, by_fd.as_str(), dir, to, AtFlags::SYMLINK_FOLLOW)
}

/// 64 random bits for temporary names (getrandom; the time and our process id if it fails).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
}

/// Opens `name` in `dir` without following a symlink there (the last component is all there
/// is: names never contain `/`). Files are created 0600 until their mode is set.
fn open_beneath(dir: BorrowedFd, name: &OsStr, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
}

/// Renames `from` to `to` in `dir` unless `to` exists: Ok(Some(why)) then.
fn rename_new(dir: BorrowedFd, from: &OsStr, to: &OsStr) -> Result<Option<&'static str>> {
    let renamed = match rustix::fs::renameat_with(dir, from, dir, to, rustix::fs::RenameFlags::NOREPLACE) {
        // Filesystems without RENAME_NOREPLACE: a hard link also refuses an existing name.
        Err(Errno::INVAL) | Err(Errno::NOSYS) => rustix::fs::linkat(dir, from, dir, to, AtFlags::empty())
            .and_then(|()| rustix::fs::unlinkat(dir, from, AtFlags::empty())),
        other => other,
    };
    match renamed {
        Ok(()) => Ok(None),
        Err(e) => match skippable(e) {
            Some(why) => Ok(Some(why)),
            None => Err(e).with_context(|| format!("cannot rename into {}", Path::new(to).display())),
        },
    }
}

/// How a folder is recognised: by its number where the filesystem has one, else by its listing.
fn folder_key(me: &Entry, entries: &[Entry]) -> FolderKey {
    match me.ident {
        Ident::Exact(n) => FolderKey::Exact(n),
        _ => FolderKey::Listing(listing_digest(entries)),
    }
}

/// A digest of a folder's listing: each entry's name, kind and what it points at.
fn listing_digest(entries: &[Entry]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in entries {
        (e.name.as_bytes(), e.kind, e.ident).hash(&mut h);
    }
    h.finish()
}

fn opened<F: Filesystem + 'static>(volume: &Volume, open: impl FnOnce() -> Result<F>) -> Result<Box<dyn Filesystem>> {
    let kind = volume.filesystem.unwrap_or("?");
    let fs = guarded(open).with_context(|| format!("reading the {kind} filesystem of {}", volume.name))?;
    Ok(Box::new(Guarded { fs: Box::new(fs), kind }))
}

/// Runs a step that parses a guest's bytes, turning a panic (a bug, or a parser crate tripping
/// on a crafted structure: `ntfs`, `fatfs` and `ext4-view` do not promise to never panic) into
/// an error, so that it costs that step, not the process.
pub(crate) fn guarded<T>(step: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(anyhow::anyhow!("internal error while reading it: {why}"))
    })
}

/// A filesystem reader whose every call is [`guarded`]: a panic is an error naming the path.
/// The reader's state stays usable: its borrows end as the panic unwinds.
struct Guarded {
    fs: Box<dyn Filesystem>,
    kind: &'static str,
}

impl Filesystem for Guarded {
    fn stat(&self, path: &str) -> Result<Entry> {
        guarded(|| self.fs.stat(path)).with_context(|| format!("{path}: reading the {} filesystem", self.kind))
    }
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        guarded(|| self.fs.read_dir(path)).with_context(|| format!("{path}: reading the {} filesystem", self.kind))
    }
    fn read_link(&self, path: &str) -> Result<String> {
        guarded(|| self.fs.read_link(path)).with_context(|| format!("{path}: reading the {} filesystem", self.kind))
    }
    fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        guarded(|| self.fs.copy_to(path, out)).with_context(|| format!("{path}: reading the {} filesystem", self.kind))
    }
    fn resolve(&self, path: &str) -> Result<String> {
        guarded(|| self.fs.resolve(path)).with_context(|| format!("{path}: reading the {} filesystem", self.kind))
    }
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

/// `/a/b/`, `a/b` and `/a/c/../b` all become `/a/b`; the root is `/` (and `..` of the root is
/// the root).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
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

/// The fuzz targets' sparse disks, to read their regression inputs in tests.
#[cfg(test)]
#[path = "../../../../fuzz/fuzz_targets/guest_disk/sparse.rs"]
#[allow(dead_code)]
mod sparse;

#[cfg(test)]
mod tests {
    use super::*;

    use super::sparse;

    /// A disk from a fuzz input (the fuzz targets' sparse disks), in memory.
    fn fuzz_disk(input: &[u8]) -> Arc<dyn DiskRead> {
        let disk = sparse::SparseDisk::parse(input, 64 << 20);
        let mut bytes = vec![0u8; disk.size as usize];
        disk.read(0, &mut bytes);
        Arc::new(MemoryDisk { name: "fuzz".into(), bytes })
    }

    fn regression_input(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/files_tree").join(name)).unwrap()
    }

    /// What the files_tree fuzz target found: an ext4 superblock claiming 2^31 block groups, for
    /// which ext4-view would allocate 32 GiB before reading any. Refused first, with the reason.
    #[test]
    fn an_ext4_superblock_claiming_more_than_its_volume_is_refused_before_ext4_view_allocates() {
        let disk = fuzz_disk(&regression_input("regression-ext4-huge-group-count"));
        let err = Browser::open_disks(&[disk], None).err().unwrap();
        assert!(format!("{err:#}").contains("ext4 superblock claims"), "{err:#}");
    }

    /// What the files_tree fuzz target found: an ext4 symlink whose inode claims a target of
    /// about 1 TB, which ext4-view reads whole into memory. Refused by its size, on copy and
    /// when a path goes through it.
    #[test]
    fn an_ext4_symlink_claiming_a_huge_target_is_refused_before_it_is_read() {
        let b = Browser::open_disks(&[fuzz_disk(&regression_input("regression-ext4-symlink-size"))], None).unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = b.get("/", out.path()).unwrap_err();
        assert!(format!("{err:#}").contains("a symlink whose target would be"), "{err:#}");
        assert_eq!(b.list("/etc/current").unwrap()[0].kind, "symlink");
        let through = b.list("/etc/current/x").unwrap_err();
        assert!(format!("{through:#}").contains("a symlink whose target would be"), "{through:#}");
    }

    /// What the files_tree fuzz target found: NTFS index entries that make the `ntfs` crate
    /// slice past its buffer. Listing and copying are errors, not a panic of the process.
    #[test]
    fn a_filesystem_crate_panicking_on_a_crafted_volume_is_an_error() {
        let input = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../fuzz/corpus/files_tree/regression-ntfs-index-entry-panic"),
        )
        .unwrap();
        let b = Browser::open_disks(&[fuzz_disk(&input)], None).unwrap();
        assert_eq!(b.volume.filesystem, Some("ntfs"));
        let err = b.list("/").unwrap_err();
        assert!(format!("{err:#}").contains("internal error while reading it"), "{err:#}");
        let out = tempfile::tempdir().unwrap();
        assert!(b.get("/", out.path()).is_err());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "nothing left behind");
    }

    /// Writes `bytes` through a [`NewFile`] in `dir` and names it `name`.
    fn new_file(dir: &Path, name: &OsStr, bytes: &[u8]) -> (bool, Result<Option<&'static str>>) {
        let d = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let f = NewFile::create(d.as_fd()).unwrap();
        let nameless = f.temporary.is_none();
        std::fs::File::from(f.fd.try_clone().unwrap()).write_all(bytes).unwrap();
        (nameless, f.name(d.as_fd(), name))
    }

    /// Files take their name only when complete, without a suffix that would make a guest name
    /// of 242-255 bytes too long, and never replace an entry; nothing else is left.
    fn new_files_take_their_name_whole(dir: &Path) -> bool {
        let long = OsString::from("n".repeat(250));
        let (nameless, named) = new_file(dir, &long, b"long\n");
        assert_eq!(named.unwrap(), None);
        assert_eq!(std::fs::read(dir.join(&long)).unwrap(), b"long\n");
        let (_, again) = new_file(dir, &long, b"other\n");
        assert_eq!(again.unwrap(), Some("an entry of the same name is already there"));
        assert_eq!(std::fs::read(dir.join(&long)).unwrap(), b"long\n");
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [long], "temporary files left");
        nameless
    }

    #[test]
    fn files_get_names_each_file_only_when_complete() {
        let t = tempfile::tempdir().unwrap();
        assert!(new_files_take_their_name_whole(t.path()), "O_TMPFILE was not used on {}", t.path().display());
    }

    /// On a filesystem without O_TMPFILE (NTFS through ntfs-3g), a short random temporary name.
    #[test]
    fn files_get_falls_back_to_a_short_temporary_name_without_o_tmpfile() {
        use std::process::Command;
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("ntfs.img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let made = Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&img).output();
        let mnt = t.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = made.is_ok_and(|o| o.status.success())
            && Command::new("ntfs-3g").arg(&img).arg(&mnt).status().is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot make and mount an NTFS image here (ntfs-3g)");
            return;
        }
        let nameless = std::panic::catch_unwind(|| new_files_take_their_name_whole(&mnt));
        let _ = Command::new("umount").arg(&mnt).status();
        assert!(!nameless.unwrap(), "ntfs-3g took O_TMPFILE");
    }
}
