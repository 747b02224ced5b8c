//! The restore points of a repository, as interfaces list them.

use crate::error::OpResult;
use cairn_repo::vm_record::VmRecord;
use cairn_repo::PointId;
use cairn_repo::{DiskStats, Repository, RestorePoint};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Duration;

/// One restore point as `points --json` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PointSummary {
    pub id: PointId,
    pub name: String,
    pub time: String,
    pub hostname: String,
    pub source: String,
    pub parent: Option<PointId>,
    pub mode: String,
    pub protected: bool,
    pub logical_bytes: u64,
    pub read_bytes: u64,
    pub new_bytes: u64,
    pub stored_bytes: u64,
    pub repository_growth_bytes: u64,
    /// Found in the repository already, or unchanged since the parent.
    pub dedup_bytes: u64,
    pub zero_bytes: u64,
    pub duration_ms: u64,
    pub locked_until: Option<u64>,
    pub disks: Vec<DiskSummary>,
    /// The VM record of a VM point, without the configuration document.
    pub vm: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskSummary {
    pub name: String,
    pub role: Option<String>,
    pub size: u64,
    pub stats: DiskStats,
}

impl PointSummary {
    pub fn of(id: &PointId, p: &RestorePoint, protected: bool) -> PointSummary {
        let t = &p.stats.totals;
        PointSummary {
            id: id.clone(),
            name: p.name.clone(),
            time: p.time.clone(),
            hostname: p.hostname.clone(),
            source: p.source.clone(),
            parent: p.parent.clone(),
            mode: p.stats.mode.clone(),
            protected,
            logical_bytes: t.logical_bytes,
            read_bytes: t.read_bytes,
            new_bytes: t.new_bytes,
            stored_bytes: t.stored_bytes,
            repository_growth_bytes: p.stats.repository_growth_bytes,
            dedup_bytes: t.dedup_bytes + t.unchanged_bytes,
            zero_bytes: t.zero_bytes,
            duration_ms: p.stats.duration_ms,
            locked_until: p.locked_until,
            disks: p
                .disks
                .iter()
                .map(|d| DiskSummary { name: d.name.clone(), role: d.role.clone(), size: d.size, stats: d.stats })
                .collect(),
            vm: VmRecord::of(p).map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v.as_object_mut().map(|o| o.remove("config"));
                v
            }),
        }
    }
}

/// The points of a repository (those named `name`, or all), oldest first.
pub struct Points {
    pub points: Vec<(PointId, RestorePoint)>,
    /// IDs of the protected points.
    pub protected: HashSet<PointId>,
    /// Points that cannot be read: (ID, why).
    pub damaged: Vec<(String, String)>,
}

/// Lists the points under the repository's shared lock.
pub fn list_points(repo: &Repository, name: Option<&str>, lock_wait: Duration) -> OpResult<Points> {
    let _lock = repo.lock(false, "points", lock_wait)?;
    let list = repo.list_points()?;
    let protected = cairn_repo::forget::protected_points(repo)?;
    let points = list.points.into_iter().filter(|(_, p)| name.is_none_or(|n| p.name == n)).collect();
    Ok(Points { points, protected, damaged: list.damaged })
}
