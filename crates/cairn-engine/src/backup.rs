//! The backup pipeline: one disk at a time, every block read once, hashed, deduplicated and
//! compressed in parallel, and the image map built in disk order.
//!
//! ```text
//!  planner/reader ──batches──▶ workers (N) ──results──▶ collector ──frames──▶ session
//!  (allocation, changed       (zero check, BLAKE3,      (reorders, builds    (packs, index,
//!   ranges, reads ahead)       dedup claim, zstd,        map pages)           point)
//!                              encryption)
//! ```
//! A batch is 16 blocks (1 MiB): its new blocks are compressed together as one frame, which
//! keeps zstd's ratio close to whole-file compression while dedup stays at 64 KiB.

use crate::pool::{self, Pool};
use crate::progress::{check_cancelled, Progress};
use crate::ranges::{Range, RangeCursor};
use crate::source::{Allocation, Extent, Source};
use anyhow::{bail, Context, Result};
use cairn_repo::crypto::Compressor;
use cairn_repo::map::PAGE_BLOCKS;
use cairn_repo::pack::{BlobEntry, BlobKind, SealedFrame};
use cairn_repo::{
    is_all_zero, BlockId, Claims, DiskImage, DiskStats, PointId, PointStats, Repository, RestorePoint, Session,
};
use crossbeam_channel::bounded;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Blocks per batch (and at most per frame).
pub const BATCH_BLOCKS: usize = 16;
/// Reads kept in flight ahead of the workers.
const READ_AHEAD_BYTES: usize = 16 << 20;
/// Allocation is asked for in windows of this size, so memory does not grow with the disk.
const ALLOCATION_WINDOW: u64 = 1 << 30;

/// One disk to back up.
pub struct DiskInput {
    pub name: String,
    pub source: Box<dyn Source>,
    /// Only these ranges changed since the parent point; every other block comes from it.
    pub changed: Option<Vec<Range>>,
    /// Ranges not worth reading (swap): blocks wholly inside are recorded as zeros. Normalized.
    pub skip: Vec<Range>,
    /// See [`DiskImage::role`].
    pub role: Option<String>,
    /// See [`DiskImage::path`].
    pub path: Option<String>,
}

impl DiskInput {
    pub fn new(name: &str, source: Box<dyn Source>) -> DiskInput {
        DiskInput { name: name.to_string(), source, changed: None, skip: Vec::new(), role: None, path: None }
    }
}

pub struct BackupOptions {
    /// The restore point's name (image or VM name).
    pub name: String,
    pub compression_level: i32,
    pub workers: usize,
    /// Free-form metadata stored in the point (VM configuration, for instance).
    pub metadata: serde_json::Value,
    /// The point changed ranges are relative to (required when any disk has `changed`).
    pub parent: Option<(PointId, RestorePoint)>,
    /// Images taken over unchanged from the parent point (files that did not change): their
    /// blocks are already durable, so nothing is read.
    pub carry: Vec<DiskImage>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            name: String::new(),
            compression_level: cairn_repo::crypto::DEFAULT_LEVEL,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            metadata: serde_json::Value::Null,
            parent: None,
            carry: Vec::new(),
        }
    }
}

/// Backs up disks as one restore point. Returns the point's ID and the point.
pub fn backup(
    repo: &Arc<Repository>,
    disks: Vec<DiskInput>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint)> {
    backup_with(repo, disks, opts, progress, |_| Ok(()))
}

