//! Checking and mending a repository: `verify` (re-read and re-hash; the verify state and the
//! quarantine are kept by `cairn_engine::verify`) and `repair index` (rebuild the index from
//! the packs, under the exclusive lock).

use crate::error::OpResult;
use cairn_engine::repair::{rebuild_index, RepairReport};
use cairn_engine::verify::{VerifyOptions, VerifyRun};
use cairn_engine::Progress;
use cairn_repo::Repository;
use std::time::Duration;

pub struct VerifyRequest {
    /// Only these points (`NAME[@POINT]`); all when empty.
    pub points: Vec<String>,
    /// Only this percentage of the packs, those verified longest ago first.
    pub sample_percent: Option<f64>,
    pub workers: usize,
    pub lock_wait: Duration,
}

/// Verifies the repository (or the selected points) under its shared lock.
pub fn verify(repo: &Repository, req: &VerifyRequest, progress: &dyn Progress) -> OpResult<VerifyRun> {
    let _lock = repo.lock(false, "verify", req.lock_wait)?;
    repo.load_index()?;
    let points = if req.points.is_empty() {
        None
    } else {
        Some(req.points.iter().map(|p| repo.select_point(p).map(|(id, _)| id)).collect::<Result<Vec<_>, _>>()?)
    };
    let opts = VerifyOptions { points, sample_percent: req.sample_percent, ..Default::default() };
    Ok(cairn_engine::verify::run(repo, req.workers, opts, progress)?)
}

/// Rebuilds the index from the packs under the exclusive lock (`dry_run`: only says what it
/// would write).
pub fn repair_index(
    repo: &Repository,
    dry_run: bool,
    lock_wait: Duration,
    progress: &dyn Progress,
) -> OpResult<RepairReport> {
    let _lock = repo.lock(true, "repair index", lock_wait)?;
    Ok(rebuild_index(repo, dry_run, progress)?)
}
