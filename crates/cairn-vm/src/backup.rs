//! Backing up a whole VM through a [`Hypervisor`]: pick the method, take the point in time,
//! stream every disk from the point's NBD exports (only the dirty extents when the VM's
//! checkpoint can be trusted), add the configuration and the files it names, and commit one
//! restore point.
//!
//! The order of a live backup, and why:
//! 1. prepare: clean up leftovers of a killed run (backup job, half-made checkpoints), decide the
//!    method and whether the last checkpoint can be trusted;
//! 2. take the point: freeze (app-consistent) or pause + save memory (saved-state), then one
//!    `begin_backup` that creates the new checkpoint and the exports atomically, then thaw or
//!    resume at once. The watchdog process is told before each step, so a killed job never leaves
//!    the guest frozen or paused;
//! 3. copy: the exports hold the point while the guest runs on;
//! 4. commit the restore point (durable), then end the job and delete older checkpoints of this
//!    repository. A failure before the commit ends the job and deletes the new checkpoint, so the
//!    old one (whose bitmap then holds every write since it) still matches the last restore point.

use crate::guest_disks::GuestDisks;
use crate::host::{private_dir, HostAccess};
use crate::Refusal;
use anyhow::{anyhow, bail, Context, Result};
use cairn_disk::swap::{find_swap, skip_ranges};
use cairn_engine::backup::{backup_with, BackupOptions, DiskInput};
use cairn_engine::progress::Progress;
use cairn_engine::ranges::Range;
use cairn_engine::source::{ImageFormat, NbdSource, Source};
use cairn_hypervisor::watchdog::{Guard, Watchdog};
use cairn_hypervisor::{AgentStatus, BackupExport, BackupRequest, Hypervisor, VmDisk, VmState, VmSummary};
use cairn_repo::vm_record::{Event, FileRecord, HookRun, SkippedSwap};
pub use cairn_repo::vm_record::{Method, VmRecord};
use cairn_repo::PointId;
use cairn_repo::{DiskImage, Repository, RestorePoint};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone)]
pub struct VmBackupOptions {
    pub method: Method,
    /// Read every disk in full even when the checkpoint could be trusted.
    pub full: bool,
    pub skip_swap: bool,
    /// Shell commands run in the guest (through the agent) before the freeze and after the thaw.
    pub pre_freeze: Vec<String>,
    pub post_thaw: Vec<String>,
    /// Folder of this machine for the VMs' locks; per VM inside. For a VM of this machine, also
    /// its NBD sockets, scratch (fleecing) files and memory state (a VM of another host has them
    /// in its host's [`HostAccess::work_dir`]).
    pub work_dir: PathBuf,
    pub compression_level: i32,
    pub workers: usize,
    /// Testing aid: also pull each export with `qemu-img convert` into this folder (an
    /// independent reader of the same point).
    pub oracle_dir: Option<PathBuf>,
    /// Testing aid: stay frozen (or paused) this long after the point is taken.
    pub hold_point: Option<Duration>,
    /// Names this run's NBD socket, scratch and memory files (see [`new_run_token`]); the
    /// watchdog is given the same token, so it ends this run's backup job and no other.
    pub run_token: String,
    /// The watchdog's limit: a guest frozen or paused longer is thawed or resumed by it. A point
    /// that took longer than this to take is discarded, since the guest may have run on before it.
    pub freeze_limit: Duration,
}

/// Runs a hook command in the guest through the agent (bounded to 5 minutes).
fn run_hook(hv: &dyn Hypervisor, uuid: &str, when: &str, cmd: &str) -> Result<HookRun> {
    let r = hv.agent_exec(uuid, cmd, 300)?;
    Ok(HookRun { when: when.into(), command: cmd.into(), exit_code: r.exit_code, output: r.stdout + &r.stderr })
}

/// A new random token naming one run's files and backup job.
pub fn new_run_token() -> String {
    let mut b = [0u8; 8];
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: time and process still make it unique on this host.
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        b = (t ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    hex::encode(b)
}

/// The newest restore point of the VM with this UUID (followed across renames and hosts).
pub fn last_point_of(repo: &Repository, uuid: &str) -> Result<Option<(PointId, RestorePoint)>> {
    let list = repo.list_points()?;
    Ok(list
        .points
        .into_iter()
        .rev()
        .find(|(_, p)| p.metadata.get("vm").and_then(|v| v.get("uuid")).and_then(|u| u.as_str()) == Some(uuid)))
}

/// Why a VM qualifies, or not, for the app-consistent method.
pub fn app_consistent_requirements(hv: &dyn Hypervisor, vm: &VmSummary) -> std::result::Result<String, String> {
    if vm.state != VmState::Running {
        return Err(format!("the VM is {}", vm.state.as_str()));
    }
    match &vm.agent {
        AgentStatus::NoChannel => return Err("the VM has no guest agent channel (org.qemu.guest_agent.0)".into()),
        AgentStatus::NotAnswering(e) => return Err(format!("the guest agent does not answer guest-ping ({e})")),
        AgentStatus::Answering => {}
    }
    let not_qcow2: Vec<_> = vm
        .config
        .disks
        .iter()
        .filter(|d| d.is_backed_up() && !d.supports_checkpoints())
        .map(|d| format!("{} ({})", d.target, d.format))
        .collect();
    if !not_qcow2.is_empty() {
        return Err(format!("disks {} do not support checkpoints (qcow2 needed)", not_qcow2.join(", ")));
    }
    match hv.agent_filesystems(&vm.uuid) {
        Ok(fs) => Ok(format!(
            "guest agent answers; {} filesystem(s) to freeze{}",
            fs.len(),
            if fs.is_empty() {
                String::new()
            } else {
                format!(": {}", fs.iter().map(|f| f.mountpoint.as_str()).collect::<Vec<_>>().join(", "))
            }
        )),
        Err(e) => Err(format!("the guest agent cannot list the guest's filesystems (guest-get-fsinfo: {e})")),
    }
}

/// Which method a VM gets under `auto`, and why (for the inventory and the job).
pub fn choose_method(hv: &dyn Hypervisor, vm: &VmSummary, asked: Method) -> Result<(Method, String)> {
    match vm.state {
        VmState::ShutOff => {
            return Ok((Method::Offline, "the VM is shut off: its disk files are read directly".into()))
        }
        VmState::Paused => {
            return Ok((
                Method::CrashConsistent,
                "the VM is paused by its owner: the point is taken as it stands and the VM stays paused".into(),
            ))
        }
        VmState::Running => {}
        other => bail!("VM {} is {}: start it or shut it off before backing it up", vm.name, other.as_str()),
    }
    Ok(match asked {
        Method::Auto => match app_consistent_requirements(hv, vm) {
            Ok(why) => (Method::AppConsistent, why),
            Err(why) => (Method::SavedState, format!("app-consistent is not possible: {why}; saved-state instead")),
        },
        Method::AppConsistent => match app_consistent_requirements(hv, vm) {
            Ok(why) => (Method::AppConsistent, why),
            Err(why) => return Err(Refusal::AppConsistentImpossible { vm: vm.name.clone(), why }.into()),
        },
        Method::SavedState => (Method::SavedState, "asked for (method saved-state)".into()),
        Method::CrashConsistent => (Method::CrashConsistent, "asked for (method crash-consistent)".into()),
        Method::Offline => bail!("the offline method is only for VMs that are shut off"),
    })
}

struct Clock {
    t0: Instant,
    events: Vec<Event>,
}

impl Clock {
    fn mark(&mut self, event: &str) -> Instant {
        let now = Instant::now();
        self.events.push(Event {
            event: event.to_string(),
            at: cairn_repo::now_rfc3339(),
            t_ms: now.duration_since(self.t0).as_millis() as u64,
        });
        now
    }
}

/// A lock on one VM on this host: two backups of the same VM would fight over its checkpoints.
/// Held in the VM's work folder and, so that runs with different `--work-dir`s also exclude
/// each other, in the host's lock folder (when we may write there).
pub struct VmLock {
    _files: Vec<std::fs::File>,
}

/// The host-wide lock folder: root's own, unlike the world-writable /run/lock where any local
/// user could create it first and hold our locks.
pub const HOST_LOCK_DIR: &str = "/run/cairn/locks";

fn lock_vm(dir: &Path, uuid: &str, name: &str) -> Result<VmLock> {
    lock_vm_in(dir, Some(Path::new(HOST_LOCK_DIR)), uuid, name)
}

/// The lock of VM `uuid` on its host, for a backup run from another machine
/// ([`HostAccess::lock_vm`]): in the host's work folder (its `locks/`) and its host-wide lock
/// folder, which a cairn run on the host itself takes too. So two backup servers, or a backup server and the host's own
/// cairn, cannot take each other's backup jobs for leftovers of a killed run and end them.
pub fn lock_vm_for_another_machine(work_dir: &Path, uuid: &str, name: &str) -> Result<VmLock> {
    if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        bail!("{uuid:?} is not a VM's UUID");
    }
    let dir = work_dir.join("locks");
    private_dir(work_dir).context("the work folder")?;
    private_dir(&dir).context("the work folder's locks")?;
    lock_vm_in(&dir, Some(Path::new(HOST_LOCK_DIR)), uuid, name)
}

