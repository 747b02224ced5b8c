//! Verification: re-read every pack, re-hash every block and every map page, and name every
//! restore point that damage affects.

use crate::progress::Progress;
use anyhow::Result;
use cairn_repo::index::{pack_id_from_name, PackId};
use cairn_repo::pack::{open_frame, parse_pack};
use cairn_repo::{BlockId, Repository};
use cairn_storage::Kind;
use crossbeam_channel::unbounded;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub packs_checked: u64,
    pub pack_bytes_checked: u64,
    pub blocks_checked: u64,
    pub points_checked: u64,
    pub damaged_packs: Vec<PackDamage>,
    pub damaged_blocks: Vec<BlockDamage>,
    pub damaged_index_files: Vec<Named>,
    pub damaged_points: Vec<Named>,
    pub affected_points: Vec<AffectedPoint>,
    /// Packs no index lists: left by interrupted backups. Harmless; not an error.
    pub unindexed_packs: Vec<String>,
    /// Packs holding damaged copies that are quarantined (see `Repository::quarantine`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quarantined_packs: Vec<String>,
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

#[derive(Debug, Serialize)]
pub struct BlockDamage {
    pub block: String,
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
    pub id: String,
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
    pub points: Option<Vec<String>>,
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
    let list = repo.list_points()?;
    let selected: Option<HashSet<&str>> = opts.points.as_ref().map(|v| v.iter().map(|s| s.as_str()).collect());
    if let Some(sel) = &selected {
        // The packs holding the selected points' blocks and map pages.
        let mut wanted: HashSet<PackId> = HashSet::new();
        for (_, p) in list.points.iter().filter(|(id, _)| sel.contains(id.as_str())) {
            for d in &p.disks {
                for (page_no, page_id) in d.map.iter().enumerate() {
                    if let Some(loc) = BlockId::from_hex(page_id).and_then(|b| index.get(&b)) {
                        wanted.insert(loc.pack);
                    }
                    if let Ok(ids) = repo.read_map_page(d, page_no) {
                        for b in ids.iter().filter(|b| !b.is_zero()) {
                            if let Some(loc) = index.get(b) {
                                wanted.insert(loc.pack);
                            }
                        }
                    }
                }
            }
        }
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

    let mut damaged: HashMap<BlockId, BlockDamage> = HashMap::new();
    for (pack, ids) in &by_pack {
        if !all_stored.contains(pack) {
            let name = hex::encode(pack);
            report.damaged_packs.push(PackDamage { pack: name.clone(), problem: "pack file is missing".into() });
            for id in ids {
                damaged.insert(
                    *id,
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

    // Packs, in parallel: whole-pack hash, trailer, then every indexed blob via the index's
    // own locations (what a restore will read).
    progress.start("verify packs", stored.values().map(|(_, s)| *s).sum());
    let shared = Mutex::new((Vec::<PackDamage>::new(), Vec::<BlockDamage>::new(), 0u64, 0u64, 0u64));
    let (tx, rx) = unbounded::<(PackId, String)>();
    for (id, (name, _)) in &stored {
        tx.send((*id, name.clone())).unwrap();
    }
    drop(tx);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            let shared = &shared;
            let by_pack = &by_pack;
            let index = &index;
            let quarantined = &quarantined;
            s.spawn(move || {
                for (pack, name) in rx {
                    let mut pd = Vec::new();
                    let mut bd = Vec::new();
                    let mut blocks = 0u64;
                    let bytes = match repo.backend().get(Kind::Pack, &name) {
                        Ok(b) => b,
                        Err(e) => {
                            pd.push(PackDamage { pack: name.clone(), problem: format!("unreadable: {e}") });
                            for id in by_pack.get(&pack).into_iter().flatten() {
                                bd.push(BlockDamage {
                                    block: id.to_hex(),
                                    pack: name.clone(),
                                    problem: "its pack is unreadable".into(),
                                });
                            }
                            let mut sh = shared.lock().unwrap();
                            sh.0.extend(pd);
                            sh.1.extend(bd);
                            continue;
                        }
                    };
                    progress.advance(bytes.len() as u64);
                    // A pack whose damaged copies are quarantined (and so no longer used) still
                    // differs from its name: that is known, not new damage. Its other blocks are
                    // checked one by one below.
                    if cairn_repo::pack::name_of(&bytes) != name && !quarantined.contains(&pack) {
                        pd.push(PackDamage {
                            pack: name.clone(),
                            problem: "bytes changed (hash does not match the pack's name)".into(),
                        });
                    }
                    let trailer = parse_pack(repo.crypto(), &bytes, &format!("pack {}", &name[..8]));
                    if let Err(e) = &trailer {
                        pd.push(PackDamage { pack: name.clone(), problem: e.to_string() });
                    }
                    // Blocks are checked in pack order, so only the frame in hand is kept
                    // decoded (a whole decoded pack is ~3.5x its size).
                    let mut current: Option<(u32, Result<Vec<u8>, String>)> = None;
                    let mut check = |id: &BlockId,
                                     off: u32,
                                     stored_len: u32,
                                     raw_len: u32,
                                     raw_offset: u32,
                                     len: u32|
                     -> Option<String> {
                        if current.as_ref().map(|c| c.0) != Some(off) {
                            let end = off as usize + stored_len as usize;
                            let decoded = if end > bytes.len() {
                                Err("frame lies beyond the end of the pack (truncated)".into())
                            } else {
                                open_frame(repo.crypto(), &bytes[off as usize..end], raw_len, "frame")
                                    .map_err(|e| e.to_string())
                            };
                            current = Some((off, decoded));
                        }
                        let frame = &current.as_ref().unwrap().1;
                        match frame {
                            Err(e) => Some(e.clone()),
                            Ok(raw) => {
                                let end = raw_offset as usize + len as usize;
                                if end > raw.len() || repo.crypto().block_id(&raw[raw_offset as usize..end]) != *id {
                                    Some("content does not match its hash".into())
                                } else {
                                    None
                                }
                            }
                        }
                    };
                    match by_pack.get(&pack) {
                        Some(ids) => {
                            let mut in_order: Vec<_> = ids.iter().map(|id| (id, index.get(id).unwrap())).collect();
                            in_order.sort_by_key(|(_, loc)| (loc.frame_offset, loc.raw_offset));
                            for (id, loc) in in_order {
                                blocks += 1;
                                if let Some(problem) = check(
                                    id,
                                    loc.frame_offset,
                                    loc.frame_stored_len,
                                    loc.frame_raw_len,
                                    loc.raw_offset,
                                    loc.len,
                                ) {
                                    bd.push(BlockDamage { block: id.to_hex(), pack: name.clone(), problem });
                                }
                            }
                        }
                        None => {
                            // Unindexed: still check what its trailer lists.
                            if let Ok(fr) = &trailer {
                                for f in fr {
                                    for b in &f.blobs {
                                        blocks += 1;
                                        if let Some(problem) =
                                            check(&b.id, f.offset, f.stored_len, f.raw_len, b.raw_offset, b.len)
                                        {
                                            pd.push(PackDamage {
                                                pack: name.clone(),
                                                problem: format!("unindexed block {}: {problem}", b.id.short()),
                                            });
                                        }
                                    }
                                }
                            }
                        }
                    }
                    let mut sh = shared.lock().unwrap();
                    sh.0.extend(pd);
                    sh.1.extend(bd);
                    sh.2 += blocks;
                    sh.3 += 1;
                    sh.4 += bytes.len() as u64;
                }
            });
        }
    });
    progress.finish();
    let (pd, bd, blocks, packs, bytes) = shared.into_inner().unwrap();
    report.damaged_packs.extend(pd);
    for b in bd {
        damaged.insert(BlockId::from_hex(&b.block).unwrap(), b);
    }
    report.blocks_checked = blocks;
    report.packs_checked = packs;
    report.pack_bytes_checked = bytes;

    for (name, problem) in repo.damaged_index_files() {
        report.damaged_index_files.push(Named { id: name, problem });
    }

    // Points: every map page re-read and re-hashed; every referenced block present and sound.
    for (id, problem) in &list.damaged {
        report.damaged_points.push(Named { id: id.clone(), problem: problem.clone() });
    }
    for (id, p) in &list.points {
        if selected.as_ref().is_some_and(|sel| !sel.contains(id.as_str())) && damaged.is_empty() {
            continue;
        }
        report.points_checked += 1;
        let mut disks = Vec::new();
        for d in &p.disks {
            let mut ad =
                AffectedDisk { disk: d.name.clone(), offsets: vec![], damaged_blocks: 0, damaged_map_pages: vec![] };
            let mut seen_missing = HashSet::new();
            for page in 0..d.map.len() {
                match repo.read_map_page(d, page) {
                    Err(_) => ad.damaged_map_pages.push(page),
                    Ok(ids) => {
                        for (i, bid) in ids.iter().enumerate() {
                            if bid.is_zero() {
                                continue;
                            }
                            let bad = damaged.contains_key(bid) || !index.contains(bid);
                            if bad {
                                if !index.contains(bid) && seen_missing.insert(*bid) {
                                    let q = quarantined.iter().find(|p| index.is_quarantined(p, bid));
                                    damaged.entry(*bid).or_insert(BlockDamage {
                                        block: bid.to_hex(),
                                        pack: String::new(),
                                        problem: match q {
                                            Some(p) => format!(
                                                "damaged in pack {} and quarantined: the next backup that reads this block stores it again",
                                                &hex::encode(p)[..8]
                                            ),
                                            None => "missing from every index".into(),
                                        },
                                    });
                                }
                                ad.damaged_blocks += 1;
                                if ad.offsets.len() < 100 {
                                    ad.offsets
                                        .push((page * cairn_repo::map::PAGE_BLOCKS + i) as u64 * d.block_size as u64);
                                }
                            }
                        }
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
    let mut sorted: BTreeMap<String, BlockDamage> = BTreeMap::new();
    for (_, b) in damaged {
        sorted.insert(b.block.clone(), b);
    }
    report.damaged_blocks = sorted.into_values().collect();
    report.ok = report.damaged_packs.is_empty()
        && report.damaged_blocks.is_empty()
        && report.damaged_index_files.is_empty()
        && report.damaged_points.is_empty()
        && report.affected_points.is_empty();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
