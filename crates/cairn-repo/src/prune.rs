//! Prune: reclaim the space of blocks no restore point references, without ever stopping a
//! backup (FORMAT.md §12).
//!
//! Nothing is deleted the moment it looks unused: a backup that loaded the index a minute ago
//! may be about to reference it. A prune instead **marks** packs (a catalog record naming
//! each with the time it was marked), and a pack is deleted only when, in a later check:
//! 1. it is still marked and no point references a block whose only copies it holds;
//! 2. the mark is at least the grace period old;
//! 3. every live lock was created after the mark (plus a clock margin): a process whose index
//!    predates the mark may not know it; one that started after it does, since readers load
//!    marks with the index and a new point never relies on a marked pack
//!    ([`crate::index::Index::reusable`]);
//! 4. points are listed *after* the locks (3), so a writer that finished in between is seen.
//!
//! Marked packs stay readable: a point committed by a writer that did not know the mark still
//! restores, and the next prune takes the mark back ("recovered"). Deletion follows the
//! write ordering in reverse: new index files without the deleted packs are durable before the
//! old index files go, and those go before the packs.
//!
//! Packs partly unused beyond a threshold are **repacked**: the blocks points still need are
//! copied into new packs (durable and indexed), and the old pack is then marked like an unused
//! one.

use crate::index::{pack_id_from_name, Index, PackId};
use crate::lock::{live_locks, LockMode};
use crate::pack::{BlobEntry, FrameEntry, SealedFrame};
use crate::{BlockId, Error, Repository, Result, Session};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The catalog record kind that holds the marks.
pub const MARKS_KIND: &str = "prune-marks";
/// Clocks of the hosts sharing a repository must agree within this much (FORMAT.md §12); it
/// also covers the time a marks record takes to become durable.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(10 * 60);
/// A marks record that took longer than this to store is not trusted (see [`CLOCK_MARGIN`]).
const SLOW_MARKS_WRITE: Duration = Duration::from_secs(5 * 60);
/// Default grace period: 23 hours, so a daily prune deletes what the previous day's marked.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(23 * 3600);

/// The marks of every readable marks record: pack → unix seconds it was marked (the earliest,
/// when records disagree: a crash between writing a new record and deleting the old).
pub fn marks_in(records: &[(String, serde_json::Value)]) -> HashMap<PackId, u64> {
    let mut out: HashMap<PackId, u64> = HashMap::new();
    for (_, r) in records.iter().filter(|(_, r)| r["kind"] == MARKS_KIND) {
        for e in r["packs"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            let (Some(pack), Some(at)) =
                (e.get(0).and_then(|p| p.as_str()).and_then(pack_id_from_name), e.get(1).and_then(|t| t.as_u64()))
            else {
                continue;
            };
            out.entry(pack).and_modify(|t| *t = (*t).min(at)).or_insert(at);
        }
    }
    out
}

#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// A pack whose unused share (of its blocks' bytes) exceeds this fraction is repacked.
    pub max_unused: f64,
    /// How long a mark stands before its pack may be deleted.
    pub grace: Duration,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// How long to wait for another prune or a repair to finish.
    pub lock_wait: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { max_unused: 0.05, grace: DEFAULT_GRACE, dry_run: false, lock_wait: Duration::ZERO }
    }
}

/// Counts of packs and their stored bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Packs {
    pub packs: u64,
    pub bytes: u64,
}

impl Packs {
    fn add(&mut self, bytes: u64) {
        self.packs += 1;
        self.bytes += bytes;
    }
}

