//! Repairs: rebuild the index from what the packs say about themselves (FORMAT.md §5: "a pack
//! is self-describing").
//!
//! Why: one damaged index file hides every pack it listed, and every restore point that
//! deduplicated against those packs then fails with "missing" although the packs are intact;
//! packs left by killed backups are stored but unknown to the index. A rebuild makes every
//! readable pack findable again.
//!
//! How, in the write order that keeps readers safe (FORMAT.md §8):
//! 1. every sound index file is read, keeping its entries for packs that exist (entries of
//!    missing packs are dropped, so backups store those blocks again);
//! 2. every stored pack no sound index file lists is read whole, and indexed from its trailer
//!    only for the blocks whose content matches their ID (a plain repository's trailer is not
//!    authenticated: a misread bit must not become an index entry that points at the wrong
//!    bytes);
//! 3. the new index files are stored durably;
//! 4. only then are the old index files deleted. A crash before 4 leaves duplicate entries,
//!    which readers accept; nothing is ever missing from the index.

use crate::progress::Progress;
use anyhow::Result;
use cairn_repo::index::{pack_id_from_name, PackId};
use cairn_repo::pack::{open_frame_into, parse_pack, FrameEntry};
use cairn_repo::{Error as RepoError, Repository};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// New index files list at most this many packs each (~16 GiB of packs, a few MiB of index).
const PACKS_PER_INDEX_FILE: usize = 1024;

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    pub packs_stored: u64,
    /// Packs whose entries came from sound index files.
    pub packs_from_index: u64,
    /// Packs no sound index file listed, read whole and indexed from their trailers (left by
    /// killed backups, or listed only in damaged index files).
    pub packs_from_trailers: Vec<String>,
    /// Blocks of those packs left out because their content does not match their ID.
    pub damaged_blocks_left_out: u64,
    /// Packs that could not be read or parsed: not indexed (their blocks are stored again by
    /// the next backup that reads them; `cairn verify` names the points affected).
    pub unreadable_packs: Vec<Unreadable>,
    /// Packs sound index files listed but storage does not hold.
    pub missing_packs: Vec<String>,
    pub damaged_index_files: Vec<String>,
    pub index_files_written: u64,
    pub index_files_removed: u64,
}

#[derive(Debug, Serialize)]
pub struct Unreadable {
    pub pack: String,
    pub problem: String,
}

/// A pack's trailer entries, keeping only blobs whose content matches their ID (with the
/// number left out).
fn checked_entries(repo: &Repository, name: &str) -> Result<(Vec<FrameEntry>, u64)> {
    let (bytes, sound) = crate::verify::read_pack_twice(repo, name).map_err(|e| match e {
        crate::verify::ReadProblem::Missing => anyhow::anyhow!("pack file is missing"),
        crate::verify::ReadProblem::Unreadable(e) => anyhow::anyhow!("{e}"),
    })?;
    let mut frames = parse_pack(repo.crypto(), &bytes, &format!("pack {}", &name[..8]))?;
    if sound {
        // Exactly the bytes written: the trailer is what the writer said.
        return Ok((frames, 0));
    }
    let mut bad = 0;
    let mut raw = Vec::new();
    for f in &mut frames {
        let start = f.offset as usize;
        let stored = &bytes[start..start + f.stored_len as usize];
        if open_frame_into(repo.crypto(), stored, f.raw_len, "frame", &mut raw).is_err() {
            bad += f.blobs.len() as u64;
            f.blobs.clear();
            continue;
        }
        let before = f.blobs.len();
        f.blobs.retain(|b| {
            let s = b.raw_offset as usize;
            raw.get(s..s + b.len as usize).is_some_and(|blob| repo.crypto().block_id(blob) == b.id)
        });
        bad += (before - f.blobs.len()) as u64;
    }
    frames.retain(|f| !f.blobs.is_empty());
    Ok((frames, bad))
}

/// Rebuilds the index. The caller holds the repository's exclusive lock (no backup may write
/// index files meanwhile: their files would be deleted with the old ones).
pub fn rebuild_index(repo: &Repository, dry_run: bool, progress: &dyn Progress) -> Result<RepairReport> {
    let mut report = RepairReport { dry_run, ..Default::default() };
    let stored: HashMap<PackId, (String, u64)> = repo
        .stored_packs()?
        .into_iter()
        .filter_map(|(n, size)| pack_id_from_name(&n).map(|id| (id, (n, size))))
        .collect();
    report.packs_stored = stored.len() as u64;

    let old_files = repo.index_file_names()?;
    let mut packs: BTreeMap<PackId, Vec<FrameEntry>> = BTreeMap::new();
    let mut missing: BTreeMap<PackId, ()> = BTreeMap::new();
    progress.start("read index files", old_files.len() as u64);
    for name in &old_files {
        // A damaged-looking file is read once more: a misread must not cost its entries.
        match repo.read_index_file(name).or_else(|_| repo.read_index_file(name)) {
            Ok(list) => {
                for (pack, frames) in list {
                    // Dropped only when storage confirms the pack is gone (a listing is no proof).
                    if stored.contains_key(&pack) || repo.pack_exists(&hex::encode(pack)).unwrap_or(true) {
                        packs.entry(pack).or_insert(frames);
                    } else {
                        missing.insert(pack, ());
                    }
                }
            }
            Err(RepoError::Corrupt(_) | RepoError::Format(_)) => report.damaged_index_files.push(name.clone()),
            Err(e) => return Err(e.into()),
        }
        progress.advance(1);
    }
    progress.finish();
    report.packs_from_index = packs.len() as u64;
    report.missing_packs = missing.keys().map(hex::encode).collect();

    let unlisted: Vec<(&PackId, &(String, u64))> = stored.iter().filter(|(id, _)| !packs.contains_key(*id)).collect();
    progress.start("read pack trailers", unlisted.len() as u64);
    for (id, (name, size)) in unlisted {
        if *size > crate::verify::MAX_PACK_READ {
            report.unreadable_packs.push(Unreadable {
                pack: name.clone(),
                problem: format!("{size} bytes, larger than any pack cairn writes"),
            });
            continue;
        }
        match checked_entries(repo, name) {
            Ok((frames, bad)) => {
                packs.insert(*id, frames);
                report.packs_from_trailers.push(name.clone());
                report.damaged_blocks_left_out += bad;
            }
            Err(e) => report.unreadable_packs.push(Unreadable { pack: name.clone(), problem: format!("{e:#}") }),
        }
        progress.advance(1);
    }
    progress.finish();
    report.packs_from_trailers.sort();
    report.unreadable_packs.sort_by(|a, b| a.pack.cmp(&b.pack));

    if dry_run {
        return Ok(report);
    }
    let all: Vec<(PackId, Vec<FrameEntry>)> = packs.into_iter().collect();
    let mut written = std::collections::HashSet::new();
    for chunk in all.chunks(PACKS_PER_INDEX_FILE) {
        let (name, _) = repo.write_index_file(chunk)?;
        written.insert(name);
        cairn_storage::crash_point("repair.index_written");
    }
    report.index_files_written = written.len() as u64;
    // Every pack is now listed in a durable new file: the old files can go.
    for name in old_files.iter().filter(|n| !written.contains(*n)) {
        repo.delete_index_file(name)?;
        report.index_files_removed += 1;
        cairn_storage::crash_point("repair.old_index_deleted");
    }
    repo.load_index()?;
    Ok(report)
}
