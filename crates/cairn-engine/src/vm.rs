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

use crate::backup::{backup_with, BackupOptions, DiskInput};
use crate::progress::Progress;
use crate::ranges::Range;
use crate::source::{open_path, FileSource, ImageFormat, NbdSource, Source};
use crate::swap::{find_swap, skip_ranges};
use anyhow::{anyhow, bail, Context, Result};
use cairn_hypervisor::watchdog::{Guard, Watchdog};
use cairn_hypervisor::{AgentStatus, BackupExport, BackupRequest, Hypervisor, VmDisk, VmState, VmSummary};
use cairn_repo::{DiskImage, Repository, RestorePoint};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How the point in time is taken from a running VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// App-consistent when its requirements hold, else saved-state.
    Auto,
    /// Guest filesystems frozen through the guest agent (with pre-freeze/post-thaw commands).
    AppConsistent,
    /// VM paused, memory and device state saved, point taken, VM resumed.
    SavedState,
    /// Point taken with no freeze and no pause: what a power cut would leave.
    CrashConsistent,
    /// The VM is shut off: its disk files are read directly.
    Offline,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::AppConsistent => "app-consistent",
            Method::SavedState => "saved-state",
            Method::CrashConsistent => "crash-consistent",
            Method::Offline => "offline",
        }
    }
}

pub struct VmBackupOptions {
    pub method: Method,
    /// Read every disk in full even when the checkpoint could be trusted.
    pub full: bool,
    pub skip_swap: bool,
    /// Shell commands run in the guest (through the agent) before the freeze and after the thaw.
    pub pre_freeze: Vec<String>,
    pub post_thaw: Vec<String>,
    /// Host folder for NBD sockets, scratch (fleecing) files and memory state; per VM inside.
    pub work_dir: PathBuf,
    pub compression_level: i32,
    pub workers: usize,
    /// Testing aid: also pull each export with `qemu-img convert` into this folder (an
    /// independent reader of the same point).
    pub oracle_dir: Option<PathBuf>,
    /// Testing aid: stay frozen (or paused) this long after the point is taken.
    pub hold_point: Option<Duration>,
}

/// One step of a backup with when it happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub event: String,
    /// RFC 3339 with milliseconds.
    pub at: String,
    /// Milliseconds since the job started.
    pub t_ms: u64,
}

/// A file outside the disks that the VM needs, as stored in the point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    pub role: String,
    pub path: String,
    /// The image of the restore point holding it.
    pub image: String,
    pub size: u64,
    pub mtime_ns: u128,
}

/// A swap area that was not copied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedSwap {
    pub disk: String,
    pub location: String,
    pub offset: u64,
    pub length: u64,
}

/// Everything a VM restore point records about the VM and how it was taken: the point's
/// `metadata.vm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub uuid: String,
    pub name: String,
    pub hypervisor: String,
    pub host: String,
    /// The VM's state when the backup started.
    pub state: String,
    pub method: Method,
    pub method_reason: String,
    /// "incremental" (dirty extents only) or "full".
    pub chain: String,
    pub chain_reason: String,
    /// The checkpoint this point's data is relative to for the next backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<String>,
    pub events: Vec<Event>,
    /// Freeze returned → thaw returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_window_ms: Option<u64>,
    /// VM paused → VM running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_window_ms: Option<u64>,
    /// Bytes read from the VM's disks (not counting files and memory state).
    pub vm_read_bytes: u64,
    pub skipped_swap: Vec<SkippedSwap>,
    /// What the backup could not do but went on without (a guest structure that could not be
    /// read: nothing skipped there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub files: Vec<FileRecord>,
    /// The image holding the saved memory and device state (saved-state method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_state: Option<String>,
    /// Output of pre-freeze and post-thaw commands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookRun>,
    /// The hypervisor's configuration document (libvirt domain XML).
    pub config: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookRun {
    pub when: String,
    pub command: String,
    pub exit_code: i64,
    pub output: String,
}

