//! Recovery: a VM restore point becomes a VM again, on this host and in a storage folder, with
//! nobody editing a configuration by hand.
//!
//! Order, and why: everything that can refuse (the point is a VM point, the name is free,
//! networks and host devices exist or are remapped, the storage has room) is checked before a
//! byte is written ([`plan_recovery`]); then the disks and files are restored (hash-checked,
//! sparse); only then is the configuration defined (and the original, with `replace`, removed)
//! ([`RecoveryPlan::execute`]). A failure while writing removes what was written and defines
//! nothing. A caller that confirms a replacement asks between the two steps.

use crate::guest_disks::{ROLE_DISK, ROLE_HASHES};
use crate::host::{private_dir, HostAccess, PathKind, SocketLink};
use crate::process;
use crate::Refusal;
use anyhow::{bail, Context, Result};
use cairn_engine::progress::Progress;
use cairn_engine::restore::{data_bytes, restore_disk_into, RestoreOptions};
use cairn_engine::target::TargetFormat;
use cairn_hypervisor::{ConfigEdit, PlacedDisk};
use cairn_hypervisor::{Hypervisor, VmSummary};
use cairn_repo::vm_record::VmRecord;
use cairn_repo::PointId;
use cairn_repo::{safe_name, Repository, RestorePoint};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct RecoverOptions {
    /// Where the disks and files go.
    pub storage: PathBuf,
    /// The new VM's name (default: `NAME-restored`, or NAME itself with `replace`).
    pub name: Option<String>,
    /// Replace the original VM: same name and UUID; the original is stopped and undefined.
    pub replace: bool,
    pub start: bool,
    /// Start from the saved memory state of a saved-state point: the guest runs on from there.
    pub resume_state: bool,
    pub format: TargetFormat,
    pub network_map: Vec<(String, String)>,
    /// Leave out NICs and host devices that do not exist here, instead of refusing.
    pub drop_missing: bool,
    /// Keep the host devices passed through to the VM and the host folders shared with it: a
    /// restore point could name any device or folder of this host, so they are left out unless
    /// the operator asks.
    pub keep_host_devices: bool,
    /// Instant recovery: the VM runs from the repository while its disks move (see
    /// [`InstantMode`]).
    pub instant: bool,
    pub workers: usize,
    /// This machine's work folder: an instant recovery onto another host keeps its state, and
    /// the point's NBD server (which runs here) its socket, in `instant/` there.
    pub local_work_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecoveredFile {
    pub name: String,
    pub role: Option<String>,
    pub path: PathBuf,
    pub data_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecoverReport {
    pub point: PointId,
    pub name: String,
    pub uuid: String,
    pub replaced: bool,
    pub files: Vec<RecoveredFile>,
    /// Devices left out because they do not exist on this host.
    pub dropped: Vec<String>,
    /// What was left out because a restore must not run or write it (QEMU overrides, another
    /// host's emulator, unknown images).
    pub removed: Vec<String>,
    pub started: bool,
    pub resumed_state: bool,
    pub duration_ms: u64,
}

/// Instant recovery: the VM starts at once on overlays over NBD exports of the point (served by
/// a process of its own, so an interrupted recovery leaves the VM running), then its disks move to
/// the storage folder while it runs, and the tie to the repository goes.
pub struct InstantMode<'a> {
    /// Starts a detached `serve-nbd` of the point on this socket; returns its PID once it listens.
    pub launch_server: &'a dyn Fn(&Path) -> Result<u32>,
    /// Testing aid: stop once the VM runs, as an interrupted recovery would.
    pub stop_after_start: bool,
}

/// What an instant recovery in progress keeps next to its disks, so a rerun can finish it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
struct InstantState {
    point: PointId,
    uuid: String,
    server_pid: u32,
    /// The server's start time ([`process::start_time`]): with the PID, it names the process for
    /// good. A PID alone may name another process after a reboot. (Absent in older state files.)
    #[serde(default)]
    server_start: Option<u64>,
    /// The server's socket, on this machine.
    socket: PathBuf,
    /// The server's socket as the VM's host reaches it (absent in older state files: the host
    /// was this machine).
    #[serde(default)]
    link: Option<SocketLink>,
    /// The user the VM's emulator runs as, when not root (the link's socket is handed to it).
    #[serde(default)]
    owner: Option<(u32, u32)>,
    /// (target, overlay, final image, format), on the VM's host.
    disks: Vec<(String, PathBuf, PathBuf, String)>,
}

/// Where an instant recovery of VM `name` into `storage` on `host` keeps its state, and the
/// point's NBD server (always on this machine) its socket and log: next to the disks when the host
/// is this machine; otherwise in this machine's work folder `local_work`, under a key of the
/// host, the folder and the VM.
fn instant_dir(host: &dyn HostAccess, local_work: &Path, storage: &Path, name: &str) -> PathBuf {
    if host.is_this_machine() {
        storage.join(format!(".cairn-instant-{name}"))
    } else {
        local_work.join("instant").join(instant_key(host, storage, name))
    }
}

/// The folder, on another host, of the link to an instant recovery's NBD server.
fn link_dir(host: &dyn HostAccess, storage: &Path, name: &str) -> PathBuf {
    host.work_dir().join("instant").join(instant_key(host, storage, name))
}

/// A short key for one VM recovered into one folder of one host: sockets' paths are limited to
/// 107 bytes, and names and folders can be long.
fn instant_key(host: &dyn HostAccess, storage: &Path, name: &str) -> String {
    let mut h = blake3::Hasher::new();
    for part in [host.name().as_bytes(), storage.as_os_str().as_encoded_bytes(), name.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Whether a command line is that of the NBD server we start on `socket`:
/// `... serve-nbd ... --socket SOCKET ...`.
fn serves_on(socket: &Path) -> impl Fn(&process::Args) -> bool + '_ {
    use std::os::unix::ffi::OsStrExt;
    move |args| {
        args.contains(&&b"serve-nbd"[..]) && process::has_option(args, "--socket", socket.as_os_str().as_bytes())
    }
}

/// Whether process `pid` (started at `start_time`, when known) is the NBD server we started on `socket`.
pub(crate) fn is_our_server(pid: u32, start_time: Option<u64>, socket: &Path) -> bool {
    process::is_ours(pid, start_time, &serves_on(socket))
}

/// Stops the NBD server we started on `socket`, if `pid` still is it; returns whether it was.
pub(crate) fn stop_server(pid: u32, start_time: Option<u64>, socket: &Path) -> bool {
    process::stop(pid, start_time, &serves_on(socket))
}

/// The image roles this version knows (FORMAT.md §7); readers ignore others.
pub const KNOWN_ROLES: [&str; 6] = ["kernel", "initrd", "dtb", "loader", "nvram", "memory-state"];

/// Refuses an image whose name could not be a file name. Points are checked when loaded
/// (`cairn_repo::RestorePoint::check`); this guards the place where names become paths.
pub(crate) fn check_image_name(short: &str, img: &cairn_repo::DiskImage) -> Result<()> {
    if !safe_name(&img.name) || img.role.as_deref().is_some_and(|r| !safe_name(r)) {
        bail!(
            "restore point {short} holds an image named {:?} (role {:?}) that cannot be a file name (letters, digits, . _ - only): the point is damaged or was tampered with; nothing was written",
            img.name,
            img.role
        );
    }
    Ok(())
}

/// Whether the saved memory state of a point may be resumed: it must have one, and the point must
/// hold everything that memory refers to. Points taken before swap was kept in saved-state
/// backups recorded their swap areas as zeros: the guest's swapped-out pages would read as zeros.
pub fn check_resumable(record: &VmRecord, short: &str) -> Result<()> {
    if record.memory_state.is_none() {
        return Err(Refusal::NoMemoryState { point: short.into(), method: record.method.as_str().into() }.into());
    }
    if !record.skipped_swap.is_empty() {
        let areas: Vec<String> = record
            .skipped_swap
            .iter()
            .map(|s| format!("{} on disk {} ({} MiB)", s.location, s.disk, s.length >> 20))
            .collect();
        return Err(Refusal::SwapNotKept { point: short.into(), areas: areas.join(", ") }.into());
    }
    Ok(())
}

/// How many times a disk's move off the repository is tried.
const MOVE_ATTEMPTS: u32 = 3;

/// Moves every disk still on its overlay into its final image, then drops the NBD server and the
/// overlays.
fn finish_instant(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    dir: &Path,
    st: &InstantState,
    progress: &dyn Progress,
) -> Result<()> {
    for (target, _overlay, fin, format) in &st.disks {
        // Whether the VM runs on the final image already: moved by an earlier run or attempt (a
        // copy can fail after its pivot), so `fin` is its disk and must never be removed.
        let on_final =
            || -> Result<bool> { Ok(hv.disk_source(&st.uuid, target)?.as_deref() == Some(&*fin.to_string_lossy())) };
        // A copy that fails is tried again: when the NBD server or its link was gone (and is back),
        // QEMU's client fails the read that finds its connection dead, then connects again.
        for attempt in 1.. {
            if on_final()? {
                break;
            }
            host.remove_file(fin); // a half-made copy of an interrupted run or attempt
            progress.start(&format!("moving {target}"), 0);
            let last = std::sync::atomic::AtomicU64::new(0);
            let moved = hv.move_disk(&st.uuid, target, fin, format, &|cur, end| {
                let prev = last.swap(cur, std::sync::atomic::Ordering::Relaxed);
                if prev == 0 {
                    progress.start(&format!("moving {target}"), end);
                }
                progress.advance(cur.saturating_sub(prev));
            });
            progress.finish();
            match moved {
                Ok(()) => break,
                Err(e) if attempt < MOVE_ATTEMPTS => {
                    progress.note(&format!("moving disk {target} failed ({e:#}); trying again"));
                    std::thread::sleep(std::time::Duration::from_secs(2 * attempt as u64));
                }
                Err(e) => {
                    if !on_final().unwrap_or(true) {
                        host.remove_file(fin);
                    }
                    return Err(e.context(format!(
                        "moving disk {target} off the repository ({MOVE_ATTEMPTS} attempts); the VM still runs \
                         from it: run the same command again"
                    )));
                }
            }
        }
    }
    drop_instant(host, dir, st);
    Ok(())
}

/// Stops the NBD server of an instant recovery and its link to the host, and removes its
/// overlays and state.
fn drop_instant(host: &dyn HostAccess, dir: &Path, st: &InstantState) {
    if let Some(link) = &st.link {
        host.unlink_socket(link);
    }
    stop_server(st.server_pid, st.server_start, &st.socket);
    for (_, overlay, _, _) in &st.disks {
        host.remove_file(overlay);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What recovering a point onto this host comes to, decided before anything is written.
pub enum Recovery {
    /// An instant recovery of this VM was interrupted on this host: finishing it is all there is.
    Unfinished(Box<UnfinishedInstant>),
    Plan(Box<RecoveryPlan>),
}

/// An interrupted instant recovery: the VM runs on overlays, some disks still to move.
pub struct UnfinishedInstant {
    name: String,
    dir: PathBuf,
    state: InstantState,
    /// The place's lock ([`lock_instant`]).
    _lock: std::fs::File,
}

/// A recovery checked against this host: the identity it keeps, the devices and networks it
/// drops or maps, the files it writes, and the room they need. Nothing is written until
/// [`RecoveryPlan::execute`]; a caller that wants a confirmation asks between the two (see
/// [`RecoveryPlan::replaces`]).
pub struct RecoveryPlan {
    /// The options the plan was checked with; [`RecoveryPlan::execute`] follows them.
    opts: RecoverOptions,
    point_id: PointId,
    point: RestorePoint,
    record: VmRecord,
    /// The recovered VM's name.
    pub name: String,
    /// The VM a `replace` stops and undefines, if it exists here.
    pub replaces: Option<VmSummary>,
    storage: PathBuf,
    edit: ConfigEdit,
    /// What is written before the VM is defined: (index in the point's images, file, data bytes).
    images: Vec<(usize, PathBuf, u64)>,
    /// Devices left out because this host lacks them (`drop_missing`).
    pub dropped: Vec<String>,
    /// Images left out (unknown roles), said to the operator.
    removed: Vec<String>,
    /// Where an instant recovery keeps its state, here ([`instant_dir`]).
    instant_dir: PathBuf,
    /// Where its link to the NBD server goes on another host ([`link_dir`]).
    link_dir: PathBuf,
    /// The user the recovered VM's emulator will run as, if not root (instant recovery only).
    emulator_owner: Option<(u32, u32)>,
    /// An instant recovery's place, locked from the plan on ([`lock_instant`]).
    _instant_lock: Option<std::fs::File>,
}

/// Checks everything that can refuse a recovery of `point` onto this host, in this order: the
/// point is a VM point; an interrupted instant recovery of the same VM is found; identity (name
/// and UUID free, or replaced); the storage folder exists; networks and host devices; image
/// names, free file names and room in the storage.
pub fn plan_recovery(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    opts: &RecoverOptions,
    progress: &dyn Progress,
) -> Result<Recovery> {
    let short = point_id.short();
    let record =
        VmRecord::of(point).ok_or_else(|| Refusal::NotAVmPoint { point: short.into(), name: point.name.clone() })?;
    let name = recovered_name(&record, opts)?;
    // Another host: its files are reached over SSH (crate::ssh), from this machine's folder.
    if !host.is_this_machine() && !opts.storage.is_absolute() {
        bail!(
            "give the storage folder on {} as an absolute path ({} is relative)",
            host.name(),
            opts.storage.display()
        );
    }
    if opts.instant {
        let storage = std::path::absolute(&opts.storage)?;
        let dir = instant_dir(host, &opts.local_work_dir, &storage, &name);
        if let Some(unfinished) = unfinished_instant(hv, dir, &name)? {
            return Ok(Recovery::Unfinished(unfinished));
        }
        if opts.resume_state {
            return Err(Refusal::InstantCannotResume.into());
        }
    }
    let (original, keep_identity) = check_identity(hv, &record, &name, opts, short)?;
    if host.path_kind(&opts.storage)? != PathKind::Folder {
        bail!("storage folder {} does not exist on {}", opts.storage.display(), host.name());
    }
    let storage = std::path::absolute(&opts.storage)?;
    let host_firmware = host_firmware(hv, progress);
    let mut edit = ConfigEdit {
        name: name.clone(),
        keep_identity,
        network_map: opts.network_map.clone(),
        keep_host_devices: opts.keep_host_devices,
        storage_dir: storage.to_string_lossy().into_owned(),
        host_emulators: host_emulators(hv, progress),
        host_firmware,
        ..Default::default()
    };
    let dropped = check_host_devices(hv, host, &record, opts, &mut edit, short)?;
    let mut removed = Vec::new();
    let images = plan_images(host, repo, point, &name, &storage, opts, &edit.host_firmware, &mut removed, short)?;
    let emulator_owner = if opts.instant { hv.emulator_owner_for(&record.config)? } else { None };
    let instant_dir = instant_dir(host, &opts.local_work_dir, &storage, &name);
    let instant_lock = if opts.instant { Some(lock_instant(&instant_dir, &name)?) } else { None };
    Ok(Recovery::Plan(Box::new(RecoveryPlan {
        instant_dir,
        _instant_lock: instant_lock,
        link_dir: link_dir(host, &storage, &name),
        emulator_owner,
        opts: opts.clone(),
        point_id: point_id.clone(),
        point: point.clone(),
        record,
        name,
        replaces: if opts.replace { original } else { None },
        storage,
        edit,
        images,
        dropped,
        removed,
    })))
}

/// The recovered VM's name: asked for, or `NAME-restored`, or NAME itself when replacing.
fn recovered_name(record: &VmRecord, opts: &RecoverOptions) -> Result<String> {
    let name = opts.name.clone().unwrap_or_else(|| {
        if opts.replace {
            record.name.clone()
        } else {
            format!("{}-restored", record.name)
        }
    });
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c)) || name.is_empty() {
        bail!("{name:?} is not a usable VM name (letters, digits, - _ . +)");
    }
    Ok(name)
}

/// An interrupted instant recovery of VM `name`, if its state is in `dir` and its VM still exists
/// on the host.
fn unfinished_instant(hv: &dyn Hypervisor, dir: PathBuf, name: &str) -> Result<Option<Box<UnfinishedInstant>>> {
    if std::fs::symlink_metadata(&dir).is_ok() {
        private_dir(&dir)?; // what it says is only trusted if only we could write it
    }
    let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else { return Ok(None) };
    let state: InstantState = serde_json::from_str(&text).context("reading the instant recovery's state")?;
    match hv.find(&state.uuid) {
        Ok(_) => {
            let lock = lock_instant(&dir, name)?;
            Ok(Some(Box::new(UnfinishedInstant { name: name.to_string(), dir, state, _lock: lock })))
        }
        // Its VM is gone (or was never defined): what it left is stopped when the place is used.
        Err(e) if e.downcast_ref::<cairn_hypervisor::NoSuchVm>().is_some() => Ok(None),
        Err(e) => Err(e.context("looking for the VM of an unfinished instant recovery")),
    }
}

/// Identity: a new VM by default; the original's own when replacing it or resuming its memory.
/// Returns the original VM (if it exists here) and whether the identity is kept.
fn check_identity(
    hv: &dyn Hypervisor,
    record: &VmRecord,
    name: &str,
    opts: &RecoverOptions,
    short: &str,
) -> Result<(Option<VmSummary>, bool)> {
    let original = hv.find(&record.uuid).ok();
    if opts.resume_state {
        check_resumable(record, short)?;
    }
    if opts.resume_state && !opts.replace && original.is_some() {
        return Err(Refusal::IdentityInUse { vm: record.name.clone() }.into());
    }
    let keep_identity = opts.replace || opts.resume_state;
    if let Ok(other) = hv.find(name) {
        let is_original = original.as_ref().is_some_and(|o| o.uuid == other.uuid);
        if !(opts.replace && is_original) {
            return Err(Refusal::NameTaken { name: name.into(), uri: hv.uri().into(), uuid: other.uuid }.into());
        }
    }
    if keep_identity && !opts.replace {
        if let Ok(clash) = hv.find(&record.uuid) {
            return Err(Refusal::UuidTaken { vm: clash.name, uuid: record.uuid.clone() }.into());
        }
    }
    Ok((original, keep_identity))
}

/// Networks, bridges and (when kept) host devices the VM uses must exist here, be mapped, or be
/// dropped (`drop_missing`); returns what was dropped.
fn check_host_devices(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    record: &VmRecord,
    opts: &RecoverOptions,
    edit: &mut ConfigEdit,
    short: &str,
) -> Result<Vec<String>> {
    let stored = hv.parse_config(&record.config)?;
    let mut missing = Vec::new();
    let mut dropped = Vec::new();
    for nic in &stored.nics {
        let Some(src) = &nic.source else { continue };
        if !matches!(nic.kind.as_str(), "network" | "bridge") {
            continue;
        }
        let wanted =
            opts.network_map.iter().find(|(o, _)| o == src).map(|(_, n)| n.clone()).unwrap_or_else(|| src.clone());
        // A bridge is a network interface of the host (read there); a network, the hypervisor's.
        let available = if nic.kind == "bridge" {
            host.path_kind(&Path::new("/sys/class/net").join(&wanted).join("bridge"))? == PathKind::Folder
        } else {
            hv.network_available(&nic.kind, &wanted)?
        };
        if !available {
            let what = format!(
                "{} {wanted}{}",
                nic.kind,
                if &wanted != src { format!(" (mapped from {src})") } else { String::new() }
            );
            if opts.drop_missing {
                edit.drop_nics.push(src.clone());
                dropped.push(format!("NIC on {what}"));
            } else {
                missing.push(what);
            }
        }
    }
    let passed_through = if opts.keep_host_devices { hv.host_devices(&record.config)? } else { vec![] };
    for dev in passed_through {
        if host_device_present(host, &dev)? {
            continue;
        }
        if opts.drop_missing {
            edit.drop_hostdevs = true;
            dropped.push(format!("host device {dev}"));
        } else {
            missing.push(format!("host device {dev}"));
        }
    }
    if !missing.is_empty() {
        return Err(Refusal::MissingOnHost { point: short.into(), vm: record.name.clone(), missing }.into());
    }
    Ok(dropped)
}

/// The images written before the VM is defined, each checked: a plain name, a free file (or the
/// original's own, when replacing), and room for all of them in the storage folder.
#[allow(clippy::too_many_arguments)] // each is a separate input of the decision
fn plan_images(
    host: &dyn HostAccess,
    repo: &Repository,
    point: &RestorePoint,
    name: &str,
    storage: &Path,
    opts: &RecoverOptions,
    host_firmware: &[String],
    removed: &mut Vec<String>,
    short: &str,
) -> Result<Vec<(usize, PathBuf, u64)>> {
    let mut images = Vec::new();
    let mut total = 0;
    for (i, img) in point.disks.iter().enumerate() {
        check_image_name(short, img)?;
        // A disk only the guest saw: restored to a raw image file next to the VM's disks (its
        // configuration does not name it; the guest attached it itself). Its hash list is the
        // next backup's business only.
        let guest_disk = img.role.as_deref() == Some(ROLE_DISK);
        if img.role.as_deref() == Some(ROLE_HASHES) {
            continue;
        }
        if let Some(role) = img.role.as_deref().filter(|r| !KNOWN_ROLES.contains(r) && !guest_disk) {
            // A newer writer's kind of image: readers ignore roles they do not know.
            removed.push(format!("image {} (role {role}, unknown to this version)", img.name));
            continue;
        }
        if img.role.as_deref() == Some("memory-state") && !opts.resume_state {
            continue;
        }
        // Firmware this host's hypervisor offers stays where the host has it (shared by every VM);
        // any other loader is the VM's own and comes from the point.
        if img.role.as_deref() == Some("loader") && img.path.as_ref().is_some_and(|p| host_firmware.contains(p)) {
            continue;
        }
        let bytes = data_bytes(repo, img)?;
        total += bytes;
        let file = match &img.role {
            None => storage.join(format!("{name}-{}.{}", img.name, opts.format.name())),
            Some(_) if guest_disk => storage.join(format!("{name}-{}.raw", img.name)),
            Some(role) => storage.join(format!("{name}-{role}")),
        };
        // Replacing the VM replaces its files: its disks where they were, a guest disk's image
        // where the last recovery wrote it.
        let own = Some(file.to_string_lossy().as_ref()) == img.path.as_deref() || guest_disk;
        if host.path_kind(&file)? != PathKind::Missing && !(opts.replace && own) {
            return Err(Refusal::FileExists(file).into());
        }
        if opts.instant && img.role.is_none() {
            continue; // moved into place while the VM runs
        }
        images.push((i, file, bytes));
    }
    host.check_space(storage, total)?;
    Ok(images)
}

impl UnfinishedInstant {
    /// Restarts the NBD server, and its link to the VM's host, if they are gone, then moves the
    /// remaining disks off the repository.
    pub fn finish(
        self,
        hv: &dyn Hypervisor,
        host: &dyn HostAccess,
        instant: &InstantMode,
        progress: &dyn Progress,
    ) -> Result<RecoverReport> {
        let started = Instant::now();
        let UnfinishedInstant { name, dir, state: mut st, _lock } = self;
        if !is_our_server(st.server_pid, st.server_start, &st.socket) {
            // The PID it names is not our server (reused, or the file is old): the server of this
            // socket may still run under another PID.
            if let Some((pid, start)) = process::find(&serves_on(&st.socket)) {
                (st.server_pid, st.server_start) = (pid, start);
                save_state(&dir, &st)?;
            }
        }
        let relaunched = !is_our_server(st.server_pid, st.server_start, &st.socket) || !st.socket.exists();
        if relaunched {
            stop_server(st.server_pid, st.server_start, &st.socket); // one without its socket
            st.server_pid = (instant.launch_server)(&st.socket)?;
            st.server_start = process::start_time(st.server_pid);
            save_state(&dir, &st)?;
        }
        // A link on this machine is the socket itself: a new server's socket is handed over again.
        if let Some(link) = st.link.as_ref().filter(|l| !l.is_up() || (relaunched && l.dir.is_none())) {
            // Made again where it was: the overlays name the socket on the host.
            let host_dir = link.dir.clone().unwrap_or_default();
            let relinked = host.link_socket(&st.socket, &host_dir, st.owner, &dir.join("link.log"))?;
            if relinked.socket != link.socket {
                bail!(
                    "internal error: the link to {} moved from {} to {}",
                    host.name(),
                    link.socket.display(),
                    relinked.socket.display()
                );
            }
            st.link = Some(relinked);
            save_state(&dir, &st)?;
        }
        finish_instant(hv, host, &dir, &st, progress)?;
        Ok(RecoverReport {
            point: st.point.clone(),
            name,
            uuid: st.uuid.clone(),
            replaced: false,
            files: st
                .disks
                .iter()
                .map(|(t, _, f, _)| RecoveredFile { name: t.clone(), role: None, path: f.clone(), data_bytes: 0 })
                .collect(),
            dropped: vec![],
            removed: vec![],
            started: true,
            resumed_state: false,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}

impl RecoveryPlan {
    /// Writes the images (hash-checked, under temporary names until complete), rewrites the stored
    /// configuration for this host, replaces the original if the plan says so, defines the VM and
    /// starts it (from its memory state, on instant-recovery overlays, or booting) as `opts` asks.
    /// A failure before the VM is defined removes what was written.
    /// `instant` says how an instant recovery (`RecoverOptions::instant`) starts its NBD server.
    pub fn execute(
        self,
        hv: &dyn Hypervisor,
        host: &dyn HostAccess,
        repo: &Repository,
        instant: &InstantMode,
        progress: &dyn Progress,
    ) -> Result<RecoverReport> {
        let started = Instant::now();
        let mut plan = self;
        let opts = plan.opts.clone();
        let opts = &opts;
        let instant = opts.instant.then_some(instant);
        let mut written = plan.write_images(host, repo, opts, progress)?;
        let cleanup = |written: &[RecoveredFile]| {
            for f in written {
                host.remove_file(&f.path);
            }
        };
        let instant_state = match plan.place(host, &written, instant) {
            Ok(st) => st,
            Err(e) => {
                cleanup(&written);
                return Err(e);
            }
        };
        // Until the VM is defined, a failure removes what this run wrote and started.
        let undo = |written: &[RecoveredFile], st: Option<&InstantState>| {
            cleanup(written);
            if let Some(st) = st {
                drop_instant(host, &plan.instant_dir, st);
            }
        };
        let rewritten = match hv.rewrite_config(&plan.record.config, &plan.edit) {
            Ok(r) => r,
            Err(e) => {
                undo(&written, instant_state.as_ref());
                return Err(e);
            }
        };
        let config = rewritten.document;
        let mut removed = std::mem::take(&mut plan.removed);
        removed.extend(rewritten.removed.into_iter().map(|r| format!("{r} from the stored configuration")));
        for r in &removed {
            progress.note(&format!("left out: {r}"));
        }

        // Define (replacing the original if the plan says so), then start.
        let replaced = plan.replaces.is_some();
        if let Some(orig) = &plan.replaces {
            if let Err(e) = hv.power_off(&orig.uuid).and_then(|()| hv.undefine(&orig.uuid)) {
                undo(&written, instant_state.as_ref());
                return Err(e.context(format!("replacing VM {}; the restored disks were removed", orig.name)));
            }
        }
        let uuid = match hv.define(&config) {
            Ok(u) => u,
            Err(e) => {
                undo(&written, instant_state.as_ref());
                return Err(e.context("the restored disks were removed"));
            }
        };
        let mut resumed_state = false;
        let mut started_vm = false;
        if opts.resume_state {
            let state = written
                .iter()
                .find(|f| f.role.as_deref() == Some("memory-state"))
                .context("memory state not restored")?;
            let r = hv.start_from_memory(&state.path, &config);
            host.remove_file(&state.path);
            r?;
            resumed_state = true;
            started_vm = true;
        } else if let (Some(mut st), Some(inst)) = (instant_state, instant) {
            st.uuid = uuid.clone();
            let dir = &plan.instant_dir;
            save_state(dir, &st)?;
            if let Err(e) = hv.start(&uuid) {
                let _ = hv.undefine(&uuid);
                cleanup(&written);
                drop_instant(host, dir, &st);
                return Err(e);
            }
            started_vm = true;
            progress.note(&format!(
                "{} is running from the repository ({:.1} s); moving its disks into {}",
                plan.name,
                started.elapsed().as_secs_f64(),
                plan.storage.display()
            ));
            if !inst.stop_after_start {
                finish_instant(hv, host, dir, &st, progress)?;
            }
            for (t, _, f, _) in &st.disks {
                written.push(RecoveredFile { name: t.clone(), role: None, path: f.clone(), data_bytes: 0 });
            }
        } else if opts.start {
            hv.start(&uuid)?;
            started_vm = true;
        }
        let files = written.into_iter().filter(|f| f.role.as_deref() != Some("memory-state")).collect();
        Ok(RecoverReport {
            point: plan.point_id,
            name: plan.name,
            uuid,
            replaced,
            files,
            dropped: plan.dropped,
            removed,
            started: started_vm,
            resumed_state,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Points the configuration at what was written (disks, files) and, for an instant
    /// recovery, at overlays over an NBD server of the point it starts (returned with its state).
    fn place(
        &mut self,
        host: &dyn HostAccess,
        written: &[RecoveredFile],
        instant: Option<&InstantMode>,
    ) -> Result<Option<InstantState>> {
        let format = self.opts.format;
        for f in written {
            let path = f.path.to_string_lossy().into_owned();
            match &f.role {
                None => self.edit.disks.push(PlacedDisk { target: f.name.clone(), path, format: format.name().into() }),
                Some(r) if r != "memory-state" && r != ROLE_DISK => self.edit.files.push((r.clone(), path)),
                Some(_) => {}
            }
        }
        let Some(inst) = instant else { return Ok(None) };
        let st = start_overlays(self, host, inst)?;
        Ok(Some(st))
    }

    /// Restores the planned images; on a failure, removes those already written.
    fn write_images(
        &self,
        host: &dyn HostAccess,
        repo: &Repository,
        opts: &RecoverOptions,
        progress: &dyn Progress,
    ) -> Result<Vec<RecoveredFile>> {
        let short = self.point_id.short();
        let mut written: Vec<RecoveredFile> = Vec::new();
        for (i, file, bytes) in &self.images {
            let img = &self.point.disks[*i];
            let format = if img.role.is_none() { opts.format } else { TargetFormat::Raw };
            let ropts = RestoreOptions { format, force: opts.replace, workers: opts.workers };
            let make = |size, block_size, data| host.create_image(file, size, block_size, data, format, ropts.force);
            let r = restore_disk_into(repo, &self.point_id, &self.point, img, &make, &ropts, progress).map_err(|e| {
                // Made since the plan (the plan checked it was free): a recovery's own refusal.
                match e.downcast_ref::<cairn_engine::target::TargetRefusal>() {
                    Some(cairn_engine::target::TargetRefusal::Exists { path, .. }) => {
                        anyhow::Error::from(Refusal::FileExists(path.clone()))
                    }
                    _ => e.context(format!("restoring {} of restore point {short}", img.name)),
                }
            });
            if let Err(e) = r {
                for f in &written {
                    host.remove_file(&f.path);
                }
                return Err(e);
            }
            written.push(RecoveredFile {
                name: img.name.clone(),
                role: img.role.clone(),
                path: file.clone(),
                data_bytes: *bytes,
            });
        }
        Ok(written)
    }
}

/// Starts the NBD server of the point here, links it to the VM's host, and creates one overlay
/// per disk there over its exports; points the configuration's disks at the overlays.
fn start_overlays(plan: &mut RecoveryPlan, host: &dyn HostAccess, inst: &InstantMode) -> Result<InstantState> {
    let dir = &plan.instant_dir;
    // It holds the socket the VM's disks are read through: ours alone.
    private_dir(dir)?;
    let socket = dir.join("nbd.sock");
    drop_leftovers(host, dir, &socket);
    let pid = (inst.launch_server)(&socket)?;
    let mut st = InstantState {
        point: plan.point_id.clone(),
        uuid: String::new(),
        server_pid: pid,
        server_start: process::start_time(pid),
        socket: socket.clone(),
        link: None,
        owner: plan.emulator_owner,
        disks: vec![],
    };
    // Written as soon as there is something to stop: a run killed from here on leaves a state
    // (without a VM) whose processes the next recovery into this place stops (drop_leftovers).
    let link = save_state(dir, &st)
        .and_then(|()| host.link_socket(&socket, &plan.link_dir, plan.emulator_owner, &dir.join("link.log")));
    let served = match link {
        Ok(link) => st.link.insert(link).socket.clone(),
        Err(e) => {
            drop_instant(host, dir, &st);
            return Err(e);
        }
    };
    if let Err(e) = save_state(dir, &st) {
        drop_instant(host, dir, &st);
        return Err(e);
    }
    let format = plan.opts.format;
    for img in plan.point.disks.iter().filter(|d| d.is_disk()) {
        let overlay = plan.storage.join(format!("{}-{}.instant.qcow2", plan.name, img.name));
        let fin = plan.storage.join(format!("{}-{}.{}", plan.name, img.name, format.name()));
        if let Err(e) = host.create_overlay(&overlay, &served, &img.name) {
            drop_instant(host, dir, &st);
            return Err(e);
        }
        plan.edit.disks.push(PlacedDisk {
            target: img.name.clone(),
            path: overlay.to_string_lossy().into_owned(),
            format: "qcow2".into(),
        });
        st.disks.push((img.name.clone(), overlay, fin, format.name().to_string()));
    }
    Ok(st)
}

/// Writes an instant recovery's state (durably: a rerun trusts it) into `dir`.
fn save_state(dir: &Path, st: &InstantState) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    let f = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&f, st)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
}

/// Takes the lock of an instant recovery's place (its state folder `dir`, made if missing), held
/// from the plan to the end of the recovery: two recoveries into one place would stop each
/// other's server and write over each other's overlays.
fn lock_instant(dir: &Path, name: &str) -> Result<std::fs::File> {
    private_dir(dir)?;
    crate::host::try_lock(&dir.join("lock"))?.ok_or_else(|| {
        anyhow::anyhow!("another instant recovery of {name} into this storage folder is running; wait for it to finish")
    })
}

/// Stops what an earlier instant recovery into the same place left running (its VM is gone, or
/// the plan would have finished it instead): its NBD server, which would otherwise go on serving
/// another point on this socket, and its link; removes the socket.
fn drop_leftovers(host: &dyn HostAccess, dir: &Path, socket: &Path) {
    let old = std::fs::read_to_string(dir.join("state.json")).ok();
    if let Some(old) = old.and_then(|t| serde_json::from_str::<InstantState>(&t).ok()) {
        if let Some(link) = &old.link {
            host.unlink_socket(link);
        }
        stop_server(old.server_pid, old.server_start, &old.socket);
    }
    // One whose state was never written, or was lost (given 5 s to go).
    for _ in 0..50 {
        match process::find(&serves_on(socket)) {
            Some((pid, start)) if stop_server(pid, start, socket) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            _ => break,
        }
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(dir.join("state.json"));
}

/// The emulators this host offers. If the hypervisor cannot tell, the stored `<emulator>` is
/// replaced by the hypervisor's default all the same (never kept unchecked), with a warning.
pub(crate) fn host_emulators(hv: &dyn Hypervisor, progress: &dyn Progress) -> Vec<String> {
    hv.emulators().unwrap_or_else(|e| {
        progress.note(&format!(
            "warning: cannot list this host's emulators ({e:#}): the VM gets the hypervisor's default emulator"
        ));
        Vec::new()
    })
}

/// The firmware files this host offers; none (with a warning) if the hypervisor cannot tell: a
/// loader is then restored from the point like any other file.
pub(crate) fn host_firmware(hv: &dyn Hypervisor, progress: &dyn Progress) -> Vec<String> {
    hv.firmware().unwrap_or_else(|e| {
        progress.note(&format!(
            "warning: cannot list this host's firmware ({e:#}): a VM's loader is restored from the restore point"
        ));
        Vec::new()
    })
}

/// Whether the host has device `dev` (`pci 0000:03:00.0`, as the configuration names it).
fn host_device_present(host: &dyn HostAccess, dev: &str) -> Result<bool> {
    match dev.strip_prefix("pci ") {
        Some(addr) if addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') => {
            Ok(host.path_kind(&Path::new("/sys/bus/pci/devices").join(addr))? != PathKind::Missing)
        }
        Some(_) => Ok(false),
        None => Ok(true), // USB and others: the hypervisor reports them at start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn record(memory: bool, swap: bool) -> VmRecord {
        let mut v = serde_json::json!({
            "uuid": "u-1", "name": "web", "hypervisor": "fake", "host": "h", "state": "running",
            "method": "saved-state", "method_reason": "", "chain": "full", "chain_reason": "",
            "events": [], "vm_read_bytes": 0, "skipped_swap": [], "files": [], "config": ""
        });
        if memory {
            v["memory_state"] = "memory-state".into();
        }
        if swap {
            v["skipped_swap"] =
                serde_json::json!([{"disk": "vdb", "location": "partition 1", "offset": 1114112, "length": 66060288}]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn resuming_a_point_whose_swap_was_skipped_is_refused() {
        check_resumable(&record(true, false), "0123abcd").unwrap();
        let e = check_resumable(&record(true, true), "0123abcd").unwrap_err();
        assert!(matches!(e.downcast_ref(), Some(crate::Refusal::SwapNotKept { .. })), "{e}");
        let e = e.to_string();
        assert!(e.contains("swap") && e.contains("partition 1 on disk vdb"), "{e}");
        let e = check_resumable(&record(false, false), "0123abcd").unwrap_err().to_string();
        assert!(e.contains("no memory state"), "{e}");
    }

    #[test]
    fn emulators_that_cannot_be_listed_are_warned_about() {
        struct Notes(std::sync::Mutex<Vec<String>>);
        impl Progress for Notes {
            fn start(&self, _: &str, _: u64) {}
            fn advance(&self, _: u64) {}
            fn finish(&self) {}
            fn note(&self, m: &str) {
                self.0.lock().unwrap().push(m.to_string());
            }
        }
        let fake = std::sync::Arc::new(cairn_hypervisor::fake::Fake::default());
        let hv = cairn_hypervisor::fake::Handle(fake.clone());
        let notes = Notes(Default::default());
        assert_eq!(host_emulators(&hv, &notes), ["/usr/bin/qemu-system-x86_64"]);
        assert!(notes.0.lock().unwrap().is_empty());
        *fake.emulators_fail.lock().unwrap() = true;
        assert!(host_emulators(&hv, &notes).is_empty());
        let said = notes.0.lock().unwrap().join("\n");
        assert!(said.contains("warning") && said.contains("cannot read the host's capabilities"), "{said}");
    }

    #[test]
    fn names_from_a_point_stay_file_names() {
        for ok in ["vda", "disk0", "memory-state", "sda.1", "a_b"] {
            assert!(safe_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", "/etc/passwd", "a\0b", "vda ", "é"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    /// `sh -c 'sleep 60; true' serve-nbd --socket SOCKET`: a process whose command line names
    /// serve-nbd and the socket, as our NBD server's does.
    fn fake_server(socket: &Path) -> std::process::Child {
        Command::new("sh")
            .args(["-c", "sleep 20; true", "serve-nbd", "--socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn alive(c: &mut std::process::Child) -> bool {
        std::thread::sleep(std::time::Duration::from_millis(200));
        c.try_wait().unwrap().is_none()
    }

    #[test]
    fn only_our_own_server_is_signalled() {
        let socket = Path::new("/st/.cairn-instant-web/nbd.sock");
        // An unrelated process under a PID a state file names (a reboot, a reused PID).
        let mut sleep = Command::new("sleep").arg("20").spawn().unwrap();
        assert!(!stop_server(sleep.id(), None, socket));
        assert!(alive(&mut sleep), "an unrelated process was signalled");
        // Our server, but the start time recorded is another process's.
        let mut server = fake_server(socket);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let start = process::start_time(server.id()).unwrap();
        assert!(!stop_server(server.id(), Some(start + 1), socket));
        assert!(!stop_server(server.id(), Some(start), Path::new("/other.sock")));
        assert!(alive(&mut server));
        // Ours, start time and socket matching: stopped.
        assert!(stop_server(server.id(), Some(start), socket));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(server.try_wait().unwrap().is_some(), "our server still runs");
        // The cleanup of an instant recovery whose state names the unrelated process.
        let dir = tempfile::tempdir().unwrap();
        let st = InstantState {
            point: PointId::of_sealed(b"p"),
            uuid: "u".into(),
            server_pid: sleep.id(),
            server_start: None,
            socket: dir.path().join("nbd.sock"),
            link: None,
            owner: None,
            disks: vec![],
        };
        let here = crate::host::LocalHost { work_dir: dir.path().to_path_buf() };
        drop_instant(&here, dir.path(), &st);
        assert!(alive(&mut sleep), "drop_instant signalled an unrelated process");
        // A link whose recorded process is now another one.
        let link = SocketLink {
            socket: "/h/nbd.sock".into(),
            local: "/l/nbd.sock".into(),
            dir: Some("/h".into()),
            pid: sleep.id(),
            start: None,
        };
        assert!(!link.is_up());
        link.stop();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(alive(&mut sleep), "a link's stop signalled an unrelated process");
        let _ = sleep.kill();
        let _ = sleep.wait();
    }
}
