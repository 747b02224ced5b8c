//! Copying restore points between repositories (`cairn copy`), for offsite copies: only the
//! blocks and map pages the target lacks travel, checked against their IDs as they are read
//! from the source and sealed again with the target's keys (a frame whose every block goes is
//! re-encrypted as it is, not compressed again).
//!
//! Both repositories must name blocks alike (the same ID scheme: both unencrypted, or the
//! target made with `init --copy-from` so it shares the source's ID key while keeping its own
//! data key and password); then a block's ID is the same on both sides and the target's index
//! says what it already holds, across all its points.
//!
//! Order, as in a backup (FORMAT.md §8): the target's packs and index files are durable before
//! the copied point is written, so a copy killed at any moment leaves no point without data,
//! and what it stored is indexed (every 2 s) so the next run does not send it again. A copied
//! point records the source point's ID (`metadata.copied_from`), which makes a second copy of
//! the same point a no-op.

use crate::crypto::Compressor;
use crate::pack::{BlobEntry, BlobKind, SealedFrame};
use crate::{BlobLocation, BlockId, Error, PointId, Repository, RestorePoint, Result, Session};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Whether blocks get the same IDs in both repositories (see the module docs).
pub fn same_block_ids(a: &Repository, b: &Repository) -> bool {
    let probe = b"cairn: do these repositories name blocks alike?";
    a.crypto().block_id(probe) == b.crypto().block_id(probe)
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CopyReport {
    pub points: Vec<CopiedPoint>,
    /// Blocks and map pages sent to the target, their raw size and what they cost there.
    pub blocks_sent: u64,
    pub raw_bytes_sent: u64,
    pub stored_bytes_sent: u64,
    /// Blocks and map pages of the copied points the target held already.
    pub blocks_present: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CopiedPoint {
    pub name: String,
    pub time: String,
    pub source_id: PointId,
    /// The point's ID in the target.
    pub target_id: PointId,
    /// True when the target had a copy already (nothing was sent).
    pub already_there: bool,
}

/// Counters the worker threads share (progress reads them).
#[derive(Default)]
pub struct CopyProgress {
    pub blocks_sent: AtomicU64,
    pub raw_bytes_sent: AtomicU64,
    pub blocks_present: AtomicU64,
}

/// The ID of the point this one is a copy of (the first of a chain of copies).
pub fn copied_from(point: &RestorePoint) -> Option<PointId> {
    PointId::parse(point.metadata.get("copied_from")?.get("point")?.as_str()?)
}

/// What identifies a point across repositories: the point it was first copied from, or its
/// own ID.
fn origin(id: &PointId, point: &RestorePoint) -> PointId {
    copied_from(point).unwrap_or_else(|| id.clone())
}

/// Copies `points` (IDs and documents of `src`) into `dst`. The caller holds a shared lock on
/// both and has loaded both indexes. `threads` read and seal in parallel (0: up to 4).
pub fn copy_points(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    points: &[(PointId, RestorePoint)],
    threads: usize,
    progress: &CopyProgress,
) -> Result<CopyReport> {
    if !same_block_ids(src, dst) {
        return Err(Error::Incompatible(
            "the target names blocks differently from the source (its own encryption keys, or one is \
             encrypted and the other not), so it cannot deduplicate what it receives"
                .into(),
        ));
    }
    let threads =
        if threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4) } else { threads };
    // What the target holds must be known for sure: a point it failed to read could be a
    // copy already there, and copying again would make a second one. A read that fails twice
    // stops the copy before anything is sent. A point whose bytes are damaged (not its name,
    // or not a point) is no usable copy: the copy is made again beside it.
    let listed = dst.list_points()?;
    let mut points_there = listed.points;
    for (name, why) in listed.damaged {
        let Some(id) = PointId::parse(&name) else { continue };
        match dst.load_point(&id) {
            Ok(p) => points_there.push((id, p)),
            Err(Error::Storage(e)) if e.is_not_found() => {} // forgotten meanwhile
            Err(Error::Storage(_)) => {
                return Err(Error::Corrupt(format!(
                    "restore point {} of the target cannot be read ({why}); nothing was copied",
                    id.short()
                )))
            }
            Err(_) => {}
        }
    }
    // A point is known by its origin: the point it is a copy of (through any chain of
    // copies), or itself. The same origin on both sides means the target has it.
    let mut existing: HashMap<PointId, PointId> = HashMap::new();
    for (id, p) in points_there {
        existing.insert(origin(&id, &p), id.clone());
        existing.insert(id.clone(), id);
    }
    let mut report = CopyReport::default();
    for (source_id, point) in points {
        if let Some(target_id) = existing.get(&origin(source_id, point)).or_else(|| existing.get(source_id)) {
            report.points.push(CopiedPoint {
                name: point.name.clone(),
                time: point.time.clone(),
                source_id: source_id.clone(),
                target_id: target_id.clone(),
                already_there: true,
            });
            continue;
        }
        let (target_id, stored) = copy_point(src, dst, source_id, point, threads, progress)?;
        report.stored_bytes_sent += stored;
        report.points.push(CopiedPoint {
            name: point.name.clone(),
            time: point.time.clone(),
            source_id: source_id.clone(),
            target_id,
            already_there: false,
        });
    }
    report.blocks_sent = progress.blocks_sent.load(Ordering::Relaxed);
    report.raw_bytes_sent = progress.raw_bytes_sent.load(Ordering::Relaxed);
    report.blocks_present = progress.blocks_present.load(Ordering::Relaxed);
    Ok(report)
}

