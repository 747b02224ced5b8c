//! Recovery: a VM restore point becomes a VM again, on this host and in a storage folder, with
//! nobody editing a configuration by hand.
//!
//! Order, and why: everything that can refuse (the point is a VM point, the name is free,
//! networks and host devices exist or are remapped, the storage has room) is checked before a
//! byte is written; then the disks and files are restored (hash-checked, sparse); only then is
//! the configuration defined (and the original, with `replace`, removed). A failure while
//! writing removes what was written and defines nothing.

use crate::progress::Progress;
use crate::restore::{data_bytes, restore_disk, RestoreOptions};
use crate::target::{check_space, TargetFormat};
use crate::vm::VmRecord;
use anyhow::{bail, Context, Result};
use cairn_hypervisor::domain_xml::{self, ConfigEdit};
use cairn_hypervisor::Hypervisor;
use cairn_repo::{Repository, RestorePoint};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    pub workers: usize,
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
    pub point: String,
    pub name: String,
    pub uuid: String,
    pub replaced: bool,
    pub files: Vec<RecoveredFile>,
    /// Devices left out because they do not exist on this host.
    pub dropped: Vec<String>,
    pub started: bool,
    pub resumed_state: bool,
    pub duration_ms: u64,
}

/// Asks the user whether to go on (replacing a VM); false stops.
pub type Confirm<'a> = &'a dyn Fn(&str) -> bool;

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
    point: String,
    uuid: String,
    server_pid: u32,
    socket: PathBuf,
    /// (target, overlay, final image, format)
    disks: Vec<(String, PathBuf, PathBuf, String)>,
}

fn instant_dir(storage: &Path, name: &str) -> PathBuf {
    storage.join(format!(".cairn-instant-{name}"))
}

