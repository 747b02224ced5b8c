//! Where restored disks go: a sparse raw file, or a qcow2 image (written by us when the blocks
//! are 64 KiB clusters, else through `qemu-nbd`). All write to a temporary name and take the
//! final name only when complete and durable; a block device (an LV, a zvol, a disk) is written
//! into in place, its zero ranges unmapped where the device can (see [`RawFile::zero`]).

mod qcow2;

use crate::source::nbd_runtime;
use crate::source::{ImageFormat, QemuNbd};
use anyhow::{bail, Context, Result};
use cairn_nbd::NbdClient;
use cairn_storage::AlignedBuf;
use rustix::fd::{AsRawFd, OwnedFd};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where a restore may not write, typed so that an interface can say what would change it.
#[derive(Debug, thiserror::Error)]
pub enum TargetRefusal {
    #[error("{} is a block device: writing the disk into it overwrites everything on it", .0.display())]
    DeviceNeedsForce(PathBuf),
    #[error("{} is a block device: a disk is written into it as raw, not as qcow2", .0.display())]
    DeviceNeedsRaw(PathBuf),
    /// `replaceable`: the caller could ask for the file to be replaced.
    #[error("{} already exists", .path.display())]
    Exists { path: PathBuf, replaceable: bool },
    #[error("{} is a folder, not the image file to create", .0.display())]
    IsFolder(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetFormat {
    Raw,
    Qcow2,
}

impl TargetFormat {
    /// Its name, as QEMU and libvirt say it (and the extension of a restored disk's file).
    pub fn name(self) -> &'static str {
        match self {
            TargetFormat::Raw => "raw",
            TargetFormat::Qcow2 => "qcow2",
        }
    }

    pub fn parse(s: &str) -> Result<TargetFormat> {
        match s {
            "raw" => Ok(TargetFormat::Raw),
            "qcow2" => Ok(TargetFormat::Qcow2),
            _ => bail!("unknown image format {s:?} (raw, qcow2)"),
        }
    }
}

pub trait Target: Send {
    /// Writes restored bytes; ranges never written read as zeros.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the image durable and gives it its final name.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Removes the partial image (the restore failed).
    fn abandon(self: Box<Self>);
}

fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".cairn-partial");
    PathBuf::from(p)
}

/// Opens a target for a disk of `size` bytes of which `data_bytes` hold data (the rest stays
/// sparse). An existing `path` is refused unless `force`; a folder without room for the data
/// is refused before anything is written. A block device is written into in place, when no
/// VM uses it (see [`check_device_users`]) and QEMU holds no lock on it.
pub fn create(
    path: &Path,
    size: u64,
    block_size: u64,
    data_bytes: u64,
    format: TargetFormat,
    force: bool,
) -> Result<Box<dyn Target>> {
    if let Some((node, rdev)) = find_block_device(path)? {
        if !force {
            return Err(TargetRefusal::DeviceNeedsForce(path.into()).into());
        }
        if format != TargetFormat::Raw {
            return Err(TargetRefusal::DeviceNeedsRaw(path.into()).into());
        }
        refuse_device_users(path, rdev)?;
        // O_DIRECT only when every write, the padded last one too, ends inside the disk.
        let (file, direct) = open_device(&node, rdev, path, size.is_multiple_of(ALIGN as u64))?;
        if qemu_holds_lock(&file) {
            bail!(
                "{} is in use: a QEMU process (a VM, qemu-nbd or qemu-img) holds its image lock; stop it \
                 first, nothing was written",
                path.display()
            );
        }
        return Ok(Box::new(RawFile::device(file, path, size, direct)?));
    }
    if path.exists() && !force {
        return Err(TargetRefusal::Exists { path: path.into(), replaceable: true }.into());
    }
    if path.is_dir() {
        return Err(TargetRefusal::IsFolder(path.into()).into());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("folder {} does not exist", parent.display());
        }
        check_space(parent, data_bytes)?;
    }
    let partial = partial_path(path);
    let _ = std::fs::remove_file(&partial);
    match format {
        TargetFormat::Raw => Ok(Box::new(RawFile::create(&partial, path, size)?)),
        TargetFormat::Qcow2 if block_size == qcow2::CLUSTER => {
            Ok(Box::new(qcow2::Qcow2Writer::new(RawFile::create(&partial, path, 0)?, size)))
        }
        TargetFormat::Qcow2 => Ok(Box::new(NbdImage::local(path, size, format, data_bytes, force)?)),
    }
}