/// [`backup`], with a last look at the point once every block is stored and before the point is
/// written (the VM job ends its export there and records when the data was copied).
pub fn backup_with(
    repo: &Arc<Repository>,
    disks: Vec<DiskInput>,
    opts: &BackupOptions,
    progress: &dyn Progress,
    finalize: impl FnOnce(&mut RestorePoint) -> Result<()>,
) -> Result<(PointId, RestorePoint)> {
    let started = Instant::now();
    let time = cairn_repo::now_rfc3339();
    let mut session = Session::new(repo.clone());
    let mut images = Vec::new();
    let mut totals = DiskStats::default();
    let mut sources = Vec::new();
    let mut changed_mode = false;
    for mut d in disks {
        let parent_disk = match (&d.changed, &opts.parent) {
            (None, _) => None,
            (Some(_), None) => {
                bail!("changed ranges for disk {} need a previous restore point of {}", d.name, opts.name)
            }
            (Some(_), Some((pid, p))) => {
                let pd = p.disks.iter().find(|x| x.name == d.name && x.role == d.role).with_context(|| {
                    format!("the previous restore point {} has no disk {}: run a full backup", pid.short(), d.name)
                })?;
                if pd.size != d.source.size() {
                    bail!(
                        "disk {} was {} bytes at the previous restore point {} and is {} bytes now; changed ranges cannot describe a resize, so run a full backup (without changed ranges)",
                        d.name,
                        pd.size,
                        pid.short(),
                        d.source.size()
                    );
                }
                if pd.block_size != repo.block_size() {
                    bail!("the previous restore point uses another block size; run a full backup");
                }
                changed_mode = true;
                Some(pd.clone())
            }
        };
        sources.push(d.source.describe());
        let image = backup_disk(repo, &mut session, &mut d, parent_disk.as_ref(), opts, progress)?;
        totals.add(&image.stats);
        images.push(image);
    }
    for c in &opts.carry {
        let mut image = c.clone();
        image.stats = DiskStats { logical_bytes: c.size, unchanged_bytes: c.size, ..Default::default() };
        totals.add(&image.stats);
        images.push(image);
    }
    let mut point = RestorePoint {
        version: 1,
        name: opts.name.clone(),
        time,
        hostname: repo.hostname().to_string(),
        source: sources.join(", "),
        parent: if changed_mode { opts.parent.as_ref().map(|(id, _)| id.clone()) } else { None },
        disks: images,
        metadata: opts.metadata.clone(),
        stats: PointStats {
            totals,
            repository_growth_bytes: 0,
            duration_ms: 0,
            mode: if changed_mode { "changed-ranges" } else { "full" }.into(),
        },
        locked_until: None,
    };
    finalize(&mut point)?;
    point.stats.duration_ms = started.elapsed().as_millis() as u64;
    let id = session.commit(&mut point)?;
    Ok((id, point))
}

#[derive(Clone, Copy)]
enum Plan {
    Zero,
    /// Not worth reading (swap): stored as zeros.
    Skip,
    Keep(BlockId),
    Read,
}

struct Batch {
    seq: u64,
    plans: Vec<Plan>,
    lens: Vec<u32>,
    /// Block data at `i * block_size`; blocks not read stay zero-filled.
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    ids: Vec<BlockId>,
    frame: Option<SealedFrame>,
    stats: DiskStats,
    bytes: u64,
}

