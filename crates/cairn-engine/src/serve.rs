//! Restore points as NBD exports: any disk of a point, read block by block straight from the
//! repository, every block checked against its hash. Instant recovery boots VMs from these.

use anyhow::{bail, Result};
use cairn_nbd::server::Export;
use cairn_repo::map::PAGE_BLOCKS;
use cairn_repo::{BlockId, DiskImage, Repository};
use lru::LruCache;
use std::collections::VecDeque;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Decoded frames kept: reads of neighbouring blocks (a guest booting, a sequential copy) hit
/// the same 1 MiB frame, which is then read and decompressed once.
const CACHED_FRAMES: usize = 64;
/// Map pages kept, the most recently used: 8 MiB (128 KiB each, 256 MiB of disk each at 64 KiB
/// blocks), however large the disk and however long the server runs.
const CACHED_PAGES: NonZeroUsize = NonZeroUsize::new(64).unwrap();

type FrameKey = ([u8; 32], u32);

pub struct PointDisk {
    repo: Arc<Repository>,
    disk: DiskImage,
    pages: Mutex<LruCache<usize, Arc<Vec<BlockId>>>>,
    frames: Mutex<VecDeque<(FrameKey, Arc<Vec<u8>>)>>,
    /// Bytes read from the repository (stored frames and map pages), for read amplification.
    stored_read: AtomicU64,
}