/// One map page of one disk: the unit of work of a copy thread.
struct PageJob<'a> {
    disk: &'a crate::DiskImage,
    page: usize,
}

fn copy_point(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    source_id: &PointId,
    point: &RestorePoint,
    threads: usize,
    progress: &CopyProgress,
) -> Result<(PointId, u64)> {
    let mut session = Session::new(dst.clone());
    let claims = session.claims();
    let jobs: Vec<PageJob> =
        point.disks.iter().flat_map(|d| (0..d.map.len()).map(move |page| PageJob { disk: d, page })).collect();
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<&PageJob>();
    for j in &jobs {
        job_tx.send(j).unwrap();
    }
    drop(job_tx);
    let (tx, rx) = crossbeam_channel::bounded::<SealedFrame>(2 * threads);
    // One thread's failure stops the others at their next page (the copy fails anyway).
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (results, stored) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (job_rx, tx, claims, failed) = (job_rx.clone(), tx.clone(), claims.clone(), &failed);
                scope.spawn(move || -> Result<()> {
                    let mut sender = FrameSender::new(dst, &tx);
                    for job in job_rx {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = copy_page(src, &claims, job, &mut sender, progress) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    sender.flush()
                })
            })
            .collect();
        drop(tx);
        // On a storage error the receiver goes: the threads' next send fails and they stop.
        let stored = rx.iter().try_for_each(|frame| session.add_frame(frame).map(drop));
        drop(rx);
        let results: Vec<Result<()>> = handles.into_iter().map(|h| h.join().expect("copy thread panicked")).collect();
        (results, stored)
    });
    stored?;
    for r in results {
        r?;
    }
    let mut copy = point.clone();
    if !copy.metadata.is_object() {
        copy.metadata = serde_json::json!({});
    }
    // A copy of a copy keeps the first origin (see `origin`).
    if copied_from(point).is_none() {
        copy.metadata["copied_from"] = serde_json::json!({
            "repository": src.config().id,
            "point": source_id,
        });
    }
    let id = session.commit(&mut copy)?;
    Ok((id, copy.stats.repository_growth_bytes))
}

/// Sends one map page and the blocks it names that the target lacks.
fn copy_page(
    src: &Repository,
    claims: &crate::Claims,
    job: &PageJob,
    sender: &mut FrameSender,
    progress: &CopyProgress,
) -> Result<()> {
    let disk = job.disk;
    let page_id = BlockId::from_hex(&disk.map[job.page])
        .ok_or_else(|| Error::Corrupt(format!("disk {} has no valid map page {}", disk.name, job.page)))?;
    // The page is read whatever the target holds: its blocks may still be missing there (a
    // copy killed after the page went, before its blocks did, sends them now).
    let ids = src.read_map_page(disk, job.page)?;
    let mut wanted: Vec<(BlockId, BlobKind)> = Vec::new();
    if claims.claim(&page_id) {
        wanted.push((page_id, BlobKind::Map));
    } else {
        progress.blocks_present.fetch_add(1, Ordering::Relaxed);
    }
    for id in ids.iter().filter(|b| !b.is_zero()) {
        if claims.claim(id) {
            wanted.push((*id, BlobKind::Data));
        } else {
            progress.blocks_present.fetch_add(1, Ordering::Relaxed);
        }
    }
    fetch_and_send(src, &wanted, sender, progress)
}

