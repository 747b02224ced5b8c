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

/// Whether a host device named by [`domain_xml::host_devices`] exists here.
fn host_device_present(dev: &str) -> bool {
    match dev.strip_prefix("pci ") {
        Some(addr) => Path::new("/sys/bus/pci/devices").join(addr).exists(),
        None => true, // USB and others: the hypervisor reports them at start
    }
}
