//! Immutable repositories (FORMAT.md §13): every object a restore point needs stays locked by
//! the store at least `days` after the point, so that nobody (cairn, an administrator,
//! ransomware with the keys) can remove the point or anything it needs before then.
//!
//! The store locks each pack, point, key file and the config as it is written (storage's
//! `object_lock`). What this module adds is the other half: blocks a new point reuses live in
//! older packs, whose locks may end sooner. Before a point is written,
//! [`Repository::lock_what_the_point_needs`] finds the packs it relies on and extends the
//! lock of any whose known lock ends before the point's, to the current generation's date.
//! Which locks are known comes from `object-locks` catalog records (written after each
//! extension, before the point) and from what this process locked itself; an unknown lock is
//! asked of the store, so a lost or missing record costs requests, never safety.
//!
//! Walking every block of a point at every backup would cost as much as reading its maps, so
//! the walk is limited: a point records in `locked_until` the date its objects were locked
//! until; a new point whose reference (its parent, else the newest point of the same name)
//! is locked long enough needs only the packs behind the map pages that differ from it.

use crate::catalog::{LockGroup, ObjectLocks};
use crate::point::RestorePoint;
use crate::{BlockId, Error, PointId, Repository, Result};
use cairn_storage::object_lock::{self, LockPolicy, ObjectLock};
use cairn_storage::Kind;
use std::collections::{BTreeSet, HashMap};

/// What [`audit_locks`] found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LockAudit {
    pub points: usize,
    /// Objects whose lock was asked of the store.
    pub objects_checked: usize,
    /// Objects locked for less time than a point needs (or not at all).
    pub short: Vec<ShortLock>,
    /// Points whose requirement has passed (their objects may be unlocked by now): not checked.
    pub points_past_their_lock: usize,
    /// Objects whose current version is not locked while an older one is: someone wrote over
    /// cairn's version, or hid it (`repair undelete` brings cairn's back).
    pub overwritten: Vec<String>,
    /// Points whose maps could not be read (a damaged or overwritten pack: `repair undelete`
    /// and `verify` tell more), with the problem: their packs were not all checked.
    /// Points whose document or maps could not be read (by ID, or by object name when the
    /// listing could not read the document at all), and why: their objects were not checked.
    pub unreadable: Vec<(String, String)>,
    pub ok: bool,
}

/// An object locked for less time than a point needs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShortLock {
    pub kind: String,
    pub name: String,
    /// Unix seconds; `None`: not locked at all.
    pub locked_until: Option<u64>,
    pub needed_until: u64,
    /// A point that needs it that long.
    pub point: PointId,
}