/// Refuses to start a restore whose data cannot fit in the free space of `dir`.
pub fn check_space(dir: &Path, data_bytes: u64) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if free < data_bytes {
            bail!(
                "{} has {} MiB free but the restored disk holds {} MiB of data; free some space or restore elsewhere",
                dir.display(),
                free >> 20,
                data_bytes.div_ceil(1 << 20)
            );
        }
    }
    Ok(())
}

/// Who uses block devices on this host besides the restore, as (who, device path) pairs, e.g.
/// ("VM web (running), disk vda", "/dev/vg/web"). The CLI tells, asking libvirt, which this
/// crate does not link.
pub type DeviceUsers = dyn Fn() -> Vec<(String, PathBuf)> + Send + Sync;

static DEVICE_USERS: OnceLock<Box<DeviceUsers>> = OnceLock::new();

/// Makes every later restore into a block device ask `users` first, and refuse a device that
/// one of them uses (the device itself, a partition of it, or the disk it is a partition of):
/// O_EXCL does not keep out a QEMU that opened it without. Set once per process.
pub fn check_device_users(users: Box<DeviceUsers>) {
    let _ = DEVICE_USERS.set(users);
}

fn refuse_device_users(path: &Path, rdev: u64) -> Result<()> {
    let Some(users) = DEVICE_USERS.get() else { return Ok(()) };
    let using = users_of(rdev, &users());
    if !using.is_empty() {
        bail!(
            "{} is a disk of {}: writing into it would corrupt that VM; shut it down first (nothing was written)",
            path.display(),
            using.join(", ")
        );
    }
    Ok(())
}

/// Which of `users` use the block device `rdev` or one sharing sectors with it.
fn users_of(rdev: u64, users: &[(String, PathBuf)]) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    users
        .iter()
        .filter(|(_, p)| {
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device() && overlaps(m.rdev(), rdev))
        })
        .map(|(who, _)| who.clone())
        .collect()
}

/// Whether two block devices share sectors: the same device, or one a partition of the other.
fn overlaps(a: u64, b: u64) -> bool {
    let sys = Path::new("/sys");
    a == b || whole_disk(sys, a) == Some(b) || whole_disk(sys, b) == Some(a)
}

