//! Forget: remove restore points a retention policy no longer keeps, and protect points from
//! it (FORMAT.md §12).
//!
//! Points are grouped by what they back up: a VM by its UUID (across renames, hosts and
//! migrations), any other image by its name. The policy ([`crate::retention`]) decides per
//! group. Forgetting deletes only point documents (and the catalog records about them);
//! their blocks stay until a prune finds them unreferenced, so forget needs only a shared
//! lock and never stops a backup.
//!
//! Protection is a catalog record per protected point (`kind: "protection"`): protecting
//! writes one, unprotecting deletes them, so two operators never undo each other's change.

use crate::catalog::Protection;
use crate::retention::{decide, parse_point_time, Candidate, Decision, Policy, Reason};
use crate::{PointId, Repository, RestorePoint, Result};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What a group of points is keyed by.
pub fn group_key(point: &RestorePoint) -> String {
    match point.metadata["vm"]["uuid"].as_str() {
        Some(uuid) => format!("vm:{uuid}"),
        None => format!("image:{}", point.name),
    }
}

/// One point and what the policy decided.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Planned {
    pub id: PointId,
    pub name: String,
    pub time: String,
    /// The rule that keeps it; `None`: removed.
    pub kept_by: Option<Reason>,
}

/// A group's points, newest first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GroupPlan {
    /// `vm:<uuid>` or `image:<name>`.
    pub group: String,
    /// The name of the group's newest point.
    pub name: String,
    pub points: Vec<Planned>,
    /// Whether the group's newest point is removed: a VM's next backup then reads every disk
    /// in full (its checkpoint belongs to a point that is gone).
    pub newest_removed: bool,
}

/// The points of the groups `selectors` name (a point name, a VM name at any time, or a VM
/// UUID; none: every group), and what `policy` does with them. A selector that matches
/// nothing is an error: a typo must not pass for "nothing to forget".
pub fn plan(
    repo: &Repository,
    selectors: &[String],
    policy: &Policy,
    now: jiff::Timestamp,
    tz: &jiff::tz::TimeZone,
) -> Result<Vec<GroupPlan>> {
    let listed = repo.list_points()?;
    let protected = protected_points(repo)?;
    let mut groups: BTreeMap<String, Vec<(PointId, RestorePoint)>> = BTreeMap::new();
    for (id, p) in listed.points {
        groups.entry(group_key(&p)).or_default().push((id, p));
    }
    let matches = |key: &str, points: &[(PointId, RestorePoint)], sel: &str| {
        key.strip_prefix("vm:") == Some(sel) || points.iter().any(|(_, p)| p.name == sel)
    };
    for sel in selectors {
        if !groups.iter().any(|(k, pts)| matches(k, pts, sel)) {
            return Err(crate::Error::NotFound(format!("no restore point of a VM or image named {sel:?}")));
        }
    }
    let mut out = Vec::new();
    for (key, mut points) in groups {
        if !selectors.is_empty() && !selectors.iter().any(|s| matches(&key, &points, s)) {
            continue;
        }
        points.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(b.0.cmp(&a.0)));
        let candidates: Vec<Candidate> = points
            .iter()
            .map(|(id, p)| Candidate {
                id: id.as_str(),
                time: parse_point_time(&p.time),
                protected: protected.contains(id),
            })
            .collect();
        let decisions = decide(policy, &candidates, now, tz).map_err(|e| crate::Error::Invalid(e.to_string()))?;
        let planned: Vec<Planned> = points
            .iter()
            .zip(decisions)
            .map(|((id, p), d)| Planned {
                id: id.clone(),
                name: p.name.clone(),
                time: p.time.clone(),
                kept_by: match d {
                    Decision::Keep(r) => Some(r),
                    Decision::Remove => None,
                },
            })
            .collect();
        out.push(GroupPlan {
            group: key,
            name: points[0].1.name.clone(),
            newest_removed: planned[0].kept_by.is_none(),
            points: planned,
        });
    }
    Ok(out)
}

/// A plan that removes exactly the points `specs` name (`NAME@POINT`, see
/// [`Repository::select_point`]). A protected point is refused: unprotect it first.
pub fn plan_points(repo: &Repository, specs: &[String]) -> Result<Vec<GroupPlan>> {
    let listed = repo.list_points()?;
    let protected = protected_points(repo)?;
    let mut out: Vec<GroupPlan> = Vec::new();
    for spec in specs {
        let (id, p) = repo.select_point(spec)?;
        if protected.contains(&id) {
            return Err(crate::Error::Protected { point: id.short().to_string(), name: p.name, spec: spec.clone() });
        }
        let key = group_key(&p);
        let newest = listed.points.iter().filter(|(_, q)| group_key(q) == key).map(|(i, q)| (&q.time, i)).max();
        let is_newest = newest.is_some_and(|(_, i)| *i == id);
        let planned = Planned { id: id.clone(), name: p.name.clone(), time: p.time.clone(), kept_by: None };
        match out.iter_mut().find(|g| g.group == key) {
            Some(g) => {
                if !g.points.iter().any(|q| q.id == id) {
                    g.points.push(planned);
                }
                g.newest_removed |= is_newest;
            }
            None => out.push(GroupPlan {
                group: key,
                name: p.name.clone(),
                points: vec![planned],
                newest_removed: is_newest,
            }),
        }
    }
    Ok(out)
}

