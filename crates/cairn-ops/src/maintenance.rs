//! The repository's life: `forget` (retention, or named points), `prune`, `protect`, `stats`. The rules
//! themselves are `cairn_repo`'s (`retention`, `forget`, `prune`, FORMAT.md §12); these
//! operations check the request, take the lock, and run them in order.

use crate::error::{ErrorKind, OpError, OpResult};
use cairn_engine::Progress;
use cairn_repo::forget::{self, Forgotten, GroupPlan};
use cairn_repo::prune::{self, PruneOptions, PruneReport, Usage};
use cairn_repo::retention::Policy;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use std::sync::Arc;
use std::time::Duration;

/// Forget requests that cannot be carried out as given.
#[derive(Debug, thiserror::Error)]
pub enum ForgetRefusal {
    #[error("NAME@POINT selections (remove exactly those) and names with retention rules do not go together")]
    MixedSelection,
    #[error("NAME@POINT removes exactly that point: retention rules do not apply to it")]
    RulesWithPoints,
    #[error("no retention rule given: forget never removes every point by default")]
    NoRule,
}

/// What to forget: the points named `NAME@POINT` in `select`, or, when `select` holds only
/// names (VMs by name or UUID, images; none for all), what `policy` does not keep.
pub struct ForgetRequest {
    pub select: Vec<String>,
    pub policy: Policy,
    /// Decide only; change nothing.
    pub dry_run: bool,
    pub lock_wait: Duration,
}

/// What a forget decided, and (unless a dry run) what it did.
pub struct ForgetOutcome {
    /// Every point of every group concerned, with the rule that keeps it or none.
    pub plan: Vec<GroupPlan>,
    /// How many points the plan removes.
    pub removes: usize,
    pub done: Option<Forgotten>,
}

/// Checks a forget request before the repository is touched.
pub fn check_forget(req: &ForgetRequest) -> OpResult<()> {
    let explicit = req.select.iter().filter(|s| s.contains('@')).count();
    let refuse = |r: ForgetRefusal| Err(OpError::new(ErrorKind::InvalidRequest, r));
    if explicit > 0 && explicit < req.select.len() {
        return refuse(ForgetRefusal::MixedSelection);
    }
    if explicit > 0 && !req.policy.is_empty() {
        return refuse(ForgetRefusal::RulesWithPoints);
    }
    if explicit == 0 && req.policy.is_empty() {
        return refuse(ForgetRefusal::NoRule);
    }
    Ok(())
}

/// Plans and (unless a dry run) applies a forget under the repository's shared lock. The data
/// of removed points stays until a prune reclaims it.
pub fn forget(repo: &Repository, req: &ForgetRequest) -> OpResult<ForgetOutcome> {
    check_forget(req)?;
    let _lock = repo.lock(false, "forget", req.lock_wait)?;
    let plan = if req.select.iter().any(|s| s.contains('@')) {
        forget::plan_points(repo, &req.select)?
    } else {
        forget::plan(repo, &req.select, &req.policy, jiff::Timestamp::now(), &jiff::tz::TimeZone::system())?
    };
    let done = if req.dry_run { None } else { Some(forget::apply(repo, &plan)?) };
    let removes = plan.iter().map(|g| g.points.iter().filter(|p| p.kept_by.is_none()).count()).sum();
    Ok(ForgetOutcome { plan, removes, done })
}

/// Reclaims space (see `cairn_repo::prune`); `progress` hears each step as a note. A prune is
/// not stopped by `progress.cancelled()`: its steps are safe against a kill at any point, and
/// stopping one early would only defer its work.
pub fn prune(repo: &Arc<Repository>, opts: &PruneOptions, progress: &dyn Progress) -> OpResult<PruneReport> {
    Ok(prune::prune(repo, opts, &|step: &str| progress.note(&format!("prune: {step}")))?)
}

/// Sizes, deduplication and compression of the points named (all when none), and what a prune
/// would reclaim; under the shared lock.
pub fn stats(repo: &Repository, names: &[String], lock_wait: Duration) -> OpResult<Usage> {
    let _lock = repo.lock(false, "stats", lock_wait)?;
    repo.load_index()?;
    Ok(prune::usage(repo, names)?)
}

/// Protects a point from every removal (or lifts the protection); returns the point and whether
/// anything changed.
pub fn protect(
    repo: &Repository,
    point: &str,
    protect: bool,
    lock_wait: Duration,
) -> OpResult<(PointId, RestorePoint, bool)> {
    let _lock = repo.lock(false, "protect", lock_wait)?;
    let (id, p) = repo.select_point(point)?;
    let changed = forget::set_protected(repo, &id, protect)?;
    Ok((id, p, changed))
}
