//! The write side: a backup session packs sealed frames, stores packs and index files from a
//! background thread, and finally commits a restore point.
//!
//! Ordering (FORMAT.md, "Write ordering"): a pack is durable before any index file lists it;
//! every index file a point needs is durable before the point is written.

use crate::crypto::Compressor;
use crate::index::{pack_id_from_name, PackId};
use crate::map;
use crate::pack::{BlobEntry, BlobKind, FinishedPack, FrameEntry, PackBuilder, SealedFrame, PACK_TARGET};
use crate::point::RestorePoint;
use crate::{BlockId, PointId, Repository, Result};
use cairn_storage::Kind;
use crossbeam_channel::{bounded, Sender};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Index files are written at least this often during a session (and every
/// [`INDEX_EVERY_PACKS`] packs), so a killed backup leaves its uploaded blocks findable.
const INDEX_EVERY: Duration = Duration::from_secs(2);
const INDEX_EVERY_PACKS: usize = 8;
/// Partial index files of a session are merged into one at commit when they are this small
/// (about 200k blocks). Merging decodes them whole: a larger limit costs memory in proportion
/// (a prune's repack of a large repository writes many).
const MERGE_LIMIT: usize = 8 << 20;

/// Decides which blocks a session stores: those neither in the repository's index nor
/// already claimed by this session. Shared by the pipeline's worker threads.
pub struct Claims {
    repo: Arc<Repository>,
    claimed: Mutex<HashSet<BlockId>>,
}

impl Claims {
    /// True when the caller must store the block (first sight in this session and not in the
    /// repository); a second caller with the same block gets false.
    pub fn claim(&self, id: &BlockId) -> bool {
        !self.repo.index().reusable(id) && self.claimed.lock().unwrap().insert(*id)
    }
}

struct WriterOutcome {
    index_files: Vec<String>,
    index_bytes: u64,
}

pub struct Session {
    repo: Arc<Repository>,
    claims: Arc<Claims>,
    pack: PackBuilder,
    tx: Option<Sender<FinishedPack>>,
    /// Pack buffers the writer has stored, back for reuse (no fresh 16 MiB per pack).
    recycled: crossbeam_channel::Receiver<Vec<u8>>,
    writer: Option<JoinHandle<Result<WriterOutcome>>>,
    pack_bytes: u64,
    page_compressor: Compressor,
}

impl Session {
    pub fn new(repo: Arc<Repository>) -> Session {
        // One pack queued at most (the writer stores with O_DIRECT, quickly): bounds memory.
        let (tx, rx) = bounded::<FinishedPack>(1);
        let (recycle_tx, recycled) = bounded::<Vec<u8>>(1);
        let r = repo.clone();
        let writer = std::thread::Builder::new()
            .name("cairn-pack-writer".into())
            .spawn(move || -> Result<WriterOutcome> {
                let mut out = WriterOutcome { index_files: vec![], index_bytes: 0 };
                let mut pending: Vec<(PackId, Vec<FrameEntry>)> = Vec::new();
                let mut last = Instant::now();
                for pack in rx {
                    r.store(Kind::Pack, &pack.name, &pack.bytes)?;
                    cairn_storage::crash_point("session.pack_stored");
                    let _ = recycle_tx.try_send(pack.bytes);
                    pending.push((pack_id_from_name(&pack.name).unwrap(), pack.frames));
                    if pending.len() >= INDEX_EVERY_PACKS || last.elapsed() >= INDEX_EVERY {
                        write_index(&r, &mut pending, &mut out)?;
                        last = Instant::now();
                    }
                }
                write_index(&r, &mut pending, &mut out)?;
                Ok(out)
            })
            .expect("spawn pack writer");
        Session {
            claims: Arc::new(Claims { repo: repo.clone(), claimed: Mutex::new(HashSet::new()) }),
            repo,
            pack: PackBuilder::default(),
            tx: Some(tx),
            recycled,
            writer: Some(writer),
            pack_bytes: 0,
            page_compressor: Compressor::new(3),
        }
    }

    pub fn claims(&self) -> Arc<Claims> {
        self.claims.clone()
    }

    /// Adds a frame of claimed blocks to the current pack; returns the frame's emptied buffer
    /// for reuse.
    pub fn add_frame(&mut self, frame: SealedFrame) -> Result<Vec<u8>> {
        let emptied = self.pack.add(frame);
        if self.pack.len() >= PACK_TARGET {
            self.flush_pack()?;
        }
        Ok(emptied)
    }

    /// Stores a map page (if new) and returns its ID.
    pub fn store_map_page(&mut self, ids: &[BlockId]) -> Result<BlockId> {
        let raw = map::encode_page(ids);
        let id = self.repo.crypto().block_id(&raw);
        if self.claims.claim(&id) {
            let blob = BlobEntry { kind: BlobKind::Map, id, raw_offset: 0, len: raw.len() as u32 };
            let frame = SealedFrame::build(self.repo.crypto(), &mut self.page_compressor, &raw, vec![blob]);
            let _ = self.add_frame(frame)?;
        }
        Ok(id)
    }

    fn flush_pack(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let next = PackBuilder::with_buffer(self.recycled.try_recv().unwrap_or_default());
        let pack = std::mem::replace(&mut self.pack, next).finish(self.repo.crypto());
        self.pack_bytes += pack.bytes.len() as u64;
        let tx = self.tx.as_ref().expect("session is open");
        if tx.send(pack).is_err() {
            // The writer stopped on an error: report that error, not the closed channel.
            return Err(self
                .join_writer()
                .err()
                .unwrap_or_else(|| crate::Error::Corrupt("pack writer stopped".into())));
        }
        Ok(())
    }

    /// Frees the pack buffers (tens of MiB) once the writer is done, before the session's
    /// index files are merged and added to the index.
    fn release_buffers(&mut self) {
        self.pack = PackBuilder::default();
        while self.recycled.try_recv().is_ok() {}
    }

    fn join_writer(&mut self) -> Result<WriterOutcome> {
        drop(self.tx.take());
        match self.writer.take() {
            Some(h) => h.join().expect("pack writer panicked"),
            None => Err(crate::Error::Corrupt("pack writer already stopped".into())),
        }
    }

    /// Makes everything durable, then writes the point. Returns the point's ID.
    pub fn commit(mut self, point: &mut RestorePoint) -> Result<PointId> {
        self.flush_pack()?;
        let mut outcome = self.join_writer()?;
        self.release_buffers();
        merge_session_index(&self.repo, &mut outcome)?;
        point.stats.repository_growth_bytes = self.pack_bytes + outcome.index_bytes;
        // An immutable repository: everything the point needs locked long enough, first. The
        // walk looks the point's new blocks up, so the session's index files join the index.
        if self.repo.lock_policy().is_some() {
            self.repo.add_index_files(&outcome.index_files)?;
        }
        self.repo.lock_what_the_point_needs(point)?;
        cairn_storage::crash_point("commit.before_point");
        let id = self.repo.save_point(point)?;
        cairn_storage::crash_point("commit.point_saved");
        // This process may read the point next (a VM job, a server): its blocks join the
        // in-memory index. The point is committed whatever happens here; a reader that finds
        // the index stale refreshes it again.
        let _ = self.repo.add_index_files(&outcome.index_files);
        Ok(id)
    }
}

impl Session {
    /// Makes everything durable without writing a point (a prune's repacking): returns the
    /// index files written, each confirmed present.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.flush_pack()?;
        let mut outcome = self.join_writer()?;
        self.release_buffers();
        merge_session_index(&self.repo, &mut outcome)?;
        // Repacked packs were written locked (immutable repositories): say so for others
        // (only knowledge: a failed record costs requests later, nothing else).
        let _ = self.repo.record_locks_here(Vec::new());
        let _ = self.repo.add_index_files(&outcome.index_files);
        Ok(outcome.index_files)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // An abandoned session still finishes writing what it queued, so the next backup can
        // reuse those blocks; the index files it leaves are valid.
        if self.writer.is_some() {
            let _ = self.join_writer();
        }
    }
}

