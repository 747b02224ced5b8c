//! The jobs' repositories as the director reads them: opened with the password of the job that
//! names them, their restore points mirrored in the catalog, their size sampled.
//!
//! The repository stays the truth. After each of its tasks, the catalog's points of a
//! repository are made to match its listing ([`refresh`]): points forgotten by a retention (or
//! by `cairn forget` on the command line) go, points made elsewhere come. The console and the
//! API read the catalog, never the repository, to list points: 30,000 points are one indexed
//! query, not 30,000 object reads.

use crate::catalog::{Catalog, PointRow};
use crate::jobs::JobSpec;
use crate::DirectorError;
use anyhow::{Context, Result};
use cairn_repo::vm_record::VmRecord;
use cairn_repo::{PointId, Repository, RestorePoint};
use std::sync::Arc;
use std::time::Duration;

/// A repository's location as the catalog keys it: `/srv/repo/` is `/srv/repo`.
pub fn key(location: &str) -> String {
    location.trim_end_matches('/').to_string()
}

/// A repository the director opens: where it is, and its password file.
#[derive(Clone, Debug)]
pub struct Location {
    pub location: String,
    pub password_file: Option<String>,
}

impl Location {
    /// The repository of job `spec`.
    pub fn of_job(spec: &JobSpec) -> Location {
        Location { location: spec.repository.clone(), password_file: spec.password_file.clone() }
    }

    /// The repository's password, from its password file (none without one).
    pub fn password(&self) -> Result<Option<String>> {
        self.password_file.as_deref().map(read_password_file).transpose()
    }

    pub fn open(&self) -> Result<Arc<Repository>> {
        let password = self.password()?;
        let backend = cairn_storage::open(&self.location)?;
        Ok(Arc::new(Repository::open(backend, move || password.clone())?))
    }
}

/// Repository `location` as a job names it (its own, or a copy target), with the password file
/// that job gives: a point of it can be restored or browsed.
pub fn find(catalog: &Catalog, location: &str) -> Result<Location> {
    let k = key(location);
    for job in catalog.jobs()? {
        if key(&job.spec.repository) == k {
            return Ok(Location::of_job(&job.spec));
        }
        if let Some(c) = job.spec.copies.iter().find(|c| key(&c.repository) == k) {
            return Ok(Location { location: c.repository.clone(), password_file: c.password_file.clone() });
        }
    }
    Err(DirectorError::NotFound(format!("no job names the repository {location} any more: its password is unknown"))
        .into())
}

/// A point as the catalog lists it, from the point itself (its VM record when it is a VM's).
pub fn point_row(location: &str, job_id: Option<i64>, id: &PointId, p: &RestorePoint) -> PointRow {
    let record = VmRecord::of(p);
    PointRow {
        id: id.to_string(),
        repository: key(location),
        job_id,
        name: p.name.clone(),
        vm_uuid: record.as_ref().map(|r| r.uuid.clone()),
        host: record.as_ref().map(|r| r.host.clone()).filter(|h| !h.is_empty()),
        time: p.time.clone(),
        chain: record.as_ref().map(|r| r.chain.to_string()),
        method: record.as_ref().map(|r| r.method.as_str().to_string()),
        read_bytes: record.as_ref().map(|r| r.vm_read_bytes as i64),
        ..Default::default()
    }
}

/// Held while a task writes a repository's points into the catalog and syncs it with the
/// repository's listing: two syncs of one repository (a job's own, and another job copying
/// into it) must not interleave, or one's older listing removes the other's new rows.
pub fn catalog_sync() -> std::sync::MutexGuard<'static, ()> {
    static SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SYNC.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the catalog's points of repository `location` match its listing (under its shared
/// lock), and records its size now (the bytes of its packs). Returns (added, removed).
pub fn refresh(catalog: &Catalog, repo: &Repository, location: &str, job_id: Option<i64>) -> Result<(usize, usize)> {
    let listed = cairn_ops::points::list_points(repo, None, Duration::from_secs(60))?;
    // Damaged points are left as the catalog knows them: a read error is no proof of absence.
    let mut rows: Vec<PointRow> = listed.points.iter().map(|(id, p)| point_row(location, job_id, id, p)).collect();
    for (name, _) in &listed.damaged {
        if let Some(kept) = catalog.points_with_id(name)?.into_iter().find(|p| p.repository == key(location)) {
            rows.push(kept);
        }
    }
    let changed = catalog.sync_points(&key(location), &rows)?;
    let stored: u64 = repo
        .backend()
        .list(cairn_storage::Kind::Pack)
        .context("listing the repository's packs")?
        .iter()
        .map(|l| l.size)
        .sum();
    catalog.record_usage(&key(location), stored, listed.points.len())?;
    Ok(changed)
}

/// The repository as a helper process is told it: a folder made absolute, a URL as given.
pub fn helper_location(location: &str) -> Result<std::path::PathBuf> {
    if location.contains("://") {
        return Ok(location.into());
    }
    Ok(std::path::absolute(location)?)
}

/// A password from password file `f` (its last line break dropped). The file must be a regular
/// file of root (or of this process's user), readable by nobody else, at most 4 KiB, not reached
/// through a symbolic link: the server reads it as root, on the word of an operator's token.
pub fn read_password_file(f: &str) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        // No symbolic link followed; a FIFO does not block the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(f)
        .with_context(|| format!("opening the password file {f}"))?;
    let meta = file.metadata()?;
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o077 != 0 || meta.len() > 4096 {
        anyhow::bail!("the password file {f} must be a regular file of root, mode 0600 or stricter, at most 4 KiB");
    }
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).with_context(|| format!("reading the password file {f}"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}