/// A marked pack that could not be deleted yet, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pending {
    pub pack: String,
    pub bytes: u64,
    pub marked: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub points: usize,
    /// Distinct blocks (and map pages) the points reference.
    pub referenced_blocks: u64,
    /// Bytes of those blocks, uncompressed.
    pub referenced_raw_bytes: u64,
    pub stored: Packs,
    /// Packs every block of which a point needs.
    pub used: Packs,
    /// Packs some of whose blocks a point needs, under the repack threshold: kept.
    pub partly_used: Packs,
    /// Unused bytes (estimated from blocks' share) in the partly used packs kept.
    pub partly_used_unused_bytes: u64,
    /// Packs rewritten without their unused blocks (then marked), and what was written.
    pub repacked: Packs,
    pub repack_written: Packs,
    /// Packs marked by this run (unused, repacked, unindexed).
    pub newly_marked: Packs,
    /// Packs storage holds that no index file lists (a killed backup's last packs).
    pub unindexed: Packs,
    /// Marked packs that a point references again: mark taken back.
    pub recovered: Packs,
    /// Marked packs deleted by this run.
    pub deleted: Packs,
    /// Marked packs left for a later run.
    pub pending: Vec<Pending>,
    pub index_files_rewritten: u64,
    /// Catalog records about points that no longer exist, dropped.
    pub records_dropped: usize,
    /// Referenced blocks whose only copies verify found damaged: their packs are kept.
    pub damaged_only_blocks: u64,
    pub warnings: Vec<String>,
}

/// Progress callback: a short line for each phase.
pub type Progress<'a> = &'a dyn Fn(&str);

/// What the points reference and what that makes of each pack; changes nothing.
struct Analysis {
    report: PruneReport,
    old_records: Vec<String>,
    marks: HashMap<PackId, u64>,
    reach: Reachability,
    sizes: HashMap<PackId, u64>,
    to_mark: Vec<PackId>,
    to_repack: Vec<(PackId, Vec<u32>)>,
}

fn analyze(repo: &Repository, opts: &PruneOptions, progress: Progress) -> Result<Analysis> {
    let mut report = PruneReport { dry_run: opts.dry_run, ..Default::default() };

    // Marks from earlier runs, then the index that knows them.
    let records = repo.load_records()?;
    let old_records: Vec<String> =
        records.iter().filter(|(_, r)| r["kind"] == MARKS_KIND).map(|(n, _)| n.clone()).collect();
    if let Some((name, why)) = repo.damaged_records().first() {
        return Err(Error::Corrupt(format!(
            "catalog record {} is damaged ({why}): it may hold prune marks, a quarantine or protections that \
             decide what may be deleted; nothing was changed (`cairn verify` names it; delete it to go on)",
            &name[..8.min(name.len())]
        )));
    }
    let mut marks = marks_in(&records);
    repo.load_index()?;
    if let Some((name, why)) = repo.damaged_index_files().first() {
        return Err(Error::Corrupt(format!(
            "index file {} is damaged ({why}): prune would take the packs it lists for unused; run `cairn repair index` first",
            &name[..8.min(name.len())]
        )));
    }

    progress("reading restore points and their maps");
    let mut reach = Reachability::default();
    let listed = repo.list_points()?;
    if let Some((id, why)) = listed.damaged.first() {
        return Err(Error::Corrupt(format!(
            "restore point {} cannot be read ({why}): prune would delete the data it needs; nothing was changed",
            &id[..8.min(id.len())]
        )));
    }
    for (id, _) in &listed.points {
        reach.seen_points.insert(id.clone());
    }
    let index = repo.index();
    reach.used = vec![0u64; index.len().div_ceil(64)];
    for (id, point) in &listed.points {
        reach.add_point(repo, &index, id, point)?;
    }
    report.points = listed.points.len();
    report.referenced_blocks = reach.blocks;
    report.referenced_raw_bytes = reach.raw_bytes;
    report.damaged_only_blocks = reach.damaged_only.len() as u64;

    progress("sorting packs");
    let sizes: HashMap<PackId, u64> =
        repo.stored_packs()?.into_iter().filter_map(|(n, size)| Some((pack_id_from_name(&n)?, size))).collect();
    report.stored = Packs { packs: sizes.len() as u64, bytes: sizes.values().sum() };
    let by_pack = index.blobs_by_pack();
    let mut to_mark: Vec<PackId> = Vec::new();
    let mut to_repack: Vec<(PackId, Vec<u32>)> = Vec::new();
    for (pack, positions) in &by_pack {
        let Some(&size) = sizes.get(pack) else { continue }; // listed, not stored: nothing to reclaim
        let pinned = reach.damaged_only.contains(pack);
        let (mut used_raw, mut all_raw) = (0u64, 0u64);
        let mut used_positions = Vec::new();
        for &p in positions {
            let len = index.entry(p).1.len as u64;
            all_raw += len;
            if reach.is_used(p) {
                used_raw += len;
                used_positions.push(p);
            }
        }
        let quarantined = index.has_quarantined_copies_in(pack);
        if marks.contains_key(pack) {
            if used_raw > 0 || pinned {
                // A writer that did not know the mark referenced it: take the mark back.
                marks.remove(pack);
                report.recovered.add(size);
            }
            continue;
        }
        if used_raw == 0 && !pinned {
            to_mark.push(*pack);
        } else if used_raw == all_raw && !quarantined || pinned {
            report.used.add(size);
        } else if quarantined || (all_raw - used_raw) as f64 > opts.max_unused * all_raw as f64 {
            to_repack.push((*pack, used_positions));
        } else {
            report.partly_used.add(size);
            report.partly_used_unused_bytes += size.saturating_mul(all_raw - used_raw) / all_raw.max(1);
        }
    }
    // Packs storage holds that no index lists: a killed writer's last packs (a running one's
    // too; the lock rule keeps those until it is gone, and by then its index lists them).
    let indexed: HashSet<&PackId> = index.packs().iter().collect();
    for (pack, &size) in &sizes {
        if !indexed.contains(pack) && !marks.contains_key(pack) {
            report.unindexed.add(size);
            to_mark.push(*pack);
        }
    }
    for pack in &to_mark {
        report.newly_marked.add(sizes.get(pack).copied().unwrap_or(0));
    }
    Ok(Analysis { report, old_records, marks, reach, sizes, to_mark, to_repack })
}