/// Checks with the store that every object each point needs (its document, the packs of its
/// map pages and blocks, the key files and config) is locked at least until the point's
/// `locked_until` (else its time plus the repository's days). One HEAD per object; the caller
/// holds a lock and has loaded the index.
pub fn audit_locks(repo: &Repository, progress: &dyn Fn(&str)) -> Result<LockAudit> {
    let (Some(policy), Some(locks)) = (repo.lock_policy(), repo.object_locks()?) else {
        return Err(Error::Invalid(format!("{} is not an immutable repository", repo.backend().location())));
    };
    let now = object_lock::now();
    let list = repo.list_points()?;
    let mut needed: HashMap<(Kind, String), (u64, PointId)> = HashMap::new();
    let mut need = |kind: Kind, name: String, until: u64, point: &PointId| {
        let e = needed.entry((kind, name)).or_insert_with(|| (0, point.clone()));
        if until > e.0 {
            *e = (until, point.clone());
        }
    };
    let mut audit = LockAudit { points: list.points.len(), unreadable: list.damaged.clone(), ..Default::default() };
    let keys = repo.backend().list(Kind::Key)?;
    for (i, (id, point)) in list.points.iter().enumerate() {
        progress(&format!("reading the maps of point {}/{}", i + 1, list.points.len()));
        let taken = humantime::parse_rfc3339_weak(point.time.trim_end_matches('Z'))
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let until = point.locked_until.or_else(|| taken.map(|t| policy.required(t))).unwrap_or(0);
        if until <= now {
            audit.points_past_their_lock += 1;
            continue;
        }
        need(Kind::Point, id.to_string(), until, id);
        need(Kind::Config, "config".into(), until, id);
        for k in &keys {
            need(Kind::Key, k.name.clone(), until, id);
        }
        match repo.packs_needed_beyond(point, None) {
            Ok(packs) => packs.into_iter().for_each(|p| need(Kind::Pack, p, until, id)),
            Err(e) => audit.unreadable.push((id.to_string(), e.to_string())),
        }
    }
    let total = needed.len();
    for (i, ((kind, name), (until, point))) in needed.into_iter().enumerate() {
        if i % 1024 == 0 {
            progress(&format!("asking the store for locks: {i}/{total}"));
        }
        // cairn's version: the lowest lock among the locked versions (one written over it
        // does not count), and whether the version readers get is one of them.
        let have = match locks.lowest_retained(kind, &name) {
            Ok(h) => h,
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        audit.objects_checked += 1;
        let current = match locks.retained_until(kind, &name) {
            Ok(c) => c,
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        if have.is_some() && current.is_none() {
            audit.overwritten.push(format!("{kind} {name}"));
        }
        if have.is_none_or(|h| h < until) {
            audit.short.push(ShortLock {
                kind: kind.to_string(),
                name,
                locked_until: have,
                needed_until: until,
                point,
            });
        }
    }
    audit.short.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
    audit.ok = audit.short.is_empty() && audit.unreadable.is_empty() && audit.overwritten.is_empty();
    Ok(audit)
}

/// Lock requests a point's commit keeps in flight (each waits for round trips to the store).
const LOCK_REQUESTS_IN_FLIGHT: usize = 16;

impl Repository {
    /// The repository's immutability, if it has one.
    pub fn lock_policy(&self) -> Option<LockPolicy> {
        self.config().immutability
    }

    /// The store's object locks, for an immutable repository (an error if its store has none).
    pub(crate) fn object_locks(&self) -> Result<Option<&dyn ObjectLock>> {
        match self.lock_policy() {
            None => Ok(None),
            Some(policy) => crate::config::store_locks(self.backend().as_ref(), policy).map(Some),
        }
    }

    /// Known lock dates of packs: the `object-locks` records, and what this process locked.
    pub fn known_pack_locks(&self) -> Result<HashMap<String, u64>> {
        let mut known: HashMap<String, u64> = HashMap::new();
        let mut note = |name: String, until: u64| {
            let e = known.entry(name).or_insert(until);
            *e = (*e).max(until);
        };
        for (_, r) in self.typed_records::<ObjectLocks>()? {
            for (name, until) in record_entries(&r) {
                note(name, until);
            }
        }
        if let Some(l) = self.backend().object_lock() {
            for (kind, name, until) in l.locked_here() {
                if kind == Kind::Pack {
                    note(name, until);
                }
            }
        }
        Ok(known)
    }

    /// Makes sure every object `point` needs is locked at least `days` from now, and sets its
    /// `locked_until`; called by sessions just before the point is written. In a repository
    /// without immutability it only clears `locked_until` (a copied point brings its source's).
    pub(crate) fn lock_what_the_point_needs(&self, point: &mut RestorePoint) -> Result<()> {
        point.locked_until = None;
        let (Some(policy), Some(locks)) = (self.lock_policy(), self.object_locks()?) else {
            return Ok(());
        };
        let now = object_lock::now();
        let required = policy.required(now);
        let target = policy.until(now);
        let mut floor = target;

        // The config and key files: a few requests, every time.
        let mut small = vec![(Kind::Config, "config".to_string())];
        small.extend(self.backend().list(Kind::Key)?.into_iter().map(|l| (Kind::Key, l.name)));
        for (kind, name) in small {
            let until = keep_locked(locks, kind, &name, required, target)?;
            floor = floor.min(until);
        }

        let reference = self.lock_reference(point, required);
        if let Some(r) = &reference {
            floor = floor.min(r.locked_until.unwrap_or(0));
        }
        let needed = self.packs_needed_beyond(point, reference.as_ref())?;
        let known = self.known_pack_locks()?;
        let mut unknown = Vec::new();
        for pack in needed {
            match known.get(&pack) {
                Some(&u) if u >= required => floor = floor.min(u),
                _ => unknown.push(pack),
            }
        }
        // Each unknown pack costs a few round trips (a listing, a HEAD per version, maybe an
        // extension): at a generation's first backup that is every pack the point uses, so
        // they are asked in parallel.
        let newly = keep_locked_all(locks, &unknown, required, target)?;
        for (_, until) in &newly {
            floor = floor.min(*until);
        }
        // What this process wrote locked (the session's packs) is known to others only
        // through a record; so is what was just extended. Only knowledge: a failed record
        // costs the next backup requests, and does not stop this one.
        let _ = self.record_locks_here(newly);
        point.locked_until = Some(floor);
        Ok(())
    }

    /// The point whose locks a new point may rely on: its parent, else the newest point of the
    /// same name, if it was locked until at least `required`.
    fn lock_reference(&self, point: &RestorePoint, required: u64) -> Option<RestorePoint> {
        let long_enough = |p: &RestorePoint| p.locked_until.is_some_and(|u| u >= required);
        if let Some(parent) = point.parent.as_ref().and_then(|id| self.load_point(id).ok()) {
            if long_enough(&parent) {
                return Some(parent);
            }
        }
        let points = self.list_points().ok()?.points;
        points.into_iter().rev().map(|(_, p)| p).find(|p| p.name == point.name && long_enough(p))
    }

    /// The packs holding the map pages and blocks of `point` that `reference` does not cover
    /// (map pages with the same ID at the same place of a disk of the same name and block size).
    fn packs_needed_beyond(&self, point: &RestorePoint, reference: Option<&RestorePoint>) -> Result<BTreeSet<String>> {
        let index = self.index();
        let mut packs = BTreeSet::new();
        let mut add = |id: &BlockId, what: &dyn Fn() -> String| -> Result<()> {
            if id.is_zero() {
                return Ok(());
            }
            match index.get(id) {
                Some(loc) => {
                    packs.insert(loc.pack_name());
                    Ok(())
                }
                None => Err(Error::Corrupt(format!("{} ({}) is in no index file", what(), id.short()))),
            }
        };
        for disk in &point.disks {
            let same =
                reference.and_then(|r| r.disks.iter().find(|d| d.name == disk.name && d.block_size == disk.block_size));
            for (k, page_hex) in disk.map.iter().enumerate() {
                if same.is_some_and(|d| d.map.get(k) == Some(page_hex)) {
                    continue;
                }
                let page = BlockId::from_hex(page_hex)
                    .ok_or_else(|| Error::Corrupt(format!("disk {} has no valid map page {k}", disk.name)))?;
                add(&page, &|| format!("map page {k} of disk {}", disk.name))?;
                for id in self.read_map_page(disk, k)? {
                    add(&id, &|| format!("a block of disk {}", disk.name))?;
                }
            }
        }
        Ok(packs)
    }

    /// Records `found` and the locks this process set on packs since its last record (the
    /// packs it wrote, what it extended) in one `object-locks` record. Sessions call it before
    /// a point is written, and prune after repacking.
    pub(crate) fn record_locks_here(&self, mut found: Vec<(String, u64)>) -> Result<()> {
        let Some(locks) = self.backend().object_lock() else { return Ok(()) };
        let mut recorded = self.locks_recorded.lock().unwrap();
        for (kind, name, until) in locks.locked_here() {
            if kind == Kind::Pack && recorded.get(&name) != Some(&until) {
                found.push((name, until));
            }
        }
        found.retain(|(n, u)| recorded.get(n) != Some(u));
        found.sort();
        found.dedup();
        if !found.is_empty() {
            self.record_locks(&found)?;
        }
        recorded.extend(found);
        Ok(())
    }

    /// Writes an `object-locks` record of packs and their lock dates (nothing when empty).
    fn record_locks(&self, entries: &[(String, u64)]) -> Result<String> {
        let mut groups: std::collections::BTreeMap<u64, Vec<&str>> = Default::default();
        for (name, until) in entries {
            groups.entry(*until).or_default().push(name);
        }
        let groups = groups
            .into_iter()
            .map(|(until, packs)| LockGroup { until, packs: packs.into_iter().map(String::from).collect() })
            .collect();
        self.save_typed(&ObjectLocks { time: crate::now_rfc3339(), groups })
    }

    /// Replaces the `object-locks` records (one per backup) by one, without packs that are
    /// gone or whose lock has ended; the new record is durable before the old ones go. Prune
    /// calls it with the packs still stored. Returns how many records it replaced.
    pub fn compact_lock_records(&self, stored: &std::collections::HashSet<String>) -> Result<usize> {
        let old = self.typed_records::<ObjectLocks>()?;
        if old.len() < 2 {
            return Ok(0);
        }
        let now = object_lock::now();
        let mut merged: HashMap<String, u64> = HashMap::new();
        for (_, r) in &old {
            for (name, until) in record_entries(r) {
                if until > now && stored.contains(&name) {
                    let e = merged.entry(name).or_insert(until);
                    *e = (*e).max(until);
                }
            }
        }
        let entries: Vec<(String, u64)> = merged.into_iter().collect();
        let name = if entries.is_empty() { None } else { Some(self.record_locks(&entries)?) };
        for (n, _) in &old {
            if Some(n) != name.as_ref() {
                self.delete_record(n)?;
            }
        }
        Ok(old.len())
    }
}

/// Makes cairn's versions of an object locked until at least `required` (to `target`, the
/// generation's date, when they are not); returns the lowest date they then have. Asks about
/// every locked version, not the current one only: someone may have written a version (locked
/// or not) over cairn's.
fn keep_locked(locks: &dyn ObjectLock, kind: Kind, name: &str, required: u64, target: u64) -> Result<u64> {
    match locks.lowest_retained(kind, name)? {
        Some(u) if u >= required => Ok(u),
        _ => Ok(locks.extend(kind, name, target)?),
    }
}

/// [`keep_locked`] for many packs, `LOCK_REQUESTS_IN_FLIGHT` at a time.
fn keep_locked_all(locks: &dyn ObjectLock, packs: &[String], required: u64, target: u64) -> Result<Vec<(String, u64)>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(packs.len()));
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..LOCK_REQUESTS_IN_FLIGHT.min(packs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= packs.len() || failed.lock().unwrap().is_some() {
                    return;
                }
                match keep_locked(locks, Kind::Pack, &packs[i], required, target) {
                    Ok(until) => results.lock().unwrap().push((packs[i].clone(), until)),
                    Err(e) => {
                        failed.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(results.into_inner().unwrap()),
    }
}

/// The (pack, until) entries of an `object-locks` record; malformed entries are skipped (the
/// record is only knowledge: a pack left out is asked of the store).
pub fn record_entries(r: &ObjectLocks) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for g in &r.groups {
        for name in g.packs.iter().filter(|n| cairn_storage::valid_name(n)) {
            out.push((name.clone(), g.until));
        }
    }
    out
}