fn lock_vm_in(dir: &Path, host_dir: Option<&Path>, uuid: &str, name: &str) -> Result<VmLock> {
    let mut paths = vec![dir.join(format!("vm-{uuid}.lock"))];
    match host_dir.map(|d| (d, private_dir(d))) {
        Some((d, Ok(()))) => paths.push(d.join(format!("vm-{uuid}.lock"))),
        // Not ours to create (not root): the host folder is a second line of defence.
        Some((_, Err(e))) if is_permission_denied(&e) => {}
        Some((_, Err(e))) => return Err(e),
        None => {}
    }
    let mut files = Vec::new();
    for p in &paths {
        let Some(f) = crate::host::try_lock(p)? else {
            bail!("another cairn backup of VM {name} is running on this host; wait for it to finish");
        };
        files.push(f);
    }
    Ok(VmLock { _files: files })
}

fn is_permission_denied(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied))
}

/// Ends the backup job this run started, if it runs (a failure after `begin_backup`). Ok once no
/// job of this run runs: the watchdog may then forget it, and not before.
fn end_our_job(hv: &dyn Hypervisor, uuid: &str, token: &str) -> Result<()> {
    match hv.running_backup(uuid)? {
        Some(socket) if is_ours(&socket, token) => end_job(hv, uuid, token),
        _ => Ok(()),
    }
}

/// Ends the VM's backup job, started by this run. An end that failed but left no job of this run
/// (it ended anyway, or a watchdog ended it) counts as done.
fn end_job(hv: &dyn Hypervisor, uuid: &str, token: &str) -> Result<()> {
    let Err(e) = hv.end_backup(uuid) else { return Ok(()) };
    match hv.running_backup(uuid) {
        Ok(Some(socket)) if is_ours(&socket, token) => Err(e),
        Ok(_) => Ok(()),
        Err(_) => Err(e),
    }
}

fn is_ours(socket: &Path, token: &str) -> bool {
    socket.file_name().is_some_and(|n| *n == *cairn_hypervisor::job_socket_name(token))
}

/// The guest could not be thawed or resumed: the watchdog keeps its mark and goes on trying (a
/// new point is not tried on a guest in that state).
#[derive(Debug)]
struct NotUndone(&'static str);

impl std::fmt::Display for NotUndone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} failed; the watchdog goes on trying", self.0)
    }
}

/// Thaws the guest; Ok(frozen filesystems thawed) only if it is thawed now (a failed call after
/// which the guest reports itself thawed counts).
fn thaw(hv: &dyn Hypervisor, uuid: &str) -> Result<u32> {
    match hv.thaw(uuid) {
        Ok(n) => Ok(n),
        Err(_) if hv.freeze_status(uuid).is_ok_and(|s| s == "thawed") => Ok(0),
        Err(e) => Err(e.context(NotUndone("thawing the guest"))),
    }
}

/// Resumes the VM; Ok(false) when it already ran (the watchdog resumed it), Ok(true) when we did,
/// an error if it is still paused.
fn resume(hv: &dyn Hypervisor, uuid: &str) -> Result<bool> {
    match hv.resume(uuid) {
        Ok(()) => Ok(true),
        Err(_) if hv.state(uuid).is_ok_and(|s| s == VmState::Running) => Ok(false),
        Err(e) => Err(e.context(NotUndone("resuming the VM"))),
    }
}

/// A file removed when dropped: the memory state (a dump of guest RAM) must not outlive the run,
/// whatever path the run leaves by.
/// A file of the host, removed when this goes.
struct RemoveOnDrop<'a>(&'a dyn HostAccess, &'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        self.0.remove_file(self.1);
    }
}

/// The point took longer to take than the watchdog's limit: the guest may have been thawed or
/// resumed before it, so it is not what the method promises.
#[derive(Debug)]
struct LimitExceeded {
    what: &'static str,
    took: Duration,
    limit: Duration,
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "taking the point took {:.1} s, longer than the freeze limit of {:.1} s: the watchdog may have {} before it, so the point was discarded; raise the freeze limit if the guest can bear it",
            self.took.as_secs_f64(),
            self.limit.as_secs_f64(),
            self.what
        )
    }
}

impl std::error::Error for LimitExceeded {}

fn checkpoint_prefix(repo: &Repository) -> String {
    format!("cairn-{}-", &repo.config().id[..8.min(repo.config().id.len())])
}

/// The folder of one VM's sockets, scratch files and memory state.
pub fn vm_work_dir(work_dir: &Path, uuid: &str) -> PathBuf {
    work_dir.join(uuid)
}

/// Backs up one VM as one restore point. The steps are in the module documentation; each is a
/// function below: [`prepare`], [`new_record`], then [`backup_offline`] for a shut-off VM, or
/// [`take_live_point`], [`read_live_point`] and [`end_live_backup`] for a running one.
pub fn backup_vm(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: &VmSummary,
    opts: &VmBackupOptions,
    watchdog: &mut Watchdog,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord)> {
    let mut clock = Clock { t0: Instant::now(), events: Vec::new() };
    clock.mark("prepare");
    let prep = prepare(hv, host, repo, vm, opts, progress)?;
    let (method, method_reason) = choose_method(hv, vm, opts.method)?;
    let disks: Vec<VmDisk> = vm.config.disks.iter().filter(|d| d.is_backed_up()).cloned().collect();
    if disks.is_empty() {
        bail!("VM {} has no disks to back up", vm.name);
    }
    let mut record = new_record(hv, repo, vm, method, method_reason)?;
    progress.note(&format!("{}: method {} ({})", vm.name, method.as_str(), record.method_reason));
    let mut registered: Option<String> = None;
    let chain = if opts.full {
        Err("a full read was asked for".to_string())
    } else {
        let last_record = prep.last.as_ref().and_then(|(_, p)| VmRecord::of(p));
        trust_checkpoint(
            hv,
            &vm.uuid,
            &disks,
            prep.last.as_ref(),
            last_record.as_ref(),
            prep.forgotten_checkpoint.as_deref(),
            &mut registered,
        )
    };
    if let Some(r) = &registered {
        progress.note(&format!("{}: the checkpoint of its last restore point was {r}", vm.name));
    }
    if method == Method::Offline {
        return backup_offline(host, repo, vm, &disks, chain, prep.last, record, clock, opts, progress);
    }
    let mut guest = GuestDisks::for_backup(hv, host, vm, method == Method::AppConsistent, progress);

    let new_checkpoint =
        format!("{}{}", prep.prefix, SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_millis());
    let memory_file = prep.dir.join(format!("memory-{}.state", opts.run_token));
    let _memory_file = RemoveOnDrop(host, &memory_file);
    let live = LivePoint {
        host,
        socket_dir: &prep.socket_dir,
        dir: &prep.dir,
        disks: &disks,
        new_checkpoint: &new_checkpoint,
        memory_file: &memory_file,
    };
    let (export, listed_changes, chain) = take_live_point(
        hv,
        repo,
        vm,
        method,
        &live,
        chain,
        opts,
        watchdog,
        &mut clock,
        &mut record,
        &mut guest,
        progress,
    )?;
    let all_qcow2 = disks.iter().all(|d| d.supports_checkpoints());
    record.checkpoint = if all_qcow2 { Some(new_checkpoint.clone()) } else { None };
    if all_qcow2 {
        // Kept in the point: on another host (after a migration) it is registered again from it.
        match hv.checkpoint_document(&vm.uuid, &new_checkpoint) {
            Ok(doc) => record.checkpoint_document = Some(doc),
            Err(e) => record.warnings.push(format!(
                "the definition of checkpoint {new_checkpoint} could not be read ({e:#}): if the VM moves to another host, its next backup reads everything"
            )),
        }
    }
    match &chain {
        Ok(cp) => {
            record.chain = "incremental".into();
            record.incremental_from = Some(cp.clone());
            record.chain_reason =
                format!("checkpoint {cp} matches restore point {}", &prep.last.as_ref().unwrap().0.short());
            if let Some(r) = &registered {
                record.chain_reason.push_str(&format!("; {r}"));
            }
        }
        Err(why) => {
            record.chain_reason = if all_qcow2 {
                format!("{why}; a new chain starts")
            } else {
                format!("{why}; raw disks carry no dirty bitmap, so they are read in full (deduplicated)")
            }
        }
    }
    progress.note(&format!("{}: {} read ({})", vm.name, record.chain, record.chain_reason));
    let result = read_live_point(
        repo,
        vm,
        &live,
        &export,
        listed_changes,
        chain.is_ok(),
        prep.last,
        record,
        clock,
        &mut guest,
        opts,
        progress,
    );
    // The agent's views go (released already when the guest disks were read).
    drop(guest);
    // The job ends either way; its scratch files go with it.
    let ended = end_job(hv, &vm.uuid, &opts.run_token);
    drop(_memory_file);
    host.remove_file(&export.socket);
    end_live_backup(hv, &vm.uuid, &prep.prefix, &new_checkpoint, result, ended, watchdog)
}

