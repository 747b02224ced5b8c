//! Verification: re-read every pack, re-hash every block and every map page, and name every
//! restore point that damage affects.
//!
//! Only what is *proven* wrong counts as damage that verify acts on: bytes that were read and
//! do not match their hash or do not decode, a pack that is missing or truncated. A read that
//! fails for another reason (an I/O error, a busy server) proves nothing about the data: the
//! pack is reported as unreadable, nothing is quarantined, and the next run reads it again.
//! Copies in quarantine are re-checked each time their pack is read; one that reads sound is
//! released.

use crate::progress::{Cancelled, Progress};
use anyhow::Result;
use cairn_repo::catalog::VerifyState;
use cairn_repo::index::{pack_id_from_name, Index, PackId};
use cairn_repo::pack::{open_frame, parse_pack, FrameEntry};
use cairn_repo::{BlobLocation, BlockId, Error as RepoError, PointId, Repository};
use cairn_storage::StorageError;
use crossbeam_channel::unbounded;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A pack larger than this is not read whole (cairn closes packs near 16 MiB; a frame may
/// overshoot by at most 16 MiB): it is reported instead of exhausting memory.
pub const MAX_PACK_READ: u64 = 256 << 20;
/// A failed pack read is retried this many times before the pack is called unreadable.
const READ_ATTEMPTS: u32 = 3;

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub packs_checked: u64,
    pub pack_bytes_checked: u64,
    pub blocks_checked: u64,
    pub points_checked: u64,
    pub damaged_packs: Vec<PackDamage>,
    /// Damaged or missing copies of blocks (a block with another sound copy is still listed
    /// here, but affects no restore point).
    pub damaged_blocks: Vec<BlockDamage>,
    /// Packs that could not be read for a reason that proves nothing about their bytes (an I/O
    /// error): not verified this run, nothing quarantined; run verify again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_packs: Vec<PackDamage>,
    pub damaged_index_files: Vec<Named>,
    pub damaged_points: Vec<Named>,
    pub affected_points: Vec<AffectedPoint>,
    /// Packs no index lists: left by interrupted backups. Harmless; not an error.
    pub unindexed_packs: Vec<String>,
    /// Packs a prune had marked and deleted while this verify ran (not damage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reclaimed_packs: Vec<String>,
    /// Packs holding damaged copies that are quarantined (see `Repository::quarantine`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quarantined_packs: Vec<String>,
    /// Quarantined copies this run read back sound: they are released from quarantine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub released_copies: Vec<BlockDamage>,
    /// Packs in the repository, and the ones this run read (all, unless a selection or sample).
    pub packs_total: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packs_verified: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct PackDamage {
    pub pack: String,
    pub problem: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BlockDamage {
    pub block: String,
    /// The pack holding the damaged copy; empty when the block has no copy at all.
    pub pack: String,
    pub problem: String,
}

#[derive(Debug, Serialize)]
pub struct Named {
    pub id: String,
    pub problem: String,
}

#[derive(Debug, Serialize)]
pub struct AffectedPoint {
    pub id: PointId,
    pub name: String,
    pub time: String,
    pub disks: Vec<AffectedDisk>,
}

#[derive(Debug, Serialize)]
pub struct AffectedDisk {
    pub disk: String,
    /// Disk byte offsets of damaged or missing blocks (the first 100).
    pub offsets: Vec<u64>,
    pub damaged_blocks: u64,
    /// Map pages that could not be read (the point cannot be restored at all).
    pub damaged_map_pages: Vec<usize>,
}

/// What to verify; the default is everything.
#[derive(Default)]
pub struct VerifyOptions {
    /// Only these restore points (IDs): their map pages and the packs their blocks live in.
    pub points: Option<Vec<PointId>>,
    /// Only this percentage of the (selected) packs, those verified longest ago first, so that
    /// repeated runs cover the whole repository.
    pub sample_percent: Option<f64>,
    /// When each pack (by name) was last verified, RFC 3339.
    pub last_verified: HashMap<String, String>,
}

/// Verifies the whole repository. The caller holds a shared lock and has loaded the index.
pub fn verify(repo: &Repository, workers: usize, progress: &dyn Progress) -> Result<VerifyReport> {
    verify_with(repo, workers, &VerifyOptions::default(), progress)
}

/// A verify run with its bookkeeping done: see [`run`].
#[derive(Debug, Serialize)]
pub struct VerifyRun {
    #[serde(flatten)]
    pub report: VerifyReport,
    /// Packs no run has verified yet.
    pub packs_never_verified: usize,
    /// When every pack present had been verified at least once by then (None while some never were).
    pub all_verified_since: Option<String>,
}

/// Verifies what `opts` selects (its `last_verified` is read from the catalog), then records
/// the outcome in the repository's catalog: proven-damaged copies join the quarantine (so the
/// next backup of their source stores them again), copies that read back sound leave it, and
/// each pack read whole and sound gets its last-verified time (what `--sample` rotates on).
pub fn run(repo: &Repository, workers: usize, mut opts: VerifyOptions, progress: &dyn Progress) -> Result<VerifyRun> {
    let mut states = repo.typed_records::<VerifyState>()?;
    states.sort_by(|(_, a), (_, b)| a.time.cmp(&b.time));
    let mut last: HashMap<String, String> =
        states.last().map(|(_, s)| s.packs.clone().into_iter().collect()).unwrap_or_default();
    opts.last_verified = last.clone();
    let report = verify_with(repo, workers, &opts, progress)?;

    let pair = |b: &BlockDamage| (b.pack.clone(), b.block.clone());
    let add: Vec<(String, String)> = report.damaged_blocks.iter().filter(|b| !b.pack.is_empty()).map(pair).collect();
    let release: Vec<(String, String)> = report.released_copies.iter().map(pair).collect();
    repo.update_quarantine(&add, &release)?;

    let now = cairn_repo::now_rfc3339();
    let damaged: HashSet<&str> = report.damaged_packs.iter().map(|d| d.pack.as_str()).collect();
    let unreadable: HashSet<&str> = report.unreadable_packs.iter().map(|d| d.pack.as_str()).collect();
    for p in &report.packs_verified {
        if !damaged.contains(p.as_str()) && !unreadable.contains(p.as_str()) {
            last.insert(p.clone(), now.clone());
        }
    }
    let present: HashSet<String> = repo.stored_packs()?.into_iter().map(|(n, _)| n).collect();
    last.retain(|p, _| present.contains(p));
    let packs_never_verified = present.iter().filter(|p| !last.contains_key(*p)).count();
    let all_verified_since = if packs_never_verified == 0 { last.values().min().cloned() } else { None };
    if !report.packs_verified.is_empty() {
        // The new state is durable before the old ones go: a crash leaves two, which readers
        // resolve by time.
        let name = repo.save_typed(&VerifyState { time: now, packs: last.into_iter().collect() })?;
        cairn_storage::crash_point("verify.state_saved");
        for (old, _) in states {
            if old != name {
                repo.delete_record(&old)?;
            }
        }
    }
    Ok(VerifyRun { report, packs_never_verified, all_verified_since })
}

/// What reading one pack found.
#[derive(Default)]
struct PackFindings {
    pack_damage: Vec<PackDamage>,
    unreadable: Option<PackDamage>,
    /// Damaged copies in this pack (proven: bytes read and wrong).
    copies: Vec<BlockDamage>,
    released: Vec<BlockDamage>,
    blocks: u64,
    bytes: u64,
    /// The pack was gone, and a prune had marked it: reclaimed, not damage.
    reclaimed: Option<String>,
}

/// Verifies what `opts` selects. Damage found is reported with every restore point it affects,
/// whichever points were selected.
pub fn verify_with(
    repo: &Repository,
    workers: usize,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut report = VerifyReport::default();
    // Points first, then the index: the listing refreshes the index, so it covers every point
    // listed, even one a backup committed a moment ago (never a false "missing").
    let list = repo.list_points()?;
    let index = repo.index();
    let by_pack = index.blobs_by_pack();
    let mut stored: HashMap<PackId, (String, u64)> = repo
        .stored_packs()?
        .into_iter()
        .filter_map(|(n, size)| pack_id_from_name(&n).map(|id| (id, (n, size))))
        .collect();
    // Every pack present, before a selection or sample narrows what is read.
    let all_stored: HashSet<PackId> = stored.keys().copied().collect();
    report.packs_total = stored.len() as u64;
    let selected: Option<HashSet<&str>> = opts.points.as_ref().map(|v| v.iter().map(|s| s.as_str()).collect());
    if let Some(sel) = &selected {
        let wanted = packs_of_points(repo, &index, list.points.iter().filter(|(id, _)| sel.contains(id.as_str())));
        stored.retain(|id, _| wanted.contains(id));
    }
    if let Some(pct) = opts.sample_percent {
        let mut order: Vec<(String, PackId)> = stored
            .iter()
            .map(|(id, (name, _))| (opts.last_verified.get(name).cloned().unwrap_or_default(), *id))
            .collect();
        order.sort(); // never verified ("") first, then the oldest
        let take = ((order.len() as f64 * pct / 100.0).ceil() as usize).min(order.len());
        let keep: HashSet<PackId> = order.into_iter().take(take).map(|(_, id)| id).collect();
        stored.retain(|id, _| keep.contains(id));
    }
    let quarantined = index.quarantined_packs();
    report.quarantined_packs = quarantined.iter().map(hex::encode).collect();
    report.quarantined_packs.sort();
    report.packs_verified = stored.values().map(|(n, _)| n.clone()).collect();
    report.packs_verified.sort();

    // Damaged copies, by (pack, block): a block is lost only when every copy is.
    let mut damaged: HashMap<(PackId, BlockId), BlockDamage> = HashMap::new();
    for (pack, positions) in &by_pack {
        // Not listed: missing only if storage confirms it (a listing is not proof).
        if index.is_marked(pack) && !all_stored.contains(pack) {
            // A prune marked it and has deleted it since: no point this verify reads needs it.
            report.reclaimed_packs.push(hex::encode(pack));
            continue;
        }
        if !all_stored.contains(pack) && !repo.pack_exists(&hex::encode(pack)).unwrap_or(true) {
            let name = hex::encode(pack);
            report.damaged_packs.push(PackDamage { pack: name.clone(), problem: "pack file is missing".into() });
            for id in positions.iter().map(|&p| index.entry(p).0) {
                damaged.insert(
                    (*pack, id),
                    BlockDamage { block: id.to_hex(), pack: name.clone(), problem: "its pack file is missing".into() },
                );
            }
        }
    }
    for (pack, (name, _)) in &stored {
        if !index.has_pack(pack) {
            report.unindexed_packs.push(name.clone());
        }
    }
    report.unindexed_packs.sort();

    progress.start("verify packs", stored.values().map(|(_, s)| *s).sum());
    let (tx, rx) = unbounded::<(PackId, String, u64)>();
    for (id, (name, size)) in &stored {
        tx.send((*id, name.clone(), *size)).unwrap();
    }
    drop(tx);
    let found = Mutex::new(Vec::<(PackId, PackFindings)>::new());
    // Latched: a worker that stopped left packs unread, whatever the caller answers later.
    let stopped = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let (rx, found, by_pack, index, stopped) = (rx.clone(), &found, &by_pack, &index, &stopped);
            s.spawn(move || {
                for (pack, name, size) in rx {
                    if progress.cancelled() {
                        stopped.store(true, Ordering::SeqCst);
                        break;
                    }
                    let copies: Vec<(BlockId, BlobLocation)> =
                        by_pack.get(&pack).into_iter().flatten().map(|&p| index.entry(p)).collect();
                    let f = check_pack(repo, index, &pack, &name, size, &copies);
                    progress.advance(size);
                    found.lock().unwrap().push((pack, f));
                }
            });
        }
    });
    // A cancelled run checked only some packs: it reports nothing rather than a partial verdict.
    if stopped.load(Ordering::SeqCst) {
        return Err(Cancelled("verifying packs".into()).into());
    }
    progress.finish();
    for (pack, f) in found.into_inner().unwrap() {
        report.reclaimed_packs.extend(f.reclaimed);
        report.damaged_packs.extend(f.pack_damage);
        report.unreadable_packs.extend(f.unreadable);
        report.released_copies.extend(f.released);
        for c in f.copies {
            damaged.insert((pack, BlockId::from_hex(&c.block).unwrap()), c);
        }
        report.blocks_checked += f.blocks;
        report.pack_bytes_checked += f.bytes;
        report.packs_checked += 1;
    }
    report.unreadable_packs.sort_by(|a, b| a.pack.cmp(&b.pack));
    report.released_copies.sort_by(|a, b| (&a.pack, &a.block).cmp(&(&b.pack, &b.block)));

    for (name, problem) in repo.damaged_index_files() {
        report.damaged_index_files.push(Named { id: name, problem });
    }

    // Points: every map page re-read and re-hashed; every referenced block present and sound.
    for (id, problem) in &list.damaged {
        report.damaged_points.push(Named { id: id.clone(), problem: problem.clone() });
    }
    // A block is lost when it has no copy, or every copy is damaged; a quarantined copy this
    // run read back sound (released below) is a copy.
    let released: HashSet<BlockId> =
        report.released_copies.iter().filter_map(|c| BlockId::from_hex(&c.block)).collect();
    let lost =
        |bid: &BlockId| !released.contains(bid) && index.copies(bid).all(|loc| damaged.contains_key(&(loc.pack, *bid)));
    let mut missing: BTreeMap<BlockId, BlockDamage> = BTreeMap::new();
    for (id, p) in &list.points {
        if selected.as_ref().is_some_and(|sel| !sel.contains(id.as_str())) && damaged.is_empty() {
            continue;
        }
        report.points_checked += 1;
        let mut disks = Vec::new();
        for d in &p.disks {
            let mut ad =
                AffectedDisk { disk: d.name.clone(), offsets: vec![], damaged_blocks: 0, damaged_map_pages: vec![] };
            for page in 0..d.map.len() {
                let Ok(ids) = repo.read_map_page(d, page) else {
                    ad.damaged_map_pages.push(page);
                    continue;
                };
                for (i, bid) in ids.iter().enumerate() {
                    if bid.is_zero() || !lost(bid) {
                        continue;
                    }
                    if !index.contains(bid) {
                        missing.entry(*bid).or_insert_with(|| missing_block(&index, &quarantined, bid));
                    }
                    ad.damaged_blocks += 1;
                    if ad.offsets.len() < 100 {
                        ad.offsets.push((page * cairn_repo::map::PAGE_BLOCKS + i) as u64 * d.block_size as u64);
                    }
                }
            }
            if ad.damaged_blocks > 0 || !ad.damaged_map_pages.is_empty() {
                disks.push(ad);
            }
        }
        if !disks.is_empty() {
            report.affected_points.push(AffectedPoint {
                id: id.clone(),
                name: p.name.clone(),
                time: p.time.clone(),
                disks,
            });
        }
    }
    let mut sorted: Vec<BlockDamage> = damaged.into_values().chain(missing.into_values()).collect();
    sorted.sort_by(|a, b| (&a.block, &a.pack).cmp(&(&b.block, &b.pack)));
    report.damaged_blocks = sorted;
    report.ok = report.damaged_packs.is_empty()
        && report.damaged_blocks.is_empty()
        && report.unreadable_packs.is_empty()
        && report.damaged_index_files.is_empty()
        && report.damaged_points.is_empty()
        && report.affected_points.is_empty();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The packs holding the blocks and map pages of `points`.
