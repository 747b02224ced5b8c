//! Where restored disks go: a sparse raw file, or a qcow2 image (written by us when the blocks
//! are 64 KiB clusters, else through `qemu-nbd`). All write to a temporary name and take the
//! final name only when complete and durable; a block device (an LV, a zvol, a disk) is written
//! into in place, zeros included.

mod qcow2;

use crate::source::nbd_runtime;
use crate::source::{ImageFormat, QemuNbd};
use anyhow::{bail, Context, Result};
use cairn_nbd::NbdClient;
use cairn_storage::AlignedBuf;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetFormat {
    Raw,
    Qcow2,
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
/// is refused before anything is written.
pub fn create(
    path: &Path,
    size: u64,
    block_size: u64,
    data_bytes: u64,
    format: TargetFormat,
    force: bool,
) -> Result<Box<dyn Target>> {
    use std::os::unix::fs::FileTypeExt;
    // Following symlinks: /dev/vg/lv names /dev/dm-3.
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        if !force {
            bail!(
                "{} is a block device: add --force to write the disk into it (everything on it is overwritten)",
                path.display()
            );
        }
        if format != TargetFormat::Raw {
            bail!(
                "{} is a block device: a disk is written into it as raw (--format raw), not as qcow2",
                path.display()
            );
        }
        return Ok(Box::new(RawFile::device(path, size)?));
    }
    if path.exists() && !force {
        bail!("{} already exists; choose another --to, or add --force to replace it", path.display());
    }
    if path.is_dir() {
        bail!("{} is a folder; --to takes the path of the image file to create", path.display());
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
        TargetFormat::Qcow2 => Ok(Box::new(Qcow2Image::create(&partial, path, size)?)),
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

    /// Writes into the block device `path` in place. It is opened exclusively (O_EXCL: refused
    /// while mounted or held by device-mapper, md or another exclusive opener) and must hold at
    /// least `size` bytes; bytes past `size` are left alone.
    fn device(path: &Path, size: u64) -> Result<RawFile> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| OpenOptions::new().write(true).custom_flags(libc::O_EXCL | flags).open(path);
        // O_DIRECT only when every write, the padded last one too, ends inside the disk.
        let (file, direct) = match size.is_multiple_of(ALIGN as u64).then(|| open(libc::O_DIRECT)) {
            Some(Ok(f)) => (f, true),
            _ => (
                open(0)
                    .with_context(|| format!("cannot open block device {} for writing (in use?)", path.display()))?,
                false,
            ),
        };
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

impl RawFile {
    /// Zeroes [from, to) of the device: in the device itself where it can (BLKZEROOUT: discards
    /// or write-zeroes, no data through memory), else by writing zeros.
    fn zero(&mut self, from: u64, to: u64) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        let range = [from, to - from];
        let aligned = from.is_multiple_of(512) && to.is_multiple_of(512);
        if aligned && unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } == 0 {
            return Ok(());
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

/// A new qcow2 image, filled through a private writable `qemu-nbd`. Writes are pipelined.
struct Qcow2Image {
    rt: tokio::runtime::Runtime,
    client: Option<Arc<NbdClient>>,
    server: Option<QemuNbd>,
    inflight: VecDeque<tokio::task::JoinHandle<Result<(), cairn_nbd::NbdError>>>,
    partial: PathBuf,
    path: PathBuf,
}

const MAX_INFLIGHT_WRITES: usize = 32;

impl Qcow2Image {
    fn create(partial: &Path, path: &Path, size: u64) -> Result<Qcow2Image> {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(partial)
            .arg(size.to_string())
            .env_remove("CAIRN_PASSWORD")
            .output()
            .map_err(|e| anyhow::anyhow!("qemu-img is needed to write qcow2 (apt-get install qemu-utils): {e}"))?;
        if !out.status.success() {
            bail!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut server = QemuNbd::serve(partial, ImageFormat::Qcow2, false, None)?;
        let rt = nbd_runtime()?;
        let addr = server.address();
        let client = server.connect(|| rt.block_on(NbdClient::connect(&addr, &[])))?;
        Ok(Qcow2Image {
            rt,
            client: Some(Arc::new(client)),
            server: Some(server),
            inflight: VecDeque::new(),
            partial: partial.to_path_buf(),
            path: path.to_path_buf(),
        })
    }

    fn wait_one(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.pop_front() {
            self.rt.block_on(h)?.context("writing the qcow2 image")?;
        }
        Ok(())
    }
}

impl Target for Qcow2Image {
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
        self.rt.block_on(client.flush()).context("flushing the qcow2 image")?;
        let client = Arc::try_unwrap(client).map_err(|_| anyhow::anyhow!("NBD writes still pending"))?;
        self.rt.block_on(client.disconnect())?;
        // qemu-nbd exits once its only client is gone, after closing the image cleanly.
        self.server.take().unwrap().wait_exit(Duration::from_secs(60))?;
        File::open(&self.partial)?.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        sync_parent(&self.path)
    }

    fn abandon(mut self: Box<Self>) {
        self.inflight.clear();
        self.client = None;
        self.server = None;
        let _ = std::fs::remove_file(&self.partial);
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
            std::fs::write(&lo.file, vec![0xAAu8; 4 << 20]).unwrap();
        }
        // Refused: without force, as qcow2, and larger than the device (nothing written).
        let e = create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Raw, false).err().unwrap().to_string();
        assert!(e.contains("block device") && e.contains("--force"), "{e}");
        let e = create(&lo.dev, 1 << 20, 65536, 0, TargetFormat::Qcow2, true).err().unwrap().to_string();
        assert!(e.contains("raw"), "{e}");
        let e = create(&lo.dev, 5 << 20, 65536, 0, TargetFormat::Raw, true).err().unwrap().to_string();
        assert!(e.contains("less than the disk"), "{e}");
        assert!(std::fs::read(&lo.file).unwrap().iter().all(|b| *b == 0xAA));
    }
}
