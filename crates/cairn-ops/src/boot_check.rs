//! A boot check with its report: boot a VM restore point in a sandbox ([`cairn_vm::boot`]),
//! mail the verdict with the screenshot, and keep both in the repository's catalog
//! (FORMAT.md §11), where `report` and later checks find them.

use crate::error::OpResult;
use crate::helpers::Helpers;
use crate::mail::MailSettings;
use base64::Engine as _;
use cairn_engine::Progress;
use cairn_hypervisor::Hypervisor;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_vm::boot::{verify_boot, BootCheck, BootOptions};
use cairn_vm::host::HostAccess;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a boot check needs beyond the point.
#[derive(Clone, Debug)]
pub struct BootCheckRequest {
    /// Folder for the sandbox's overlays (emptied afterwards); absolute.
    pub work_dir: PathBuf,
    /// How long the OS may take to come up.
    pub timeout: Duration,
    /// Where the verdict is mailed, if anywhere.
    pub mail: Option<MailSettings>,
    pub workers: usize,
}

/// What a boot check found and where its report went.
#[derive(Clone, Debug)]
pub struct BootOutcome {
    pub check: BootCheck,
    /// The catalog record holding the verdict and the screenshot.
    pub record_id: String,
    /// The address the report was mailed to; `None` when not asked or when mailing failed (the
    /// failure is a progress note: the verdict stands without the mail).
    pub mailed_to: Option<String>,
    pub screenshot: Option<Vec<u8>>,
}

/// Boots point `id` in a sandbox on `hv`'s host (whose files `host` reaches), mails the verdict if asked, and stores it in the catalog.
#[allow(clippy::too_many_arguments)] // the point, where it boots, and the interface's services
pub fn boot_check(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    id: &PointId,
    point: &RestorePoint,
    req: &BootCheckRequest,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
) -> OpResult<BootOutcome> {
    let server_point = format!("{}@{}", point.name, id);
    let launch = |socket: &Path| helpers.start_nbd_server(&server_point, socket);
    let opts = BootOptions {
        work_dir: req.work_dir.clone(),
        timeout: req.timeout,
        launch_server: &launch,
        workers: req.workers,
    };
    let (check, screenshot) = verify_boot(hv, host, repo, id, point, &opts, progress)?;
    let mut record = serde_json::to_value(&check).map_err(anyhow::Error::from)?;
    if let Some(png) = &screenshot {
        record["screenshot"] = base64::engine::general_purpose::STANDARD.encode(png).into();
    }
    let mut mailed_to = None;
    if let Some(mail) = &req.mail {
        match mail.send_boot_report(&check, screenshot.as_deref()) {
            Ok(()) => mailed_to = Some(mail.to.clone()),
            Err(e) => progress.note(&format!("warning: the report could not be mailed to {}: {e:#}", mail.to)),
        }
    }
    record["mailed_to"] = mailed_to.clone().into();
    let record_id = repo.save_record(&record)?;
    Ok(BootOutcome { check, record_id, mailed_to, screenshot })
}