/// Runs a prune (see the module docs). Holds a maintenance lock: backups, restores and
/// verifies go on; another prune or a repair waits.
pub fn prune(repo: &Arc<Repository>, opts: &PruneOptions, progress: Progress) -> Result<PruneReport> {
    let lock = repo.lock_mode(LockMode::Maintenance, "prune", opts.lock_wait)?;
    let Analysis { mut report, old_records, mut marks, mut reach, sizes, mut to_mark, to_repack } =
        analyze(repo, opts, progress)?;
    let index = repo.index();
    if !opts.dry_run && !to_repack.is_empty() {
        progress(&format!("repacking {} packs", to_repack.len()));
        let written = repack(repo, &index, &to_repack, &sizes, &mut report)?;
        // Pack names are content hashes: a repack can write a pack under the name of one this
        // run (or an earlier one, killed before it indexed it) took for unindexed. Never mark
        // what the repack just made the home of the blocks it moved.
        for p in to_mark.iter().filter(|p| written.contains(*p)) {
            report.newly_marked.packs -= 1;
            report.newly_marked.bytes -= sizes.get(p).copied().unwrap_or(0);
        }
        to_mark.retain(|p| !written.contains(p));
        marks.retain(|p, _| !written.contains(p));
    } else {
        for (pack, _) in &to_repack {
            report.repacked.add(sizes[pack]);
        }
    }
    // Taken after the repack: a mark must not claim to be older than it is (see `blocker`).
    let now = unix_now();
    for pack in &to_mark {
        marks.insert(*pack, now);
    }
    for (pack, _) in &to_repack {
        report.newly_marked.add(sizes.get(pack).copied().unwrap_or(0));
        marks.insert(*pack, now);
    }

    if opts.dry_run {
        let locks = live_locks(repo.backend().as_ref(), repo.hostname(), lock.name())?;
        for (pack, &at) in &marks {
            let size = sizes.get(pack).copied().unwrap_or(0);
            match blocker(at, opts.grace, &locks, now) {
                None if at < now => report.deleted.add(size),
                None => {
                    report.pending.push(pending(pack, size, at, "marked by this run; deleted by a later prune".into()))
                }
                Some(why) => report.pending.push(pending(pack, size, at, why)),
            }
        }
        return Ok(report);
    }

    // The marks are durable before anyone is judged by them.
    progress("recording marks");
    let written = write_marks(repo, &marks, &old_records)?;

    // Locks first, then points: a writer gone by now has its point listed below.
    let locks = live_locks(repo.backend().as_ref(), repo.hostname(), lock.name())?;
    let later = repo.list_points()?;
    if let Some((name, why)) = repo.damaged_index_files().first() {
        return Err(Error::Corrupt(format!(
            "index file {} is damaged ({why}); marks recorded, nothing deleted: run `cairn repair index`",
            &name[..8.min(name.len())]
        )));
    }
    if let Some((id, why)) = later.damaged.first() {
        return Err(Error::Corrupt(format!(
            "restore point {} cannot be read ({why}); marks recorded, nothing deleted",
            &id[..8.min(id.len())]
        )));
    }
    let index = repo.index();
    let mut late_used: HashSet<PackId> = HashSet::new();
    for (id, point) in &later.points {
        if !reach.seen_points.contains(id) {
            late_used.extend(reach.packs_only_marked_hold(repo, &index, &marks, point)?);
        }
    }

    let mut doomed: Vec<PackId> = Vec::new();
    for (pack, &at) in &marks {
        let size = sizes.get(pack).copied().unwrap_or(0);
        if late_used.contains(pack) {
            report.recovered.add(size);
            continue;
        }
        match blocker(at, opts.grace, &locks, now) {
            None => doomed.push(*pack),
            Some(why) => report.pending.push(pending(pack, size, at, why)),
        }
    }
    for pack in &late_used {
        marks.remove(pack);
    }

    if !doomed.is_empty() {
        progress(&format!("deleting {} packs", doomed.len()));
        let doomed_set: HashSet<PackId> = doomed.iter().copied().collect();
        report.index_files_rewritten = drop_from_index(repo, &doomed_set)?;
        for pack in &doomed {
            repo.delete_pack(&hex::encode(pack))?;
            cairn_storage::crash_point("prune.pack_deleted");
            report.deleted.add(sizes.get(pack).copied().unwrap_or(0));
            marks.remove(pack);
        }
        forget_packs_in_catalog(repo, &doomed_set)?;
    }
    if !doomed.is_empty() || !late_used.is_empty() {
        write_marks(repo, &marks, &[written])?;
    }
    // Records about points a forget removed but did not get to clean (it was killed).
    report.records_dropped = crate::forget::drop_records_of_missing_points(repo)?;
    repo.load_index()?;
    Ok(report)
}