impl HookRun {
    /// Runs a hook command in the guest through the agent (bounded to 5 minutes).
    fn run(hv: &dyn Hypervisor, uuid: &str, when: &str, cmd: &str) -> Result<HookRun> {
        let r = hv.agent_exec(uuid, cmd, 300)?;
        Ok(HookRun { when: when.into(), command: cmd.into(), exit_code: r.exit_code, output: r.stdout + &r.stderr })
    }
}

impl VmRecord {
    /// The VM record of a restore point, if it is a VM backup.
    pub fn of(point: &RestorePoint) -> Option<VmRecord> {
        serde_json::from_value(point.metadata.get("vm")?.clone()).ok()
    }
}

/// The newest restore point of the VM with this UUID (followed across renames and hosts).
pub fn last_point_of(repo: &Repository, uuid: &str) -> Result<Option<(String, RestorePoint)>> {
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
            Err(why) => {
                bail!("VM {} cannot be backed up app-consistently: {why}. Use --method saved-state or auto.", vm.name)
            }
        },
        Method::SavedState => (Method::SavedState, "asked for (--method saved-state)".into()),
        Method::CrashConsistent => (Method::CrashConsistent, "asked for (--method crash-consistent)".into()),
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
struct VmLock {
    _files: Vec<std::fs::File>,
}

/// The host-wide lock folder.
const HOST_LOCK_DIR: &str = "/run/lock/cairn";

fn lock_vm(dir: &Path, uuid: &str, name: &str) -> Result<VmLock> {
    use std::os::unix::io::AsRawFd;
    let mut paths = vec![dir.join("lock")];
    if std::fs::create_dir_all(HOST_LOCK_DIR).is_ok() {
        paths.push(Path::new(HOST_LOCK_DIR).join(format!("vm-{uuid}.lock")));
    }
    let mut files = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let f = match std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(p) {
            Ok(f) => f,
            Err(_) if i > 0 => continue, // the host folder is a second line of defence
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", p.display())),
        };
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("another cairn backup of VM {name} is running on this host; wait for it to finish");
        }
        files.push(f);
    }
    Ok(VmLock { _files: files })
}

fn checkpoint_prefix(repo: &Repository) -> String {
    format!("cairn-{}-", &repo.config().id[..8.min(repo.config().id.len())])
}

/// The folder of one VM's sockets, scratch files and memory state.
pub fn vm_work_dir(work_dir: &Path, uuid: &str) -> PathBuf {
    work_dir.join(uuid)
}

