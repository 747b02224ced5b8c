//! Offsite: restore points copied between repositories (`cairn_repo::copy`), the store locks of
//! an immutable repository audited (`cairn_repo::immutability`), and cairn's versions of
//! objects made current again after someone hid or overwrote them.

use crate::error::{ErrorKind, OpError, OpResult};
use cairn_engine::Progress;
use cairn_repo::copy::{copy_points, CopyProgress, CopyReport};
use cairn_repo::immutability::{audit_locks, LockAudit};
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_storage::object_lock::Restored;
use cairn_storage::Backend;
use std::sync::Arc;
use std::time::Duration;

/// Offsite requests that cannot be carried out as given.
#[derive(Debug, thiserror::Error)]
pub enum OffsiteRefusal {
    #[error("the source has no restore point named {0:?}")]
    NoSuchSourcePoint(String),
    #[error("restore point {id} of the source cannot be read ({why}); nothing was copied")]
    UnreadableSourcePoint { id: String, why: String },
    #[error("the source and the target are the same repository")]
    SameRepository,
    /// The target names blocks differently from the source.
    #[error("cannot copy into {target}: {why}")]
    Incompatible { target: String, why: String },
    #[error("{0} is not on S3 or Azure Blob: only versioned stores keep what was deleted or overwritten")]
    NotVersioned(String),
    #[error(
        "{0} has no locked config: it is not an immutable repository, and there cairn's own deletes leave delete markers, which undelete would undo (bringing back forgotten points and pruned data); nothing done"
    )]
    NoLockedConfig(String),
    #[error("{0} is not an immutable repository (its locked config says so); nothing done")]
    NotImmutable(String),
}

fn refuse<T>(r: OffsiteRefusal) -> OpResult<T> {
    let kind = match r {
        OffsiteRefusal::NoSuchSourcePoint(_) => ErrorKind::NotFound,
        OffsiteRefusal::UnreadableSourcePoint { .. } => ErrorKind::Damaged,
        _ => ErrorKind::InvalidRequest,
    };
    Err(OpError::new(kind, r))
}

/// The source's points that `specs` name (`NAME` for all of a name, `NAME@POINT` for one; all
/// when empty), oldest first. A point the listing could not read is read again; one that still
/// cannot be read stops the copy (it would be left out without a word otherwise).
pub fn select_points(src: &Repository, specs: &[String]) -> OpResult<Vec<(PointId, RestorePoint)>> {
    let listed = src.list_points()?;
    let mut all = listed.points;
    for (name, why) in listed.damaged {
        let unreadable =
            || OffsiteRefusal::UnreadableSourcePoint { id: name[..12.min(name.len())].into(), why: why.clone() };
        let Some(id) = PointId::parse(&name) else { return refuse(unreadable()) };
        match src.load_point(&id) {
            Ok(p) => all.push((id, p)),
            Err(cairn_repo::Error::Storage(e)) if e.is_not_found() => {}
            Err(_) => return refuse(unreadable()),
        }
    }
    all.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
    if specs.is_empty() {
        return Ok(all);
    }
    let mut out: Vec<(PointId, RestorePoint)> = Vec::new();
    for spec in specs {
        let chosen: Vec<(PointId, RestorePoint)> = if spec.contains('@') {
            vec![src.select_point(spec)?]
        } else {
            let mine: Vec<_> = all.iter().filter(|(_, p)| &p.name == spec).cloned().collect();
            if mine.is_empty() {
                return refuse(OffsiteRefusal::NoSuchSourcePoint(spec.clone()));
            }
            mine
        };
        for c in chosen {
            if !out.iter().any(|(id, _)| *id == c.0) {
                out.push(c);
            }
        }
    }
    out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
    Ok(out)
}

/// Copies the points `specs` name from `src` to `dst` (each under its shared lock), moving
/// only the blocks the target lacks; `progress` counts as it goes. `workers` 0: the default.
pub fn copy(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    specs: &[String],
    workers: usize,
    lock_wait: Duration,
    progress: &CopyProgress,
) -> OpResult<CopyReport> {
    if src.config().id == dst.config().id && src.backend().location() == dst.backend().location() {
        return refuse(OffsiteRefusal::SameRepository);
    }
    let _src_lock = src.lock(false, "copy (source)", lock_wait)?;
    let _dst_lock = dst.lock(false, "copy", lock_wait)?;
    src.load_index()?;
    dst.load_index()?;
    let points = select_points(src, specs)?;
    match copy_points(src, dst, &points, workers, progress) {
        Ok(r) => Ok(r),
        Err(cairn_repo::Error::Incompatible(why)) => {
            refuse(OffsiteRefusal::Incompatible { target: dst.backend().location(), why })
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks the store about the lock of every object each point needs (under the shared lock and
/// with the index loaded by the caller).
pub fn audit(repo: &Repository, progress: &dyn Progress) -> OpResult<LockAudit> {
    Ok(audit_locks(repo, &|step: &str| progress.note(&format!("verify locks: {step}")))?)
}

/// Makes cairn's version of each object current again (see FORMAT.md §13), only in an
/// immutable repository: elsewhere cairn's own deletes leave delete markers, which this would
/// undo. Decided from the config cairn wrote, locked.
pub fn undelete(backend: &dyn Backend, dry_run: bool) -> OpResult<Vec<Restored>> {
    let Some(locks) = backend.object_lock() else {
        return refuse(OffsiteRefusal::NotVersioned(backend.location()));
    };
    let Some(raw) = locks.locked_config()? else {
        return refuse(OffsiteRefusal::NoLockedConfig(backend.location()));
    };
    let config = cairn_repo::Config::parse(&raw, &backend.location())?;
    if config.immutability.is_none() {
        return refuse(OffsiteRefusal::NotImmutable(backend.location()));
    }
    Ok(locks.undelete(dry_run)?)
}