/// What `cairn stats` shows: the size of some points (or all) and what storing them costs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub points: usize,
    /// Sum of the sizes of their disks and files.
    pub logical_bytes: u64,
    /// The same without all-zero blocks (never stored).
    pub logical_nonzero_bytes: u64,
    /// Distinct blocks and map pages they reference, uncompressed and as stored.
    pub unique_blocks: u64,
    pub unique_raw_bytes: u64,
    pub unique_stored_bytes: u64,
    /// The whole repository as a prune would see it now (a dry run).
    pub repository: PruneReport,
    /// Stored bytes of packs no point needs (marked or about to be).
    pub reclaimable_bytes: u64,
}

/// Sizes of the points named `names` (point names or VM UUIDs; all when empty) and of the
/// repository. The caller holds a shared lock and has loaded the index.
pub fn usage(repo: &Repository, names: &[String]) -> Result<Usage> {
    let analysis = analyze(repo, &PruneOptions { dry_run: true, ..Default::default() }, &|_| {})?;
    let listed = repo.list_points()?;
    let index = repo.index();
    let mut reach = Reachability { used: vec![0u64; index.len().div_ceil(64)], ..Default::default() };
    let mut out = Usage::default();
    let mut page_nonzero: HashMap<BlockId, u64> = HashMap::new();
    for (id, p) in &listed.points {
        let uuid = p.metadata["vm"]["uuid"].as_str();
        if !names.is_empty() && !names.iter().any(|n| *n == p.name || Some(n.as_str()) == uuid) {
            continue;
        }
        out.points += 1;
        for disk in &p.disks {
            out.logical_bytes += disk.size;
            for (k, h) in disk.map.iter().enumerate() {
                let Some(page) = BlockId::from_hex(h) else { continue };
                if let Some(n) = page_nonzero.get(&page) {
                    out.logical_nonzero_bytes += n;
                    continue;
                }
                let ids = repo.read_map_page(disk, k)?;
                let n = ids.iter().filter(|b| !b.is_zero()).count() as u64 * disk.block_size as u64;
                page_nonzero.insert(page, n);
                out.logical_nonzero_bytes += n;
            }
        }
        reach.add_point(repo, &index, id, p)?;
    }
    out.logical_nonzero_bytes = out.logical_nonzero_bytes.min(out.logical_bytes);
    out.unique_blocks = reach.blocks;
    out.unique_raw_bytes = reach.raw_bytes;
    out.unique_stored_bytes = reach.stored_bytes;
    out.reclaimable_bytes =
        analysis.to_mark.iter().chain(analysis.marks.keys()).map(|p| analysis.sizes.get(p).copied().unwrap_or(0)).sum();
    out.repository = analysis.report;
    for (pack, _) in &analysis.to_repack {
        out.repository.repacked.add(analysis.sizes.get(pack).copied().unwrap_or(0));
    }
    Ok(out)
}