/// The disk a partition belongs to (from sysfs at `sys`), None for anything else.
fn whole_disk(sys: &Path, rdev: u64) -> Option<u64> {
    let node = sys.join(format!("dev/block/{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev)));
    if !node.join("partition").exists() {
        return None;
    }
    // The link leads to .../block/sda/sda1: the parent folder is the disk's.
    let dev = std::fs::read_to_string(node.join("../dev")).ok()?;
    let (major, minor) = dev.trim().split_once(':')?;
    Some(rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// `path`, when it is a block device: a descriptor that names it without opening it (O_PATH:
/// no device driver, FIFO or terminal is opened by looking), and its device number. Symbolic
/// links are followed (/dev/vg/lv names /dev/dm-3), once: the device is then opened through
/// this descriptor, never by its path again.
fn find_block_device(path: &Path) -> Result<Option<(OwnedFd, u64)>> {
    use rustix::fs::{FileType, Mode, OFlags};
    let node = match rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        // Nothing there (or a parent missing): a new image file, checked as such.
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot look up {}", path.display())),
    };
    let st = rustix::fs::fstat(&node).with_context(|| format!("cannot read {}", path.display()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Ok(None);
    }
    Ok(Some((node, st.st_rdev)))
}

/// Opens the device `node` names for writing, exclusively (O_EXCL: refused while mounted or
/// held by device-mapper, md or another exclusive opener), with O_DIRECT when `direct` and the
/// device allows it. Through /proc/self/fd: the same inode, not a new lookup of the path.
fn open_device(node: &OwnedFd, rdev: u64, path: &Path, direct: bool) -> Result<(File, bool)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let by_fd = format!("/proc/self/fd/{}", node.as_raw_fd());
    let open = |flags: i32| OpenOptions::new().write(true).custom_flags(libc::O_EXCL | flags).open(&by_fd);
    let (file, direct) = match direct.then(|| open(libc::O_DIRECT)) {
        Some(Ok(f)) => (f, true),
        _ => (
            open(0).with_context(|| {
                format!("cannot open block device {} for writing (mounted, or in use?)", path.display())
            })?,
            false,
        ),
    };
    let m = file.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if !m.file_type().is_block_device() || m.rdev() != rdev {
        bail!("{} changed while it was being opened; nothing was written", path.display());
    }
    Ok((file, direct))
}

/// Whether some process holds a lock where QEMU puts its image locks (OFD locks on bytes
/// 100-105 and 200-205 of every image it opens, a device included): a VM, qemu-nbd or qemu-img
/// has the device open. Kernels without OFD locks answer no.
fn qemu_holds_lock(file: &File) -> bool {
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 100;
    lock.l_len = 200;
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    r == 0 && lock.l_type != libc::F_UNLCK as libc::c_short
}

/// A sparse raw image. Written with O_DIRECT where the filesystem allows it: buffered writes
/// plus fsync cost ~2.6 s of CPU per GB in writeback on the machines we measured. Contiguous
/// writes are gathered in aligned 8 MiB buffers, which an I/O thread writes while the next
/// one fills.
struct RawFile {
    file: Arc<File>,
    partial: PathBuf,
    path: PathBuf,
    size: u64,
    direct: bool,
    /// Written into a block device in place: no temporary name, and what the restore does not
    /// write (zero blocks) is zeroed, since the device holds old data, not holes.
    device: bool,
    /// Everything below this offset is written or zeroed (block devices).
    covered: u64,
    /// Ways of zeroing in the device not refused yet (block devices): see [`RawFile::zero`].
    zero_modes: Vec<ZeroMode>,
    buf: AlignedBuf,
    buf_start: u64,
    buf_len: usize,
    to_io: Option<crossbeam_channel::Sender<(AlignedBuf, u64, usize)>>,
    free: crossbeam_channel::Receiver<AlignedBuf>,
    io: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

const GATHER: usize = 16 << 20;
const ALIGN: usize = 4096;
/// Buffers queued for the I/O thread besides the one filling.
const IO_DEPTH: usize = 3;
/// Writes in flight at once: the device serves several faster than one.
const IO_THREADS: usize = 2;

fn gather_buf() -> AlignedBuf {
    let mut b = AlignedBuf::new(ALIGN);
    b.prepare(GATHER);
    b
}

impl RawFile {
    fn create(partial: &Path, path: &Path, size: u64) -> Result<RawFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| OpenOptions::new().write(true).create_new(true).custom_flags(flags).open(partial);
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", partial.display())),
        };
        file.set_len(size)?; // sparse: unwritten ranges stay holes
        Self::start(file, partial, path, size, direct, false)
    }

    /// Writes into the block device `file` (opened by [`open_device`]) in place. It must hold
    /// at least `size` bytes; bytes past `size` are left alone.
    fn device(file: File, path: &Path, size: u64, direct: bool) -> Result<RawFile> {
        use std::io::{Seek, SeekFrom};
        let capacity =
            (&file).seek(SeekFrom::End(0)).with_context(|| format!("reading the size of {}", path.display()))?;
        if capacity < size {
            bail!(
                "block device {} holds {capacity} bytes, less than the disk's {size}: nothing was written",
                path.display()
            );
        }
        Self::start(file, path, path, size, direct, true)
    }

    fn start(file: File, partial: &Path, path: &Path, size: u64, direct: bool, device: bool) -> Result<RawFile> {
        let file = Arc::new(file);
        let (to_io, from_main) = crossbeam_channel::bounded::<(AlignedBuf, u64, usize)>(IO_DEPTH);
        let (give_back, free) = crossbeam_channel::bounded::<AlignedBuf>(IO_DEPTH);
        for _ in 0..IO_DEPTH {
            give_back.send(gather_buf()).unwrap();
        }
        let mut threads = Vec::new();
        for _ in 0..IO_THREADS {
            let (f, rx, back) = (file.clone(), from_main.clone(), give_back.clone());
            threads.push(std::thread::Builder::new().name("cairn-restore-io".into()).spawn(
                move || -> std::io::Result<()> {
                    for (mut b, start, len) in rx {
                        f.write_all_at(&b.prepare(GATHER)[..len], start)?;
                        let _ = back.send(b);
                    }
                    Ok(())
                },
            )?);
        }
        Ok(RawFile {
            file,
            partial: partial.to_path_buf(),
            path: path.to_path_buf(),
            size,
            direct,
            device,
            covered: 0,
            zero_modes: vec![ZeroMode::Unmap, ZeroMode::ZeroRange, ZeroMode::ZeroOut],
            buf: gather_buf(),
            buf_start: 0,
            buf_len: 0,
            to_io: Some(to_io),
            free,
            io: threads,
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf_len == 0 {
            return Ok(());
        }
        // Only the disk's last block can end off-alignment; its padding lies past the end of
        // the disk and is cut by the final set_len.
        let len = if self.direct { self.buf_len.next_multiple_of(ALIGN) } else { self.buf_len };
        self.buf.prepare(GATHER)[self.buf_len..len].fill(0);
        let next = match self.free.recv() {
            Ok(b) => b,
            Err(_) => {
                return Err(self.stop_io().err().unwrap_or_else(|| anyhow::anyhow!("restore I/O thread stopped")))
            }
        };
        let full = std::mem::replace(&mut self.buf, next);
        if self.to_io.as_ref().unwrap().send((full, self.buf_start, len)).is_err() {
            return Err(self.stop_io().err().unwrap_or_else(|| anyhow::anyhow!("restore I/O thread stopped")));
        }
        self.buf_len = 0;
        Ok(())
    }

    /// Waits for queued writes and reports the I/O thread's error, if any.
    fn stop_io(&mut self) -> Result<()> {
        drop(self.to_io.take());
        let mut result = Ok(());
        for h in self.io.drain(..) {
            let r =
                h.join().expect("I/O thread panicked").with_context(|| format!("writing {}", self.partial.display()));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

const BLKZEROOUT: libc::c_ulong = 0x127f; // _IO(0x12, 127): zero a byte range of a block device

/// Ways a block device zeroes a range itself, in the order tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMode {
    /// fallocate(PUNCH_HOLE): the device's write-zeroes allowed to unmap, never falling back
    /// to writing zeros. A thin LV, a zvol or a loop device over a sparse file gives the space
    /// back: a restore must not provision the whole device (it could fill a thin pool).
    Unmap,
    /// fallocate(ZERO_RANGE): zeroes, allocated (written if the device has no faster way).
    ZeroRange,
    /// The BLKZEROOUT ioctl, the same for kernels before 4.9.
    ZeroOut,
}

impl ZeroMode {
    fn apply(self, file: &File, from: u64, len: u64) -> rustix::io::Result<()> {
        use rustix::fs::FallocateFlags as F;
        match self {
            ZeroMode::Unmap => rustix::fs::fallocate(file, F::PUNCH_HOLE | F::KEEP_SIZE, from, len),
            ZeroMode::ZeroRange => rustix::fs::fallocate(file, F::ZERO_RANGE | F::KEEP_SIZE, from, len),
            ZeroMode::ZeroOut => {
                let range = [from, len];
                match unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } {
                    0 => Ok(()),
                    _ => Err(rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                        .unwrap_or(rustix::io::Errno::IO)),
                }
            }
        }
    }
}

impl RawFile {
    /// Zeroes [from, to) of the device: in the device itself where it can (the first
    /// [`ZeroMode`] it accepts; one the device does not support is not tried again), else by
    /// writing zeros.
    fn zero(&mut self, from: u64, to: u64) -> Result<()> {
        use rustix::io::Errno;
        if from.is_multiple_of(512) && to.is_multiple_of(512) {
            let mut i = 0;
            while let Some(mode) = self.zero_modes.get(i) {
                match mode.apply(&self.file, from, to - from) {
                    Ok(()) => return Ok(()),
                    // Not supported by this device (ENODEV: a kernel before 4.9).
                    Err(Errno::OPNOTSUPP | Errno::NOTTY | Errno::NODEV) => {
                        self.zero_modes.remove(i);
                    }
                    // Refused for this range only (a larger sector size, say).
                    Err(_) => i += 1,
                }
            }
        }
        let zeros = vec![0u8; GATHER];
        let mut at = from;
        while at < to {
            let n = (to - at).min(GATHER as u64) as usize;
            self.put(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Gathers `data` for the I/O threads.
    fn put(&mut self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let contiguous = self.buf_len > 0 && offset == self.buf_start + self.buf_len as u64;
            if !contiguous || self.buf_len == GATHER {
                self.flush()?;
                if !offset.is_multiple_of(ALIGN as u64) && self.direct {
                    bail!("internal error: unaligned restore write at {offset}");
                }
                self.buf_start = offset;
            }
            let n = data.len().min(GATHER - self.buf_len);
            let at = self.buf_len;
            self.buf.prepare(GATHER)[at..at + n].copy_from_slice(&data[..n]);
            self.buf_len += n;
            data = &data[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

impl Target for RawFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if self.device {
            // Restores write in disk order and skip zero blocks: zero the gap before this write.
            if offset > self.covered {
                self.zero(self.covered, offset)?;
            }
            self.covered = self.covered.max(offset + data.len() as u64);
        }
        self.put(offset, data)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.device {
            if self.covered < self.size {
                self.zero(self.covered, self.size)?;
            }
            self.flush()?;
            self.stop_io()?;
            // Flushes the device's write cache too: the disk is on stable storage when we return.
            return self.file.sync_all().with_context(|| format!("syncing {}", self.path.display()));
        }
        self.flush()?;
        self.stop_io()?;
        self.file.set_len(self.size)?;
        self.file.sync_all().with_context(|| format!("syncing {}", self.partial.display()))?;
        cairn_storage::crash_point("restore.image_synced");
        std::fs::rename(&self.partial, &self.path)?;
        cairn_storage::crash_point("restore.image_renamed");
        sync_parent(&self.path)
    }

    fn abandon(mut self: Box<Self>) {
        let _ = self.stop_io();
        if !self.device {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Makes a rename in `p`'s folder durable. An error fails the restore: the image may not have
/// its name after a power cut, and saying "restored" would be a lie.
fn sync_parent(p: &Path) -> Result<()> {
    let d = match p.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing folder {} after naming {}", d.display(), p.display()))
}

/// A new image (under its partial name until [`ServedImage::commit`]) served writable by a private
/// `qemu-nbd`: what a qcow2 restore writes through, here or on another host (`cairn host
/// create-image`, which the restore drives over SSH). Dropped uncommitted, the partial file goes.
pub struct ServedImage {
    server: Option<QemuNbd>,
    partial: PathBuf,
    path: PathBuf,
}

impl ServedImage {
    /// Creates `path`'s partial file, `size` bytes of `format` (qcow2 with 64 KiB clusters, or a
    /// sparse raw file), and serves it. `path` must not exist unless `force`; its folder must
    /// have room for `data_bytes`.
    pub fn create(path: &Path, size: u64, format: TargetFormat, data_bytes: u64, force: bool) -> Result<ServedImage> {
        if path.exists() && !force {
            return Err(TargetRefusal::Exists { path: path.into(), replaceable: true }.into());
        }
        if path.is_dir() {
            return Err(TargetRefusal::IsFolder(path.into()).into());
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("folder {} does not exist", parent.display());
        }
        check_space(parent, data_bytes)?;
        let partial = partial_path(path);
        let _ = std::fs::remove_file(&partial);
        let qemu_format = format.name();
        let (image_format, options) = match format {
            TargetFormat::Qcow2 => (ImageFormat::Qcow2, "cluster_size=65536"),
            TargetFormat::Raw => (ImageFormat::Raw, ""),
        };
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", qemu_format]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        let out = cmd.arg(&partial).arg(size.to_string()).env_remove("CAIRN_PASSWORD").output().map_err(|e| {
            anyhow::anyhow!("qemu-img is needed to write {qemu_format} images (apt-get install qemu-utils): {e}")
        })?;
        if !out.status.success() {
            bail!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        match QemuNbd::serve(&partial, image_format, false, None) {
            Ok(server) => Ok(ServedImage { server: Some(server), partial, path: path.to_path_buf() }),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Where the image is served (a Unix socket of this machine).
    pub fn address(&self) -> cairn_nbd::NbdAddress {
        self.server.as_ref().expect("served until committed").address()
    }

    /// Connects to the image: the client a restore writes through.
    pub fn connect(&mut self, rt: &tokio::runtime::Runtime) -> Result<NbdClient> {
        let server = self.server.as_mut().expect("served until committed");
        let addr = server.address();
        server.connect(|| rt.block_on(NbdClient::connect(&addr, &[])))
    }

    /// Once every client is gone: waits for qemu-nbd to close the image cleanly, makes it
    /// durable and gives it its final name.
    pub fn commit(mut self) -> Result<()> {
        // qemu-nbd exits once its only client is gone, after closing the image cleanly.
        self.server.take().expect("served until committed").wait_exit(Duration::from_secs(60))?;
        File::open(&self.partial)?.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        sync_parent(&self.path)
    }
}

impl Drop for ServedImage {
    fn drop(&mut self) {
        if self.server.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// What makes an [`NbdImage`] final once every write is flushed and the client is gone.
pub type CommitImage = Box<dyn FnOnce() -> Result<()> + Send>;

/// A target written through an NBD export of a new image ([`ServedImage`], here or on another
/// host). Writes are pipelined. `commit` makes it final; dropping it uncommitted (`abandon`)
/// drops whatever it holds, which removes the partial image.
pub struct NbdImage {
    rt: tokio::runtime::Runtime,
    client: Option<Arc<NbdClient>>,
    inflight: VecDeque<tokio::task::JoinHandle<Result<(), cairn_nbd::NbdError>>>,
    commit: Option<CommitImage>,
}

const MAX_INFLIGHT_WRITES: usize = 32;

impl NbdImage {
    pub fn new(rt: tokio::runtime::Runtime, client: NbdClient, commit: CommitImage) -> NbdImage {
        NbdImage { rt, client: Some(Arc::new(client)), inflight: VecDeque::new(), commit: Some(commit) }
    }

    /// A new image at `path` (created as `partial`), served by a qemu-nbd of this machine.
    fn local(path: &Path, size: u64, format: TargetFormat, data_bytes: u64, force: bool) -> Result<NbdImage> {
        let mut served = ServedImage::create(path, size, format, data_bytes, force)?;
        let rt = nbd_runtime()?;
        let client = served.connect(&rt)?;
        Ok(NbdImage::new(rt, client, Box::new(move || served.commit())))
    }

    fn wait_one(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.pop_front() {
            self.rt.block_on(h)?.context("writing the image")?;
        }
        Ok(())
    }
}

impl Target for NbdImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let c = self.client.clone().unwrap();
        let max = c.max_request() as usize;
        for (i, chunk) in data.chunks(max).enumerate() {
            while self.inflight.len() >= MAX_INFLIGHT_WRITES {
                self.wait_one()?;
            }
            let c = c.clone();
            let buf = chunk.to_vec();
            let at = offset + (i * max) as u64;
            self.inflight.push_back(self.rt.spawn(async move { c.write(at, &buf).await }));
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        while !self.inflight.is_empty() {
            self.wait_one()?;
        }
        let client = self.client.take().unwrap();
        self.rt.block_on(client.flush()).context("flushing the image")?;
        let client = Arc::try_unwrap(client).map_err(|_| anyhow::anyhow!("NBD writes still pending"))?;
        self.rt.block_on(client.disconnect())?;
        (self.commit.take().unwrap())()
    }

    fn abandon(mut self: Box<Self>) {
        self.inflight.clear();
        self.client = None;
        self.commit = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_folder_that_cannot_be_synced_fails_the_restore() {
        let e = sync_parent(Path::new("/nonexistent-folder/disk.raw")).unwrap_err();
        assert!(format!("{e:#}").contains("syncing folder /nonexistent-folder"), "{e:#}");
        let t = tempfile::tempdir().unwrap();
        sync_parent(&t.path().join("disk.raw")).unwrap();
    }

    /// A loop device over a file of `len` bytes of 0xAA; detached when dropped.
    struct Loop {
        dev: PathBuf,
        file: PathBuf,
    }

    impl Loop {
        fn new(dir: &Path, len: usize) -> Option<Loop> {
            let file = dir.join("backing");
            std::fs::write(&file, vec![0xAAu8; len]).unwrap();
            let out = Command::new("losetup").args(["-f", "--show"]).arg(&file).output().ok()?;
            if !out.status.success() {
                eprintln!("skipped: losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                return None;
            }
            Some(Loop { dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()), file })
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
    }

    fn allocated_bytes(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn a_block_device_is_written_in_place_zeros_included() {
        let t = tempfile::tempdir().unwrap();
        let Some(lo) = Loop::new(t.path(), 4 << 20) else { return };
        // 3 MiB (O_DIRECT) and 3 MiB + 512 (unaligned: buffered); blocks 1 and 3 hold data, the
        // rest is zero blocks the restore never writes: they must read as zeros, not old bytes.
        for size in [3u64 << 20, (3 << 20) + 512] {
            let block = 1u64 << 20;
            let mut target = create(&lo.dev, size, block, 2 * block, TargetFormat::Raw, true).unwrap();
            target.write_at(block, &vec![1u8; block as usize]).unwrap();
            let last = (size - 2 * block - block / 2) as usize;
            target.write_at(2 * block + block / 2, &vec![3u8; last]).unwrap();
            target.finish().unwrap();
            let got = std::fs::read(&lo.file).unwrap();
            let want = |i: u64| -> u8 {
                match i {
                    i if i >= size => 0xAA, // past the disk: left alone
                    i if (block..2 * block).contains(&i) => 1,
                    i if i >= 2 * block + block / 2 => 3,
                    _ => 0,
                }
            };
            for (i, b) in got.iter().enumerate() {
                assert_eq!(*b, want(i as u64), "size {size}: byte {i}");
            }
            assert!(lo.dev.exists(), "the device node was replaced");
            // The zero ranges were unmapped, not written: the backing file has holes there
            // (a thin LV or a zvol would give its space back the same way).
            let allocated = allocated_bytes(&lo.file);
            let kept = 2 * block - block / 2 + (4 << 20) - size; // data, and the bytes past the disk
            assert!(allocated <= kept + 65536, "size {size}: {allocated} bytes allocated, {kept} hold data");
            std::fs::write(&lo.file, vec![0xAAu8; 4 << 20]).unwrap();
        }
        // Refused: without force, as qcow2, and larger than the device (nothing written).
        let e = create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Raw, false).err().unwrap();
        assert!(matches!(e.downcast_ref(), Some(TargetRefusal::DeviceNeedsForce(_))), "{e}");
        let e = create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Qcow2, true).err().unwrap();
        assert!(matches!(e.downcast_ref(), Some(TargetRefusal::DeviceNeedsRaw(_))), "{e}");
        let e = create(&lo.dev, 5 << 20, 65536, 0, TargetFormat::Raw, true).err().unwrap().to_string();
        assert!(e.contains("less than the disk"), "{e}");
        assert!(std::fs::read(&lo.file).unwrap().iter().all(|b| *b == 0xAA));
    }

    /// A device QEMU has open (qemu-nbd here, a VM alike) is refused: QEMU opens without
    /// O_EXCL, so only its image lock tells.
    #[test]
    fn a_block_device_qemu_holds_is_refused_untouched() {
        let t = tempfile::tempdir().unwrap();
        let Some(lo) = Loop::new(t.path(), 4 << 20) else { return };
        let sock = t.path().join("nbd.sock");
        let mut qemu = Command::new("qemu-nbd")
            .args(["-f", "raw", "--socket"])
            .arg(&sock)
            .arg(&lo.dev)
            .spawn()
            .expect("qemu-nbd (qemu-utils) must be installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sock.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let refused = create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Raw, true).err().map(|e| e.to_string());
        let _ = qemu.kill();
        let _ = qemu.wait();
        let e = refused.expect("a device qemu-nbd serves was opened for the restore");
        assert!(e.contains("in use") && e.contains("QEMU"), "{e}");
        assert!(std::fs::read(&lo.file).unwrap().iter().all(|b| *b == 0xAA));
        // Once QEMU is gone, the device is free again.
        create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Raw, true).unwrap().abandon();
    }

    /// Devices VMs use are matched by device number.
    #[test]
    fn the_users_of_a_device_are_found_by_device_number() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let (Some(one), Some(two)) = (Loop::new(&a, 1 << 20), Loop::new(&b, 1 << 20)) else { return };
        let link = t.path().join("lv");
        std::os::unix::fs::symlink(&one.dev, &link).unwrap();
        let rdev = |p: &Path| std::fs::metadata(p).unwrap().rdev();
        let users = vec![
            ("VM a, disk vda".to_string(), link.clone()),
            ("VM b, disk vdb".to_string(), two.dev.clone()),
            ("VM c, disk vdc".to_string(), t.path().join("gone")),
            ("VM d, disk vdd".to_string(), one.file.clone()), // a file, not the device
        ];
        assert_eq!(users_of(rdev(&one.dev), &users), ["VM a, disk vda"]);
        assert_eq!(users_of(rdev(&two.dev), &users), ["VM b, disk vdb"]);
    }

    /// A partition and its disk share sectors (sysfs tells which disk a partition is of; a
    /// copy of its layout here: loop devices here have no partitions).
    #[test]
    fn a_partition_overlaps_its_disk_only() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let disk = sys.join("devices/virtual/block/sdz");
        std::fs::create_dir_all(disk.join("sdz1")).unwrap();
        std::fs::write(disk.join("dev"), "8:0\n").unwrap();
        std::fs::write(disk.join("sdz1/dev"), "8:1\n").unwrap();
        std::fs::write(disk.join("sdz1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/sdz", sys.join("dev/block/8:0")).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/sdz/sdz1", sys.join("dev/block/8:1")).unwrap();
        let dev = |minor| rustix::fs::makedev(8, minor);
        assert_eq!(whole_disk(sys, dev(1)), Some(dev(0)));
        assert_eq!(whole_disk(sys, dev(0)), None, "a disk is no partition");
        assert_eq!(whole_disk(sys, dev(2)), None, "no such device");
    }
}
