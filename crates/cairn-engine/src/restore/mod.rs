//! Restore: a disk of a restore point back into an image file, every block checked against
//! its hash before it is written.
//!
//! ```text
//!  planner ──frame jobs──▶ workers (N) ──verified frames──▶ writer (target)
//!  (walks map pages,       (decrypt, decompress,           (pwrite / NBD write;
//!   groups blocks by        BLAKE3 check)                    zeros stay holes)
//!   frame, starts span          ▲
//!   reads)  ──spans──▶ fetchers ┘ (large reads of pack spans, around the page cache)
//! ```

mod fetch;

use crate::pool::Pool;
use crate::progress::{check_cancelled, Progress};
use crate::target::{self, Target, TargetFormat};
use anyhow::{bail, Context, Result};
use cairn_repo::map::PAGE_BLOCKS;
use cairn_repo::PointId;
use cairn_repo::{BlobLocation, BlockId, DiskImage, Repository, RestorePoint};
use crossbeam_channel::bounded;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct RestoreOptions {
    pub format: TargetFormat,
    pub force: bool,
    pub workers: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub disk: String,
    pub size: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub frames_read: u64,
    pub stored_bytes_read: u64,
    pub duration_ms: u64,
}

struct Item {
    id: BlockId,
    raw_offset: u32,
    len: u32,
    disk_offset: u64,
}

/// A decoded, hash-checked frame: its bytes, the blocks to write from it, its stored size.
type Decoded = (Vec<u8>, Vec<Item>, u32);

struct FrameJob {
    /// Position in disk order: the writer puts frames back in this order so the device sees
    /// long sequential writes.
    seq: u64,
    loc: BlobLocation,
    items: Vec<Item>,
}

/// Bytes of a disk image that hold data (what a restore writes); reads every map page.
pub fn data_bytes(repo: &Repository, disk: &DiskImage) -> Result<u64> {
    Ok((count_data_blocks(repo, disk)? * disk.block_size as u64).min(disk.size))
}

/// Counts the blocks that hold data (checks every map page on the way).
fn count_data_blocks(repo: &Repository, disk: &DiskImage) -> Result<u64> {
    let mut n = 0;
    for p in 0..disk.map.len() {
        n += repo.read_map_page(disk, p)?.iter().filter(|id| !id.is_zero()).count() as u64;
    }
    Ok(n)
}

/// Whether a block of a decoded frame matches its ID.
fn block_matches(repo: &Repository, frame: &[u8], it: &Item) -> bool {
    let start = it.raw_offset as usize;
    frame.get(start..start + it.len as usize).is_some_and(|b| repo.crypto().block_id(b) == it.id)
}

/// Rebuilds `frame` from sound copies of its blocks held in other packs (the copy at `loc` is
/// damaged), laying them out one after another and pointing `items` at them. False when some
/// block has no sound copy elsewhere.
fn from_other_copies(repo: &Repository, loc: &BlobLocation, items: &mut [Item], frame: &mut Vec<u8>) -> bool {
    let mut rebuilt = Vec::new();
    for it in items.iter_mut() {
        let Some(blob) = repo.read_other_copy(&it.id, &loc.pack) else { return false };
        it.raw_offset = rebuilt.len() as u32;
        it.len = blob.len() as u32;
        rebuilt.extend_from_slice(&blob);
    }
    *frame = rebuilt;
    true
}

/// Restores `disk` of a point into the file or device `to` (see [`target::create`]).
pub fn restore_disk(
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    disk: &DiskImage,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let make = |size, block_size, data_bytes| target::create(to, size, block_size, data_bytes, opts.format, opts.force);
    restore_disk_into(repo, point_id, point, disk, &make, opts, progress)
}

/// Makes the target of a restore from (disk size, block size, bytes of data to write).
pub type MakeTarget<'a> = dyn Fn(u64, u64, u64) -> Result<Box<dyn Target>> + 'a;