/// What [`prepare`] found and holds for the rest of a backup.
struct Prepared {
    /// The VM's work folder on its host (scratch files, memory state), ours alone.
    dir: PathBuf,
    /// Where the emulator creates the job's socket: `dir`, or a folder of its user inside.
    socket_dir: PathBuf,
    /// Held until the backup ends: no other cairn run backs up this VM meanwhile.
    _lock: VmLock,
    /// The VM's lock on its host ([`HostAccess::lock_vm`]), released when dropped.
    _host_lock: crate::host::HostLock,
    /// This repository's checkpoint names start with it.
    prefix: String,
    /// The VM's newest restore point in this repository.
    last: Option<(PointId, RestorePoint)>,
    /// A checkpoint of this repository newer than the newest point's (deleted here): its point
    /// was removed since (forget), which the chain's reason says.
    forgotten_checkpoint: Option<String>,
}

/// Before anything touches the guest: the work folders, the VM's lock, and the leftovers of a
/// killed run (its backup job, scratch files, memory state, and checkpoints it made that no
/// restore point refers to).
fn prepare(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: &VmSummary,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let uuid = vm.uuid.as_str();
    // The locks stay on this machine, out of the VM's folder (which may be QEMU's user's).
    let lock_dir = opts.work_dir.join("locks");
    private_dir(&opts.work_dir).context("the work folder")?;
    private_dir(&lock_dir).context("the work folder's locks")?;
    // This machine's host-wide lock is for its own VMs; a VM of another host is locked there
    // (another backup server, or cairn on that host, may back it up too).
    let lock = if host.is_this_machine() {
        lock_vm(&lock_dir, uuid, &vm.name)?
    } else {
        lock_vm_in(&lock_dir, None, uuid, &vm.name)?
    };
    let host_lock = host.lock_vm(uuid, &vm.name)?;
    // The folder where the hypervisor puts the sockets we read from: on the VM's host.
    let dir = vm_work_dir(host.work_dir(), uuid);
    let prefix = checkpoint_prefix(repo);
    let last = last_point_of(repo, uuid)?;
    if vm.state != VmState::ShutOff {
        if let Some(socket) = hv.running_backup(uuid)? {
            if socket.starts_with(&dir) {
                progress.note(&format!("{}: ending the backup job a killed cairn run left behind", vm.name));
                // Its watchdog may be ending it at this very moment: gone is as good as ended.
                if let Err(e) = hv.end_backup(uuid) {
                    if hv.running_backup(uuid)?.is_some() {
                        return Err(e);
                    }
                }
            } else {
                return Err(Refusal::ForeignBackupJob { vm: vm.name.clone(), socket }.into());
            }
        }
    }
    // An unprivileged QEMU (a stock host) creates the job's socket there and opens its scratch files.
    let owner = if vm.state != VmState::ShutOff { hv.emulator_owner(uuid)? } else { None };
    let socket_dir = host.prepare_dir(&dir, owner)?;
    let keep = last.as_ref().and_then(|(_, p)| VmRecord::of(p)).and_then(|r| r.checkpoint);
    let mut forgotten_checkpoint: Option<String> = None;
    if vm.state != VmState::ShutOff {
        if let Ok(cps) = hv.checkpoints(uuid) {
            for cp in cps.iter().rev() {
                if cp.name.starts_with(&prefix) && Some(&cp.name) != keep.as_ref() {
                    // Newer than the newest point's: its run committed (older checkpoints go only
                    // after a commit), so its point was removed since.
                    let newer = keep.as_ref().is_some_and(|k| cp.name > *k);
                    let why = if newer {
                        "its restore point, the newest, was removed"
                    } else {
                        "no restore point uses it (left by a failed run)"
                    };
                    progress.note(&format!("{}: deleting checkpoint {}: {why}", vm.name, cp.name));
                    hv.delete_checkpoint(uuid, &cp.name)?;
                    if newer && forgotten_checkpoint.is_none() {
                        forgotten_checkpoint = Some(cp.name.clone());
                    }
                }
            }
        }
    }
    Ok(Prepared { dir, socket_dir, _lock: lock, _host_lock: host_lock, prefix, last, forgotten_checkpoint })
}

/// The record of a new point of `vm`, before its chain is known.
fn new_record(
    hv: &dyn Hypervisor,
    repo: &Repository,
    vm: &VmSummary,
    method: Method,
    method_reason: String,
) -> Result<VmRecord> {
    Ok(VmRecord {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        hypervisor: hv.uri().to_string(),
        host: repo.hostname().to_string(),
        state: vm.state.as_str().to_string(),
        method,
        method_reason,
        chain: "full".into(),
        chain_reason: String::new(),
        checkpoint: None,
        incremental_from: None,
        checkpoint_document: None,
        events: Vec::new(),
        frozen_window_ms: None,
        offline_window_ms: None,
        vm_read_bytes: 0,
        skipped_swap: Vec::new(),
        warnings: Vec::new(),
        files: Vec::new(),
        memory_state: None,
        hooks: Vec::new(),
        guest_disks: Vec::new(),
        not_captured: Vec::new(),
        config: hv.config_document(&vm.uuid)?,
    })
}

/// A shut-off VM: its disk files are read directly, only what the checkpoint's bitmap (stored
/// in each qcow2 image) lists when `chain` trusts it.
#[allow(clippy::too_many_arguments)] // the backup's state, handed on once
fn backup_offline(
    host: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: &VmSummary,
    disks: &[VmDisk],
    mut chain: std::result::Result<String, String>,
    last: Option<(PointId, RestorePoint)>,
    mut record: VmRecord,
    mut clock: Clock,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord)> {
    let method = record.method;
    let mut inputs = None;
    if let Ok(cp) = chain.clone() {
        // QEMU stored the checkpoint's bitmap in each qcow2 image when it closed them cleanly;
        // after a crash it is missing or marked inconsistent, and qemu-nbd refuses it.
        match open_files(host, disks, Some(&cp), skip_swap(opts, method), &mut record) {
            Ok(i) => inputs = Some(i),
            Err(e) => {
                record.skipped_swap.clear();
                chain = Err(format!("checkpoint {cp} cannot be used: {e:#}"));
            }
        }
    }
    let inputs = match inputs {
        Some(i) => i,
        None => open_files(host, disks, None, skip_swap(opts, method), &mut record)?,
    };
    match chain {
        Ok(cp) => {
            record.chain = "incremental".into();
            record.chain_reason = format!(
                "the VM is shut off; the bitmap of checkpoint {cp}, stored in its disk images, lists every change since restore point {}",
                &last.as_ref().unwrap().0.short()
            );
            // The checkpoint keeps recording from where it started: it stays this chain's base.
            record.incremental_from = Some(cp.clone());
            record.checkpoint_document =
                last.as_ref().and_then(|(_, p)| VmRecord::of(p)).and_then(|r| r.checkpoint_document);
            record.checkpoint = Some(cp);
        }
        Err(why) => {
            record.chain_reason = format!("the VM is shut off: its disk files are read in full (deduplicated); {why}");
        }
    }
    progress.note(&format!("{}: {} read ({})", vm.name, record.chain, record.chain_reason));
    clock.mark("point created");
    commit(host, repo, vm, inputs, last, record, clock, opts, progress)
}

