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
