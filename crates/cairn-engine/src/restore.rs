//! Restore: a disk of a restore point back into an image file, every block checked against
//! its hash before it is written.
//!
//! ```text
//!  planner ──frame jobs──▶ workers (N) ──verified frames──▶ writer (target)
//!  (walks map pages,       (read frame, decrypt,           (pwrite / NBD write;
//!   groups blocks by        decompress, BLAKE3 check)        zeros stay holes)
//!   frame)
//! ```

use crate::progress::Progress;
use crate::target::{self, TargetFormat};
use anyhow::{bail, Context, Result};
use cairn_repo::map::PAGE_BLOCKS;
use cairn_repo::{BlobLocation, BlockId, DiskImage, Repository, RestorePoint};
use crossbeam_channel::bounded;
use serde::Serialize;
use std::path::Path;
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

struct FrameJob {
    loc: BlobLocation,
    items: Vec<Item>,
}

/// Counts the blocks that hold data (checks every map page on the way).
fn count_data_blocks(repo: &Repository, disk: &DiskImage) -> Result<u64> {
    let mut n = 0;
    for p in 0..disk.map.len() {
        n += repo.read_map_page(disk, p)?.iter().filter(|id| !id.is_zero()).count() as u64;
    }
    Ok(n)
}

pub fn restore_disk(
    repo: &Repository,
    point_id: &str,
    point: &RestorePoint,
    disk: &DiskImage,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let bs = disk.block_size as u64;
    let nblocks = disk.size.div_ceil(bs);
    if (disk.map.len() as u64) != cairn_repo::map::page_count(nblocks) {
        bail!(
            "restore point {} disk {} has {} map pages for {} blocks: the point is damaged",
            &point_id[..8],
            disk.name,
            disk.map.len(),
            nblocks
        );
    }
    let data_blocks = count_data_blocks(repo, disk)?;
    let data_bytes = data_blocks * bs;
    let mut target = target::create(to, disk.size, data_bytes.min(disk.size), opts.format, opts.force)?;
    progress.start(&format!("restore {}", disk.name), data_bytes.min(disk.size));

    let (job_tx, job_rx) = bounded::<FrameJob>(opts.workers * 4);
    let (out_tx, out_rx) = bounded::<Result<(Vec<u8>, Vec<Item>, u32)>>(opts.workers * 2);
    let describe_block = |id: &BlockId, off: u64| {
        format!(
            "block {} at offset {off} of disk {} in restore point {} ({} of {})",
            id.short(),
            disk.name,
            &point_id[..8],
            point.name,
            point.time
        )
    };

    let mut report = RestoreReport { disk: disk.name.clone(), size: disk.size, ..Default::default() };
    let result = std::thread::scope(|s| -> Result<()> {
        let planner = s.spawn(move || -> Result<()> {
            let index = repo.index();
            let mut job: Option<FrameJob> = None;
            for p in 0..disk.map.len() {
                let ids = repo.read_map_page(disk, p)?;
                for (i, id) in ids.iter().enumerate() {
                    if id.is_zero() {
                        continue;
                    }
                    let block = (p * PAGE_BLOCKS + i) as u64;
                    let disk_offset = block * bs;
                    let loc = index.get(id).with_context(|| {
                        format!("{} is missing from the repository", describe_block(id, disk_offset))
                    })?;
                    let item = Item { id: *id, raw_offset: loc.raw_offset, len: loc.len, disk_offset };
                    match &mut job {
                        Some(j) if j.loc.pack == loc.pack && j.loc.frame_offset == loc.frame_offset => {
                            j.items.push(item)
                        }
                        _ => {
                            if let Some(j) = job.replace(FrameJob { loc, items: vec![item] }) {
                                if job_tx.send(j).is_err() {
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
            }
            if let Some(j) = job {
                let _ = job_tx.send(j);
            }
            Ok(())
        });
        for _ in 0..opts.workers.max(1) {
            let rx = job_rx.clone();
            let tx = out_tx.clone();
            s.spawn(move || {
                for job in rx {
                    let r = (|| -> Result<(Vec<u8>, Vec<Item>, u32)> {
                        let first = &job.items[0];
                        let frame = repo.read_frame(&job.loc).map_err(|e| {
                            anyhow::anyhow!(
                                "{} is damaged: {e} (pack {})",
                                describe_block(&first.id, first.disk_offset),
                                job.loc.pack_name()
                            )
                        })?;
                        for it in &job.items {
                            let end = it.raw_offset as usize + it.len as usize;
                            if end > frame.len() || repo.crypto().block_id(&frame[it.raw_offset as usize..end]) != it.id
                            {
                                bail!(
                                    "{} is damaged: its content does not match its hash (pack {}); restore stopped",
                                    describe_block(&it.id, it.disk_offset),
                                    job.loc.pack_name()
                                );
                            }
                        }
                        Ok((frame, job.items, job.loc.frame_stored_len))
                    })();
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(out_tx);
        let written = (|| -> Result<()> {
            for r in out_rx.iter() {
                let (frame, items, stored_len) = r?;
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
            }
            Ok(())
        })();
        drop(out_rx);
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