/// Where a live point's files go and what it is called.
struct LivePoint<'a> {
    host: &'a dyn HostAccess,
    /// Where the emulator creates the job's socket (see [`HostAccess::prepare_dir`]).
    socket_dir: &'a Path,
    dir: &'a Path,
    disks: &'a [VmDisk],
    new_checkpoint: &'a str,
    memory_file: &'a Path,
}

/// Changed ranges per disk, when the point's method listed them itself.
type ListedChanges = Option<Vec<Vec<Range>>>;

/// Takes the point of a running VM (see [`take_point`]) with its new checkpoint, incremental
/// from `chain`'s checkpoint when it is trusted. A checkpoint the hypervisor refuses (a broken
/// or missing bitmap) starts a new chain; returns the exports, the changes the method listed,
/// and the chain as it ended up.
#[allow(clippy::too_many_arguments)] // the backup's state, handed on once
fn take_live_point(
    hv: &dyn Hypervisor,
    repo: &Repository,
    vm: &VmSummary,
    method: Method,
    live: &LivePoint,
    mut chain: std::result::Result<String, String>,
    opts: &VmBackupOptions,
    watchdog: &mut Watchdog,
    clock: &mut Clock,
    record: &mut VmRecord,
    guest: &mut GuestDisks,
    progress: &dyn Progress,
) -> Result<(BackupExport, ListedChanges, std::result::Result<String, String>)> {
    let uuid = vm.uuid.as_str();
    let targets: Vec<String> = live.disks.iter().map(|d| d.target.clone()).collect();
    let description = format!("cairn repository {} (restore points of {})", repo.config().id, vm.name);
    // Told before the job exists, like every guard: a kill right after it starts is covered.
    watchdog.tell(Guard::Job)?;
    loop {
        let from = chain.as_ref().ok().map(|s| s.as_str());
        let req = BackupRequest {
            disks: &targets,
            new_checkpoint: live.new_checkpoint,
            checkpoint_description: &description,
            incremental_from: from,
            work_dir: live.dir,
            socket_dir: live.socket_dir,
            run_token: &opts.run_token,
        };
        let taken = take_point(hv, live.host, vm, method, &req, opts, live.memory_file, watchdog, clock, record, guest);
        // A failure after the job started (a thaw that failed, a point too late) leaves it.
        let job_gone = if taken.is_err() { end_our_job(hv, uuid, &opts.run_token) } else { Ok(()) };
        match taken {
            Ok((export, listed)) => return Ok((export, listed, chain)),
            Err(e)
                if from.is_some()
                    && job_gone.is_ok()
                    && e.downcast_ref::<LimitExceeded>().is_none()
                    && e.downcast_ref::<NotUndone>().is_none() =>
            {
                // A broken or missing bitmap: libvirt refuses the incremental. Start a new chain.
                let _ = hv.delete_checkpoint(uuid, live.new_checkpoint);
                chain = Err(format!("checkpoint {} cannot be used: {e:#}", from.unwrap()));
                progress.note(&format!("{}: {}; reading everything", vm.name, chain.as_ref().unwrap_err()));
            }
            Err(e) => {
                let _ = hv.delete_checkpoint(uuid, live.new_checkpoint);
                let _ = hv.delete_checkpoint(uuid, &format!("{}-pre", live.new_checkpoint));
                if let Err(end) = job_gone {
                    // The watchdog keeps the job's mark and ends it once we are gone.
                    return Err(e.context(format!("ending the backup job failed too ({end:#})")));
                }
                watchdog.tell(Guard::JobEnded)?;
                return Err(e);
            }
        }
    }
}

/// Reads every disk from the point's exports (only the changed extents of an incremental) and
/// the memory state of a saved-state point, and commits the restore point.
#[allow(clippy::too_many_arguments)] // the backup's state, handed on once
fn read_live_point(
    repo: &Arc<Repository>,
    vm: &VmSummary,
    live: &LivePoint,
    export: &BackupExport,
    listed_changes: ListedChanges,
    incremental: bool,
    last: Option<(PointId, RestorePoint)>,
    mut record: VmRecord,
    clock: Clock,
    guest: &mut GuestDisks,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord)> {
    if let Some(o) = &opts.oracle_dir {
        pull_with_qemu_img(live.host, export, o)?;
    }
    let method = record.method;
    // The guest's own disks first (each then its hash list): their views in the guest live only
    // while they are read.
    let mut inputs = guest.inputs(repo, last.as_ref(), &mut record)?;
    for m in &record.not_captured {
        progress.note(&format!("{}: guest disk {} is not in this point: {}", vm.name, m.disk, m.why));
    }
    for (i, (d, e)) in live.disks.iter().zip(&export.disks).enumerate() {
        let addr = live.host.reach(&cairn_nbd::NbdAddress::parse(&e.uri).map_err(anyhow::Error::msg)?)?;
        let bitmap = match (incremental, &e.dirty_context) {
            (true, Some(c)) => c.strip_prefix("qemu:dirty-bitmap:").map(String::from),
            _ => None,
        };
        let mut src = NbdSource::connect(addr, bitmap.as_deref(), None)
            .with_context(|| format!("connecting to the export of disk {}", d.target))?;
        let changed = match (&listed_changes, &bitmap) {
            (Some(listed), _) => Some(listed[i].clone()),
            (None, Some(b)) => Some(src.dirty_ranges(b)?),
            (None, None) => None,
        };
        inputs.push(disk_input(d, Box::new(src), changed, skip_swap(opts, method), &mut record)?);
    }
    if record.method == Method::SavedState {
        let state = live.memory_file.to_str().context("the memory state's path is not UTF-8")?;
        let mut input = DiskInput::new("memory-state", live.host.open_image(state, Some(ImageFormat::Raw), None)?);
        input.role = Some("memory-state".into());
        inputs.push(input);
        record.memory_state = Some("memory-state".into());
    }
    commit(live.host, repo, vm, inputs, last, record, clock, opts, progress)
}

/// After the backup job ended (`ended`): on success the new checkpoint backs the newest point
/// and this repository's older ones go; on failure the new one goes, and the old one (which
/// absorbs its bits) still matches the last point.
fn end_live_backup(
    hv: &dyn Hypervisor,
    uuid: &str,
    prefix: &str,
    new_checkpoint: &str,
    result: Result<(PointId, RestorePoint, VmRecord)>,
    ended: Result<()>,
    watchdog: &mut Watchdog,
) -> Result<(PointId, RestorePoint, VmRecord)> {
    match result {
        Ok(done) => {
            cairn_storage::crash_point("vm.point_committed");
            ended.context("ending the backup job")?;
            watchdog.tell(Guard::JobEnded)?;
            for cp in hv.checkpoints(uuid)? {
                if cp.name.starts_with(prefix) && cp.name != new_checkpoint {
                    hv.delete_checkpoint(uuid, &cp.name)?;
                    cairn_storage::crash_point("vm.checkpoint_deleted");
                }
            }
            if done.2.checkpoint.is_none() {
                let _ = hv.delete_checkpoint(uuid, new_checkpoint);
            }
            Ok(done)
        }
        Err(e) => {
            // Told only if it ended: otherwise the watchdog ends it once we are gone.
            if ended.is_ok() {
                let _ = watchdog.tell(Guard::JobEnded);
            }
            let _ = hv.delete_checkpoint(uuid, new_checkpoint);
            Err(e)
        }
    }
}

