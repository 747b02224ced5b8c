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

use crate::catalog::{PruneMarks, VerifyState};
use crate::index::{pack_id_from_name, Index, PackId};
use crate::lock::{live_locks, LockMode};
use crate::pack::{BlobEntry, FrameEntry, SealedFrame};
use crate::{BlockId, Error, PointId, Repository, Result, Session};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clocks of the hosts sharing a repository must agree within this much (FORMAT.md §12); it
/// also covers the time a marks record takes to become durable.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(10 * 60);
/// A marks record that took longer than this to store is not trusted (see [`CLOCK_MARGIN`]).
const SLOW_MARKS_WRITE: Duration = Duration::from_secs(5 * 60);
/// Default grace period: 23 hours, so a daily prune deletes what the previous day's marked.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(23 * 3600);

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
    /// Threads repacking at once (0: one per core, at most 4). Backups running meanwhile may
    /// want the cores.
    pub threads: usize,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { max_unused: 0.05, grace: DEFAULT_GRACE, dry_run: false, lock_wait: Duration::ZERO, threads: 0 }
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
    /// Packs a prune would repack or delete but whose store lock has not ended (an immutable
    /// repository): kept as they are, pending (see `pending` for the deletions' dates).
    pub locked: Packs,
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
    /// The index the positions in `reach` and `to_repack` refer to (a refresh renumbers).
    index: Arc<Index>,
}