/// Reads `wanted` from the source frame by frame (each frame once, neighbouring frames of a
/// pack in one read), checks every blob against its ID, and hands it to `sender`.
fn fetch_and_send(
    src: &Repository,
    wanted: &[(BlockId, BlobKind)],
    sender: &mut FrameSender,
    progress: &CopyProgress,
) -> Result<()> {
    let index = src.index();
    let mut located: Vec<(BlobLocation, BlockId)> = Vec::with_capacity(wanted.len());
    for (id, kind) in wanted {
        match index.copies(id).next() {
            Some(loc) => located.push((loc, *id)),
            // Only quarantined copies: read_blob tries them (checked) or says it is missing.
            None => {
                let blob = src.read_blob(id, "copying")?;
                progress.blocks_sent.fetch_add(1, Ordering::Relaxed);
                progress.raw_bytes_sent.fetch_add(blob.len() as u64, Ordering::Relaxed);
                sender.push(*id, *kind, &blob)?;
            }
        }
    }
    located.sort_by_key(|(l, _)| (l.pack, l.frame_offset, l.raw_offset));
    let (mut span, mut frame) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < located.len() {
        // A run of frames of one pack that follow each other on storage, up to 8 MiB: one read.
        let first = located[i].0;
        let mut end = first.frame_offset as u64 + first.frame_stored_len as u64;
        let mut j = i + 1;
        while j < located.len() {
            let (l, prev) = (&located[j].0, &located[j - 1].0);
            let same_frame = l.pack == prev.pack && l.frame_offset == prev.frame_offset;
            let next_frame = l.pack == first.pack && l.frame_offset as u64 == end;
            let l_end = l.frame_offset as u64 + l.frame_stored_len as u64;
            if !(same_frame || next_frame) || l_end - first.frame_offset as u64 > 8 << 20 {
                break;
            }
            end = end.max(l_end);
            j += 1;
        }
        let read = src.read_pack_span(
            &first.pack_name(),
            first.frame_offset as u64,
            end - first.frame_offset as u64,
            &mut span,
        );
        for group in located[i..j].chunk_by(|a, b| a.0.frame_offset == b.0.frame_offset) {
            let loc0 = group[0].0;
            let stored = read.as_ref().ok().map(|range| {
                let at = range.start + (loc0.frame_offset - first.frame_offset) as usize;
                &span[at..at + loc0.frame_stored_len as usize]
            });
            let opened = stored.is_some_and(|st| src.decode_frame_into(&loc0, st, &mut frame).is_ok());
            let sound = |loc: &BlobLocation, id: &BlockId, frame: &[u8]| {
                opened
                    && frame
                        .get(loc.raw_offset as usize..(loc.raw_offset + loc.len) as usize)
                        .is_some_and(|b| src.crypto().block_id(b) == *id)
            };
            // Every byte of the frame is a wanted block, each checked: the frame goes as
            // stored, only re-encrypted for the target (no second compression).
            let mut at = 0u32;
            let whole = group.iter().all(|(l, _)| {
                let next = l.raw_offset == at;
                at += l.len;
                next
            }) && at == loc0.frame_raw_len;
            if let Some(st) = stored.filter(|_| whole && group.iter().all(|(l, id)| sound(l, id, &frame))) {
                let mut resealed = Vec::with_capacity(st.len() + 32);
                src.crypto().reseal_into(st, sender.dst.crypto(), "copying", &mut resealed)?;
                let blobs: Vec<BlobEntry> = group
                    .iter()
                    .map(|(l, id)| BlobEntry { kind: l.kind, id: *id, raw_offset: l.raw_offset, len: l.len })
                    .collect();
                progress.blocks_sent.fetch_add(blobs.len() as u64, Ordering::Relaxed);
                progress.raw_bytes_sent.fetch_add(loc0.frame_raw_len as u64, Ordering::Relaxed);
                sender.send(SealedFrame { stored: resealed, raw_len: loc0.frame_raw_len, blobs })?;
                continue;
            }
            for (loc, id) in group {
                let blob = if sound(loc, id, &frame) {
                    frame[loc.raw_offset as usize..(loc.raw_offset + loc.len) as usize].to_vec()
                } else {
                    // A damaged copy: any other (read_blob checks it too), or the error.
                    src.read_blob(id, "copying")?
                };
                progress.blocks_sent.fetch_add(1, Ordering::Relaxed);
                progress.raw_bytes_sent.fetch_add(blob.len() as u64, Ordering::Relaxed);
                sender.push(*id, loc.kind, &blob)?;
            }
        }
        i = j;
    }
    Ok(())
}

/// Gathers blobs into frames of up to 16 blobs or 1 MiB, sealed with the target's keys.
struct FrameSender<'a> {
    dst: &'a Repository,
    out: &'a crossbeam_channel::Sender<SealedFrame>,
    compressor: Compressor,
    raw: Vec<u8>,
    blobs: Vec<BlobEntry>,
}

impl<'a> FrameSender<'a> {
    fn new(dst: &'a Repository, out: &'a crossbeam_channel::Sender<SealedFrame>) -> Self {
        FrameSender { dst, out, compressor: Compressor::new(3), raw: Vec::new(), blobs: Vec::new() }
    }

    fn push(&mut self, id: BlockId, kind: BlobKind, blob: &[u8]) -> Result<()> {
        if self.blobs.len() == 16 || (!self.blobs.is_empty() && self.raw.len() + blob.len() > 1 << 20) {
            self.flush()?;
        }
        self.blobs.push(BlobEntry { kind, id, raw_offset: self.raw.len() as u32, len: blob.len() as u32 });
        self.raw.extend_from_slice(blob);
        Ok(())
    }

    /// Sends a frame made elsewhere (a source frame resealed whole).
    fn send(&mut self, frame: SealedFrame) -> Result<()> {
        self.out.send(frame).map_err(|_| Error::Corrupt("the copy's storage failed".into()))
    }

    fn flush(&mut self) -> Result<()> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let frame =
            SealedFrame::build(self.dst.crypto(), &mut self.compressor, &self.raw, std::mem::take(&mut self.blobs));
        self.raw.clear();
        self.out.send(frame).map_err(|_| Error::Corrupt("the copy's storage failed".into()))
    }
}