fn write_index(repo: &Repository, pending: &mut Vec<(PackId, Vec<FrameEntry>)>, out: &mut WriterOutcome) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    // A writer that lost its lock may have stalled past a prune that deleted its unindexed
    // packs: an index file naming them now would make new backups rely on nothing.
    repo.check_locks()?;
    let (name, size) = repo.write_index_file(pending)?;
    cairn_storage::crash_point("session.index_written");
    out.index_files.push(name);
    out.index_bytes += size;
    pending.clear();
    Ok(())
}

/// Replaces a session's several partial index files by one: the merged file is durable before
/// any partial one is deleted, so a reader always finds every pack in some listed file.
fn merge_session_index(repo: &Repository, out: &mut WriterOutcome) -> Result<()> {
    if out.index_files.len() < 2 {
        return Ok(());
    }
    let mut all = Vec::new();
    let mut raw_size = 0usize;
    for name in &out.index_files {
        let packs = repo.read_index_file(name)?;
        raw_size += packs.iter().map(|(_, f)| f.iter().map(|f| 16 + f.blobs.len() * 41).sum::<usize>()).sum::<usize>();
        if raw_size > MERGE_LIMIT {
            return Ok(());
        }
        all.extend(packs);
    }
    let old = std::mem::take(&mut out.index_files);
    out.index_bytes = 0;
    write_index(repo, &mut all, out)?;
    cairn_storage::crash_point("commit.merged_index_written");
    for name in old {
        repo.delete_index_file(&name)?;
        cairn_storage::crash_point("commit.partial_index_deleted");
    }
    Ok(())
}