fn pending(pack: &PackId, bytes: u64, at: u64, reason: String) -> Pending {
    Pending { pack: hex::encode(pack), bytes, marked: rfc3339(at), reason }
}

/// Why a pack marked at `at` may not be deleted now (`None`: it may).
fn blocker(at: u64, grace: Duration, locks: &[(String, Option<crate::lock::LockInfo>)], now: u64) -> Option<String> {
    if at.saturating_add(grace.as_secs()) > now {
        return Some(format!("grace period: deletable from {}", rfc3339(at.saturating_add(grace.as_secs()))));
    }
    for (name, info) in locks {
        let created = info.as_ref().and_then(|i| i.created).unwrap_or(0);
        if created <= at.saturating_add(CLOCK_MARGIN.as_secs()) {
            let who = info.as_ref().map(|i| i.describe()).unwrap_or_else(|| format!("unreadable lock file {name}"));
            return Some(format!("{who} began before the mark and may still use it"));
        }
    }
    None
}

/// What the points reference: one bit per index position (the copy each block is read from).
#[derive(Default)]
struct Reachability {
    used: Vec<u64>,
    pages: HashSet<BlockId>,
    seen_points: HashSet<String>,
    /// Packs holding the only (quarantined) copies of referenced blocks: never deleted.
    damaged_only: HashSet<PackId>,
    blocks: u64,
    raw_bytes: u64,
    /// The chosen copies' share of their frames' stored bytes.
    stored_bytes: u64,
}

impl Reachability {
    fn is_used(&self, p: u32) -> bool {
        self.used[p as usize / 64] & (1 << (p % 64)) != 0
    }

    /// Marks the copy a block will be kept in: the first outside packs already marked.
    fn mark(&mut self, index: &Index, id: &BlockId, context: &dyn Fn() -> String) -> Result<()> {
        let positions = index.positions(id);
        if positions.is_empty() {
            let quarantined: Vec<PackId> = index.quarantined_copies(id).map(|q| q.pack).collect();
            if !quarantined.is_empty() {
                // Verify may have misread one of them: keep every copy.
                self.damaged_only.extend(quarantined);
                return Ok(());
            }
            return Err(Error::MissingBlock {
                id: *id,
                context: format!("{}; prune would not be safe: run `cairn verify`", context()),
            });
        }
        let chosen = positions.clone().find(|&p| !index.pack_at(p).1).unwrap_or(positions.start);
        if positions.clone().any(|p| self.is_used(p)) {
            return Ok(());
        }
        self.used[chosen as usize / 64] |= 1 << (chosen % 64);
        self.blocks += 1;
        let loc = index.entry(chosen).1;
        self.raw_bytes += loc.len as u64;
        self.stored_bytes += loc.frame_stored_len as u64 * loc.len as u64 / (loc.frame_raw_len as u64).max(1);
        Ok(())
    }

    fn add_point(&mut self, repo: &Repository, index: &Index, id: &str, point: &crate::RestorePoint) -> Result<()> {
        for disk in &point.disks {
            for (k, page_hex) in disk.map.iter().enumerate() {
                let page = BlockId::from_hex(page_hex).ok_or_else(|| {
                    Error::Corrupt(format!("restore point {}: map page {k} of {} is not an ID", &id[..8], disk.name))
                })?;
                if !self.pages.insert(page) {
                    continue; // a page another point shares: its blocks are marked already
                }
                self.mark(index, &page, &|| format!("map page {k} of disk {} of point {}", disk.name, &id[..8]))?;
                let ids = repo.read_map_page(disk, k).map_err(|e| {
                    Error::Corrupt(format!(
                        "map page {k} of disk {} of point {} cannot be read ({e}); nothing was changed",
                        disk.name,
                        &id[..8]
                    ))
                })?;
                for b in ids.iter().filter(|b| !b.is_zero()) {
                    self.mark(index, b, &|| format!("a block of disk {} of point {}", disk.name, &id[..8]))?;
                }
            }
        }
        Ok(())
    }

