//! Backing up VMs: each VM of the request, found by name or UUID, backed up under its watchdog
//! ([`cairn_vm::backup::backup_vm`]), then boot-checked if asked. One VM's failure does not stop
//! the others; each gets its own outcome.

use crate::boot_check::{boot_check, BootCheckRequest, BootOutcome};
use crate::cancel::Cancel;
use crate::error::{OpError, OpResult};
use crate::helpers::Helpers;
use cairn_engine::Progress;
use cairn_hypervisor::watchdog::Watchdog;
use cairn_hypervisor::{Hypervisor, VmState};
use cairn_repo::vm_record::VmRecord;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_vm::backup::{backup_vm, new_run_token, VmBackupOptions};
use std::sync::Arc;

pub struct BackupVmsRequest {
    /// VMs by name or UUID; each becomes one restore point named after the VM.
    pub vms: Vec<String>,
    /// The options of every VM's backup (each gets its own run token).
    pub options: VmBackupOptions,
    /// Boot-check each new point, and how.
    pub boot_check: Option<BootCheckRequest>,
}

/// A VM's restore point, and its boot check if one was asked for.
pub struct BackedUp {
    pub id: PointId,
    pub point: RestorePoint,
    pub record: VmRecord,
    pub boot: Option<OpResult<BootOutcome>>,
}

impl BackedUp {
    /// The point was boot-checked and did not come up (or the check itself failed).
    pub fn unbootable(&self) -> bool {
        match &self.boot {
            None => false,
            Some(Ok(b)) => !b.check.passed(),
            Some(Err(_)) => true,
        }
    }
}

/// One VM of the request and what became of it.
pub struct VmBackupOutcome {
    /// The VM as the request named it.
    pub vm: String,
    pub result: OpResult<BackedUp>,
}

/// Backs up every VM of `req` in order. `on_done` sees each outcome as soon as it is known
/// (an interface prints it while the next VM runs). A cancellation stops the VM under way at
/// its next batch of blocks (its guest thawed or resumed and its backup job ended as after any
/// failure, no point written) and gets the VMs not started a `Cancelled` outcome too.
pub fn backup_vms(
    hv: &dyn Hypervisor,
    repo: &Arc<Repository>,
    req: &BackupVmsRequest,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
    cancel: &Cancel,
    on_done: &mut dyn FnMut(&VmBackupOutcome),
) -> Vec<VmBackupOutcome> {
    let progress = &cancel.watching(progress);
    let mut outcomes = Vec::new();
    for name in &req.vms {
        let result = cancel.check(&format!("the backup of VM {name}")).and_then(|()| {
            let (id, point, record) = backup_one(hv, repo, name, &req.options, helpers, progress)?;
            let boot = req.boot_check.as_ref().map(|b| {
                cancel.check(&format!("the boot check of {name}"))?;
                boot_check(hv, repo, &id, &point, b, helpers, progress)
            });
            Ok(BackedUp { id, point, record, boot })
        });
        let outcome = VmBackupOutcome { vm: name.clone(), result };
        on_done(&outcome);
        outcomes.push(outcome);
    }
    outcomes
}

/// One VM's backup, guarded by a watchdog while its guest runs.
fn backup_one(
    hv: &dyn Hypervisor,
    repo: &Arc<Repository>,
    name: &str,
    options: &VmBackupOptions,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord), OpError> {
    let vm = hv.find(name)?;
    let opts = VmBackupOptions { run_token: new_run_token(), ..options.clone() };
    // A shut-off VM has nothing to guard: no freeze, no pause, no backup job.
    let mut dog = if vm.state != VmState::ShutOff {
        let dog = helpers.start_watchdog(hv.uri(), &vm.uuid, opts.freeze_limit, &opts.run_token)?;
        progress.note(&format!("{}: watchdog running {}", vm.name, dog.mode()));
        dog
    } else {
        Watchdog::none()
    };
    let r = backup_vm(hv, repo, &vm, &opts, &mut dog, progress);
    if r.is_ok() {
        dog.done();
    }
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use cairn_hypervisor::fake::{Fake, Handle};
    use cairn_repo::vm_record::Method;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// Helpers that must not be reached.
    struct NoHelpers;
    impl Helpers for NoHelpers {
        fn start_nbd_server(&self, _: &str, _: &Path) -> anyhow::Result<u32> {
            panic!("no NBD server expected")
        }
        fn start_watchdog(&self, _: &str, _: &str, _: Duration, _: &str) -> anyhow::Result<Watchdog> {
            panic!("no watchdog expected")
        }
    }

    fn request(vms: &[&str]) -> BackupVmsRequest {
        BackupVmsRequest {
            vms: vms.iter().map(|v| v.to_string()).collect(),
            options: VmBackupOptions {
                method: Method::Auto,
                full: false,
                skip_swap: true,
                pre_freeze: vec![],
                post_thaw: vec![],
                work_dir: PathBuf::from("/nonexistent"),
                compression_level: 1,
                workers: 1,
                oracle_dir: None,
                hold_point: None,
                run_token: String::new(),
                freeze_limit: Duration::from_secs(10),
            },
            boot_check: None,
        }
    }

    fn new_repository() -> (tempfile::TempDir, Arc<Repository>) {
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(cairn_storage::LocalBackend::new(t.path().join("repo")));
        let repo = Arc::new(Repository::init(backend, None).unwrap());
        (t, repo)
    }

    #[test]
    fn a_cancelled_request_touches_no_vm_and_says_so_for_each() {
        let (_t, repo) = new_repository();
        let fake = Arc::new(Fake::default());
        let cancel = Cancel::new();
        cancel.cancel();
        let mut seen = Vec::new();
        let outcomes = backup_vms(
            &Handle(fake.clone()),
            &repo,
            &request(&["web", "db"]),
            &NoHelpers,
            &cairn_engine::NoProgress,
            &cancel,
            &mut |o| seen.push(o.vm.clone()),
        );
        assert_eq!(seen, ["web", "db"], "each outcome is reported as it is known");
        for o in &outcomes {
            let e = o.result.as_ref().err().expect("a cancelled VM backed up");
            assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        }
        assert!(fake.calls.lock().unwrap().is_empty(), "the hypervisor was called: {:?}", fake.calls.lock().unwrap());
        assert!(repo.list_points().unwrap().points.is_empty());
    }

    #[test]
    fn an_unknown_vm_is_not_found_and_the_others_go_on() {
        let (_t, repo) = new_repository();
        let fake = Arc::new(Fake::default());
        let outcomes = backup_vms(
            &Handle(fake.clone()),
            &repo,
            &request(&["ghost", "phantom"]),
            &NoHelpers,
            &cairn_engine::NoProgress,
            &Cancel::new(),
            &mut |_| {},
        );
        assert_eq!(outcomes.len(), 2, "one VM's failure stopped the others");
        for o in &outcomes {
            let e = o.result.as_ref().err().expect("an unknown VM backed up");
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains(&o.vm), "{e}");
        }
        assert_eq!(fake.count("find"), 2);
    }
}
