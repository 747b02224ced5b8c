//! File-level recovery: the volumes of a point, the files in them, and copies of files out of
//! them (`cairn_disk::files`, read straight from the repository). The caller holds the
//! repository's shared lock and has loaded its index.

use crate::error::OpResult;
use cairn_disk::files::{volumes, Browser, Entry, GetReport, Volume};
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use std::path::Path;
use std::sync::Arc;

/// The volumes (partitions, logical volumes) of point `point` (`NAME[@POINT]`), with the
/// filesystem each holds.
pub fn list_volumes(repo: &Arc<Repository>, point: &str) -> OpResult<(PointId, RestorePoint, Vec<Volume>)> {
    let (id, p) = repo.select_point(point)?;
    let vols = volumes(repo, &p)?;
    Ok((id, p, vols))
}

/// A folder of a volume: its entries, the volume's name, and the repository bytes read.
pub struct Listing {
    pub id: PointId,
    pub point: RestorePoint,
    pub volume: String,
    pub entries: Vec<Entry>,
    pub repository_bytes_read: u64,
}

/// The entries of folder `path` of `volume` (the one filesystem when `None`).
pub fn list_files(repo: &Arc<Repository>, point: &str, volume: Option<&str>, path: &str) -> OpResult<Listing> {
    let (id, p) = repo.select_point(point)?;
    let b = Browser::open(repo, &p, volume)?;
    let entries = b.list(path)?;
    Ok(Listing {
        id,
        volume: b.volume.name.clone(),
        repository_bytes_read: b.repository_bytes_read(),
        point: p,
        entries,
    })
}

/// Copies `path` (a file or a folder, recursively) of `volume` to `to` on this host.
pub fn get_files(
    repo: &Arc<Repository>,
    point: &str,
    volume: &str,
    path: &str,
    to: &Path,
) -> OpResult<(PointId, RestorePoint, String, GetReport)> {
    let (id, p) = repo.select_point(point)?;
    let b = Browser::open(repo, &p, Some(volume))?;
    let report = b.get(path, to)?;
    Ok((id, p, b.volume.name.clone(), report))
}