/// Restores `disk` of a point into the target `make` gives (an image on another host, say).
pub fn restore_disk_into(
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    disk: &DiskImage,
    make: &MakeTarget<'_>,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    // The point was checked when loaded (FORMAT.md §7): block size and map pages fit the disk.
    let bs = disk.block_size as u64;
    let data_blocks = count_data_blocks(repo, disk).with_context(|| {
        format!("restore point {} ({} of {}) cannot be read", point_id.short(), point.name, point.time)
    })?;
    let data_bytes = data_blocks * bs;
    let mut target = make(disk.size, bs, data_bytes.min(disk.size))?;
    progress.start(&format!("restore {}", disk.name), data_bytes.min(disk.size));

    // More readers than cores: a reader waiting on a pack read must not leave a core idle.
    let readers = opts.workers.max(1) + 2;
    // Jobs are small: a deep queue keeps the span reads well ahead of the workers.
    let (job_tx, job_rx) = bounded::<(FrameJob, Arc<fetch::SpanSlot>)>(256);
    let (out_tx, out_rx) = bounded::<(u64, Result<Decoded>)>(readers * 4);
    // A reader takes a token before a job and the writer returns it once the frame is written:
    // at most this many decoded frames wait, whatever order they finish in.
    let in_flight = readers * 4;
    let (token_tx, token_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        token_tx.send(()).unwrap();
    }
    let frame_pool = Pool::new(in_flight + 2);
    let describe_block = |id: &BlockId, off: u64| {
        format!(
            "block {} at offset {off} of disk {} in restore point {} ({} of {})",
            id.short(),
            disk.name,
            point_id.short(),
            point.name,
            point.time
        )
    };

    let mut report = RestoreReport { disk: disk.name.clone(), size: disk.size, ..Default::default() };
    let stopped = &AtomicBool::new(false);
    let result = std::thread::scope(|s| -> Result<()> {
        let depth = fetch::Depth::for_reads(repo.backend().reads_in_flight());
        let (mut windows, read_rx) = fetch::Windows::new(stopped, depth);
        for _ in 0..depth.fetchers {
            let (requests, pool) = (read_rx.clone(), windows.pool());
            s.spawn(move || fetch::fetch_spans(repo, requests, pool));
        }
        drop(read_rx);
        let planner = s.spawn(move || -> Result<()> {
            let index = repo.index();
            let mut job: Option<FrameJob> = None;
            let mut seq = 0u64;
            let mut send = |j: FrameJob, slot| job_tx.send((j, slot)).is_ok();
            for p in 0..disk.map.len() {
                let ids = repo.read_map_page(disk, p)?;
                for (i, id) in ids.iter().enumerate() {
                    if id.is_zero() {
                        continue;
                    }
                    let block = (p * PAGE_BLOCKS + i) as u64;
                    let disk_offset = block * bs;
                    // The first copy, or as a last resort a quarantined one (hash-checked
                    // like any other: verify may have quarantined it after a misread).
                    let loc = index.get(id).or_else(|| index.quarantined_copies(id).next()).with_context(|| {
                        if index.has_quarantined_copy(id) {
                            format!(
                                "{} is damaged (verify quarantined its only copy); back up its source again to heal it",
                                describe_block(id, disk_offset)
                            )
                        } else {
                            format!("{} is missing from the repository", describe_block(id, disk_offset))
                        }
                    })?;
                    let item = Item { id: *id, raw_offset: loc.raw_offset, len: loc.len, disk_offset };
                    match &mut job {
                        Some(j) if j.loc.pack == loc.pack && j.loc.frame_offset == loc.frame_offset => {
                            j.items.push(item)
                        }
                        _ => {
                            seq += 1;
                            if let Some(j) = job.replace(FrameJob { seq: seq - 1, loc, items: vec![item] }) {
                                let loc = j.loc;
                                if !windows.add(j, loc, &mut send) {
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
            }
            if let Some(j) = job {
                let loc = j.loc;
                windows.add(j, loc, &mut send);
            }
            windows.flush(&mut send);
            Ok(())
        });
        for _ in 0..readers {
            let rx = job_rx.clone();
            let tx = out_tx.clone();
            let tokens = token_rx.clone();
            let frame_pool = frame_pool.clone();
            s.spawn(move || {
                while tokens.recv().is_ok() {
                    let Ok((job, slot)) = rx.recv() else { break };
                    let seq = job.seq;
                    let r = (|| -> Result<Decoded> {
                        let mut frame = frame_pool.get();
                        let decoded = match slot.wait() {
                            Ok(span) => {
                                repo.decode_frame_into(&job.loc, span.frame(&job.loc), &mut frame).map_err(Into::into)
                            }
                            Err(e) => Err(anyhow::anyhow!("{e:#}")),
                        };
                        drop(slot);
                        let bad = match decoded {
                            Err(e) => Some((0, format!("{e}"))),
                            Ok(()) => job
                                .items
                                .iter()
                                .position(|it| !block_matches(repo, &frame, it))
                                .map(|i| (i, "its content does not match its hash".to_string())),
                        };
                        let mut items = job.items;
                        if let Some((i, problem)) = bad {
                            // This copy is damaged: take every block of the frame from another
                            // sound copy, or stop.
                            if !from_other_copies(repo, &job.loc, &mut items, &mut frame) {
                                bail!(
                                    "{} is damaged: {problem} (pack {}) and no other copy is sound; restore stopped",
                                    describe_block(&items[i].id, items[i].disk_offset),
                                    job.loc.pack_name()
                                );
                            }
                        }
                        Ok((frame, items, job.loc.frame_stored_len))
                    })();
                    let failed = r.is_err();
                    if tx.send((seq, r)).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(out_tx);
        drop(token_rx);
        let written = (|| -> Result<()> {
            let mut waiting: BTreeMap<u64, Decoded> = BTreeMap::new();
            let mut next = 0u64;
            for (seq, r) in out_rx.iter() {
                waiting.insert(seq, r?);
                while let Some((frame, items, stored_len)) = waiting.remove(&next) {
                    next += 1;
                    report.frames_read += 1;
                    report.stored_bytes_read += stored_len as u64;
                    // Merge blocks that are contiguous both in the frame and on the disk.
                    let mut i = 0;
                    while i < items.len() {
                        let mut j = i + 1;
                        let mut len = items[i].len as u64;
                        while j < items.len()
                            && items[j].disk_offset == items[i].disk_offset + len
                            && items[j].raw_offset as u64 == items[i].raw_offset as u64 + len
                        {
                            len += items[j].len as u64;
                            j += 1;
                        }
                        let start = items[i].raw_offset as usize;
                        let len = (len.min(disk.size - items[i].disk_offset)) as usize;
                        target.write_at(items[i].disk_offset, &frame[start..start + len])?;
                        report.data_bytes += len as u64;
                        progress.advance(len as u64);
                        i = j;
                    }
                    frame_pool.put(frame);
                    let _ = token_tx.send(());
                    check_cancelled(progress, || format!("restoring disk {}", disk.name))?;
                }
            }
            Ok(())
        })();
        // Readers blocked on a token or a send see these close and stop; so does the planner
        // waiting for span buffers that queued jobs hold.
        stopped.store(true, Ordering::Relaxed);
        drop(out_rx);
        drop(token_tx);
        let planned = planner.join().expect("planner panicked");
        written?;
        planned
    });
    if let Err(e) = result {
        target.abandon();
        return Err(e);
    }
    target.finish()?;
    progress.finish();
    report.zero_bytes = disk.size - report.data_bytes;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