/// Whether swap areas are recorded as zeros instead of read. Never for a point that keeps the
/// guest's memory: the memory state refers to pages swapped out to those areas, and a guest
/// resumed from it would read zeros there (corrupt processes, a crashed kernel).
fn skip_swap(opts: &VmBackupOptions, method: Method) -> bool {
    opts.skip_swap && method != Method::SavedState
}

/// Opens a shut-off VM's disk files; with `bitmap`, each disk's changed ranges come from that
/// persistent dirty bitmap in its qcow2 image.
fn open_files(
    host: &dyn HostAccess,
    disks: &[VmDisk],
    bitmap: Option<&str>,
    skip_swap: bool,
    record: &mut VmRecord,
) -> Result<Vec<DiskInput>> {
    let mut inputs = Vec::new();
    for d in disks {
        let path = d
            .path
            .as_deref()
            .with_context(|| format!("disk {} of the shut-off VM has no file or device to read", d.target))?;
        let format = ImageFormat::parse(&d.format).unwrap_or(ImageFormat::Raw);
        let mut src = host
            .open_image(path, Some(format), bitmap)
            .with_context(|| format!("opening disk {} ({path}) on {}", d.target, host.name()))?;
        let changed = match bitmap {
            Some(b) => Some(src.dirty_ranges(b)?),
            None => None,
        };
        inputs.push(disk_input(d, src, changed, skip_swap, record)?);
    }
    Ok(inputs)
}

/// Decides whether the checkpoint of the VM's last restore point can be trusted. One that is not
/// registered on the VM's host is registered again from the point's record if the hypervisor
/// finds its bitmaps there; `registered` then says so, for the chain's reason.
fn trust_checkpoint(
    hv: &dyn Hypervisor,
    uuid: &str,
    disks: &[VmDisk],
    last: Option<&(PointId, RestorePoint)>,
    record: Option<&VmRecord>,
    forgotten_checkpoint: Option<&str>,
    registered: &mut Option<String>,
) -> std::result::Result<String, String> {
    let Some((last_id, last)) = last else {
        return Err("first backup of this VM in this repository".into());
    };
    let short = last_id.short();
    let then: Vec<&DiskImage> = last.disks.iter().filter(|d| d.is_disk()).collect();
    let now_names: Vec<&str> = disks.iter().map(|d| d.target.as_str()).collect();
    let then_names: Vec<&str> = then.iter().map(|d| d.name.as_str()).collect();
    if now_names != then_names {
        return Err(format!(
            "the VM's disks changed since restore point {short} ({} then, {} now)",
            then_names.join(", "),
            now_names.join(", ")
        ));
    }
    for (d, t) in disks.iter().zip(&then) {
        if let Some(size) = d.size {
            if size != t.size {
                return Err(format!(
                    "disk {} was {} bytes at restore point {short} and is {size} now",
                    d.target, t.size
                ));
            }
        }
    }
    if let Some(raw) = disks.iter().find(|d| !d.supports_checkpoints()) {
        return Err(format!("disk {} is {}", raw.target, raw.format));
    }
    let Some(cp) = record.and_then(|r| r.checkpoint.clone()) else {
        return Err(format!("the previous restore point {short} left no checkpoint"));
    };
    let mut cps = hv.checkpoints(uuid).map_err(|e| format!("cannot list the VM's checkpoints: {e:#}"))?;
    if !cps.iter().any(|c| c.name == cp) {
        if let Some(later) = forgotten_checkpoint {
            return Err(format!(
                "checkpoint {cp} of restore point {short} no longer exists on the VM: the newest restore point, \
                 made with checkpoint {later}, was removed (forget), so restore point {short} is the newest again"
            ));
        }
        // Not registered on this host: the VM moved here (libvirt does not migrate checkpoint
        // metadata), or the host lost it. Its bitmaps may be here all the same: registered again
        // from the point, and checked by the hypervisor, or a full read with the reason.
        let Some(doc) = record.and_then(|r| r.checkpoint_document.as_deref()) else {
            return Err(format!("checkpoint {cp} of restore point {short} no longer exists on the VM"));
        };
        // URIs without their parameters (key files and the like): messages name hosts.
        let bare = |u: &str| u.split('?').next().unwrap_or("").to_string();
        let (then, now) = (bare(record.map(|r| r.hypervisor.as_str()).unwrap_or("")), bare(hv.uri()));
        let whence = if then != now { format!(" (restore point {short} was taken on {then})") } else { String::new() };
        hv.redefine_checkpoint(uuid, &cp, doc).map_err(|e| {
            if whence.is_empty() {
                format!("checkpoint {cp} of restore point {short} no longer exists on the VM, and cannot be registered again: {e:#}")
            } else {
                format!("checkpoint {cp} of restore point {short} is not registered on {now}{whence} and cannot be registered again: {e:#}")
            }
        })?;
        cps = hv.checkpoints(uuid).map_err(|e| format!("cannot list the VM's checkpoints: {e:#}"))?;
        *registered = Some(format!("registered again on {now}, where its bitmaps are{whence}"));
    }
    let Some(found) = cps.iter().find(|c| c.name == cp) else {
        return Err(format!("checkpoint {cp} was registered again but is not listed on the VM"));
    };
    if let Some(missing) = now_names.iter().find(|n| !found.disks.iter().any(|d| d == *n)) {
        return Err(format!("checkpoint {cp} has no bitmap for disk {missing}"));
    }
    Ok(cp)
}

/// Freeze or pause as the method says, create the point, undo the freeze or pause at once.
#[allow(clippy::too_many_arguments)]
fn take_point(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    vm: &VmSummary,
    method: Method,
    req: &BackupRequest,
    opts: &VmBackupOptions,
    memory_file: &Path,
    watchdog: &mut Watchdog,
    clock: &mut Clock,
    record: &mut VmRecord,
    guest: &mut GuestDisks,
) -> Result<(BackupExport, ListedChanges)> {
    match method {
        Method::AppConsistent => Ok((take_frozen_point(hv, vm, req, opts, watchdog, clock, record, guest)?, None)),
        Method::SavedState => take_paused_point(hv, host, vm, req, opts, memory_file, watchdog, clock, record),
        Method::CrashConsistent => {
            let e = hv.begin_backup(&vm.uuid, req)?;
            clock.mark("point created");
            Ok((e, None))
        }
        Method::Auto | Method::Offline => Err(anyhow!("internal error: method {} here", method.as_str())),
    }
}

/// App-consistent: the pre-freeze commands, freeze, the point, thaw at once, the post-thaw
/// commands. The watchdog is told before each step; the guest's own disks are taken inside the
/// freeze, right before the host's point.
#[allow(clippy::too_many_arguments)] // the backup's state, handed on once
fn take_frozen_point(
    hv: &dyn Hypervisor,
    vm: &VmSummary,
    req: &BackupRequest,
    opts: &VmBackupOptions,
    watchdog: &mut Watchdog,
    clock: &mut Clock,
    record: &mut VmRecord,
    guest: &mut GuestDisks,
) -> Result<BackupExport> {
    let uuid = vm.uuid.as_str();
    // Before the applications are quiesced: what the guest's snapshot needs is made ready.
    guest.before_freeze();
    let pre: Vec<&String> = vm.config.pre_freeze.iter().chain(&opts.pre_freeze).collect();
    for cmd in pre {
        let run = run_hook(hv, uuid, "pre-freeze", cmd).with_context(|| format!("pre-freeze command `{cmd}`"))?;
        let code = run.exit_code;
        record.hooks.push(run);
        if code != 0 {
            bail!("pre-freeze command `{cmd}` failed in the guest (exit {code}); nothing was frozen");
        }
    }
    // The watchdog's limit runs from when it reads this line: later than now.
    let told = Instant::now();
    watchdog.tell(Guard::Frozen)?;
    clock.mark("freeze");
    let (frozen, count) = match hv.freeze(uuid) {
        Ok(n) => {
            cairn_storage::crash_point("vm.frozen");
            (clock.mark("frozen"), n)
        }
        Err(e) => {
            // A freeze that timed out here may still complete in the guest: the watchdog
            // forgets its mark only once the guest says it is thawed.
            if let Err(t) = thaw(hv, uuid) {
                return Err(t.context(format!("freezing the guest failed ({e:#})")));
            }
            watchdog.tell(Guard::Thawed)?;
            return Err(e);
        }
    };
    // The guest's own disks first, within half of what is left of the limit.
    guest.at_freeze(opts.freeze_limit.saturating_sub(told.elapsed()) / 2);
    let point = hv.begin_backup(uuid, req);
    let took = told.elapsed();
    if point.is_ok() {
        cairn_storage::crash_point("vm.job_started");
        clock.mark("point created");
        if let Some(d) = opts.hold_point {
            std::thread::sleep(d);
        }
    }
    let thawed = thaw(hv, uuid);
    let t = clock.mark("thawed");
    if thawed.is_ok() {
        watchdog.tell(Guard::Thawed)?;
    }
    record.frozen_window_ms = Some(t.duration_since(frozen).as_millis() as u64);
    if matches!(thawed, Ok(0)) && count > 0 {
        // Nothing left to thaw: the watchdog did it (the guest was frozen past the limit).
        clock.mark("already thawed by the watchdog");
    }
    thawed?;
    if point.is_ok() && took >= opts.freeze_limit {
        return Err(LimitExceeded { what: "thawed the guest", took, limit: opts.freeze_limit }.into());
    }
    let export = point?;
    let post: Vec<&String> = vm.config.post_thaw.iter().chain(&opts.post_thaw).collect();
    for cmd in post {
        // The point is taken: a failing post-thaw command is recorded, not fatal.
        let run = run_hook(hv, uuid, "post-thaw", cmd).unwrap_or_else(|e| HookRun {
            when: "post-thaw".into(),
            command: cmd.clone(),
            exit_code: -1,
            output: format!("{e:#}"),
        });
        record.hooks.push(run);
    }
    Ok(export)
}

