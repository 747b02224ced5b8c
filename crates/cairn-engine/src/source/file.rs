//! Raw image files and block devices, read with pread; holes found with SEEK_DATA/SEEK_HOLE.

use super::{Allocation, Extent, Source};
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
    block_device: bool,
    queue: VecDeque<(u64, usize, Vec<u8>)>,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device { device_size(&file)? } else { meta.len() };
        // Sequential hint: larger kernel readahead for the whole-disk walk.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        Ok(FileSource { path: path.to_path_buf(), file, size, block_device, queue: VecDeque::new() })
    }

    fn current_size(&self) -> Result<u64> {
        if self.block_device {
            device_size(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }
}

fn device_size(f: &File) -> Result<u64> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        bail!("cannot size block device: {}", std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl Source for FileSource {
    fn describe(&self) -> String {
        format!("{} ({})", self.path.display(), if self.block_device { "block device" } else { "raw image" })
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = (offset + len).min(self.size);
        if self.block_device {
            return Ok(vec![Extent { offset, length: end - offset, kind: Allocation::Data }]);
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // No data after pos: the rest is a hole.
                    Some(libc::ENXIO) => {
                        out.push(Extent { offset: pos, length: end - pos, kind: Allocation::Zero });
                        break;
                    }
                    // The filesystem cannot tell: everything is data.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        out.push(Extent { offset: pos, length: end - pos, kind: Allocation::Data });
                        break;
                    }
                    _ => return Err(e).context(format!("SEEK_DATA on {}", self.path.display())),
                }
            }
            let data = (data as u64).min(end);
            if data > pos {
                out.push(Extent { offset: pos, length: data - pos, kind: Allocation::Zero });
            }
            if data >= end {
                break;
            }
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { (hole as u64).min(end) };
            out.push(Extent { offset: data, length: hole - data, kind: Allocation::Data });
            pos = hole;
        }
        Ok(out)
    }

    fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()> {
        self.queue.push_back((offset, len, buf));
        Ok(())
    }

    fn next(&mut self) -> Result<Vec<u8>> {
        let (offset, len, mut buf) = self.queue.pop_front().expect("next() without submit()");
        crate::pool::set_len(&mut buf, len);
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => bail!(
                    "{} ended at byte {} while reading {}..{}: the image shrank during the backup",
                    self.path.display(),
                    offset + done as u64,
                    offset,
                    offset + len as u64
                ),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {} at {}", self.path.display(), offset + done as u64))
                }
            }
        }
        Ok(buf)
    }

    fn finish(&mut self) -> Result<()> {
        let now = self.current_size()?;
        if now != self.size {
            bail!(
                "{} changed size during the backup ({} -> {} bytes); back it up again",
                self.path.display(),
                self.size,
                now
            );
        }
        Ok(())
    }
}