fn backup_disk(
    repo: &Arc<Repository>,
    session: &mut Session,
    disk: &mut DiskInput,
    parent: Option<&DiskImage>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<DiskImage> {
    let bs = repo.block_size() as u64;
    let size = disk.source.size();
    let nblocks = size.div_ceil(bs);
    let describe = disk.source.describe();
    let claims = session.claims();
    progress.start(&format!("backup {}", disk.name), size);

    let (work_tx, work_rx) = bounded::<Batch>(opts.workers * 2);
    let (done_tx, done_rx) = bounded::<Done>(opts.workers * 2);
    let changed = disk.changed.clone();
    let skip = std::mem::take(&mut disk.skip);
    let source = &mut disk.source;
    let data_pool = Pool::new(opts.workers * 4 + READ_AHEAD_BYTES / (BATCH_BLOCKS * bs as usize) + 4);
    let frame_pool = Pool::new(opts.workers * 4 + 4);

    let (map, stats) = std::thread::scope(|s| -> Result<(Vec<String>, DiskStats)> {
        let pool = data_pool.clone();
        let planner = s.spawn(move || {
            plan_and_read(repo, source.as_mut(), parent, changed.as_deref(), &skip, bs, nblocks, work_tx, &pool)
        });
        for _ in 0..opts.workers.max(1) {
            let rx = work_rx.clone();
            let tx = done_tx.clone();
            let claims = claims.clone();
            let level = opts.compression_level;
            let (data_pool, frame_pool) = (data_pool.clone(), frame_pool.clone());
            s.spawn(move || {
                let mut w = Worker { comp: Compressor::new(level), raw: Vec::new(), frames: frame_pool };
                for mut b in rx {
                    let done = w.process(repo, &claims, &mut b, bs as usize);
                    data_pool.put(std::mem::take(&mut b.data));
                    if tx.send(done).is_err() {
                        break;
                    }
                }
            });
        }
        drop(work_rx);
        drop(done_tx);

        // Collector: apply results in order.
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut page: Vec<BlockId> = Vec::with_capacity(PAGE_BLOCKS);
        let mut map = Vec::new();
        let mut stats = DiskStats { logical_bytes: size, ..Default::default() };
        let collected = (|| -> Result<()> {
            for d in done_rx.iter() {
                pending.insert(d.seq, d);
                while let Some(d) = pending.remove(&next) {
                    next += 1;
                    stats.add(&d.stats);
                    progress.advance(d.bytes);
                    check_cancelled(progress, || format!("backing up disk {}", disk.name))?;
                    if let Some(f) = d.frame {
                        stats.stored_bytes += f.stored.len() as u64;
                        frame_pool.put(session.add_frame(f)?);
                    }
                    for id in d.ids {
                        page.push(id);
                        if page.len() == PAGE_BLOCKS {
                            map.push(session.store_map_page(&page)?.to_hex());
                            page.clear();
                        }
                    }
                }
            }
            Ok(())
        })();
        drop(done_rx); // unblocks workers if we stopped early
        let planned = planner.join().expect("planner panicked");
        collected?;
        planned?;
        if next != nblocks.div_ceil(BATCH_BLOCKS as u64) {
            bail!("internal error: {next} batches collected for {nblocks} blocks");
        }
        if !page.is_empty() {
            map.push(session.store_map_page(&page)?.to_hex());
        }
        Ok((map, stats))
    })?;
    disk.source.finish()?;
    progress.finish();
    Ok(DiskImage {
        name: disk.name.clone(),
        size,
        block_size: bs as u32,
        source: describe,
        map,
        stats,
        role: disk.role.clone(),
        path: disk.path.clone(),
    })
}

/// Tells, block by block, whether the allocation map says a block reads as zeros; asks the
/// source window by window.
struct AllocCursor {
    extents: Vec<Extent>,
    idx: usize,
    window_end: u64,
    size: u64,
}

impl AllocCursor {
    fn is_zero(&mut self, src: &mut dyn Source, start: u64, end: u64) -> Result<bool> {
        if end > self.window_end {
            // Re-query from the block's start: windows are block-aligned, so one query covers it.
            let len = ALLOCATION_WINDOW.min(self.size - start);
            self.extents = src.allocation(start, len)?;
            self.idx = 0;
            self.window_end = start + len;
            if self.extents.iter().map(|e| e.length).sum::<u64>() != len {
                bail!("{} reported an allocation map that does not cover {start}..{}", src.describe(), start + len);
            }
        }
        while self.idx < self.extents.len() && self.extents[self.idx].offset + self.extents[self.idx].length <= start {
            self.idx += 1;
        }
        let mut pos = start;
        for e in &self.extents[self.idx..] {
            if e.offset > pos || e.kind != Allocation::Zero {
                return Ok(false);
            }
            pos = e.offset + e.length;
            if pos >= end {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The parent point's map, read page by page as the planner walks the disk.
struct ParentMap<'a> {
    repo: &'a Repository,
    disk: &'a DiskImage,
    page_no: usize,
    page: Vec<BlockId>,
}

impl ParentMap<'_> {
    fn get(&mut self, block: u64) -> Result<BlockId> {
        let p = (block / PAGE_BLOCKS as u64) as usize;
        if p != self.page_no || self.page.is_empty() {
            self.page = self.repo.read_map_page(self.disk, p).context("reading the previous restore point's map")?;
            self.page_no = p;
        }
        self.page
            .get(block as usize % PAGE_BLOCKS)
            .copied()
            .with_context(|| format!("the previous restore point's map is too short (block {block})"))
    }
}

fn plan_and_read(
    repo: &Repository,
    src: &mut dyn Source,
    parent: Option<&DiskImage>,
    changed: Option<&[Range]>,
    skip: &[Range],
    bs: u64,
    nblocks: u64,
    tx: crossbeam_channel::Sender<Batch>,
    pool: &Pool,
) -> Result<()> {
    let size = src.size();
    let mut alloc = AllocCursor { extents: vec![], idx: 0, window_end: 0, size };
    let mut changed = changed.map(RangeCursor::new);
    let mut skip = RangeCursor::new(skip);
    let mut parent = parent.map(|disk| ParentMap { repo, disk, page_no: 0, page: vec![] });
    // Batches whose reads are submitted, oldest first, with their runs (block index, count).
    // Runs are (first block, block count, bytes charged): read-ahead is charged by buffer
    // capacity, since a recycled 1 MiB buffer may carry a 64 KiB read.
    let mut inflight: VecDeque<(Batch, Vec<(usize, usize, usize)>)> = VecDeque::new();
    let mut inflight_bytes = 0usize;
    let mut seq = 0u64;
    let mut first = 0u64;
    while first < nblocks || !inflight.is_empty() {
        if first < nblocks && inflight_bytes < READ_AHEAD_BYTES {
            let count = (nblocks - first).min(BATCH_BLOCKS as u64) as usize;
            let mut plans = Vec::with_capacity(count);
            let mut lens = Vec::with_capacity(count);
            for b in first..first + count as u64 {
                let start = b * bs;
                let end = (start + bs).min(size);
                lens.push((end - start) as u32);
                let unchanged = changed.as_mut().is_some_and(|c| !c.intersects(start, end));
                let plan = match parent.as_mut() {
                    _ if skip.covers(start, end) => Plan::Skip,
                    // A block the index no longer has (its only copy was quarantined as
                    // damaged) is read again from the source: that heals the repository.
                    Some(p) if unchanged => match p.get(b)? {
                        id if id.is_zero() || repo.index().reusable(&id) => Plan::Keep(id),
                        _ if alloc.is_zero(src, start, end)? => Plan::Zero,
                        _ => Plan::Read,
                    },
                    _ if alloc.is_zero(src, start, end)? => Plan::Zero,
                    _ => Plan::Read,
                };
                plans.push(plan);
            }
            // Contiguous blocks to read become one request each.
            let mut runs = Vec::new();
            let mut i = 0;
            while i < count {
                if matches!(plans[i], Plan::Read) {
                    let j = (i..count).find(|&j| !matches!(plans[j], Plan::Read)).unwrap_or(count);
                    let off = (first + i as u64) * bs;
                    let len: u64 = lens[i..j].iter().map(|&l| l as u64).sum();
                    let buf = pool.get();
                    let charged = buf.capacity().max(len as usize);
                    src.submit(off, len as usize, buf)?;
                    inflight_bytes += charged;
                    runs.push((i, j - i, charged));
                    i = j;
                } else {
                    i += 1;
                }
            }
            inflight.push_back((Batch { seq, plans, lens, data: Vec::new() }, runs));
            seq += 1;
            first += count as u64;
            continue;
        }
        let (mut batch, runs) = inflight.pop_front().unwrap();
        let total: usize = batch.lens.iter().map(|&l| l as usize).sum();
        for (i, n, charged) in runs {
            let data = src.next()?;
            inflight_bytes -= charged;
            if i == 0 && n == batch.plans.len() {
                batch.data = data; // the whole batch in one read: no copy
            } else {
                if batch.data.is_empty() {
                    // Blocks not read (zero, unchanged) are never looked at: no zeroing.
                    batch.data = pool.get();
                    pool::set_len(&mut batch.data, total);
                }
                let at = i * bs as usize;
                batch.data[at..at + data.len()].copy_from_slice(&data);
                pool.put(data);
            }
        }
        if tx.send(batch).is_err() {
            return Ok(()); // the collector stopped; it reports why
        }
    }
    Ok(())
}

/// A worker thread's reusable state.
struct Worker {
    comp: Compressor,
    /// Gathers the new blocks of a batch that also holds old or zero blocks.
    raw: Vec<u8>,
    frames: Pool,
}

impl Worker {
    fn process(&mut self, repo: &Repository, claims: &Claims, b: &mut Batch, bs: usize) -> Done {
        let crypto = repo.crypto();
        let mut ids = Vec::with_capacity(b.plans.len());
        let mut stats = DiskStats::default();
        let mut blobs = Vec::new();
        let mut all_new = true;
        let mut bytes = 0u64;
        for (i, plan) in b.plans.iter().enumerate() {
            let len = b.lens[i] as usize;
            bytes += len as u64;
            match plan {
                Plan::Zero => {
                    stats.zero_bytes += len as u64;
                    ids.push(BlockId::ZERO);
                    all_new = false;
                }
                Plan::Skip => {
                    stats.skipped_bytes += len as u64;
                    ids.push(BlockId::ZERO);
                    all_new = false;
                }
                Plan::Keep(id) => {
                    stats.unchanged_bytes += len as u64;
                    ids.push(*id);
                    all_new = false;
                }
                Plan::Read => {
                    let data = &b.data[i * bs..i * bs + len];
                    stats.read_bytes += len as u64;
                    if is_all_zero(data) {
                        stats.zero_bytes += len as u64;
                        ids.push(BlockId::ZERO);
                        all_new = false;
                        continue;
                    }
                    let id = crypto.block_id(data);
                    if claims.claim(&id) {
                        blobs.push((i, BlobEntry { kind: BlobKind::Data, id, raw_offset: 0, len: len as u32 }));
                        stats.new_bytes += len as u64;
                        stats.new_blocks += 1;
                    } else {
                        stats.dedup_bytes += len as u64;
                        all_new = false;
                    }
                    ids.push(id);
                }
            }
        }
        let frame = if blobs.is_empty() {
            None
        } else if all_new {
            // Every block is new and read: the batch buffer is the frame, no copy.
            let blobs = blobs.into_iter().map(|(i, e)| BlobEntry { raw_offset: (i * bs) as u32, ..e }).collect();
            let total = b.lens.iter().map(|&l| l as usize).sum();
            Some(SealedFrame::build_into(crypto, &mut self.comp, &b.data[..total], blobs, self.frames.get()))
        } else {
            self.raw.clear();
            let mut entries = Vec::with_capacity(blobs.len());
            for (i, e) in blobs {
                entries.push(BlobEntry { raw_offset: self.raw.len() as u32, ..e });
                self.raw.extend_from_slice(&b.data[i * bs..i * bs + e.len as usize]);
            }
            Some(SealedFrame::build_into(crypto, &mut self.comp, &self.raw, entries, self.frames.get()))
        };
        Done { seq: b.seq, ids, frame, stats, bytes }
    }
}