fn process_alive(pid: u32) -> bool {
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// Moves every disk still on its overlay into its final image, then drops the NBD server and the
/// overlays.
fn finish_instant(hv: &dyn Hypervisor, dir: &Path, st: &InstantState, progress: &dyn Progress) -> Result<()> {
    for (target, _overlay, fin, format) in &st.disks {
        if hv.disk_source(&st.uuid, target)?.as_deref() == Some(&*fin.to_string_lossy()) {
            continue; // moved by an earlier run
        }
        let _ = std::fs::remove_file(fin); // a half-made copy of an interrupted run
        progress.start(&format!("moving {target}"), 0);
        let last = std::sync::atomic::AtomicU64::new(0);
        hv.move_disk(&st.uuid, target, fin, format, &|cur, end| {
            let prev = last.swap(cur, std::sync::atomic::Ordering::Relaxed);
            if prev == 0 {
                progress.start(&format!("moving {target}"), end);
            }
            progress.advance(cur.saturating_sub(prev));
        })
        .with_context(|| format!("moving disk {target} off the repository"))?;
        progress.finish();
    }
    drop_instant(dir, st);
    Ok(())
}

/// Stops the NBD server of an instant recovery and removes its overlays and state.
fn drop_instant(dir: &Path, st: &InstantState) {
    if process_alive(st.server_pid) {
        unsafe { libc::kill(st.server_pid as i32, libc::SIGTERM) };
    }
    for (_, overlay, _, _) in &st.disks {
        let _ = std::fs::remove_file(overlay);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn extension(format: TargetFormat) -> &'static str {
    match format {
        TargetFormat::Raw => "raw",
        TargetFormat::Qcow2 => "qcow2",
    }
}

pub fn recover_vm(
    hv: &dyn Hypervisor,
    repo: &Repository,
    point_id: &str,
    point: &RestorePoint,
    opts: &RecoverOptions,
    confirm: Confirm,
    instant: Option<&InstantMode>,
    progress: &dyn Progress,
) -> Result<RecoverReport> {
    let started = Instant::now();
    let short = &point_id[..8];
    let record = VmRecord::of(point).with_context(|| {
        format!(
            "restore point {short} of {} is not a VM backup; restore its disks with `cairn restore image`",
            point.name
        )
    })?;
    let stored = domain_xml::parse(&record.config)?;
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

    // An interrupted instant recovery of this VM: finish moving its disks.
    if instant.is_some() {
        let dir = instant_dir(&std::path::absolute(&opts.storage)?, &name);
        if let Ok(text) = std::fs::read_to_string(dir.join("state.json")) {
            let st: InstantState = serde_json::from_str(&text).context("reading the instant recovery's state")?;
            if hv.find(&st.uuid).is_ok() {
                let mut st = st;
                if !process_alive(st.server_pid) || !st.socket.exists() {
                    st.server_pid = (instant.unwrap().launch_server)(&st.socket)?;
                    std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&st)?)?;
                }
                finish_instant(hv, &dir, &st, progress)?;
                return Ok(RecoverReport {
                    point: st.point.clone(),
                    name,
                    uuid: st.uuid.clone(),
                    replaced: false,
                    files: st
                        .disks
                        .iter()
                        .map(|(t, _, f, _)| RecoveredFile {
                            name: t.clone(),
                            role: None,
                            path: f.clone(),
                            data_bytes: 0,
                        })
                        .collect(),
                    dropped: vec![],
                    started: true,
                    resumed_state: false,
                    duration_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
        if opts.resume_state {
            bail!("--instant and --resume-state do not go together: an instant recovery boots the VM");
        }
    }

    // Identity: a new VM by default; the original's own with --replace or to resume its memory.
    let original = hv.find(&record.uuid).ok();
    if opts.resume_state && record.memory_state.is_none() {
        bail!(
            "restore point {short} was taken with the {} method and holds no memory state; drop --resume-state to cold-boot it",
            record.method.as_str()
        );
    }
    if opts.resume_state && !opts.replace && original.is_some() {
        bail!(
            "resuming the saved memory state needs the VM's own identity (UUID, MACs), and VM {} still has it on this host: add --replace, or recover on another host",
            record.name
        );
    }
    let keep_identity = opts.replace || opts.resume_state;
    if let Ok(other) = hv.find(&name) {
        let is_original = original.as_ref().is_some_and(|o| o.uuid == other.uuid);
        if !(opts.replace && is_original) {
            bail!("a VM named {name} already exists on {} (UUID {}); choose another name with --as, or --replace the original", hv.uri(), other.uuid);
        }
    }
    if keep_identity && !opts.replace {
        if let Ok(clash) = hv.find(&record.uuid) {
            bail!("VM {} already has UUID {}; add --replace to replace it", clash.name, record.uuid);
        }
    }

    // Devices the target host must provide.
    let mut edit = ConfigEdit {
        name: name.clone(),
        keep_identity,
        network_map: opts.network_map.clone(),
        log_dir: Some(opts.storage.to_string_lossy().into_owned()),
        ..Default::default()
    };
    let mut missing = Vec::new();
    let mut dropped = Vec::new();
    for nic in &stored.nics {
        let Some(src) = &nic.source else { continue };
        if !matches!(nic.kind.as_str(), "network" | "bridge") {
            continue;
        }
        let wanted =
            opts.network_map.iter().find(|(o, _)| o == src).map(|(_, n)| n.clone()).unwrap_or_else(|| src.clone());
        if !hv.network_available(&nic.kind, &wanted)? {
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
    for dev in domain_xml::host_devices(&record.config)? {
        if host_device_present(&dev) {
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
        bail!(
            "restore point {short} of {} needs what this host does not have: {}. Map networks with --map-network OLD=NEW, or leave missing devices out with --drop-missing; nothing was written",
            record.name,
            missing.join(", ")
        );
    }

    // Room for everything, checked before writing.
    if !opts.storage.is_dir() {
        bail!("storage folder {} does not exist", opts.storage.display());
    }
    let storage = std::path::absolute(&opts.storage)?;
    let mut plan = Vec::new();
    let mut total = 0;
    for img in &point.disks {
        if img.role.as_deref() == Some("memory-state") && !opts.resume_state {
            continue;
        }
        // A firmware image shared by every VM stays where the host has it.
        if img.role.as_deref() == Some("loader") && img.path.as_deref().is_some_and(|p| Path::new(p).exists()) {
            continue;
        }
        let bytes = data_bytes(repo, img)?;
        total += bytes;
        let file = match &img.role {
            None => storage.join(format!("{name}-{}.{}", img.name, extension(opts.format))),
            Some(role) => storage.join(format!("{name}-{role}")),
        };
        if file.exists() && !(opts.replace && Some(file.to_string_lossy().as_ref()) == img.path.as_deref()) {
            bail!("{} already exists; choose another --storage or --as name", file.display());
        }
        if instant.is_some() && img.role.is_none() {
            continue; // moved into place while the VM runs
        }
        plan.push((img, file, bytes));
    }
    check_space(&storage, total)?;

    // Write. Images go to temporary names inside restore_disk and are renamed when complete.
    let mut written: Vec<RecoveredFile> = Vec::new();
    let result = (|| -> Result<()> {
        for (img, file, bytes) in &plan {
            let format = if img.role.is_none() { opts.format } else { TargetFormat::Raw };
            let ropts = RestoreOptions { format, force: opts.replace, workers: opts.workers };
            restore_disk(repo, point_id, point, img, file, &ropts, progress)
                .with_context(|| format!("restoring {} of restore point {short}", img.name))?;
            written.push(RecoveredFile {
                name: img.name.clone(),
                role: img.role.clone(),
                path: file.clone(),
                data_bytes: *bytes,
            });
        }
        Ok(())
    })();
    let cleanup = |written: &[RecoveredFile]| {
        for f in written {
            let _ = std::fs::remove_file(&f.path);
        }
    };
    if let Err(e) = result {
        cleanup(&written);
        return Err(e);
    }
    for f in &written {
        let path = f.path.to_string_lossy().into_owned();
        match &f.role {
            None => edit.disks.push((f.name.clone(), path, extension(opts.format).into())),
            Some(r) if r != "memory-state" => edit.files.push((r.clone(), path)),
            Some(_) => {}
        }
    }
    let mut instant_state = None;
    if let Some(inst) = instant {
        match start_overlays(&storage, &name, point_id, point, opts.format, inst, &mut edit) {
            Ok(st) => instant_state = Some(st),
            Err(e) => {
                cleanup(&written);
                return Err(e);
            }
        }
    }
    let config = domain_xml::rewrite(&record.config, &edit)?;

    // Define (replacing the original if asked), then start.
    let mut replaced = false;
    if opts.replace {
        if let Some(orig) = &original {
            if !confirm(&format!(
                "VM {} ({}) will be stopped and replaced by restore point {short}. Go on?",
                orig.name, orig.uuid
            )) {
                cleanup(&written);
                bail!("not confirmed: VM {} left as it was; nothing was defined", orig.name);
            }
            hv.power_off(&orig.uuid)?;
            hv.undefine(&orig.uuid)?;
            replaced = true;
        }
    }
    let uuid = match hv.define(&config) {
        Ok(u) => u,
        Err(e) => {
            cleanup(&written);
            if let Some(st) = &instant_state {
                drop_instant(&instant_dir(&storage, &name), st);
            }
            return Err(e.context("the restored disks were removed"));
        }
    };
    let mut resumed_state = false;
    let mut started_vm = false;
    if opts.resume_state {
        let state =
            written.iter().find(|f| f.role.as_deref() == Some("memory-state")).context("memory state not restored")?;
        let r = hv.start_from_memory(&state.path, &config);
        let _ = std::fs::remove_file(&state.path);
        r?;
        resumed_state = true;
        started_vm = true;
    } else if let Some(mut st) = instant_state {
        st.uuid = uuid.clone();
        let dir = instant_dir(&storage, &name);
        std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&st)?)?;
        if let Err(e) = hv.start(&uuid) {
            let _ = hv.undefine(&uuid);
            cleanup(&written);
            drop_instant(&dir, &st);
            return Err(e);
        }
        started_vm = true;
        progress.note(&format!(
            "{name} is running from the repository ({:.1} s); moving its disks into {}",
            started.elapsed().as_secs_f64(),
            storage.display()
        ));
        if !instant.unwrap().stop_after_start {
            finish_instant(hv, &dir, &st, progress)?;
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
        point: point_id.to_string(),
        name,
        uuid,
        replaced,
        files,
        dropped,
        started: started_vm,
        resumed_state,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Starts the NBD server for the point and creates one overlay per disk over its export; points
/// the configuration's disks at the overlays.
fn start_overlays(
    storage: &Path,
    name: &str,
    point_id: &str,
    point: &RestorePoint,
    format: TargetFormat,
    inst: &InstantMode,
    edit: &mut ConfigEdit,
) -> Result<InstantState> {
    let dir = instant_dir(storage, name);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("nbd.sock");
    let pid = (inst.launch_server)(&socket)?;
    let mut st = InstantState {
        point: point_id.to_string(),
        uuid: String::new(),
        server_pid: pid,
        socket: socket.clone(),
        disks: vec![],
    };
    for img in point.disks.iter().filter(|d| d.is_disk()) {
        let overlay = storage.join(format!("{name}-{}.instant.qcow2", img.name));
        let fin = storage.join(format!("{name}-{}.{}", img.name, extension(format)));
        if let Err(e) = create_overlay(&overlay, &socket, &img.name) {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            return Err(e);
        }
        edit.disks.push((img.name.clone(), overlay.to_string_lossy().into_owned(), "qcow2".into()));
        st.disks.push((img.name.clone(), overlay, fin, extension(format).to_string()));
    }
    Ok(st)
}

/// A qcow2 overlay whose backing file is export `export` of the NBD server on `socket`: reads
/// come from the restore point until written, writes stay in the overlay.
pub(crate) fn create_overlay(overlay: &Path, socket: &Path, export: &str) -> Result<()> {
    let backing = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
        .arg(overlay)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!("creating the overlay of {export}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether a host device named by [`domain_xml::host_devices`] exists here.
fn host_device_present(dev: &str) -> bool {
    match dev.strip_prefix("pci ") {
        Some(addr) => Path::new("/sys/bus/pci/devices").join(addr).exists(),
        None => true, // USB and others: the hypervisor reports them at start
    }
}
