//! Boot verification: a restore point is booted in an isolated sandbox, straight from the
//! repository (instant-recovery overlays over an NBD export), until its OS is up; its screen is
//! captured; then the sandbox and everything it created go away. The original VM is never
//! touched: the sandbox has a name of its own, a new identity, no network and no host devices.
//!
//! The sandbox runs on the host the hypervisor connection reaches ([`HostAccess`]): this
//! machine, or the VM's own host over SSH, where its emulator and machine types are. The point's
//! NBD server always runs here, where the repository is, linked to that host as an instant
//! recovery's is.

use crate::host::{private_dir, HostAccess, SocketLink};
use crate::process;
use crate::recover::{check_image_name, stop_server, KNOWN_ROLES};
use anyhow::{Context, Result};
use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore_disk_into, RestoreOptions};
use cairn_engine::target::TargetFormat;
use cairn_hypervisor::Hypervisor;
use cairn_hypervisor::{ConfigEdit, PlacedDisk};
use cairn_repo::vm_record::VmRecord;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct BootOptions<'a> {
    /// A folder of this machine for the sandbox's NBD socket, and, when the sandbox runs here,
    /// its overlays and files (removed afterwards). On another host they go into a folder of
    /// its work folder ([`HostAccess::work_dir`]).
    pub work_dir: PathBuf,
    pub timeout: Duration,
    /// Starts a detached NBD server of the point on this socket; returns its PID.
    pub launch_server: &'a dyn Fn(&Path) -> Result<u32>,
    pub workers: usize,
}

/// The result of one boot verification, as stored in the repository's catalog (without the
/// screenshot, which is stored next to it, base64).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootCheck {
    pub kind: String,
    pub point: PointId,
    pub vm: String,
    pub uuid: String,
    pub point_time: String,
    pub sandbox: String,
    pub time: String,
    /// "passed" or "failed".
    pub verdict: String,
    pub reason: String,
    /// "guest agent" or "screen".
    pub method: String,
    /// From the sandbox's start to the OS being up (or to the timeout).
    pub boot_ms: u64,
    pub total_ms: u64,
    pub screenshot_png: bool,
    /// What the sandbox left out of the stored configuration (it would have reached the host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

impl BootCheck {
    pub fn passed(&self) -> bool {
        self.verdict == "passed"
    }
}