impl PointDisk {
    pub fn new(repo: Arc<Repository>, disk: DiskImage) -> PointDisk {
        PointDisk {
            repo,
            disk,
            pages: Mutex::new(LruCache::new(CACHED_PAGES)),
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

    /// The disk's block size; 0 (a damaged point) is an error for every read.
    fn block_size(&self) -> Result<u64> {
        match self.disk.block_size {
            0 => bail!("disk {} of the restore point has a block size of 0 (damaged point)", self.disk.name),
            bs => Ok(bs as u64),
        }
    }

    /// The block ID of `block`, from its map page.
    fn block_id(&self, block: u64) -> Result<BlockId> {
        let page = self.page((block / PAGE_BLOCKS as u64) as usize)?;
        page.get((block % PAGE_BLOCKS as u64) as usize)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("block {block} is past the end of disk {}", self.disk.name))
    }

    /// Map page `p` (the repository checks it lists exactly the blocks of its part of the disk).
    fn page(&self, p: usize) -> Result<Arc<Vec<BlockId>>> {
        if let Some(page) = self.pages.lock().unwrap().get(&p) {
            return Ok(page.clone());
        }
        self.block_size()?;
        let page = self.repo.read_map_page(&self.disk, p)?;
        self.stored_read.fetch_add(page.len() as u64 * 32, Ordering::Relaxed);
        let page = Arc::new(page);
        self.pages.lock().unwrap().put(p, page.clone());
        Ok(page)
    }

    /// The block's bytes, hash-checked: from its first copy through the frame cache, or when
    /// that copy is missing or damaged, from any other sound copy.
    fn block(&self, id: &BlockId, block: u64, out: &mut [u8], from: usize) -> Result<()> {
        let at = block * self.disk.block_size as u64;
        match self.first_copy(id) {
            Some((frame, range)) => self.copy_part(id, at, &frame[range], out, from),
            None => {
                // The first copy is damaged (another copy, then quarantined ones), or there is
                // none but quarantined ones.
                let first = self.repo.index().get(id).map(|l| l.pack);
                let blob = match first {
                    Some(pack) => self.repo.read_other_copy(id, &pack).ok_or_else(|| {
                        anyhow::anyhow!(
                            "block {} at disk offset {at} is damaged (content does not match its hash) and no other copy is sound",
                            id.to_hex()
                        )
                    })?,
                    None => self
                        .repo
                        .read_blob(id, &format!("disk offset {at}"))
                        .map_err(|e| anyhow::anyhow!("block {} at disk offset {at}: {e}", id.to_hex()))?,
                };
                self.copy_part(id, at, &blob, out, from)
            }
        }
    }

    /// The first copy of a block, through the frame cache, if it exists and matches its ID.
    fn first_copy(&self, id: &BlockId) -> Option<(Arc<Vec<u8>>, std::ops::Range<usize>)> {
        let loc = self.repo.index().get(id)?;
        let key = (loc.pack, loc.frame_offset);
        let cached = self.frames.lock().unwrap().iter().find(|(k, _)| *k == key).map(|(_, f)| f.clone());
        let frame = match cached {
            Some(f) => f,
            None => {
                let f = Arc::new(self.repo.read_frame(&loc).ok()?);
                self.stored_read.fetch_add(loc.frame_stored_len as u64, Ordering::Relaxed);
                let mut frames = self.frames.lock().unwrap();
                if frames.len() == CACHED_FRAMES {
                    frames.pop_front();
                }
                frames.push_back((key, f.clone()));
                f
            }
        };
        let range = loc.raw_offset as usize..loc.raw_offset as usize + loc.len as usize;
        let sound = frame.get(range.clone()).is_some_and(|blob| self.repo.crypto().block_id(blob) == *id);
        sound.then_some((frame, range))
    }

    /// Copies the part of a (checked) block the read wants.
    fn copy_part(&self, id: &BlockId, at: u64, blob: &[u8], out: &mut [u8], from: usize) -> Result<()> {
        let Some(part) = blob.get(from..from + out.len()) else {
            bail!(
                "block {} at disk offset {at} holds {} bytes, fewer than the disk needs (damaged point)",
                id.to_hex(),
                blob.len()
            );
        };
        out.copy_from_slice(part);
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.block_size()?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / bs;
            let within = at % bs;
            let n = (bs - within).min((buf.len() - pos) as u64) as usize;
            let id = self.block_id(block)?;
            let out = &mut buf[pos..pos + n];
            if id.is_zero() {
                out.fill(0);
            } else {
                self.block(&id, block, out, within as usize)?;
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
        let failed = |e: anyhow::Error| io::Error::other(format!("{e:#}"));
        let bs = self.block_size().map_err(failed)?;
        let end = offset.saturating_add(len).min(self.disk.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end && runs.len() < 4096 {
            let block = at / bs;
            let zero = self.block_id(block).map_err(failed)?.is_zero();
            let next = (block + 1).saturating_mul(bs).min(end);
            match runs.last_mut() {
                Some((l, z)) if *z == zero => *l += next - at,
                _ => runs.push((next - at, zero)),
            }
            at = next;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_repo::crypto::Compressor;
    use cairn_repo::pack::{BlobEntry, BlobKind, SealedFrame};
    use cairn_repo::{DiskStats, PointStats, RestorePoint, Session};

    const BS: u32 = 4096;

    /// A repository holding data blocks `blobs` and map `pages`, committed under a point whose
    /// one disk has `size` bytes of `block_size`; returns the disk, served.
    fn point_disk(
        dir: &std::path::Path,
        blobs: &[&[u8]],
        pages: &[Vec<BlockId>],
        size: u64,
        block_size: u32,
    ) -> PointDisk {
        let backend = Arc::new(cairn_storage::LocalBackend::new(dir));
        let repo = Arc::new(Repository::init(backend, None).unwrap());
        let mut session = Session::new(repo.clone());
        let mut c = Compressor::new(3);
        for raw in blobs {
            let id = repo.crypto().block_id(raw);
            let blob = BlobEntry { kind: BlobKind::Data, id, raw_offset: 0, len: raw.len() as u32 };
            session.add_frame(SealedFrame::build(repo.crypto(), &mut c, raw, vec![blob])).unwrap();
        }
        let map = pages.iter().map(|p| session.store_map_page(p).unwrap().to_hex()).collect();
        let disk = DiskImage {
            name: "disk0".into(),
            size,
            block_size,
            source: "test".into(),
            map,
            stats: DiskStats::default(),
            role: None,
            path: None,
        };
        let mut point = RestorePoint {
            version: 1,
            name: "t".into(),
            time: "2026-01-01T00:00:00Z".into(),
            hostname: "h".into(),
            source: "test".into(),
            parent: None,
            disks: vec![disk.clone()],
            metadata: serde_json::Value::Null,
            stats: PointStats::default(),
            locked_until: None,
        };
        session.commit(&mut point).unwrap();
        repo.load_index().unwrap();
        PointDisk::new(repo, disk)
    }

    fn read(disk: &PointDisk, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        disk.read_at(offset, &mut buf).map(|()| buf)
    }

    /// A block's ID in a plain repository (what `point_disk` makes).
    fn id(raw: &[u8]) -> BlockId {
        cairn_repo::crypto::Crypto::Plain.block_id(raw)
    }

    #[test]
    fn reads_blocks_and_holes_across_a_page_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![0xa5u8; BS as usize];
        let blocks = PAGE_BLOCKS as u64 + 2;
        let ida = id(&a);
        let mut first = vec![BlockId::ZERO; PAGE_BLOCKS];
        first[PAGE_BLOCKS - 1] = ida;
        let disk = point_disk(dir.path(), &[&a], &[first, vec![ida, BlockId::ZERO]], blocks * BS as u64, BS);
        let at = (PAGE_BLOCKS as u64 - 1) * BS as u64 + 100;
        let got = read(&disk, at, 2 * BS as usize).unwrap();
        assert!(got[..2 * BS as usize - 100].iter().all(|&b| b == 0xa5));
        assert!(got[2 * BS as usize - 100..].iter().all(|&b| b == 0));
        assert_eq!(read(&disk, 0, 10).unwrap(), vec![0; 10]);
        let ext = disk.extents(0, blocks * BS as u64).unwrap();
        assert_eq!(ext, vec![((PAGE_BLOCKS as u64 - 1) * BS as u64, true), (2 * BS as u64, false), (BS as u64, true)]);
    }

    #[test]
    fn a_block_size_of_zero_is_an_error_not_a_division() {
        let dir = tempfile::tempdir().unwrap();
        let disk = point_disk(dir.path(), &[], &[vec![BlockId::ZERO]], 4096, 0);
        let e = read(&disk, 0, 512).unwrap_err();
        assert!(e.to_string().contains("block size of 0"), "{e}");
        assert!(disk.extents(0, 4096).is_err());
    }

    #[test]
    fn a_map_page_shorter_or_longer_than_its_part_of_the_disk_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // Three blocks on the disk, one in its only page: reading the third must not index past it.
        let short = point_disk(dir.path(), &[], &[vec![BlockId::ZERO]], 3 * BS as u64, BS);
        let e = read(&short, 2 * BS as u64, 512).unwrap_err();
        assert!(e.to_string().contains("holds 1 block IDs where 3 are needed"), "{e}");
        assert!(short.extents(0, 3 * BS as u64).is_err());
        let dir = tempfile::tempdir().unwrap();
        let long = point_disk(dir.path(), &[], &[vec![BlockId::ZERO; 5]], 3 * BS as u64, BS);
        let e = read(&long, 0, 512).unwrap_err();
        assert!(e.to_string().contains("holds 5 block IDs where 3 are needed"), "{e}");
    }

    #[test]
    fn a_block_shorter_than_its_place_on_the_disk_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let small = vec![7u8; 100];
        let disk = point_disk(dir.path(), &[&small], &[vec![id(&small)]], BS as u64, BS);
        assert_eq!(read(&disk, 0, 100).unwrap(), small, "the bytes it has still read");
        let e = read(&disk, 0, BS as usize).unwrap_err();
        assert!(e.to_string().contains("holds 100 bytes"), "{e}");
    }

    #[test]
    fn the_page_cache_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pages = CACHED_PAGES.get() + 10;
        let map: Vec<Vec<BlockId>> = (0..pages).map(|_| vec![BlockId::ZERO; PAGE_BLOCKS]).collect();
        let disk = point_disk(dir.path(), &[], &map, (pages * PAGE_BLOCKS) as u64 * BS as u64, BS);
        for p in 0..pages {
            read(&disk, (p * PAGE_BLOCKS) as u64 * BS as u64, 1).unwrap();
        }
        assert_eq!(disk.pages.lock().unwrap().len(), CACHED_PAGES.get());
    }
}