/// Backs up one VM as one restore point.
pub fn backup_vm(
    hv: &dyn Hypervisor,
    repo: &Arc<Repository>,
    vm: &VmSummary,
    opts: &VmBackupOptions,
    watchdog: &mut Watchdog,
    progress: &dyn Progress,
) -> Result<(String, RestorePoint, VmRecord)> {
    let mut clock = Clock { t0: Instant::now(), events: Vec::new() };
    clock.mark("prepare");
    let uuid = vm.uuid.as_str();
    let dir = vm_work_dir(&opts.work_dir, uuid);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create work folder {}", dir.display()))?;
    let _lock = lock_vm(&dir, uuid, &vm.name)?;
    let prefix = checkpoint_prefix(repo);
    let last = last_point_of(repo, uuid)?;
    let last_record = last.as_ref().and_then(|(_, p)| VmRecord::of(p));

    // Leftovers of a killed run: its backup job, scratch files, memory state, and checkpoints it
    // made that no restore point refers to.
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
                bail!(
                    "VM {} already has a backup job that cairn did not start (NBD socket {}); end it first (virsh domjobabort {})",
                    vm.name,
                    socket.display(),
                    vm.name
                );
            }
        }
    }
    for e in std::fs::read_dir(&dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".scratch.qcow2") || n == "memory.state" || n == "nbd.sock" {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let keep = last_record.as_ref().and_then(|r| r.checkpoint.clone());
    if vm.state != VmState::ShutOff {
        if let Ok(cps) = hv.checkpoints(uuid) {
            for cp in cps.iter().rev() {
                if cp.name.starts_with(&prefix) && Some(&cp.name) != keep.as_ref() {
                    progress.note(&format!(
                        "{}: deleting checkpoint {} that no restore point uses (left by a failed run)",
                        vm.name, cp.name
                    ));
                    hv.delete_checkpoint(uuid, &cp.name)?;
                }
            }
        }
    }

    let (method, method_reason) = choose_method(hv, vm, opts.method)?;
    let disks: Vec<VmDisk> = vm.config.disks.iter().filter(|d| d.is_backed_up()).cloned().collect();
    if disks.is_empty() {
        bail!("VM {} has no disks to back up", vm.name);
    }
    let config = hv.config_document(uuid)?;
    let mut record = VmRecord {
        uuid: uuid.to_string(),
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
        events: Vec::new(),
        frozen_window_ms: None,
        offline_window_ms: None,
        vm_read_bytes: 0,
        skipped_swap: Vec::new(),
        warnings: Vec::new(),
        files: Vec::new(),
        memory_state: None,
        hooks: Vec::new(),
        config,
    };
    progress.note(&format!("{}: method {} ({})", vm.name, method.as_str(), record.method_reason));

    if method == Method::Offline {
        let mut chain = if opts.full {
            Err("--full asked for a full read".to_string())
        } else {
            trust_checkpoint(hv, uuid, &disks, last.as_ref(), last_record.as_ref())
        };
        let mut inputs = None;
        if let Ok(cp) = chain.clone() {
            // QEMU stored the checkpoint's bitmap in each qcow2 image when it closed them cleanly;
            // after a crash it is missing or marked inconsistent, and qemu-nbd refuses it.
            match open_files(&disks, Some(&cp), opts.skip_swap, &mut record) {
                Ok(i) => inputs = Some(i),
                Err(e) => {
                    record.skipped_swap.clear();
                    chain = Err(format!("checkpoint {cp} cannot be used: {e:#}"));
                }
            }
        }
        let inputs = match inputs {
            Some(i) => i,
            None => open_files(&disks, None, opts.skip_swap, &mut record)?,
        };
        match chain {
            Ok(cp) => {
                record.chain = "incremental".into();
                record.chain_reason = format!(
                    "the VM is shut off; the bitmap of checkpoint {cp}, stored in its disk images, lists every change since restore point {}",
                    &last.as_ref().unwrap().0[..8]
                );
                // The checkpoint keeps recording from where it started: it stays this chain's base.
                record.incremental_from = Some(cp.clone());
                record.checkpoint = Some(cp);
            }
            Err(why) => {
                record.chain_reason =
                    format!("the VM is shut off: its disk files are read in full (deduplicated); {why}");
            }
        }
        progress.note(&format!("{}: {} read ({})", vm.name, record.chain, record.chain_reason));
        clock.mark("point created");
        return commit(repo, vm, inputs, last, record, clock, opts, progress);
    }

    // Live: is the last checkpoint usable?
    let mut incremental = if opts.full {
        Err("--full asked for a full read".to_string())
    } else {
        trust_checkpoint(hv, uuid, &disks, last.as_ref(), last_record.as_ref())
    };
    let new_checkpoint = format!("{prefix}{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_millis());
    let all_qcow2 = disks.iter().all(|d| d.supports_checkpoints());
    let targets: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
    let description = format!("cairn repository {} (restore points of {})", repo.config().id, vm.name);
    let memory_file = dir.join("memory.state");

    // Told before the job exists, like every guard: a kill right after it starts is covered.
    watchdog.tell(Guard::Job)?;
    let (export, listed_changes) = loop {
        let from = incremental.as_ref().ok().map(|s| s.as_str());
        let req = BackupRequest {
            disks: &targets,
            new_checkpoint: &new_checkpoint,
            checkpoint_description: &description,
            incremental_from: from,
            work_dir: &dir,
        };
        match take_point(hv, vm, method, &req, opts, &memory_file, watchdog, &mut clock, &mut record) {
            Ok(e) => break e,
            Err(e) if from.is_some() => {
                // A broken or missing bitmap: libvirt refuses the incremental. Start a new chain.
                let _ = hv.delete_checkpoint(uuid, &new_checkpoint);
                incremental = Err(format!("checkpoint {} cannot be used: {e:#}", from.unwrap()));
                progress.note(&format!("{}: {}; reading everything", vm.name, incremental.as_ref().unwrap_err()));
            }
            Err(e) => {
                let _ = hv.delete_checkpoint(uuid, &new_checkpoint);
                let _ = hv.delete_checkpoint(uuid, &format!("{new_checkpoint}-pre"));
                watchdog.tell(Guard::JobEnded)?;
                return Err(e);
            }
        }
    };
    record.checkpoint = if all_qcow2 { Some(new_checkpoint.clone()) } else { None };
    match &incremental {
        Ok(cp) => {
            record.chain = "incremental".into();
            record.incremental_from = Some(cp.clone());
            record.chain_reason = format!("checkpoint {cp} matches restore point {}", &last.as_ref().unwrap().0[..8]);
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

    let result = (|| {
        if let Some(o) = &opts.oracle_dir {
            pull_with_qemu_img(&export, o)?;
        }
        let mut inputs = Vec::new();
        for (i, (d, e)) in disks.iter().zip(&export.disks).enumerate() {
            let addr = cairn_nbd::NbdAddress::parse(&e.uri).map_err(anyhow::Error::msg)?;
            let bitmap = match (&incremental, &e.dirty_context) {
                (Ok(_), Some(c)) => c.strip_prefix("qemu:dirty-bitmap:").map(String::from),
                _ => None,
            };
            let mut src = NbdSource::connect(addr, bitmap.as_deref(), None)
                .with_context(|| format!("connecting to the export of disk {}", d.target))?;
            let changed = match (&listed_changes, &bitmap) {
                (Some(listed), _) => Some(listed[i].clone()),
                (None, Some(b)) => Some(src.dirty_ranges(b)?),
                (None, None) => None,
            };
            inputs.push(disk_input(d, Box::new(src), changed, opts.skip_swap, &mut record)?);
        }
        if record.method == Method::SavedState {
            let mut input = DiskInput::new("memory-state", Box::new(FileSource::open(&memory_file)?));
            input.role = Some("memory-state".into());
            inputs.push(input);
            record.memory_state = Some("memory-state".into());
        }
        commit(repo, vm, inputs, last, record, clock, opts, progress)
    })();
    // The job ends either way; its scratch files go with it.
    let ended = hv.end_backup(uuid);
    let _ = std::fs::remove_file(&memory_file);
    let _ = std::fs::remove_file(&export.socket);
    match result {
        Ok(done) => {
            ended.context("ending the backup job")?;
            watchdog.tell(Guard::JobEnded)?;
            // The new checkpoint now backs the newest point: older ones of this repository go.
            for cp in hv.checkpoints(uuid)? {
                if cp.name.starts_with(&prefix) && cp.name != new_checkpoint {
                    hv.delete_checkpoint(uuid, &cp.name)?;
                }
            }
            if done.2.checkpoint.is_none() {
                let _ = hv.delete_checkpoint(uuid, &new_checkpoint);
            }
            Ok(done)
        }
        Err(e) => {
            let _ = watchdog.tell(Guard::JobEnded);
            // Half-made: the old checkpoint absorbs the new one's bits and still matches the last point.
            let _ = hv.delete_checkpoint(uuid, &new_checkpoint);
            Err(e)
        }
    }
}

/// Opens a shut-off VM's disk files; with `bitmap`, each disk's changed ranges come from that
/// persistent dirty bitmap in its qcow2 image.
fn open_files(
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
        let mut src =
            open_path(path, Some(format), bitmap).with_context(|| format!("opening disk {} ({path})", d.target))?;
        let changed = match bitmap {
            Some(b) => Some(src.dirty_ranges(b)?),
            None => None,
        };
        inputs.push(disk_input(d, src, changed, skip_swap, record)?);
    }
    Ok(inputs)
}

/// Decides whether the checkpoint of the VM's last restore point can be trusted.
fn trust_checkpoint(
    hv: &dyn Hypervisor,
    uuid: &str,
    disks: &[VmDisk],
    last: Option<&(String, RestorePoint)>,
    record: Option<&VmRecord>,
) -> std::result::Result<String, String> {
    let Some((last_id, last)) = last else {
        return Err("first backup of this VM in this repository".into());
    };
    let short = &last_id[..8];
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
    let cps = hv.checkpoints(uuid).map_err(|e| format!("cannot list the VM's checkpoints: {e:#}"))?;
    let Some(found) = cps.iter().find(|c| c.name == cp) else {
        return Err(format!("checkpoint {cp} of restore point {short} no longer exists on the VM"));
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
    vm: &VmSummary,
    method: Method,
    req: &BackupRequest,
    opts: &VmBackupOptions,
    memory_file: &Path,
    watchdog: &mut Watchdog,
    clock: &mut Clock,
    record: &mut VmRecord,
) -> Result<(BackupExport, Option<Vec<Vec<Range>>>)> {
    let uuid = vm.uuid.as_str();
    match method {
        Method::AppConsistent => {
            let pre: Vec<&String> = vm.config.pre_freeze.iter().chain(&opts.pre_freeze).collect();
            for cmd in pre {
                let run =
                    HookRun::run(hv, uuid, "pre-freeze", cmd).with_context(|| format!("pre-freeze command `{cmd}`"))?;
                let code = run.exit_code;
                record.hooks.push(run);
                if code != 0 {
                    bail!("pre-freeze command `{cmd}` failed in the guest (exit {code}); nothing was frozen");
                }
            }
            watchdog.tell(Guard::Frozen)?;
            clock.mark("freeze");
            let frozen = match hv.freeze(uuid) {
                Ok(_) => clock.mark("frozen"),
                Err(e) => {
                    let _ = hv.thaw(uuid);
                    watchdog.tell(Guard::Thawed)?;
                    return Err(e);
                }
            };
            let point = hv.begin_backup(uuid, req);
            if point.is_ok() {
                clock.mark("point created");
                if let Some(d) = opts.hold_point {
                    std::thread::sleep(d);
                }
            }
            let thawed = hv.thaw(uuid);
            let t = clock.mark("thawed");
            watchdog.tell(Guard::Thawed)?;
            record.frozen_window_ms = Some(t.duration_since(frozen).as_millis() as u64);
            thawed.context("thawing the guest")?;
            let export = point?;
            let post: Vec<&String> = vm.config.post_thaw.iter().chain(&opts.post_thaw).collect();
            for cmd in post {
                // The point is taken: a failing post-thaw command is recorded, not fatal.
                let run = HookRun::run(hv, uuid, "post-thaw", cmd).unwrap_or_else(|e| HookRun {
                    when: "post-thaw".into(),
                    command: cmd.clone(),
                    exit_code: -1,
                    output: format!("{e:#}"),
                });
                record.hooks.push(run);
            }
            Ok((export, None))
        }
        Method::SavedState => {
            let _ = std::fs::remove_file(memory_file);
            watchdog.tell(Guard::Paused)?;
            clock.mark("pause");
            let paused = match hv.pause(uuid) {
                Ok(()) => clock.mark("paused"),
                Err(e) => {
                    watchdog.tell(Guard::Resumed)?;
                    return Err(e);
                }
            };
            let mut listed = None;
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
                    };
                    let export = hv.begin_backup(uuid, &pre)?;
                    let ranges = list_changes(&export);
                    let ended = hv.end_backup(uuid);
                    listed = Some(ranges?);
                    ended?;
                    clock.mark("changes listed");
                }
                hv.save_memory(uuid, memory_file)?;
                clock.mark("memory saved");
                let full = BackupRequest {
                    disks: req.disks,
                    new_checkpoint: req.new_checkpoint,
                    checkpoint_description: req.checkpoint_description,
                    incremental_from: None,
                    work_dir: req.work_dir,
                };
                hv.begin_backup(uuid, &full)
            })();
            if point.is_ok() {
                clock.mark("point created");
                if let Some(d) = opts.hold_point {
                    std::thread::sleep(d);
                }
            }
            let resumed = hv.resume(uuid);
            let t = clock.mark("resumed");
            watchdog.tell(Guard::Resumed)?;
            record.offline_window_ms = Some(t.duration_since(paused).as_millis() as u64);
            resumed.context("resuming the VM")?;
            Ok((point?, listed))
        }
        Method::CrashConsistent => {
            let e = hv.begin_backup(uuid, req)?;
            clock.mark("point created");
            Ok((e, None))
        }
        Method::Auto | Method::Offline => Err(anyhow!("internal error: method {} here", method.as_str())),
    }
}

