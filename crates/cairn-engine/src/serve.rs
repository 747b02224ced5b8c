//! Restore points as NBD exports: any disk of a point, read block by block straight from the
//! repository, every block checked against its hash. Instant recovery boots VMs from these.

use anyhow::Result;
use cairn_nbd::server::Export;
use cairn_repo::map::PAGE_BLOCKS;
use cairn_repo::{BlockId, DiskImage, Repository};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Decoded frames kept: reads of neighbouring blocks (a guest booting, a sequential copy) hit
/// the same 1 MiB frame, which is then read and decompressed once.
const CACHED_FRAMES: usize = 64;

type FrameKey = ([u8; 32], u32);

pub struct PointDisk {
    repo: Arc<Repository>,
    disk: DiskImage,
    pages: Mutex<HashMap<usize, Arc<Vec<BlockId>>>>,
    frames: Mutex<VecDeque<(FrameKey, Arc<Vec<u8>>)>>,
    /// Bytes read from the repository (stored frames and map pages), for read amplification.
    stored_read: AtomicU64,
}

impl PointDisk {
    pub fn new(repo: Arc<Repository>, disk: DiskImage) -> PointDisk {
        PointDisk {
            repo,
            disk,
            pages: Mutex::new(HashMap::new()),
            frames: Mutex::new(VecDeque::new()),
            stored_read: AtomicU64::new(0),
        }
    }

    pub fn image(&self) -> &DiskImage {
        &self.disk
    }

    /// Bytes read from the repository so far.
    pub fn stored_bytes_read(&self) -> u64 {
        self.stored_read.load(Ordering::Relaxed)
    }

    /// Reads bytes of the disk (zeros for holes), every block checked against its hash.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.disk.size) {
            anyhow::bail!("read of {} bytes at {offset} is past the end of disk {}", buf.len(), self.disk.name);
        }
        self.read(offset, buf)
    }

    fn page(&self, p: usize) -> Result<Arc<Vec<BlockId>>> {
        if let Some(page) = self.pages.lock().unwrap().get(&p) {
            return Ok(page.clone());
        }
        let page = Arc::new(self.repo.read_map_page(&self.disk, p)?);
        self.stored_read.fetch_add(page.len() as u64 * 32, Ordering::Relaxed);
        self.pages.lock().unwrap().insert(p, page.clone());
        Ok(page)
    }

    /// The block's bytes, hash-checked.
    fn block(&self, id: &BlockId, block: u64, out: &mut [u8], from: usize) -> Result<()> {
        let loc = self.repo.index().get(id).ok_or_else(|| {
            anyhow::anyhow!(
                "block {} at disk offset {} is missing from the repository",
                id.to_hex(),
                block * self.disk.block_size as u64
            )
        })?;
        let key = (loc.pack, loc.frame_offset);
        let cached = self.frames.lock().unwrap().iter().find(|(k, _)| *k == key).map(|(_, f)| f.clone());
        let frame = match cached {
            Some(f) => f,
            None => {
                let f = Arc::new(self.repo.read_frame(&loc)?);
                self.stored_read.fetch_add(loc.frame_stored_len as u64, Ordering::Relaxed);
                let mut frames = self.frames.lock().unwrap();
                if frames.len() == CACHED_FRAMES {
                    frames.pop_front();
                }
                frames.push_back((key, f.clone()));
                f
            }
        };
        let blob = frame
            .get(loc.raw_offset as usize..(loc.raw_offset + loc.len) as usize)
            .ok_or_else(|| anyhow::anyhow!("block {} lies outside its frame", id.to_hex()))?;
        if self.repo.crypto().block_id(blob) != *id {
            anyhow::bail!(
                "block {} at disk offset {} is damaged (content does not match its hash)",
                id.to_hex(),
                block * self.disk.block_size as u64
            );
        }
        out.copy_from_slice(&blob[from..from + out.len()]);
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.disk.block_size as u64;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / bs;
            let within = (at % bs) as usize;
            let n = (bs as usize - within).min(buf.len() - pos);
            let page = self.page((block / PAGE_BLOCKS as u64) as usize)?;
            let id = page[(block % PAGE_BLOCKS as u64) as usize];
            let out = &mut buf[pos..pos + n];
            if id.is_zero() {
                out.fill(0);
            } else {
                self.block(&id, block, out, within)?;
            }
            pos += n;
        }
        Ok(())
    }
}

impl Export for PointDisk {
    fn size(&self) -> u64 {
        self.disk.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf).map_err(|e| io::Error::other(format!("{e:#}")))
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let bs = self.disk.block_size as u64;
        let end = (offset + len).min(self.disk.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end && runs.len() < 4096 {
            let block = at / bs;
            let page =
                self.page((block / PAGE_BLOCKS as u64) as usize).map_err(|e| io::Error::other(format!("{e:#}")))?;
            let zero = page[(block % PAGE_BLOCKS as u64) as usize].is_zero();
            let next = ((block + 1) * bs).min(end);
            match runs.last_mut() {
                Some((l, z)) if *z == zero => *l += next - at,
                _ => runs.push((next - at, zero)),
            }
            at = next;
        }
        Ok(runs)
    }
}