    /// For a point committed during the prune: the marked packs holding the only copies of
    /// the blocks it references.
    fn packs_only_marked_hold(
        &mut self,
        repo: &Repository,
        index: &Index,
        marks: &HashMap<PackId, u64>,
        point: &crate::RestorePoint,
    ) -> Result<HashSet<PackId>> {
        let mut out = HashSet::new();
        let mut unknown = None;
        let mut check = |id: &BlockId| {
            let copies: Vec<_> = index.copies(id).chain(index.quarantined_copies(id)).map(|l| l.pack).collect();
            if copies.is_empty() {
                unknown.get_or_insert(*id);
            } else if copies.iter().all(|p| marks.contains_key(p)) {
                out.extend(copies);
            }
        };
        for disk in &point.disks {
            for (k, page_hex) in disk.map.iter().enumerate() {
                let Some(page) = BlockId::from_hex(page_hex) else { continue };
                check(&page);
                if !self.pages.insert(page) {
                    continue;
                }
                for b in repo.read_map_page(disk, k)?.iter().filter(|b| !b.is_zero()) {
                    check(b);
                }
            }
        }
        if let Some(id) = unknown {
            return Err(Error::MissingBlock {
                id,
                context: "a point committed during the prune references it; marks recorded, nothing deleted".into(),
            });
        }
        Ok(out)
    }
}

/// Copies the blocks points need out of `packs` into new packs, durable and indexed before
/// the old packs are marked (by the caller).
fn repack(
    repo: &Arc<Repository>,
    index: &Index,
    packs: &[(PackId, Vec<u32>)],
    sizes: &HashMap<PackId, u64>,
    report: &mut PruneReport,
) -> Result<HashSet<PackId>> {
    let mut session = Session::new(repo.clone());
    let mut compressor = crate::crypto::Compressor::new(3);
    let mut raw = Vec::new();
    let mut blobs: Vec<BlobEntry> = Vec::new();
    let flush = |session: &mut Session,
                 raw: &mut Vec<u8>,
                 blobs: &mut Vec<BlobEntry>,
                 c: &mut crate::crypto::Compressor|
     -> Result<()> {
        if blobs.is_empty() {
            return Ok(());
        }
        let frame = SealedFrame::build(repo.crypto(), c, raw, std::mem::take(blobs));
        raw.clear();
        session.add_frame(frame)?;
        Ok(())
    };
    for (pack, positions) in packs {
        // In frame order, each frame read and opened once.
        let mut copies: Vec<_> = positions.iter().map(|&p| index.entry(p)).collect();
        copies.sort_by_key(|(_, loc)| (loc.frame_offset, loc.raw_offset));
        let mut frame: Option<(u32, Vec<u8>)> = None;
        for (id, loc) in copies {
            if frame.as_ref().map(|(off, _)| *off) != Some(loc.frame_offset) {
                frame = repo.read_frame(&loc).ok().map(|f| (loc.frame_offset, f));
            }
            let end = loc.raw_offset as usize + loc.len as usize;
            let sound = frame
                .as_ref()
                .and_then(|(_, f)| f.get(loc.raw_offset as usize..end))
                .filter(|b| repo.crypto().block_id(b) == id)
                .map(|b| b.to_vec());
            // Checked against its ID; a damaged copy falls back to any other.
            let blob = match sound {
                Some(b) => b,
                None => repo.read_blob(&id, "repacking")?,
            };
            if blobs.len() == 16 || raw.len() + blob.len() > 1 << 20 {
                flush(&mut session, &mut raw, &mut blobs, &mut compressor)?;
            }
            blobs.push(BlobEntry { kind: loc.kind, id, raw_offset: raw.len() as u32, len: blob.len() as u32 });
            raw.extend_from_slice(&blob);
        }
        report.repacked.add(sizes.get(pack).copied().unwrap_or(0));
    }
    flush(&mut session, &mut raw, &mut blobs, &mut compressor)?;
    let files = session.finish()?;
    cairn_storage::crash_point("prune.repacked");
    let mut written = HashSet::new();
    for f in &files {
        for (pack, frames) in repo.read_index_file(f)? {
            report.repack_written.packs += 1;
            report.repack_written.bytes +=
                frames.last().map(|f: &FrameEntry| (f.offset + f.stored_len) as u64).unwrap_or(0);
            written.insert(pack);
        }
    }
    Ok(written)
}

