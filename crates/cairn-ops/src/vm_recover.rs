//! Recovering a VM restore point onto a host (this machine, or another over SSH: its
//! [`HostAccess`]), in two steps: [`plan`] checks everything that
//! can refuse and writes nothing; [`execute`] writes, defines and starts. An interface that
//! confirms the replacement of a running VM asks between them ([`RecoveryPlan::replaces`]).

use crate::error::OpResult;
use crate::helpers::Helpers;
use cairn_engine::Progress;
use cairn_hypervisor::Hypervisor;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_vm::host::HostAccess;
use cairn_vm::recover::{plan_recovery, InstantMode};
pub use cairn_vm::recover::{RecoverOptions, RecoverReport, Recovery, RecoveryPlan};
use std::path::Path;

/// Checks a recovery of point `point_id` onto `hv` (whose files `host` reaches) as `opts` asks;
/// writes nothing.
pub fn plan(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    opts: &RecoverOptions,
    progress: &dyn Progress,
) -> OpResult<Recovery> {
    Ok(plan_recovery(hv, host, repo, point_id, point, opts, progress)?)
}

/// Carries out a planned recovery (with the options it was planned with), or finishes an interrupted instant recovery. An instant
/// recovery's disks are served by a detached NBD server of `point_spec` (`NAME@ID`) started
/// through `helpers`. `stop_after_start` is a testing aid: stop once the VM runs, as an
/// interrupted instant recovery would.
#[allow(clippy::too_many_arguments)] // the recovery, where, and the interface's services
pub fn execute(
    recovery: Recovery,
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    point_spec: &str,
    helpers: &dyn Helpers,
    stop_after_start: bool,
    progress: &dyn Progress,
) -> OpResult<RecoverReport> {
    let launch = |socket: &Path| helpers.start_nbd_server(point_spec, socket);
    let instant = InstantMode { launch_server: &launch, stop_after_start };
    Ok(match recovery {
        Recovery::Unfinished(unfinished) => unfinished.finish(hv, host, &instant, progress)?,
        Recovery::Plan(plan) => plan.execute(hv, host, repo, &instant, progress)?,
    })
}

/// Writes guest disk `disk` of VM point `point` back onto that disk inside the running VM
/// `vm`, through its cairn-agent (the disk unmounted there), and checks it by reading it back.
pub fn restore_guest_disk(
    host: &dyn HostAccess,
    vm: &cairn_hypervisor::VmSummary,
    repo: &std::sync::Arc<Repository>,
    point: &RestorePoint,
    disk: &str,
    progress: &dyn Progress,
) -> OpResult<cairn_vm::guest_disks::DeviceRestore> {
    Ok(cairn_vm::guest_disks::restore_onto_device(host, vm, repo, point, disk, progress)?)
}
