//! Restores asked through the API: a VM restore point recovered onto a host of the server's
//! list, into one of the server's restore folders, whole or instantly (the VM runs from the
//! repository while its disks move). The same two steps as `cairn restore vm`
//! (`cairn_ops::vm_recover::plan`, then `execute`), run as a task.
//!
//! What an API caller may choose is narrower than what the command line allows: the host must
//! be in the host list, the folder among `--restore-storage`, and a restore never replaces the
//! original VM nor keeps host devices (both are for an operator at the host's console).

use crate::catalog::PointRow;
use crate::repos::Location;
use crate::{DirectorError, Settings};
use anyhow::{Context, Result};
use cairn_engine::Progress;
use cairn_repo::PointId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use utoipa::ToSchema;

/// What to restore, where.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The point's ID (64 hex digits, as `/api/points` lists it).
    pub point: String,
    /// The repository holding it, when more than one job's repository does (a copy keeps its ID).
    #[serde(default)]
    pub repository: Option<String>,
    pub kind: RestoreKind,
    /// The host to recover onto: a URI of the server's host list.
    pub host: String,
    /// The folder of that host the disks go to: one of the server's restore folders.
    pub storage: String,
    /// The new VM's name (default: `NAME-restored`); a VM of that name must not exist.
    #[serde(default)]
    pub name: Option<String>,
    /// Start it once defined (an instant recovery always starts it).
    #[serde(default = "yes")]
    pub start: bool,
    /// Leave out the network interfaces whose network the host lacks, instead of refusing.
    #[serde(default)]
    pub drop_missing: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestoreKind {
    /// Copy the disks to the storage folder, then define (and start) the VM.
    Vm,
    /// Start the VM at once from the repository; its disks move to the folder while it runs.
    Instant,
}

impl RestoreRequest {
    /// Refuses what the server does not allow: a host off its list, a folder not among its
    /// restore folders, a name that is not one.
    pub fn check(&self, settings: &Settings) -> Result<(), DirectorError> {
        let bad = |why: String| Err(DirectorError::Invalid(why));
        if PointId::parse(&self.point).is_none() {
            return bad(format!("point {:?}: expected its ID, 64 hex digits", self.point));
        }
        if !settings.hosts.contains(&self.host) {
            return bad(format!(
                "host {:?} is not in the server's host list ({})",
                self.host,
                settings.hosts.join(", ")
            ));
        }
        let storage = Path::new(&self.storage);
        if !settings.restore_storage.iter().any(|s| s.as_path() == storage) {
            let allowed: Vec<String> = settings.restore_storage.iter().map(|s| s.display().to_string()).collect();
            return bad(format!(
                "folder {:?} is not one of the server's restore folders ({})",
                self.storage,
                allowed.join(", ")
            ));
        }
        if let Some(name) = &self.name {
            if !crate::jobs::plain_name(name) || name.starts_with('.') {
                return bad(format!("VM name {name:?}: letters, digits, -, _ and . only (1 to 64)"));
            }
        }
        Ok(())
    }
}

/// Recovers `point` (of repository `at`) as `req` asks; the recovery's report.
pub fn restore(
    settings: &Settings,
    at: &Location,
    point: &PointRow,
    req: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<serde_json::Value> {
    use cairn_ops::vm_recover::{execute, plan, RecoverOptions};
    let repo = at.open()?;
    let _lock = repo.lock(false, "restore (director)", Duration::from_secs(300))?;
    repo.load_index()?;
    let id = PointId::parse(&point.id).context("the point's ID")?;
    let p = repo.load_point(&id).with_context(|| format!("reading restore point {}", id.short()))?;
    progress.note(&format!("restore point {} of {} ({}) onto {}", id.short(), p.name, p.time, req.host));
    let hv = (settings.connect)(&req.host)?;
    let host = cairn_ops::hosts::open_access(&req.host, &settings.work_dir, &settings.remote)?;
    let instant = req.kind == RestoreKind::Instant;
    let opts = RecoverOptions {
        storage: PathBuf::from(&req.storage),
        name: req.name.clone(),
        replace: false,
        start: req.start || instant,
        resume_state: false,
        format: cairn_engine::target::TargetFormat::Qcow2,
        network_map: Vec::new(),
        drop_missing: req.drop_missing,
        keep_host_devices: false,
        instant,
        workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        local_work_dir: settings.work_dir.clone(),
    };
    let recovery = plan(hv.as_ref(), host.as_ref(), &repo, &id, &p, &opts, progress)?;
    let helpers = cairn_ops::ExeHelpers {
        exe: std::env::current_exe().context("locating the cairn executable for its helpers")?,
        repo: crate::repos::helper_location(&at.location)?,
        password: at.password()?,
    };
    let report =
        execute(recovery, hv.as_ref(), host.as_ref(), &repo, &format!("{}@{}", p.name, id), &helpers, false, progress)?;
    progress.note(&format!(
        "VM {} ({}) {} on {}",
        report.name,
        report.uuid,
        if report.started { "recovered and started" } else { "recovered" },
        req.host
    ));
    Ok(serde_json::to_value(&report)?)
}