/// Rewrites every index file that lists a doomed pack without it: each new file is durable
/// before its old one is deleted. Returns how many files were rewritten.
fn drop_from_index(repo: &Repository, doomed: &HashSet<PackId>) -> Result<u64> {
    let mut rewritten = 0;
    for name in repo.index_file_names()? {
        let packs = match repo.read_index_file(&name) {
            Ok(p) => p,
            Err(Error::Storage(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        if !packs.iter().any(|(p, _)| doomed.contains(p)) {
            continue;
        }
        let kept: Vec<_> = packs.into_iter().filter(|(p, _)| !doomed.contains(p)).collect();
        if !kept.is_empty() {
            let (new, _) = repo.write_index_file(&kept)?;
            cairn_storage::crash_point("prune.index_written");
            if new == name {
                continue;
            }
        }
        repo.delete_index_file(&name)?;
        cairn_storage::crash_point("prune.index_deleted");
        rewritten += 1;
    }
    Ok(rewritten)
}

/// Drops deleted packs from the quarantine and the verify state, so no record names a pack
/// that is gone.
fn forget_packs_in_catalog(repo: &Repository, gone: &HashSet<PackId>) -> Result<()> {
    let release: Vec<(String, String)> = repo
        .quarantine()?
        .into_iter()
        .filter(|(p, _)| gone.contains(p))
        .map(|(p, b)| (hex::encode(p), b.to_hex()))
        .collect();
    repo.update_quarantine(&[], &release)?;
    for (name, r) in repo.load_records()?.into_iter().filter(|(_, r)| r["kind"] == "verify-state") {
        let Some(packs) = r["packs"].as_object() else { continue };
        let stale = packs.keys().any(|k| pack_id_from_name(k).is_some_and(|p| gone.contains(&p)));
        if !stale {
            continue;
        }
        let mut r = r.clone();
        let kept: serde_json::Map<String, serde_json::Value> = packs
            .iter()
            .filter(|(k, _)| !pack_id_from_name(k).is_some_and(|p| gone.contains(&p)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        r["packs"] = serde_json::Value::Object(kept);
        let new = repo.save_record(&r)?;
        if new != name {
            repo.delete_record(&name)?;
        }
    }
    Ok(())
}

/// Writes one marks record holding `marks`, durable, then deletes `old` records. Returns the
/// new record's name. A record that took too long to store is withdrawn (the marks are simply
/// made again by the next run): the lock rule's margin covers only a quick write.
fn write_marks(repo: &Repository, marks: &HashMap<PackId, u64>, old: &[String]) -> Result<String> {
    let sorted: BTreeMap<String, u64> = marks.iter().map(|(p, t)| (hex::encode(p), *t)).collect();
    let list: Vec<(String, u64)> = sorted.into_iter().collect();
    let started = std::time::Instant::now();
    let name =
        repo.save_record(&serde_json::json!({"kind": MARKS_KIND, "time": crate::now_rfc3339(), "packs": list}))?;
    if !repo.backend().exists(cairn_storage::Kind::Catalog, &name)? {
        return Err(Error::Corrupt("storage acknowledged the prune marks record but does not hold it".into()));
    }
    if started.elapsed() > SLOW_MARKS_WRITE {
        repo.delete_record(&name)?;
        return Err(Error::Corrupt(format!(
            "storing the prune marks took {} s (more than {} s): they were withdrawn; nothing was deleted",
            started.elapsed().as_secs(),
            SLOW_MARKS_WRITE.as_secs()
        )));
    }
    cairn_storage::crash_point("prune.marks_written");
    for n in old {
        if *n != name {
            repo.delete_record(n)?;
            cairn_storage::crash_point("prune.old_marks_deleted");
        }
    }
    Ok(name)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