fn packs_of_points<'a>(
    repo: &Repository,
    index: &Index,
    points: impl Iterator<Item = &'a (PointId, cairn_repo::RestorePoint)>,
) -> HashSet<PackId> {
    let mut wanted = HashSet::new();
    for (_, p) in points {
        for d in &p.disks {
            for (page_no, page_id) in d.map.iter().enumerate() {
                if let Some(b) = BlockId::from_hex(page_id) {
                    wanted.extend(index.copies(&b).map(|l| l.pack));
                }
                if let Ok(ids) = repo.read_map_page(d, page_no) {
                    for b in ids.iter().filter(|b| !b.is_zero()) {
                        wanted.extend(index.copies(b).map(|l| l.pack));
                    }
                }
            }
        }
    }
    wanted
}

/// The report of a block a point needs that no index lists.
fn missing_block(index: &Index, quarantined: &HashSet<PackId>, bid: &BlockId) -> BlockDamage {
    let q = quarantined.iter().find(|p| index.is_quarantined(p, bid));
    BlockDamage {
        block: bid.to_hex(),
        pack: String::new(),
        problem: match q {
            Some(p) => format!(
                "damaged in pack {} and quarantined: the next backup that reads this block stores it again",
                &hex::encode(p)[..8]
            ),
            None => "missing from every index".into(),
        },
    }
}