/// Boots the point in a sandbox; returns the verdict and the screenshot (PNG), if one was taken.
pub fn verify_boot(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    opts: &BootOptions,
    progress: &dyn Progress,
) -> Result<(BootCheck, Option<Vec<u8>>)> {
    let started = Instant::now();
    let short = point_id.short();
    let record = VmRecord::of(point)
        .with_context(|| format!("restore point {short} is not a VM backup: only VM points can be booted"))?;
    // The name comes from the repository: only safe characters go into a name and a path.
    let vm_name: String =
        record.name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let sandbox = format!("cairn-verify-{vm_name}-{short}-{}", std::process::id());
    // The sandbox's overlays, files and NBD socket: in a folder only we can write.
    private_dir(&opts.work_dir).context("the work folder")?;
    let dir = opts.work_dir.join(&sandbox);
    if std::fs::symlink_metadata(&dir).is_ok() {
        // A crashed run of a process with our PID: inside our private folder, so its own.
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    private_dir(&dir)?;
    let mut check = BootCheck {
        kind: cairn_repo::RecordKind::BootVerification.as_str().into(),
        point: point_id.clone(),
        vm: record.name.clone(),
        uuid: record.uuid.clone(),
        point_time: point.time.clone(),
        sandbox: sandbox.clone(),
        time: cairn_repo::now_rfc3339(),
        verdict: "failed".into(),
        reason: String::new(),
        method: if hv.parse_config(&record.config)?.agent_channel { "guest agent" } else { "screen" }.into(),
        boot_ms: 0,
        total_ms: 0,
        screenshot_png: false,
        left_out: Vec::new(),
    };
    let mut placed = Placed {
        dir: dir.clone(),
        // On another host, under a short key: the link's socket goes in it, and a socket's path
        // has at most 107 bytes.
        host_dir: if host.is_this_machine() {
            dir.clone()
        } else {
            host.work_dir().join("verify").join(&blake3::hash(sandbox.as_bytes()).to_hex()[..16])
        },
        server: None,
        link: None,
        files: Vec::new(),
    };
    let mut uuid = None;
    let outcome = (|| -> Result<Option<Vec<u8>>> {
        let rewritten =
            prepare_sandbox(hv, host, repo, point_id, point, &record.config, &sandbox, opts, progress, &mut placed)?;
        for r in &rewritten.removed {
            progress.note(&format!("{sandbox}: left out {r} from the stored configuration"));
        }
        check.left_out = rewritten.removed.clone();
        progress.note(&format!("{sandbox}: booting restore point {short} of {} (no network)", record.name));
        boot_sandbox(hv, &rewritten.document, opts, &mut check, &mut uuid)
    })();
    // The sandbox goes, whatever happened: a transient VM vanishes when stopped.
    if let Some(id) = &uuid {
        let _ = hv.power_off(id);
    }
    for f in &placed.files {
        host.remove_file(f);
    }
    if let Some(link) = &placed.link {
        host.unlink_socket(link);
    }
    if let Some((pid, start)) = placed.server {
        stop_server(pid, start, &dir.join("nbd.sock"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let shot = match outcome {
        Ok(s) => s,
        Err(e) => {
            check.reason = format!("the sandbox could not be started: {e:#}");
            None
        }
    };
    check.screenshot_png = shot.is_some();
    check.total_ms = started.elapsed().as_millis() as u64;
    Ok((check, shot))
}

/// What a sandbox put where, for its removal.
struct Placed {
    /// Here: the NBD server's socket and log.
    dir: PathBuf,
    /// On the sandbox's host: its overlays and files (`dir` itself when that is this machine).
    host_dir: PathBuf,
    /// The NBD server of the point (PID, start time).
    server: Option<(u32, Option<u64>)>,
    /// The server's link to the sandbox's host.
    link: Option<SocketLink>,
    /// Files made on the sandbox's host.
    files: Vec<PathBuf>,
}

/// The sandbox's configuration: an NBD server of the point started here and linked to the host,
/// the point's small files (kernel, initrd, NVRAM) restored whole onto the host, one overlay per
/// disk over its export, and the stored configuration rewritten onto them with its own name, a
/// new identity, no NIC and no host device. What it starts and makes is in `placed`, for the
/// caller to remove.
#[allow(clippy::too_many_arguments)] // the check's state, handed on once
fn prepare_sandbox(
    hv: &dyn Hypervisor,
    host: &dyn HostAccess,
    repo: &Repository,
    point_id: &PointId,
    point: &RestorePoint,
    config: &str,
    sandbox: &str,
    opts: &BootOptions,
    progress: &dyn Progress,
    placed: &mut Placed,
) -> Result<cairn_hypervisor::Rewritten> {
    let short = point_id.short();
    let socket = placed.dir.join("nbd.sock");
    let pid = (opts.launch_server)(&socket)?;
    placed.server = Some((pid, process::start_time(pid)));
    // An unprivileged QEMU on another host must reach the link's socket and the sandbox's folder.
    let owner = if host.is_this_machine() { None } else { hv.emulator_owner_for(config)? };
    let link = host.link_socket(&socket, &placed.host_dir, owner, &placed.dir.join("link.log"))?;
    let served = placed.link.insert(link).socket.clone();
    let dir = placed.host_dir.clone();
    // Files the configuration names (kernel, initrd, NVRAM) are small: restored whole.
    let mut edit = ConfigEdit {
        name: sandbox.to_string(),
        keep_identity: false,
        drop_all_nics: true,
        keep_host_devices: false,
        storage_dir: std::path::absolute(&dir)?.to_string_lossy().into_owned(),
        host_emulators: crate::recover::host_emulators(hv, progress),
        host_firmware: crate::recover::host_firmware(hv, progress),
        ..Default::default()
    };
    for img in &point.disks {
        check_image_name(short, img)?;
    }
    // This host's own firmware stays where it is (like in a recovery); any other file the
    // configuration names comes from the point.
    let files = point.disks.iter().filter(|d| {
        d.role.as_deref().is_some_and(|r| r != "memory-state" && KNOWN_ROLES.contains(&r))
            && !(d.role.as_deref() == Some("loader") && d.path.as_ref().is_some_and(|p| edit.host_firmware.contains(p)))
    });
    for img in files {
        let role = img.role.clone().unwrap();
        let to = dir.join(&role);
        let ropts = RestoreOptions { format: TargetFormat::Raw, force: true, workers: opts.workers };
        let make = |size, block_size, data| host.create_image(&to, size, block_size, data, TargetFormat::Raw, true);
        placed.files.push(to.clone());
        restore_disk_into(repo, point_id, point, img, &make, &ropts, progress)?;
        edit.files.push((role, to.to_string_lossy().into_owned()));
    }
    for img in point.disks.iter().filter(|d| d.is_disk()) {
        let overlay = dir.join(format!("{}.qcow2", img.name));
        placed.files.push(overlay.clone());
        host.create_overlay(&overlay, &served, &img.name)?;
        edit.disks.push(PlacedDisk {
            target: img.name.clone(),
            path: overlay.to_string_lossy().into_owned(),
            format: "qcow2".into(),
        });
    }
    hv.rewrite_config(config, &edit)
}

/// Starts the sandbox from `document` (its UUID in `uuid`, for the caller to stop), waits for
/// its OS (the guest agent, or a screen that settles), takes the screenshot and gives `check`
/// its verdict and reason. Returns the screenshot (PNG).
fn boot_sandbox(
    hv: &dyn Hypervisor,
    document: &str,
    opts: &BootOptions,
    check: &mut BootCheck,
    uuid: &mut Option<String>,
) -> Result<Option<Vec<u8>>> {
    let boot = Instant::now();
    let id = hv.start_transient(document)?;
    *uuid = Some(id.clone());
    let up = if check.method == "guest agent" {
        wait_agent(hv, &id, opts.timeout)
    } else {
        wait_screen(hv, &id, opts.timeout)
    };
    check.boot_ms = boot.elapsed().as_millis() as u64;
    let shot = hv.screenshot(&id).ok().and_then(|(bytes, mime)| (mime == "image/png").then_some(bytes));
    match up {
        Ok(why) => {
            if shot.as_deref().is_some_and(is_blank) {
                check.reason = format!("{why}, but the screen is blank");
            } else {
                check.verdict = "passed".into();
                check.reason = why;
            }
        }
        Err(why) => check.reason = why,
    }
    Ok(shot)
}

fn wait_agent(hv: &dyn Hypervisor, uuid: &str, timeout: Duration) -> std::result::Result<String, String> {
    let t = Instant::now();
    loop {
        if hv.agent_ping(uuid).is_ok() {
            return Ok(format!("the guest agent answered {:.1} s after the start", t.elapsed().as_secs_f64()));
        }
        if t.elapsed() > timeout {
            return Err(format!("the guest agent did not answer within {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Without an agent: up when the screen has stopped changing for 3 s and is not blank.
fn wait_screen(hv: &dyn Hypervisor, uuid: &str, timeout: Duration) -> std::result::Result<String, String> {
    let t = Instant::now();
    let mut last: Option<Vec<u8>> = None;
    let mut same_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let shot = hv.screenshot(uuid).map(|(b, _)| b).map_err(|e| format!("{e:#}"))?;
        if last.as_ref() != Some(&shot) || is_blank(&shot) {
            same_since = Instant::now();
        } else if same_since.elapsed() >= Duration::from_secs(3) {
            return Ok(format!("the screen settled {:.1} s after the start", t.elapsed().as_secs_f64()));
        }
        last = Some(shot);
        if t.elapsed() > timeout {
            return Err(format!(
                "the screen did not settle on something other than blank within {} s",
                timeout.as_secs()
            ));
        }
    }
}

/// Whether a PNG is one flat colour (a screen with nothing on it). Undecodable counts as blank.
pub fn is_blank(png_bytes: &[u8]) -> bool {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let Ok(mut reader) = decoder.read_info() else { return true };
    let Some(size) = reader.output_buffer_size() else { return true };
    let mut buf = vec![0u8; size];
    let Ok(info) = reader.next_frame(&mut buf) else { return true };
    let px = info.color_type.samples() * if info.bit_depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let data = &buf[..info.buffer_size()];
    let first = &data[..px.min(data.len())];
    data.chunks(px).all(|p| p == first)
}