/// Saved state: pause, (for an incremental, list the changes while the bitmaps are active),
/// save the memory, the point, resume at once. The watchdog is told before each step.
#[allow(clippy::too_many_arguments)]
fn take_paused_point(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    vm: &VmSummary,
    req: &BackupRequest,
    opts: &VmBackupOptions,
    memory_file: &Path,
    watchdog: &mut Watchdog,
    clock: &mut Clock,
    record: &mut VmRecord,
) -> Result<(BackupExport, ListedChanges)> {
    let uuid = vm.uuid.as_str();
    host.remove_file(memory_file);
    // The watchdog's limit runs from when it reads this line: later than now.
    let mut told = Instant::now();
    watchdog.tell(Guard::Paused)?;
    clock.mark("pause");
    let paused = match hv.pause(uuid) {
        Ok(()) => {
            cairn_storage::crash_point("vm.paused");
            clock.mark("paused")
        }
        Err(e) => {
            // Paused after all (the reply was lost)? The watchdog forgets its mark only
            // once the VM runs.
            if let Err(r) = resume(hv, uuid) {
                return Err(r.context(format!("pausing the VM failed ({e:#})")));
            }
            watchdog.tell(Guard::Resumed)?;
            return Err(e);
        }
    };
    let mut listed = None;
    let mut took = Duration::ZERO;
    let point = (|| {
        if let Some(from) = req.incremental_from {
            // Saving the memory leaves QEMU's bitmaps inactive, and libvirt then refuses an
            // incremental export. So a first short job, while the VM is paused and its
            // bitmaps active, lists the changes since `from`; the point itself is taken
            // after the memory is saved, of the same (paused) disks.
            let pre_name = format!("{}-pre", req.new_checkpoint);
            let pre = BackupRequest {
                disks: req.disks,
                new_checkpoint: &pre_name,
                checkpoint_description: req.checkpoint_description,
                incremental_from: Some(from),
                work_dir: req.work_dir,
                socket_dir: req.socket_dir,
                run_token: req.run_token,
            };
            let export = hv.begin_backup(uuid, &pre)?;
            let ranges = list_changes(host, &export);
            let ended = hv.end_backup(uuid);
            listed = Some(ranges?);
            ended?;
            clock.mark("changes listed");
        }
        // The limit guards the guest against a job that hangs, not the save: writing a few
        // GiB of memory takes longer than it, and libvirt refuses a resume meanwhile. So
        // the watchdog stops counting during the save and starts again after it; the
        // windows before and after it are each held to the limit.
        took = told.elapsed();
        if took >= opts.freeze_limit {
            return Err(LimitExceeded { what: "resumed the VM", took, limit: opts.freeze_limit }.into());
        }
        watchdog.tell(Guard::Saving)?;
        hv.save_memory(uuid, memory_file)?;
        clock.mark("memory saved");
        told = Instant::now();
        watchdog.tell(Guard::Paused)?;
        let full = BackupRequest {
            disks: req.disks,
            new_checkpoint: req.new_checkpoint,
            checkpoint_description: req.checkpoint_description,
            incremental_from: None,
            work_dir: req.work_dir,
            socket_dir: req.socket_dir,
            run_token: req.run_token,
        };
        hv.begin_backup(uuid, &full)
    })();
    took = took.max(told.elapsed());
    if point.is_ok() {
        clock.mark("point created");
        if let Some(d) = opts.hold_point {
            std::thread::sleep(d);
        }
    }
    let resumed = resume(hv, uuid);
    if matches!(resumed, Ok(false)) {
        // Already running: the watchdog resumed it (paused past the limit).
        clock.mark("already resumed by the watchdog");
    }
    let t = clock.mark("resumed");
    if resumed.is_ok() {
        watchdog.tell(Guard::Resumed)?;
    }
    record.offline_window_ms = Some(t.duration_since(paused).as_millis() as u64);
    resumed?;
    if point.is_ok() && took >= opts.freeze_limit {
        // The memory state and the disks' point may be apart by what the guest did.
        return Err(LimitExceeded { what: "resumed the VM", took, limit: opts.freeze_limit }.into());
    }
    Ok((point?, listed))
}

/// The dirty extents of every disk of an incremental export.
fn list_changes(host: &dyn HostAccess, export: &BackupExport) -> Result<Vec<Vec<Range>>> {
    let mut out = Vec::new();
    for e in &export.disks {
        let context =
            e.dirty_context.as_deref().context("internal error: an incremental export without a dirty bitmap")?;
        let bitmap = context.strip_prefix("qemu:dirty-bitmap:").unwrap_or(context);
        let addr = host.reach(&cairn_nbd::NbdAddress::parse(&e.uri).map_err(anyhow::Error::msg)?)?;
        let mut src = NbdSource::connect(addr, Some(bitmap), None)
            .with_context(|| format!("connecting to the export of disk {}", e.target))?;
        out.push(src.dirty_ranges(bitmap)?);
    }
    Ok(out)
}

fn disk_input(
    d: &VmDisk,
    mut src: Box<dyn cairn_engine::source::Source>,
    changed: Option<Vec<Range>>,
    skip_swap: bool,
    record: &mut VmRecord,
) -> Result<DiskInput> {
    let areas = if skip_swap {
        let scan = find_swap(src.as_mut());
        record.warnings.extend(scan.warnings.iter().map(|w| format!("disk {}: swap detection: {w}", d.target)));
        scan.areas
    } else {
        Vec::new()
    };
    for a in &areas {
        if let Some(r) = cairn_disk::swap::skipped_part(a) {
            record.skipped_swap.push(SkippedSwap {
                disk: d.target.clone(),
                location: a.location.clone(),
                offset: r.offset,
                length: r.length,
            });
        }
    }
    let mut input = DiskInput::new(&d.target, src);
    input.skip = skip_ranges(&areas);
    input.changed = changed;
    input.path = d.path.clone();
    Ok(input)
}