/// Reads one pack whole and checks it: its name against its hash, its trailer, and every copy
/// the index places in it (through the index's locations: what a restore reads), or what its
/// trailer lists when no index does; quarantined copies are checked through the trailer.
fn check_pack(
    repo: &Repository,
    index: &Index,
    pack: &PackId,
    name: &str,
    size: u64,
    copies: &[(BlockId, BlobLocation)],
) -> PackFindings {
    let mut f = PackFindings::default();
    let proven = |problem: String| PackDamage { pack: name.to_string(), problem };
    let lost_copies = |f: &mut PackFindings, problem: &str| {
        for (id, _) in copies {
            f.copies.push(BlockDamage { block: id.to_hex(), pack: name.to_string(), problem: problem.into() });
        }
    };
    if size > MAX_PACK_READ {
        f.unreadable = Some(proven(format!("{size} bytes, larger than any pack cairn writes: not read")));
        return f;
    }
    let (bytes, sound) = match read_pack_twice(repo, name) {
        Ok(b) => b,
        Err(ReadProblem::Missing) if index.is_marked(pack) => {
            f.reclaimed = Some(name.to_string());
            return f;
        }
        Err(ReadProblem::Missing) => {
            f.pack_damage.push(proven("pack file is missing".into()));
            lost_copies(&mut f, "its pack file is missing");
            return f;
        }
        Err(ReadProblem::Unreadable(e)) => {
            f.unreadable = Some(proven(format!("{e}; nothing was quarantined")));
            return f;
        }
    };
    f.bytes = bytes.len() as u64;
    // A pack whose damaged copies are quarantined still differs from its name: that is known,
    // not new damage; its blocks are checked one by one below.
    let has_quarantine = index.has_quarantined_copies_in(pack);
    if !sound && !has_quarantine {
        f.pack_damage.push(proven("bytes changed (hash does not match the pack's name)".into()));
    }
    let trailer = parse_pack(repo.crypto(), &bytes, &format!("pack {}", &name[..8]));
    if let Err(e) = &trailer {
        f.pack_damage.push(proven(e.to_string()));
    }
    let mut frames = FrameCache::default();
    if copies.is_empty() {
        // Unindexed: still check what its trailer lists.
        for (id, loc) in trailer_copies(trailer.as_deref().unwrap_or(&[]), pack) {
            f.blocks += 1;
            if let Some(problem) = frames.check(repo, &bytes, &id, &loc) {
                f.pack_damage.push(proven(format!("unindexed block {}: {problem}", id.short())));
            }
        }
    }
    let mut in_order: Vec<&(BlockId, BlobLocation)> = copies.iter().collect();
    in_order.sort_by_key(|(_, loc)| (loc.frame_offset, loc.raw_offset));
    for (id, loc) in in_order {
        f.blocks += 1;
        if let Some(problem) = frames.check(repo, &bytes, id, loc) {
            f.copies.push(BlockDamage { block: id.to_hex(), pack: name.to_string(), problem });
        }
    }
    if has_quarantine {
        // Quarantined copies are not in the index; the trailer says where they are. One that
        // reads back sound (the damage was a misread, or the pack was repaired) is released.
        for (id, loc) in trailer_copies(trailer.as_deref().unwrap_or(&[]), pack) {
            if index.is_quarantined(pack, &id) && frames.check(repo, &bytes, &id, &loc).is_none() {
                f.released.push(BlockDamage {
                    block: id.to_hex(),
                    pack: name.to_string(),
                    problem: "reads sound".into(),
                });
            }
        }
    }
    f
}