/// What [`apply`] removed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Forgotten {
    pub points: Vec<PointId>,
    /// Catalog records about them (boot verifications) removed with them.
    pub records: usize,
    /// Points the plan removed that were protected meanwhile: kept.
    pub protected_meanwhile: Vec<PointId>,
    /// Points the plan removed whose store lock has not ended (an immutable repository):
    /// kept, and removed by a forget after that date. Not an error.
    pub locked: Vec<LockedPoint>,
}

/// A point kept because the store refuses to delete it before `until`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LockedPoint {
    pub id: PointId,
    /// Unix seconds, and the same as RFC 3339.
    pub until: u64,
    pub until_rfc3339: String,
}

/// Removes the points the plan removes. Protection is read again first (a point protected
/// since the plan stays). Point documents go first, then the records about them (a crash in
/// between leaves records a later prune drops, never a point without its history).
pub fn apply(repo: &Repository, plan: &[GroupPlan]) -> Result<Forgotten> {
    let protected = protected_points_strict(repo)?;
    let mut out = Forgotten::default();
    for g in plan {
        for p in g.points.iter().filter(|p| p.kept_by.is_none()) {
            if protected.contains(&p.id) {
                out.protected_meanwhile.push(p.id.clone());
                continue;
            }
            match repo.delete_point(&p.id) {
                Err(crate::Error::Storage(cairn_storage::StorageError::Locked { until, .. })) => {
                    let until_rfc3339 = cairn_storage::object_lock::rfc3339(until);
                    out.locked.push(LockedPoint { id: p.id.clone(), until, until_rfc3339 });
                    continue;
                }
                other => other?,
            }
            cairn_storage::crash_point("forget.point_deleted");
            out.points.push(p.id.clone());
        }
    }
    out.records = drop_records_of_missing_points(repo)?;
    Ok(out)
}

/// Deletes catalog records about points that no longer exist (boot verifications, stale
/// protections). Returns how many.
pub fn drop_records_of_missing_points(repo: &Repository) -> Result<usize> {
    let existing: HashSet<String> =
        repo.backend().list(cairn_storage::Kind::Point)?.into_iter().map(|l| l.name).collect();
    let mut n = 0;
    for (name, r) in repo.load_records()? {
        let about = crate::catalog::point_of(&r);
        // Asked of the object itself too: a point committed after the listing is not missing.
        if let Some(p) = about.filter(|p| !existing.contains(p.as_str())) {
            if !repo.backend().exists(cairn_storage::Kind::Point, p.as_str())? {
                repo.delete_record(&name)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The IDs of protected points.
pub fn protected_points(repo: &Repository) -> Result<HashSet<PointId>> {
    Ok(protection_records(repo)?.into_keys().collect())
}

/// Like [`protected_points`], but refuses when a catalog record cannot be read: it may be a
/// protection (what forget deletes depends on it).
fn protected_points_strict(repo: &Repository) -> Result<HashSet<PointId>> {
    let protected = protected_points(repo)?;
    if let Some((name, why)) = repo.damaged_records().first() {
        return Err(crate::Error::Corrupt(format!(
            "catalog record {} is damaged ({why}); it may protect a point, so nothing was removed \
             (deleting the record lets forget go on)",
            &name[..8.min(name.len())]
        )));
    }
    Ok(protected)
}

fn protection_records(repo: &Repository) -> Result<HashMap<PointId, Vec<String>>> {
    let mut out: HashMap<PointId, Vec<String>> = HashMap::new();
    for (name, protection) in repo.typed_records::<Protection>()? {
        out.entry(protection.point).or_default().push(name);
    }
    Ok(out)
}

/// Protects a point (or removes its protection). Returns whether anything changed.
pub fn set_protected(repo: &Repository, point: &PointId, protect: bool) -> Result<bool> {
    let records = protection_records(repo)?;
    let existing = records.get(point).cloned().unwrap_or_default();
    if protect {
        if !existing.is_empty() {
            return Ok(false);
        }
        let name = repo.save_typed(&Protection {
            point: point.clone(),
            time: crate::now_rfc3339(),
            by: repo.hostname().to_string(),
        })?;
        if !repo.backend().exists(cairn_storage::Kind::Catalog, &name)? {
            return Err(crate::Error::Corrupt(
                "storage acknowledged the protection record but does not hold it".into(),
            ));
        }
        Ok(true)
    } else {
        for name in &existing {
            repo.delete_record(name)?;
        }
        Ok(!existing.is_empty())
    }
}