/// Adds the files the configuration names, stores everything, commits the point.
#[allow(clippy::too_many_arguments)]
fn commit(
    host: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: &VmSummary,
    mut inputs: Vec<DiskInput>,
    last: Option<(PointId, RestorePoint)>,
    mut record: VmRecord,
    mut clock: Clock,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord)> {
    let last_files = last.as_ref().and_then(|(_, p)| VmRecord::of(p)).map(|r| r.files).unwrap_or_default();
    let mut carry = Vec::new();
    for f in &vm.config.files {
        let meta = host
            .stat(&f.path)
            .with_context(|| format!("the VM's {} file {} cannot be read on {}", f.role, f.path, host.name()))?;
        let rec = FileRecord {
            role: f.role.clone(),
            path: f.path.clone(),
            image: f.role.clone(),
            size: meta.size,
            mtime_ns: meta.mtime_ns,
        };
        let same = last_files
            .iter()
            .find(|o| o.path == rec.path && o.size == rec.size && o.mtime_ns == rec.mtime_ns && o.role == rec.role);
        // Carried over only while all its blocks are sound: a quarantined block (found damaged
        // by verify) makes the file be read again, which heals it.
        let old_image = same
            .and_then(|o| last.as_ref()?.1.disks.iter().find(|d| d.name == o.image).cloned())
            .filter(|img| all_blocks_indexed(repo, img));
        match old_image {
            Some(img) => {
                let mut img = img;
                img.name = rec.image.clone();
                carry.push(img);
            }
            None => {
                let mut input = DiskInput::new(&rec.image, host.open_image(&f.path, Some(ImageFormat::Raw), None)?);
                input.role = Some(f.role.clone());
                input.path = Some(f.path.clone());
                inputs.push(input);
            }
        }
        record.files.push(rec);
    }
    // Changed ranges are relative to the last point; the engine checks sizes and disk names.
    let parent = if inputs.iter().any(|i| i.changed.is_some()) { last } else { None };
    let bopts = BackupOptions {
        name: vm.name.clone(),
        compression_level: opts.compression_level,
        workers: opts.workers,
        metadata: serde_json::Value::Null,
        parent,
        carry,
    };
    let (id, point) = backup_with(repo, inputs, &bopts, progress, |p| {
        clock.mark("data copied");
        record.vm_read_bytes = p.disks.iter().filter(|d| d.is_disk()).map(|d| d.stats.read_bytes).sum();
        record.events = std::mem::take(&mut clock.events);
        p.metadata = serde_json::json!({ "vm": record });
        Ok(())
    })?;
    let record = VmRecord::of(&point).context("internal error: VM record lost")?;
    Ok((id, point, record))
}

/// Whether every data block of an image is in the index (none missing or quarantined).
fn all_blocks_indexed(repo: &Repository, img: &DiskImage) -> bool {
    // The map pages too: a new point references them as much as the blocks.
    let pages_reusable =
        img.map.iter().all(|h| cairn_repo::BlockId::from_hex(h).is_some_and(|id| repo.index().reusable(&id)));
    pages_reusable
        && (0..img.map.len()).all(|p| {
            repo.read_map_page(img, p)
                .map(|ids| {
                    let index = repo.index();
                    ids.iter().all(|id| id.is_zero() || index.reusable(id))
                })
                .unwrap_or(false)
        })
}