fn analyze(repo: &Repository, opts: &PruneOptions, progress: Progress) -> Result<Analysis> {
    let mut report = PruneReport { dry_run: opts.dry_run, ..Default::default() };

    // Marks from earlier runs, then the index that knows them.
    let records = repo.load_records()?;
    if let Some((name, why)) = repo.damaged_records().first() {
        return Err(Error::Corrupt(format!(
            "catalog record {} is damaged ({why}): it may hold prune marks, a quarantine or protections that \
             decide what may be deleted; nothing was changed (deleting the record lets prune go on)",
            &name[..8.min(name.len())]
        )));
    }
    let marks_records: Vec<(String, PruneMarks)> = crate::catalog::typed(&records)?;
    let old_records: Vec<String> = marks_records.iter().map(|(n, _)| n.clone()).collect();
    let mut marks = crate::catalog::marks_in(&marks_records);
    repo.load_index()?;
    if let Some((name, why)) = repo.damaged_index_files().first() {
        return Err(Error::DamagedIndex {
            file: name[..8.min(name.len())].to_string(),
            why: why.to_string(),
            consequence: "prune would take the packs it lists for unused".into(),
        });
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
    // Each point after the one before it of the same name: a block at the same place in
    // both is marked already (most of a disk from one day to the next), no lookup needed.
    let mut order: Vec<&(PointId, crate::RestorePoint)> = listed.points.iter().collect();
    order.sort_by(|a, b| (&a.1.name, &a.1.time, &a.0).cmp(&(&b.1.name, &b.1.time, &b.0)));
    let mut before: Option<&crate::RestorePoint> = None;
    for (id, point) in order {
        let prev = before.filter(|b| b.name == point.name);
        reach.add_point(repo, &index, id, point, prev)?;
        before = Some(point);
    }
    report.points = listed.points.len();
    report.referenced_blocks = reach.blocks;
    report.referenced_raw_bytes = reach.raw_bytes;
    report.damaged_only_blocks = reach.damaged_only.len() as u64;

    progress("sorting packs");
    let sizes: HashMap<PackId, u64> =
        repo.stored_packs()?.into_iter().filter_map(|(n, size)| Some((pack_id_from_name(&n)?, size))).collect();
    report.stored = Packs { packs: sizes.len() as u64, bytes: sizes.values().sum() };
    // One sequential pass over the index (on disk in a large repository): each pack's bytes
    // and the share of them the points use.
    let mut tally: HashMap<PackId, (u64, u64, usize)> = HashMap::new();
    index.scan(|p, _, loc| {
        let t = tally.entry(loc.pack).or_default();
        t.1 += loc.len as u64;
        if reach.is_used(p) {
            t.0 += loc.len as u64;
            t.2 += 1;
        }
    });
    let mut to_mark: Vec<PackId> = Vec::new();
    let mut to_repack: Vec<(PackId, Vec<u32>)> = Vec::new();
    let mut tally: Vec<(PackId, (u64, u64, usize))> = tally.into_iter().collect();
    tally.sort_unstable_by_key(|(p, _)| *p);
    for (pack, (used_raw, all_raw, used_copies)) in &tally {
        let Some(&size) = sizes.get(pack) else { continue }; // listed, not stored: nothing to reclaim
        let (used_raw, all_raw) = (*used_raw, *all_raw);
        let pinned = reach.damaged_only.contains(pack);
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
            // Sized exactly: a large repack lists millions of positions.
            to_repack.push((*pack, Vec::with_capacity(*used_copies)));
        } else {
            report.partly_used.add(size);
            report.partly_used_unused_bytes += size.saturating_mul(all_raw - used_raw) / all_raw.max(1);
        }
    }
    if !to_repack.is_empty() {
        // A second pass for the used copies in the packs to repack.
        let slot: HashMap<PackId, usize> = to_repack.iter().enumerate().map(|(i, (p, _))| (*p, i)).collect();
        index.scan(|p, _, loc| {
            if let Some(&i) = slot.get(&loc.pack).filter(|_| reach.is_used(p)) {
                to_repack[i].1.push(p);
            }
        });
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
    Ok(Analysis { report, old_records, marks, reach, sizes, to_mark, to_repack, index })
}

/// Runs a prune (see the module docs). Holds a maintenance lock: backups, restores and
/// verifies go on; another prune or a repair waits.
// Long on purpose: the steps of FORMAT.md §12 in their order, each invariant commented where it
// is kept; split, the order that makes a prune safe would be spread over several functions.
pub fn prune(repo: &Arc<Repository>, opts: &PruneOptions, progress: Progress) -> Result<PruneReport> {
    let lock = repo.lock_mode(LockMode::Maintenance, "prune", opts.lock_wait)?;
    let Analysis { mut report, old_records, mut marks, mut reach, sizes, mut to_mark, mut to_repack, index } =
        analyze(repo, opts, progress)?;
    // Rewriting a locked pack would only store its blocks twice until the lock ends.
    if repo.lock_policy().is_some() && !to_repack.is_empty() {
        progress(&format!("asking the store for the locks of {} packs to repack", to_repack.len()));
        let mut kept = Vec::new();
        for (pack, _) in &to_repack {
            if store_lock(repo, pack)?.is_some() {
                kept.push(*pack);
                report.locked.add(sizes.get(pack).copied().unwrap_or(0));
            }
        }
        to_repack.retain(|(p, _)| !kept.contains(p));
    }
    let mut written: HashSet<PackId> = HashSet::new();
    if !opts.dry_run && !to_repack.is_empty() {
        progress(&format!("repacking {} packs", to_repack.len()));
        written = repack(repo, index, &mut to_repack, &sizes, opts.threads, &mut report)?.into_iter().collect();
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
        drop(index);
        for (pack, _) in &to_repack {
            report.repacked.add(sizes[pack]);
        }
    }
    // Taken after the repack: a mark must not claim to be older than it is (see `blocker`).
    let now = unix_now();
    for pack in &to_mark {
        marks.insert(*pack, now);
    }
    // A repack that gathers a pack's blocks in the same order writes that very pack again
    // (same content, same name): it is the home of what it holds now, never marked.
    for (pack, _) in to_repack.iter().filter(|(p, _)| !written.contains(p)) {
        report.newly_marked.add(sizes.get(pack).copied().unwrap_or(0));
        marks.insert(*pack, now);
    }

    if opts.dry_run {
        let locks = live_locks(repo.backend().as_ref(), repo.hostname(), lock.name())?;
        for (pack, &at) in &marks {
            let size = sizes.get(pack).copied().unwrap_or(0);
            match blocker(at, opts.grace, &locks, now) {
                None if at < now => match store_lock(repo, pack)? {
                    Some(until) => {
                        report.locked.add(size);
                        report.pending.push(pending(pack, size, at, locked_reason(until)));
                    }
                    None => report.deleted.add(size),
                },
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
        return Err(Error::DamagedIndex {
            file: name[..8.min(name.len())].to_string(),
            why: why.to_string(),
            consequence: "marks recorded, nothing deleted".into(),
        });
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
    let mut deleted: HashSet<PackId> = HashSet::new();
    for (pack, &at) in &marks {
        let size = sizes.get(pack).copied().unwrap_or(0);
        if late_used.contains(pack) {
            report.recovered.add(size);
            continue;
        }
        match blocker(at, opts.grace, &locks, now) {
            None => match store_lock(repo, pack)? {
                // Locked: stays indexed and marked until the store lets it go.
                Some(until) => {
                    report.locked.add(size);
                    report.pending.push(pending(pack, size, at, locked_reason(until)));
                }
                None => doomed.push(*pack),
            },
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
            match repo.delete_pack(&hex::encode(pack)) {
                // Locked after all (a lock extended since it was asked): no index file lists
                // it any more, so the next prune finds it unindexed and deletes it once free.
                Err(Error::Storage(cairn_storage::StorageError::Locked { until, .. })) => {
                    let size = sizes.get(pack).copied().unwrap_or(0);
                    report.locked.add(size);
                    report.pending.push(pending(pack, size, marks[pack], locked_reason(until)));
                    continue;
                }
                other => other?,
            }
            deleted.insert(*pack);
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
    if repo.lock_policy().is_some() {
        // Listed now: packs backups wrote during this prune keep their entries.
        let stored: HashSet<String> = repo.stored_packs()?.into_iter().map(|(n, _)| n).collect();
        repo.compact_lock_records(&stored)?;
    }
    // The index in memory forgets what was deleted and learns the marks (loading a large one
    // again takes long; index files rewritten meanwhile list only packs it knows).
    repo.after_prune(&deleted, &marks.keys().copied().collect());
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
        reach.add_point(repo, &index, id, p, None)?;
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
    seen_points: HashSet<PointId>,
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
        let copies = index.located(id);
        if copies.is_empty() {
            let quarantined: Vec<PackId> = index.quarantined_copies(id).map(|q| q.pack).collect();
            if !quarantined.is_empty() {
                // Verify may have misread one of them: keep every copy.
                self.damaged_only.extend(quarantined);
                return Ok(());
            }
            return Err(Error::MissingBlock { id: *id, context: format!("{}; prune would not be safe", context()) });
        }
        if copies.iter().any(|c| self.is_used(c.position)) {
            return Ok(());
        }
        let chosen = copies.iter().find(|c| !c.marked).unwrap_or(&copies[0]);
        self.used[chosen.position as usize / 64] |= 1 << (chosen.position % 64);
        self.blocks += 1;
        let loc = chosen.location;
        self.raw_bytes += loc.len as u64;
        self.stored_bytes += loc.frame_stored_len as u64 * loc.len as u64 / (loc.frame_raw_len as u64).max(1);
        Ok(())
    }

    /// Marks what a point references. `prev`: a point added before (all its blocks marked),
    /// whose disk of the same name is compared page by page to skip the lookups of blocks
    /// that did not change.
    fn add_point(
        &mut self,
        repo: &Repository,
        index: &Index,
        id: &PointId,
        point: &crate::RestorePoint,
        prev: Option<&crate::RestorePoint>,
    ) -> Result<()> {
        for disk in &point.disks {
            let prev_disk =
                prev.and_then(|p| p.disks.iter().find(|d| d.name == disk.name && d.block_size == disk.block_size));
            for (k, page_hex) in disk.map.iter().enumerate() {
                let page = BlockId::from_hex(page_hex).ok_or_else(|| {
                    Error::Corrupt(format!("restore point {}: map page {k} of {} is not an ID", id.short(), disk.name))
                })?;
                if !self.pages.insert(page) {
                    continue; // a page another point shares: its blocks are marked already
                }
                self.mark(index, &page, &|| format!("map page {k} of disk {} of point {}", disk.name, id.short()))?;
                let ids = repo.read_map_page(disk, k).map_err(|e| {
                    Error::Corrupt(format!(
                        "map page {k} of disk {} of point {} cannot be read ({e}); nothing was changed",
                        disk.name,
                        id.short()
                    ))
                })?;
                let same_place = match prev_disk.filter(|d| d.map.get(k).is_some()) {
                    // Read again rather than kept: a whole disk's map can be large.
                    Some(d) => repo.read_map_page(d, k).map_err(|e| {
                        let p = prev.map(|p| p.name.as_str()).unwrap_or_default();
                        Error::Corrupt(format!(
                            "map page {k} of disk {} of an earlier point of {p} cannot be read ({e}); nothing was changed",
                            d.name
                        ))
                    })?,
                    None => Vec::new(),
                };
                for (j, b) in ids.iter().enumerate().filter(|(_, b)| !b.is_zero()) {
                    if same_place.get(j) == Some(b) {
                        continue;
                    }
                    self.mark(index, b, &|| format!("a block of disk {} of point {}", disk.name, id.short()))?;
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

/// Writes the used blocks of `packs` into new packs, each block read back and checked against
/// its ID first; returns the packs written, all durable and indexed. Several threads (`threads`,
/// 0: one per core, at most 4), each a session of its own over a share of the packs: reading,
/// checking and compressing are CPU work.
fn repack(
    repo: &Arc<Repository>,
    index: Arc<Index>,
    packs: &mut [(PackId, Vec<u32>)],
    sizes: &HashMap<PackId, u64>,
    threads: usize,
    report: &mut PruneReport,
) -> Result<HashSet<PackId>> {
    let auto = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    let threads = if threads == 0 { auto } else { threads }.min(packs.len().max(1));
    // Shares of about equal size: the largest packs first, each to the lightest share.
    let mut order: Vec<&(PackId, Vec<u32>)> = packs.iter().collect();
    order.sort_by_key(|(p, used)| std::cmp::Reverse((used.len(), *p)));
    type Share<'a> = (usize, Vec<&'a (PackId, Vec<u32>)>);
    let mut shares: Vec<Share> = (0..threads).map(|_| (0, Vec::new())).collect();
    for p in order {
        let lightest = shares.iter_mut().min_by_key(|(n, _)| *n).unwrap();
        lightest.0 += p.1.len();
        lightest.1.push(p);
    }
    // The threads read, check and compress; one session stores what they send (one pack
    // being filled, not one per thread).
    let mut session = Session::new(repo.clone());
    let (tx, rx) = crossbeam_channel::bounded::<SealedFrame>(2 * threads);
    let (worker_results, stored) = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|(_, share)| {
                let tx = tx.clone();
                let index = &*index;
                scope.spawn(move || repack_share(repo, index, &share, &tx))
            })
            .collect();
        drop(tx);
        // On a storage error the receiver goes: the threads' next send fails and they stop.
        let stored = rx.iter().try_for_each(|frame| session.add_frame(frame).map(drop));
        drop(rx);
        let results: Vec<Result<()>> = handles.into_iter().map(|h| h.join().expect("repack thread panicked")).collect();
        (results, stored)
    });
    stored?;
    for r in worker_results {
        r?;
    }
    // The positions are spent (the index they refer to, and the lists of them: tens of MiB
    // in a large repository) before the session's index files join the index, and the
    // threads' buffers go back to the system (glibc keeps them in per-thread arenas unless
    // asked).
    drop(index);
    for (_, positions) in packs.iter_mut() {
        *positions = Vec::new();
    }
    trim_heap();
    let files = session.finish()?;
    trim_heap();
    for (pack, _) in packs {
        report.repacked.add(sizes.get(pack).copied().unwrap_or(0));
    }
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

fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One thread's share of a repack: frames of the used blocks, each checked against its ID,
/// sent to the session. Stops when the session is gone (it failed).
fn repack_share(
    repo: &Arc<Repository>,
    index: &Index,
    packs: &[&(PackId, Vec<u32>)],
    out: &crossbeam_channel::Sender<SealedFrame>,
) -> Result<()> {
    let mut compressor = crate::crypto::Compressor::new(3);
    let mut raw = Vec::new();
    let mut blobs: Vec<BlobEntry> = Vec::new();
    let mut flush = |raw: &mut Vec<u8>, blobs: &mut Vec<BlobEntry>| -> Result<()> {
        if blobs.is_empty() {
            return Ok(());
        }
        let frame = SealedFrame::build(repo.crypto(), &mut compressor, raw, std::mem::take(blobs));
        raw.clear();
        out.send(frame).map_err(|_| Error::Corrupt("the repack's storage failed".into()))
    };
    let (mut stored, mut opened) = (Vec::new(), Vec::new());
    for (_, positions) in packs {
        // In frame order, each frame read and opened once.
        let mut copies: Vec<_> = positions.iter().map(|&p| index.entry(p)).collect();
        copies.sort_by_key(|(_, loc)| (loc.frame_offset, loc.raw_offset));
        for group in copies.chunk_by(|a, b| a.1.frame_offset == b.1.frame_offset) {
            let first = group[0].1;
            let read = repo.read_frame_into(&first, &mut stored, &mut opened).is_ok();
            let sound = |id: &BlockId, loc: &crate::BlobLocation| {
                let end = loc.raw_offset as usize + loc.len as usize;
                read && opened.get(loc.raw_offset as usize..end).is_some_and(|b| repo.crypto().block_id(b) == *id)
            };
            // Every byte of the frame is a used block, each checked: the frame is copied as
            // stored (no recompression; sealed frames carry their own nonce).
            let mut at = 0u32;
            let whole = group.iter().all(|(_, l)| {
                let next = l.raw_offset == at;
                at += l.len;
                next
            }) && at == first.frame_raw_len;
            if whole && group.iter().all(|(id, loc)| sound(id, loc)) {
                let entries = group.iter().map(|(id, l)| BlobEntry {
                    kind: l.kind,
                    id: *id,
                    raw_offset: l.raw_offset,
                    len: l.len,
                });
                let frame =
                    SealedFrame { stored: stored.clone(), raw_len: first.frame_raw_len, blobs: entries.collect() };
                out.send(frame).map_err(|_| Error::Corrupt("the repack's storage failed".into()))?;
                continue;
            }
            for (id, loc) in group {
                // Checked against its ID; a damaged copy falls back to any other.
                let blob = if sound(id, loc) {
                    opened[loc.raw_offset as usize..(loc.raw_offset + loc.len) as usize].to_vec()
                } else {
                    repo.read_blob(id, "repacking")?
                };
                if blobs.len() == 16 || raw.len() + blob.len() > 1 << 20 {
                    flush(&mut raw, &mut blobs)?;
                }
                blobs.push(BlobEntry { kind: loc.kind, id: *id, raw_offset: raw.len() as u32, len: blob.len() as u32 });
                raw.extend_from_slice(&blob);
            }
        }
    }
    flush(&mut raw, &mut blobs)
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
    for (name, mut state) in repo.typed_records::<VerifyState>()? {
        let is_gone = |k: &String| pack_id_from_name(k).is_some_and(|p| gone.contains(&p));
        if !state.packs.keys().any(is_gone) {
            continue;
        }
        state.packs.retain(|k, _| !is_gone(k));
        let new = repo.save_typed(&state)?;
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
    let name = repo.save_typed(&PruneMarks { time: crate::now_rfc3339(), packs: list })?;
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

/// In an immutable repository, the date until which the store keeps `pack`, if it is later
/// than now (asked of the store: the truth, not a record).
fn store_lock(repo: &Repository, pack: &PackId) -> Result<Option<u64>> {
    let Some(locks) = repo.object_locks()? else { return Ok(None) };
    let now = cairn_storage::object_lock::now();
    match locks.retained_until(cairn_storage::Kind::Pack, &hex::encode(pack)) {
        Ok(until) => Ok(until.filter(|&u| u > now)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn locked_reason(until: u64) -> String {
    format!("locked by the store until {} (immutability)", cairn_storage::object_lock::rfc3339(until))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