/// The dirty extents of every disk of an incremental export.
fn list_changes(export: &BackupExport) -> Result<Vec<Vec<Range>>> {
    let mut out = Vec::new();
    for e in &export.disks {
        let context =
            e.dirty_context.as_deref().context("internal error: an incremental export without a dirty bitmap")?;
        let bitmap = context.strip_prefix("qemu:dirty-bitmap:").unwrap_or(context);
        let addr = cairn_nbd::NbdAddress::parse(&e.uri).map_err(anyhow::Error::msg)?;
        let mut src = NbdSource::connect(addr, Some(bitmap), None)
            .with_context(|| format!("connecting to the export of disk {}", e.target))?;
        out.push(src.dirty_ranges(bitmap)?);
    }
    Ok(out)
}

fn disk_input(
    d: &VmDisk,
    mut src: Box<dyn crate::source::Source>,
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
        if let Some(r) = crate::swap::skipped_part(a) {
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
    repo: &Arc<Repository>,
    vm: &VmSummary,
    mut inputs: Vec<DiskInput>,
    last: Option<(String, RestorePoint)>,
    mut record: VmRecord,
    mut clock: Clock,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<(String, RestorePoint, VmRecord)> {
    let last_files = last.as_ref().and_then(|(_, p)| VmRecord::of(p)).map(|r| r.files).unwrap_or_default();
    let mut carry = Vec::new();
    for f in &vm.config.files {
        let meta = std::fs::metadata(&f.path)
            .with_context(|| format!("the VM's {} file {} cannot be read", f.role, f.path))?;
        let mtime_ns = meta.modified()?.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let rec = FileRecord {
            role: f.role.clone(),
            path: f.path.clone(),
            image: f.role.clone(),
            size: meta.len(),
            mtime_ns,
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
                let mut input = DiskInput::new(&rec.image, Box::new(FileSource::open(Path::new(&f.path))?));
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
    (0..img.map.len()).all(|p| {
        repo.read_map_page(img, p)
            .map(|ids| {
                let index = repo.index();
                ids.iter().all(|id| id.is_zero() || index.contains(id))
            })
            .unwrap_or(false)
    })
}

/// Testing aid: an independent copy of each export, pulled by QEMU's own NBD client.
fn pull_with_qemu_img(export: &BackupExport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for d in &export.disks {
        let out = dir.join(format!("{}.raw", d.target));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &d.uri])
            .arg(&out)
            .status()
            .context("running qemu-img")?;
        if !st.success() {
            bail!("qemu-img convert of {} failed", d.uri);
        }
    }
    Ok(())
}