/// Testing aid: an independent copy of each export, pulled by QEMU's own NBD client.
fn pull_with_qemu_img(host: &dyn HostAccess, export: &BackupExport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for d in &export.disks {
        let out = dir.join(format!("{}.raw", d.target));
        let uri = host.reach(&cairn_nbd::NbdAddress::parse(&d.uri).map_err(anyhow::Error::msg)?)?.to_string();
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&out)
            .status()
            .context("running qemu-img")?;
        if !st.success() {
            bail!("qemu-img convert of {} failed", d.uri);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LocalHost;
    use cairn_hypervisor::fake::{Fake, Handle};
    use cairn_hypervisor::{VmConfig, VmDisk};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_host_lock_folder_someone_else_made_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let vm_dir = t.path().join("vm");
        private_dir(&vm_dir).unwrap();
        let host = t.path().join("locks");
        let lock = lock_vm_in(&vm_dir, Some(&host), "u-1", "web").unwrap();
        let f = host.join("vm-u-1.lock");
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        // Held: a second backup of the VM is refused.
        let e = lock_vm_in(&vm_dir, Some(&host), "u-1", "web").err().unwrap().to_string();
        assert!(e.contains("another cairn backup"), "{e}");
        drop(lock);
        // A lock file replaced by a symbolic link (to a file the lock would create or truncate).
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink(t.path().join("victim"), &f).unwrap();
        assert!(lock_vm_in(&vm_dir, Some(&host), "u-1", "web").is_err());
        assert!(!t.path().join("victim").exists());
        // A folder another user could write in.
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = lock_vm_in(&vm_dir, Some(&host), "u-2", "web").err().unwrap().to_string();
        assert!(e.contains("other users can write"), "{e}");
    }

    #[test]
    fn swap_is_kept_when_the_point_keeps_memory() {
        let opts = options(Duration::from_secs(10));
        assert!(!skip_swap(&opts, Method::SavedState));
        for m in [Method::AppConsistent, Method::CrashConsistent, Method::Offline] {
            assert!(skip_swap(&opts, m), "{m:?}");
        }
        let asked_to_keep = VmBackupOptions { skip_swap: false, ..opts };
        assert!(!skip_swap(&asked_to_keep, Method::AppConsistent));
    }

    fn options(limit: Duration) -> VmBackupOptions {
        VmBackupOptions {
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
            run_token: "tok".into(),
            freeze_limit: limit,
        }
    }

    fn vm() -> VmSummary {
        let disk = VmDisk {
            target: "vda".into(),
            device: "disk".into(),
            source_type: "file".into(),
            path: Some("/v/a.qcow2".into()),
            format: "qcow2".into(),
            readonly: false,
            size: None,
        };
        VmSummary {
            name: "web".into(),
            uuid: "u-1".into(),
            state: VmState::Running,
            config: VmConfig { disks: vec![disk], ..Default::default() },
            agent: AgentStatus::Answering,
        }
    }

    fn record() -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "uuid": "u-1", "name": "web", "hypervisor": "fake", "host": "h", "state": "running",
            "method": "app-consistent", "method_reason": "", "chain": "full", "chain_reason": "",
            "events": [], "vm_read_bytes": 0, "skipped_swap": [], "files": [], "config": ""
        }))
        .unwrap()
    }

    /// Takes a point through the fake; returns the result and the fake.
    fn take(method: Method, limit: Duration, begin: Duration) -> (Result<()>, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        *fake.begin_delay.lock().unwrap() = begin;
        let r = take_with(&fake, method, limit, &mut Watchdog::none());
        (r, fake)
    }

    fn take_with(fake: &Arc<Fake>, method: Method, limit: Duration, watchdog: &mut Watchdog) -> Result<()> {
        let hv = Handle(fake.clone());
        let disks = vec!["vda".to_string()];
        let dir = tempfile::tempdir().unwrap();
        let req = BackupRequest {
            disks: &disks,
            new_checkpoint: "cp",
            checkpoint_description: "",
            incremental_from: None,
            work_dir: dir.path(),
            socket_dir: dir.path(),
            run_token: "tok",
        };
        let mut clock = Clock { t0: Instant::now(), events: vec![] };
        let memory = dir.path().join("memory.state");
        let host = LocalHost { work_dir: dir.path().to_path_buf() };
        let r = take_point(
            &hv,
            &host,
            &vm(),
            method,
            &req,
            &options(limit),
            &memory,
            watchdog,
            &mut clock,
            &mut record(),
            &mut GuestDisks::none(),
        );
        r.map(|_| ())
    }

    #[test]
    fn a_point_taken_later_than_the_freeze_limit_is_discarded() {
        for method in [Method::AppConsistent, Method::SavedState] {
            let (r, fake) = take(method, Duration::from_secs(5), Duration::ZERO);
            r.unwrap();
            assert!(!*fake.frozen.lock().unwrap() && !*fake.paused.lock().unwrap());
            // begin_backup returns after the limit: the watchdog may have thawed or resumed the
            // guest before the point, which would then not be what the method says.
            let (r, fake) = take(method, Duration::from_millis(100), Duration::from_millis(300));
            let e = r.unwrap_err();
            assert!(e.downcast_ref::<LimitExceeded>().is_some(), "{e:#}");
            assert!(e.to_string().contains("freeze limit"), "{e}");
            assert!(
                !*fake.frozen.lock().unwrap() && !*fake.paused.lock().unwrap(),
                "{method:?}: guest left frozen or paused"
            );
        }
    }

    /// What the job writes to its watchdog, fed line by line to [`guard`] on a thread; the end of
    /// the writer is the job going away.
    struct Lines(std::sync::mpsc::Sender<Option<String>>, Vec<u8>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            while let Some(i) = self.1.iter().position(|c| *c == b'\n') {
                let line: Vec<u8> = self.1.drain(..=i).collect();
                let _ = self.0.send(Some(String::from_utf8_lossy(&line).trim().to_string()));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Lines {
        fn drop(&mut self) {
            let _ = self.0.send(None);
        }
    }

    /// A watchdog (the real state machine) over the same fake, on a thread.
    fn watchdog_on(fake: &Arc<Fake>, limit: Duration, token: &str) -> (Watchdog, std::thread::JoinHandle<()>) {
        use cairn_hypervisor::watchdog::{guard, Retry};
        let (tx, rx) = std::sync::mpsc::channel();
        let (fake, token) = (fake.clone(), token.to_string());
        let t = std::thread::spawn(move || {
            let connect = move || -> Result<Box<dyn Hypervisor>> { Ok(Box::new(Handle(fake.clone()))) };
            let retry = Retry {
                first_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(50),
                give_up: Duration::from_secs(5),
                job_search: Duration::from_millis(300),
                silence: Duration::from_secs(30),
            };
            guard(&connect, None, "vm", limit, &token, &rx, retry, &|m| eprintln!("watchdog: {m}"));
        });
        (Watchdog::to_writer(Box::new(Lines(tx, Vec::new()))), t)
    }

    #[test]
    fn a_thaw_that_fails_leaves_the_watchdog_thawing() {
        // The job's own thaw fails: the point is given up, and the watchdog must not have been
        // told "thawed", or the guest stays frozen for good.
        let fake = Arc::new(Fake::default());
        *fake.thaw_failures.lock().unwrap() = 2;
        let (mut dog, t) = watchdog_on(&fake, Duration::from_secs(60), "tok");
        let e = take_with(&fake, Method::AppConsistent, Duration::from_secs(60), &mut dog).unwrap_err();
        assert!(e.downcast_ref::<NotUndone>().is_some(), "{e:#}");
        assert!(*fake.frozen.lock().unwrap());
        drop(dog); // the job goes away
        t.join().unwrap();
        assert!(!*fake.frozen.lock().unwrap(), "the guest was left frozen");
        assert_eq!(fake.count("thaw"), 3, "one thaw by the job, two by the watchdog");
        // A freeze that timed out in libvirt but completed in the guest, and a thaw that fails.
        let fake = Arc::new(Fake::default());
        *fake.freeze_failures.lock().unwrap() = 1;
        *fake.thaw_failures.lock().unwrap() = 1;
        let (mut dog, t) = watchdog_on(&fake, Duration::from_secs(60), "tok");
        let e = take_with(&fake, Method::AppConsistent, Duration::from_secs(60), &mut dog).unwrap_err();
        assert!(format!("{e:#}").contains("freezing the guest failed"), "{e:#}");
        drop(dog);
        t.join().unwrap();
        assert!(!*fake.frozen.lock().unwrap(), "the guest was left frozen after a failed freeze");
        // A failed thaw after which the guest reports itself thawed: done, the watchdog forgets.
        let fake = Arc::new(Fake::default());
        *fake.thaw_failures.lock().unwrap() = 1;
        *fake.thaw_fails_after_thawing.lock().unwrap() = true;
        let (mut dog, t) = watchdog_on(&fake, Duration::from_secs(60), "tok");
        take_with(&fake, Method::AppConsistent, Duration::from_secs(60), &mut dog).unwrap();
        dog.done();
        t.join().unwrap();
        assert_eq!(fake.count("thaw"), 1);
    }

    #[test]
    fn a_resume_that_fails_leaves_the_watchdog_resuming() {
        let fake = Arc::new(Fake::default());
        *fake.resume_failures.lock().unwrap() = 2;
        let (mut dog, t) = watchdog_on(&fake, Duration::from_secs(60), "tok");
        let e = take_with(&fake, Method::SavedState, Duration::from_secs(60), &mut dog).unwrap_err();
        assert!(e.downcast_ref::<NotUndone>().is_some(), "{e:#}");
        assert!(*fake.paused.lock().unwrap());
        drop(dog);
        t.join().unwrap();
        assert!(!*fake.paused.lock().unwrap(), "the VM was left paused");
        assert_eq!(fake.count("resume"), 3);
    }

    #[test]
    fn a_memory_save_longer_than_the_limit_keeps_the_point() {
        // Writing the memory takes longer than the limit: the VM stays paused through it (the
        // watchdog does not count the save) and the point is kept.
        let fake = Arc::new(Fake::default());
        *fake.save_delay.lock().unwrap() = Duration::from_millis(700);
        let limit = Duration::from_millis(300);
        let (mut dog, t) = watchdog_on(&fake, limit, "tok");
        take_with(&fake, Method::SavedState, limit, &mut dog).unwrap();
        dog.done();
        t.join().unwrap();
        assert_eq!(fake.count("resume"), 1, "the watchdog resumed the VM during the save");
        assert!(!*fake.paused.lock().unwrap());
    }

    /// Backs up the fake's VM into a new repository, with a watchdog on a thread.
    fn backup_through(fake: &Arc<Fake>, method: Method, uuid: &str) -> (Result<()>, PathBuf, tempfile::TempDir) {
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(cairn_storage::LocalBackend::new(t.path().join("repo")));
        let repo = Arc::new(Repository::init(backend, None).unwrap());
        let mut opts = options(Duration::from_secs(60));
        opts.method = method;
        opts.work_dir = t.path().join("work");
        let token = opts.run_token.clone();
        let (mut dog, thread) = watchdog_on(fake, Duration::from_secs(60), &token);
        let mut summary = vm();
        summary.uuid = uuid.into();
        let hv = Handle(fake.clone());
        let host = LocalHost { work_dir: opts.work_dir.clone() };
        let r = backup_vm(&hv, &host, &repo, &summary, &opts, &mut dog, &cairn_engine::progress::NoProgress);
        drop(dog);
        thread.join().unwrap();
        let memory = vm_work_dir(&opts.work_dir, uuid).join(format!("memory-{token}.state"));
        (r.map(|_| ()), memory, t)
    }

    #[test]
    fn a_job_that_could_not_be_ended_is_left_to_the_watchdog() {
        // The point is taken, reading it fails (nobody serves the exports), and ending the job
        // fails: the watchdog keeps its mark and ends the job once the run is gone.
        let fake = Arc::new(Fake::default());
        *fake.end_failures.lock().unwrap() = 1;
        let (r, _, _t) = backup_through(&fake, Method::AppConsistent, "u-end-1");
        assert!(r.is_err());
        assert_eq!(fake.count("end_backup"), 2, "the watchdog did not end the job");
        assert!(fake.job_socket.lock().unwrap().is_none(), "the backup job was left running");
        // Taking the point fails after the job started (a thaw that fails): the same.
        let fake = Arc::new(Fake::default());
        *fake.end_failures.lock().unwrap() = 1;
        *fake.thaw_failures.lock().unwrap() = 1;
        let (r, _, _t) = backup_through(&fake, Method::AppConsistent, "u-end-2");
        assert!(r.is_err());
        assert!(fake.job_socket.lock().unwrap().is_none(), "the backup job was left running");
        assert!(!*fake.frozen.lock().unwrap());
    }

    #[test]
    fn the_memory_state_never_outlives_a_failed_run() {
        // The point cannot be taken after the memory was saved.
        let fake = Arc::new(Fake::default());
        *fake.begin_failures.lock().unwrap() = 1;
        let (r, memory, _t) = backup_through(&fake, Method::SavedState, "u-mem-1");
        assert!(r.is_err());
        assert_eq!(fake.count("save_memory"), 1);
        assert!(!memory.exists(), "the guest's memory was left in {}", memory.display());
        // The VM cannot be resumed.
        let fake = Arc::new(Fake::default());
        *fake.resume_failures.lock().unwrap() = 1;
        let (r, memory, _t) = backup_through(&fake, Method::SavedState, "u-mem-2");
        assert!(r.is_err());
        assert!(!memory.exists(), "the guest's memory was left in {}", memory.display());
        // Reading the point fails.
        let fake = Arc::new(Fake::default());
        let (r, memory, _t) = backup_through(&fake, Method::SavedState, "u-mem-3");
        assert!(r.is_err());
        assert!(!memory.exists(), "the guest's memory was left in {}", memory.display());
    }
}