pub(crate) enum ReadProblem {
    Missing,
    /// Not proof of damage: an I/O error, or reads that disagree with each other.
    Unreadable(String),
}

/// Reads a pack whole; returns its bytes and whether they match its name (its BLAKE3 hash).
/// Bytes that do not match are read a second time: a misread (a bit flipped on the way, a
/// torn read) must not pass for damage. Two reads that disagree prove nothing either way.
pub(crate) fn read_pack_twice(repo: &Repository, name: &str) -> Result<(Vec<u8>, bool), ReadProblem> {
    let read = || match read_pack(repo, name) {
        Ok(b) => Ok(b),
        Err(e) if e.is_not_found() => Err(ReadProblem::Missing),
        Err(e) => Err(ReadProblem::Unreadable(format!("could not be read ({e})"))),
    };
    let first = read()?;
    if cairn_repo::pack::name_of(&first) == name {
        return Ok((first, true));
    }
    let second = read()?;
    if cairn_repo::pack::name_of(&second) == name {
        return Ok((second, true));
    }
    if second != first {
        return Err(ReadProblem::Unreadable("two reads returned different bytes".into()));
    }
    Ok((first, false))
}

/// Reads a pack whole, retrying errors that may pass (an I/O error is not proof of damage).
pub(crate) fn read_pack(repo: &Repository, name: &str) -> Result<Vec<u8>, StorageError> {
    let mut attempt = 0;
    loop {
        match repo.read_pack(name) {
            Err(RepoError::Storage(StorageError::Io { .. })) if attempt + 1 < READ_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
            Ok(b) => return Ok(b),
            Err(RepoError::Storage(e)) => return Err(e),
            Err(e) => {
                return Err(StorageError::Io {
                    what: format!("pack {name}"),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }
}

/// Every blob a trailer lists, as locations in `pack`.
fn trailer_copies<'a>(
    frames: &'a [FrameEntry],
    pack: &'a PackId,
) -> impl Iterator<Item = (BlockId, BlobLocation)> + 'a {
    frames.iter().flat_map(move |fr| {
        fr.blobs.iter().map(move |b| {
            (
                b.id,
                BlobLocation {
                    pack: *pack,
                    frame_offset: fr.offset,
                    frame_stored_len: fr.stored_len,
                    frame_raw_len: fr.raw_len,
                    raw_offset: b.raw_offset,
                    len: b.len,
                    kind: b.kind,
                },
            )
        })
    })
}

/// The decoded frame in hand: blocks are checked in pack order, so only one frame is kept
/// decoded at a time (a whole decoded pack is ~3.5x its size).
#[derive(Default)]
struct FrameCache {
    current: Option<(u32, std::result::Result<Vec<u8>, String>)>,
}

impl FrameCache {
    /// Checks one copy; returns its problem, if any.
    fn check(&mut self, repo: &Repository, pack: &[u8], id: &BlockId, loc: &BlobLocation) -> Option<String> {
        if self.current.as_ref().map(|c| c.0) != Some(loc.frame_offset) {
            let start = loc.frame_offset as usize;
            let decoded = match pack.get(start..start + loc.frame_stored_len as usize) {
                None => Err("frame lies beyond the end of the pack (truncated)".to_string()),
                Some(stored) => {
                    open_frame(repo.crypto(), stored, loc.frame_raw_len, "frame").map_err(|e: RepoError| e.to_string())
                }
            };
            self.current = Some((loc.frame_offset, decoded));
        }
        match &self.current.as_ref().unwrap().1 {
            Err(e) => Some(e.clone()),
            Ok(raw) => {
                let start = loc.raw_offset as usize;
                match raw.get(start..start + loc.len as usize) {
                    Some(blob) if repo.crypto().block_id(blob) == *id => None,
                    _ => Some("content does not match its hash".into()),
                }
            }
        }
    }
}
