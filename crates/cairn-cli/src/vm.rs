//! `cairn vm list`, `cairn backup vm` and the hidden `cairn watchdog`.

use crate::output::bytes;
use crate::{bar, open_indexed, print_json, workers, Global};
use anyhow::{bail, Context, Result};
use cairn_engine::Progress;
use cairn_hypervisor::watchdog;
use cairn_hypervisor::{AgentStatus, Hypervisor};
use cairn_libvirt::{Libvirt, DEFAULT_URI};
use cairn_ops::vm_backup::{backup_vms, BackupVmsRequest, VmBackupOutcome};
use cairn_ops::Cancel;
use cairn_repo::vm_record::{Method, VmRecord};
use cairn_repo::PointId;
use cairn_vm::backup::VmBackupOptions;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Show every VM on the host and which backup method it qualifies for
    #[command(long_about = "Show every VM the hypervisor knows: name, UUID, state, disks (path, format, \
size), whether a guest agent channel exists and answers, and the backup method `--method auto` would \
pick for it, with the reason.")]
    List(ListArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// A host's hypervisor URI (qemu:///system, qemu+ssh://host/system, ...); repeat it for
    /// several hosts: their VMs in one list, a VM that several define listed once, on the host
    /// it runs on [default: CAIRN_HOSTS (URIs separated by spaces), else LIBVIRT_DEFAULT_URI,
    /// else qemu:///system]
    #[arg(long = "host", visible_alias = "connect", value_name = "URI")]
    hosts: Vec<String>,
}

/// The hosts a command works on: those given, else `CAIRN_HOSTS`, else the default URI.
pub(crate) fn host_list(given: &[String]) -> Vec<String> {
    if !given.is_empty() {
        return given.to_vec();
    }
    if let Some(hosts) = std::env::var("CAIRN_HOSTS").ok().filter(|h| !h.trim().is_empty()) {
        return hosts.split_whitespace().map(String::from).collect();
    }
    vec![std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| DEFAULT_URI.into())]
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Auto,
    AppConsistent,
    SavedState,
    CrashConsistent,
}

#[derive(Args)]
pub struct BackupVm {
    /// VMs to back up, by name or UUID; each becomes one restore point named after the VM
    #[arg(required = true, value_name = "NAME_OR_UUID")]
    vms: Vec<String>,
    /// A host's hypervisor URI; repeat it for several hosts: each VM is found on the host it runs
    /// on, and the hosts are backed up in parallel. A VM of another host needs a qemu+ssh:// URI
    /// and cairn installed there (its data comes over SSH; no repository password goes there)
    /// [default: CAIRN_HOSTS (URIs separated by spaces), else LIBVIRT_DEFAULT_URI, else qemu:///system]
    #[arg(long = "host", visible_alias = "connect", value_name = "URI")]
    hosts: Vec<String>,
    /// At most this many VMs of one host are backed up at once
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    per_host: u32,
    /// How the point in time is taken from a running VM
    #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
    method: MethodArg,
    /// Read every disk in full, starting a new chain, even when the last checkpoint is usable
    #[arg(long)]
    full: bool,
    /// Also copy swap: Linux swap partitions and LVM volumes, Windows page files (skipped by default: they restore as zeros)
    #[arg(long)]
    no_skip_swap: bool,
    /// Shell command to run in the guest (through the agent) before the freeze; repeatable.
    /// A failure stops the backup before anything is frozen
    #[arg(long, value_name = "COMMAND")]
    pre_freeze: Vec<String>,
    /// Shell command to run in the guest after the thaw; repeatable
    #[arg(long, value_name = "COMMAND")]
    post_thaw: Vec<String>,
    /// Folder of this machine for NBD sockets, scratch (fleecing) files and memory state; created
    /// 0700, and refused if it is a symbolic link, another user's, or writable by other users.
    /// (Other hosts use CAIRN_REMOTE_WORK_DIR, default /var/lib/cairn/work)
    #[arg(long, default_value = cairn_ops::DEFAULT_WORK_DIR, value_name = "DIR")]
    work_dir: PathBuf,
    /// The watchdog thaws or resumes a guest frozen or paused longer than this (retrying for
    /// minutes if the thaw or resume fails); a point that took longer to take is discarded
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    freeze_limit: u64,
    /// zstd level (1 fastest .. 19 smallest)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compression: i32,
    /// Right after each backup, boot the new restore point in a sandbox and check it comes up
    /// (see `cairn verify boot`), on the VM's own host; a point that does not boot makes the
    /// command exit 3
    #[arg(long)]
    verify_boot: bool,
    #[command(flatten)]
    mail: crate::boot::BackupBootMail,
    /// Testing aid: also pull every export with qemu-img into DIR
    #[arg(long, hide = true, value_name = "DIR")]
    debug_oracle: Option<PathBuf>,
    /// Testing aid: stay frozen (or paused) this many seconds after the point is taken
    #[arg(long, hide = true, value_name = "SECONDS")]
    debug_hold: Option<f64>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

#[derive(Args)]
pub struct RestoreGuestDisk {
    /// NAME[@POINT] of a VM restore point that holds the guest disk
    point: String,
    /// The guest disk, by cairn-agent's name for it (`lun0`; `cairn vm list` shows it)
    #[arg(long, value_name = "NAME")]
    disk: String,
    /// The running VM to write it into, by name or UUID [default: the point's VM, by UUID]
    #[arg(long, value_name = "VM")]
    vm: Option<String>,
    /// Hypervisor URI of the VM's host
    #[arg(long = "host", visible_alias = "connect", default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI", value_name = "URI")]
    host: String,
    /// Overwrite the disk without asking
    #[arg(long)]
    yes: bool,
}

/// The hypervisor at `uri` and its host's side (this machine's default work folder, or SSH).
fn hypervisor_and_host(uri: &str) -> Result<(Libvirt, Box<dyn cairn_vm::host::HostAccess>)> {
    let work_dir = PathBuf::from(cairn_ops::DEFAULT_WORK_DIR);
    let host = cairn_ops::hosts::open_access(uri, &work_dir, &cairn_ops::hosts::RemoteSettings::from_env())?;
    Ok((Libvirt::connect(uri)?, host))
}

pub fn restore_guest_disk(g: &Global, a: &RestoreGuestDisk) -> Result<i32> {
    let (hv, host) = hypervisor_and_host(&a.host)?;
    let (repo, _lock) = open_indexed(g, "restore guest-disk")?;
    let (id, point) = repo.select_point(&a.point)?;
    let uuid = cairn_repo::vm_record::VmRecord::of(&point).map(|r| r.uuid);
    let which =
        a.vm.clone().or(uuid).with_context(|| format!("restore point {} is not a VM's: give --vm", id.short()))?;
    let vm = hv.find(&which)?;
    let question = format!(
        "Disk {} inside VM {} will be overwritten with its copy from restore point {} ({}). Go on?",
        a.disk,
        vm.name,
        id.short(),
        point.time
    );
    if !confirm(&question, a.yes) {
        bail!("not confirmed: nothing was written");
    }
    let done = cairn_ops::vm_recover::restore_guest_disk(
        host.as_ref(),
        &vm,
        &repo,
        &point,
        &a.disk,
        &crate::stoppable_bar(g),
    )?;
    if g.json {
        print_json(&done);
    } else {
        println!(
            "restored guest disk {} of {} ({}) into VM {}: {} data, {} zeros, {} blocks read back and equal, {:.1} s",
            done.disk,
            point.name,
            id.short(),
            vm.name,
            bytes(done.data_bytes),
            bytes(done.zero_bytes),
            done.verified_blocks,
            done.duration_ms as f64 / 1000.0
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct RestoreVm {
    /// NAME[@POINT] of a VM restore point (see `cairn points`)
    point: String,
    /// Folder where the VM's disks and files are written, on the host it is recovered onto
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// Hypervisor URI of the host to recover onto: this machine's, or another's over qemu+ssh://
    /// (with cairn installed there; the disks are written there over SSH)
    #[arg(long = "host", visible_alias = "connect", default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI", value_name = "URI")]
    host: String,
    /// Name of the recovered VM (default: NAME-restored, or NAME with --replace)
    #[arg(long = "as", value_name = "NEW_NAME")]
    as_name: Option<String>,
    /// Start the VM once it is defined
    #[arg(long)]
    start: bool,
    /// Replace the original VM: same name, UUID and MAC addresses; the original is stopped and
    /// undefined first (its disk files are left alone unless they are where the restore writes)
    #[arg(long)]
    replace: bool,
    /// Do not ask before replacing
    #[arg(long, short)]
    yes: bool,
    /// Start from the memory state of a saved-state restore point: the guest runs on from where
    /// it was, instead of booting
    #[arg(long)]
    resume_state: bool,
    /// Disk image format to write
    #[arg(long, value_enum, default_value_t = DiskFormat::Qcow2)]
    format: DiskFormat,
    /// Attach NICs of network or bridge OLD to NEW on this host; repeatable
    #[arg(long, value_name = "OLD=NEW")]
    map_network: Vec<String>,
    /// Leave out NICs and host devices that do not exist on this host instead of refusing
    #[arg(long)]
    drop_missing: bool,
    /// Keep the host devices passed through to the VM (PCI, USB, SCSI, mediated <hostdev>) and
    /// the host folders shared with it (<filesystem>). Left out by default: a restore point, which
    /// may come from a tampered repository, could name any device or folder of this host
    #[arg(long)]
    keep_host_devices: bool,
    /// Start the VM at once from the repository (its disks served over NBD, writes to local
    /// overlays), then move its disks into --storage while it runs. If interrupted, the VM keeps
    /// running; the same command again finishes the move. Onto another host, the NBD server runs
    /// here and reaches the host over an SSH link of its own, which outlives this command too
    #[arg(long, conflicts_with = "resume_state")]
    instant: bool,
    /// Testing aid: stop once the VM runs, as an interrupted instant recovery would
    #[arg(long, hide = true)]
    debug_stop_after_start: bool,
}

#[derive(Args)]
pub struct WatchdogArgs {
    #[arg(long)]
    connect: String,
    #[arg(long)]
    vm: String,
    #[arg(long)]
    limit: u64,
    /// The backup job whose NBD socket is named with this token is ours to end
    #[arg(long)]
    job_token: String,
}

pub fn list(g: &Global, a: &ListArgs) -> Result<i32> {
    let hosts = host_list(&a.hosts);
    let connect = |uri: &str| -> Result<Box<dyn cairn_hypervisor::Hypervisor>> { Ok(Box::new(Libvirt::connect(uri)?)) };
    let (vms, mut unreachable) =
        cairn_ops::vm_list::list_vms_on_hosts(&hosts, &connect, cairn_ops::vm_list::GuestDisks::Ask);
    if hosts.len() == 1 && !unreachable.is_empty() {
        return Err(unreachable.remove(0).error.into());
    }
    for down in &unreachable {
        eprintln!("error: host {} was not listed: {:#}{}", down.host, down.error, crate::hints::suffix(&down.error));
    }
    let status = if unreachable.is_empty() { 0 } else { 1 };
    if g.json {
        print_json(&vms);
        return Ok(status);
    }
    if vms.is_empty() {
        println!("no VMs on {}", hosts.join(", "));
    }
    for hosted in &vms {
        let vm = &hosted.vm;
        if hosts.len() == 1 {
            println!("{}  {}  {}", vm.name, vm.uuid, vm.state.as_str());
        } else {
            println!("{}  {}  {}  on {}", vm.name, vm.uuid, vm.state.as_str(), hosted.host);
            let elsewhere: Vec<String> = hosted
                .hosts
                .iter()
                .filter(|p| p.host != hosted.host)
                .map(|p| format!("{} ({})", p.host, p.state.as_str()))
                .collect();
            if !elsewhere.is_empty() {
                println!("  also defined on {}", elsewhere.join(", "));
            }
        }
        println!("  {} vCPU, {} memory, {} NIC(s)", vm.vcpus, bytes(vm.memory_bytes), vm.nics.len());
        for d in &vm.disks {
            println!(
                "  disk {:<5} {:<6} {:<6} {:>10}  {}{}",
                d.target,
                d.device,
                d.format,
                d.size.map(bytes).unwrap_or_else(|| "-".into()),
                d.path.as_deref().unwrap_or("(no source)"),
                if d.is_backed_up() { "" } else { "  (not backed up)" }
            );
        }
        for f in &vm.files {
            println!("  file {:<7} {}", f.role, f.path);
        }
        let agent = match &vm.agent {
            AgentStatus::NoChannel => "no channel".to_string(),
            AgentStatus::NotAnswering(e) => format!("channel present, not answering ({e})"),
            AgentStatus::Answering => "answering".to_string(),
        };
        println!("  guest agent: {agent}");
        if vm.guest.cairn_agent != cairn_vm::guest_disks::NO_CHANNEL || !vm.guest.disks.is_empty() {
            println!("  cairn-agent: {}", vm.guest.cairn_agent);
        }
        for d in &vm.guest.disks {
            let size = d.size.map(bytes).unwrap_or_else(|| "-".into());
            let what = if d.captured {
                "backed up through cairn-agent".to_string()
            } else {
                format!("NOT backed up: {}", d.why)
            };
            println!("  guest disk {:<8} {:<6} {:>10}  {what}", d.disk, d.transport, size);
        }
        if !vm.tags.is_empty() {
            println!("  tags: {}", vm.tags.join(", "));
        }
        println!("  backup method: {} ({})", vm.method, vm.method_reason);
    }
    Ok(status)
}

pub fn backup(g: &Global, a: &BackupVm) -> Result<i32> {
    let hosts = host_list(&a.hosts);
    let (repo, _lock) = open_indexed(g, "backup vm")?;
    let progress = bar(g);
    let opts = VmBackupOptions {
        method: match a.method {
            MethodArg::Auto => Method::Auto,
            MethodArg::AppConsistent => Method::AppConsistent,
            MethodArg::SavedState => Method::SavedState,
            MethodArg::CrashConsistent => Method::CrashConsistent,
        },
        full: a.full,
        // Never for saved-state points: their memory may refer to swapped-out pages (the job decides).
        skip_swap: !a.no_skip_swap,
        pre_freeze: a.pre_freeze.clone(),
        post_thaw: a.post_thaw.clone(),
        // libvirt wants absolute socket and scratch paths.
        work_dir: std::path::absolute(&a.work_dir).context("resolving --work-dir")?,
        compression_level: a.compression,
        workers: workers(g),
        oracle_dir: a.debug_oracle.clone(),
        hold_point: a.debug_hold.map(Duration::from_secs_f64),
        run_token: String::new(), // one per VM, given by the operation
        freeze_limit: Duration::from_secs(a.freeze_limit),
    };
    // Checked before any backup: a mail setting that cannot work should not wait for a boot.
    let boot_check =
        if a.verify_boot { Some(crate::boot::BootMail::from(&a.mail).request(g, &opts.work_dir)?) } else { None };
    let helpers = crate::helpers(g)?;
    let req = BackupVmsRequest {
        vms: a.vms.clone(),
        options: opts,
        boot_check,
        per_host: a.per_host as usize,
        host_limits: None,
    };
    let mut print = |o: &VmBackupOutcome| {
        // Failures go to stderr with --json too (the JSON carries them without the advice).
        match &o.result {
            Ok(b) if !g.json => {
                print_vm_backup(&b.id, &b.point, &b.record);
                if let Some(Ok(boot)) = &b.boot {
                    crate::boot::print_check(boot);
                }
            }
            Ok(_) => {}
            Err(e) => progress.note(&format!("error: backup of VM {} failed: {e:#}{}", o.vm, crate::hints::suffix(e))),
        }
        if let Some(Err(e)) = o.result.as_ref().ok().and_then(|b| b.boot.as_ref()) {
            progress.note(&format!("error: boot verification of {} failed: {e:#}{}", o.vm, crate::hints::suffix(e)));
        }
    };
    let connect = |uri: &str| -> Result<Box<dyn Hypervisor>> { Ok(Box::new(Libvirt::connect(uri)?)) };
    let remote = cairn_ops::hosts::RemoteSettings::from_env();
    let outcomes = backup_vms(&hosts, &connect, &remote, &repo, &req, &helpers, &progress, &Cancel::new(), &mut print);
    if g.json {
        let results: Vec<serde_json::Value> = outcomes.iter().map(outcome_json).collect::<Result<_>>()?;
        print_json(&results);
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    let unbootable = outcomes.iter().filter(|o| o.result.as_ref().is_ok_and(|b| b.unbootable())).count();
    Ok(if failed > 0 {
        1
    } else if unbootable > 0 {
        crate::EXIT_DAMAGED
    } else {
        0
    })
}

/// One VM's outcome as `backup vm --json` prints it.
fn outcome_json(o: &VmBackupOutcome) -> Result<serde_json::Value> {
    let b = match &o.result {
        Ok(b) => b,
        Err(e) => return Ok(serde_json::json!({"vm": o.vm, "host": o.host, "ok": false, "error": format!("{e:#}")})),
    };
    // The point's record and disks as `points --json` shows them (the record without its
    // configuration document).
    let summary = cairn_ops::points::PointSummary::of(&b.id, &b.point, false);
    let mut result = serde_json::json!({"vm": o.vm, "host": o.host, "ok": true, "id": b.id, "record": summary.vm,
        "stats": b.point.stats, "disks": summary.disks});
    match &b.boot {
        None => {}
        Some(Ok(boot)) => {
            result["boot_verification"] = serde_json::to_value(&boot.check)?;
            result["boot_verification"]["mailed_to"] = boot.mailed_to.clone().into();
        }
        Some(Err(e)) => result["boot_verification"] = serde_json::json!({"error": format!("{e:#}")}),
    }
    Ok(result)
}

/// Asks on the terminal whether to go on; `yes` answers for the operator. Without a terminal
/// nothing is asked and the answer is no.
fn confirm(question: &str, yes: bool) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return true;
    }
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} Not asked (no terminal): add --yes to replace.");
        return false;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

pub fn restore(g: &Global, a: &RestoreVm) -> Result<i32> {
    use cairn_engine::target::TargetFormat;
    use cairn_ops::vm_recover::{execute, plan, RecoverOptions, Recovery};
    let (hv, host) = hypervisor_and_host(&a.host)?;
    let work_dir = PathBuf::from(cairn_ops::DEFAULT_WORK_DIR);
    let (repo, _lock) = open_indexed(g, "restore vm")?;
    let (id, point) = repo.select_point(&a.point)?;
    let mut network_map = Vec::new();
    for m in &a.map_network {
        let (old, new) = m.split_once('=').with_context(|| format!("--map-network {m:?}: expected OLD=NEW"))?;
        network_map.push((old.to_string(), new.to_string()));
    }
    let opts = RecoverOptions {
        storage: a.storage.clone(),
        name: a.as_name.clone(),
        replace: a.replace,
        start: a.start,
        resume_state: a.resume_state,
        format: match a.format {
            DiskFormat::Qcow2 => TargetFormat::Qcow2,
            DiskFormat::Raw => TargetFormat::Raw,
        },
        network_map,
        drop_missing: a.drop_missing,
        keep_host_devices: a.keep_host_devices,
        instant: a.instant,
        workers: workers(g),
        local_work_dir: work_dir.clone(),
    };
    let progress = bar(g);
    let recovery = plan(&hv, host.as_ref(), &repo, &id, &point, &opts, &progress)?;
    if let Recovery::Plan(p) = &recovery {
        if let Some(orig) = &p.replaces {
            let question = format!(
                "VM {} ({}) will be stopped and replaced by restore point {}. Go on?",
                orig.name,
                orig.uuid,
                id.short()
            );
            if !confirm(&question, a.yes) {
                bail!("not confirmed: VM {} left as it was; nothing was written or defined", orig.name);
            }
        }
    }
    let helpers = crate::helpers(g)?;
    let server_point = format!("{}@{}", point.name, id);
    let report =
        execute(recovery, &hv, host.as_ref(), &repo, &server_point, &helpers, a.debug_stop_after_start, &progress)?;
    if g.json {
        print_json(&report);
        return Ok(0);
    }
    println!(
        "{} VM {} ({}) from restore point {} of {} ({})",
        if report.replaced { "replaced" } else { "recovered" },
        report.name,
        report.uuid,
        id.short(),
        point.name,
        point.time
    );
    for f in &report.files {
        println!(
            "  {:<14} {}  ({} data)",
            match f.role.as_deref() {
                None => format!("disk {}", f.name),
                Some(cairn_vm::guest_disks::ROLE_DISK) => format!("guest disk {}", f.name.trim_start_matches("guest-")),
                Some(r) => r.to_string(),
            },
            f.path.display(),
            bytes(f.data_bytes)
        );
    }
    for d in &report.dropped {
        println!("  left out: {d}");
    }
    for r in &report.removed {
        println!("  left out: {r}");
    }
    println!(
        "  {} in {:.1} s",
        if report.resumed_state {
            "running from its saved memory state"
        } else if report.started {
            "started"
        } else {
            "defined (start it with `virsh start` or add --start)"
        },
        report.duration_ms as f64 / 1000.0
    );
    Ok(0)
}

/// What `cairn host` does on a hypervisor host, for the repository's machine that drives it over
/// SSH (`cairn_vm::ssh`). Nothing here opens a repository.
#[derive(Subcommand)]
pub enum HostCmd {
    /// Make DIR a folder only we (and the user OWNER, UID:GID, an unprivileged QEMU) can write,
    /// and remove what a killed run left in it
    Prepare {
        dir: PathBuf,
        #[arg(long, value_name = "UID:GID")]
        owner: Option<String>,
    },
    /// Serve a file through qemu-nbd until standard input closes; prints `socket PATH` once it serves
    ServeImage {
        path: PathBuf,
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        bitmap: Option<String>,
    },
    /// Print a file's size and modification time, as JSON
    Stat { path: PathBuf },
    /// Remove a file, if it exists; with --folder, a folder `prepare` made, with its sockets
    Remove {
        path: PathBuf,
        #[arg(long)]
        folder: bool,
    },
    /// Take VM UUID's lock in work folder WORK_DIR (its locks/) and hold it until standard input
    /// closes; prints `locked` once held
    Lock {
        work_dir: PathBuf,
        uuid: String,
        #[arg(long)]
        name: String,
    },
    /// Give socket PATH to the user OWNER (UID:GID), an unprivileged QEMU
    HandOver {
        path: PathBuf,
        #[arg(long, value_name = "UID:GID")]
        owner: String,
    },
    /// Create a qcow2 overlay over export EXPORT of the NBD server on socket SOCKET
    CreateOverlay {
        overlay: PathBuf,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        export: String,
    },
    /// Print what is at PATH, as JSON: "missing", "folder" or "other"
    PathKind { path: PathBuf },
    /// Fail unless folder DIR has room for BYTES
    CheckSpace { dir: PathBuf, bytes: u64 },
    /// Create an image (under a partial name) and serve it writable through qemu-nbd; prints
    /// `socket PATH`; a line `commit` on standard input makes it durable under its name and
    /// prints `done`; an end of file instead removes it
    CreateImage {
        path: PathBuf,
        #[arg(long)]
        size: u64,
        #[arg(long)]
        format: String,
        #[arg(long)]
        data_bytes: u64,
        #[arg(long)]
        force: bool,
    },
}

/// What a `cairn host` command that serves says first: `socket PATH` (the caller forwards it).
fn announce(address: &cairn_nbd::NbdAddress) -> Result<()> {
    use std::io::Write;
    let cairn_nbd::Transport::Unix { socket } = &address.transport else {
        bail!("internal error: qemu-nbd serves on TCP");
    };
    let mut out = std::io::stdout();
    writeln!(out, "socket {}", socket.display())?;
    Ok(out.flush()?)
}

/// `UID:GID`, numbers.
fn parse_owner(owner: &str) -> Result<(u32, u32)> {
    let (u, g) = owner.split_once(':').context("--owner UID:GID")?;
    Ok((u.parse().context("--owner UID:GID")?, g.parse().context("--owner UID:GID")?))
}

pub fn run_host(c: &HostCmd) -> Result<i32> {
    use cairn_engine::source::{ImageFormat, QemuNbd};
    use std::io::Write;
    match c {
        HostCmd::Prepare { dir, owner } => {
            let owner = owner.as_deref().map(parse_owner).transpose()?;
            cairn_vm::host::prepare_dir(dir, owner)?;
        }
        HostCmd::Lock { work_dir, uuid, name } => {
            let lock = cairn_vm::backup::lock_vm_for_another_machine(work_dir, uuid, name)?;
            let mut out = std::io::stdout();
            writeln!(out, "locked")?;
            out.flush()?;
            // Held until the other side goes (its end of file, or its silence).
            let input = cairn_vm::host::stdin_lines();
            while cairn_vm::host::next_word(&input, cairn_vm::host::SILENCE).is_some() {}
            drop(lock);
        }
        HostCmd::HandOver { path, owner } => cairn_vm::host::hand_over(path, parse_owner(owner)?)?,
        HostCmd::CreateOverlay { overlay, socket, export } => cairn_vm::host::create_overlay(overlay, socket, export)?,
        HostCmd::Remove { path, folder: true } => cairn_vm::host::remove_prepared(path),
        HostCmd::ServeImage { path, format, bitmap } => {
            let format = match format {
                Some(f) => ImageFormat::parse(f)?,
                None => ImageFormat::detect(path)?,
            };
            let server = QemuNbd::serve(path, format, true, bitmap.as_deref())?;
            announce(&server.address())?;
            // Served until the other side goes (its end of file, or its silence); then qemu-nbd is
            // stopped.
            let input = cairn_vm::host::stdin_lines();
            while cairn_vm::host::next_word(&input, cairn_vm::host::SILENCE).is_some() {}
            drop(server);
        }
        HostCmd::Stat { path } => println!("{}", serde_json::to_string(&cairn_vm::host::stat(path)?)?),
        HostCmd::Remove { path, folder: false } => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        },
        HostCmd::PathKind { path } => println!("{}", serde_json::to_string(&cairn_vm::host::path_kind(path)?)?),
        HostCmd::CheckSpace { dir, bytes } => cairn_engine::target::check_space(dir, *bytes)?,
        HostCmd::CreateImage { path, size, format, data_bytes, force } => {
            let format = cairn_engine::target::TargetFormat::parse(format)?;
            let image = cairn_engine::target::ServedImage::create(path, *size, format, *data_bytes, *force)?;
            announce(&image.address())?;
            let mut out = std::io::stdout();
            let input = cairn_vm::host::stdin_lines();
            if cairn_vm::host::next_word(&input, cairn_vm::host::SILENCE).as_deref() != Some("commit") {
                // Dropped uncommitted: the partial image goes.
                bail!("the restore into {} was abandoned; nothing is left", path.display());
            }
            image.commit()?;
            writeln!(out, "done")?;
            out.flush()?;
        }
    }
    Ok(0)
}

pub fn run_watchdog(a: &WatchdogArgs) -> Result<i32> {
    let connect = || -> Result<Box<dyn Hypervisor>> { Ok(Box::new(Libvirt::connect(&a.connect)?)) };
    watchdog::run(&connect, &a.vm, Duration::from_secs(a.limit), &a.job_token)?;
    Ok(0)
}

fn print_vm_backup(id: &PointId, p: &cairn_repo::RestorePoint, r: &VmRecord) {
    println!("restore point {} of VM {} ({}), {}", id.short(), p.name, r.uuid, p.time);
    println!("  method        {} ({})", r.method.as_str(), r.method_reason);
    println!("  chain         {} ({})", r.chain, r.chain_reason);
    if let Some(ms) = r.frozen_window_ms {
        println!("  frozen window {ms} ms");
    }
    if let Some(ms) = r.offline_window_ms {
        println!("  offline       {ms} ms");
    }
    for d in &p.disks {
        let what = match &d.role {
            None => format!("disk {}", d.name),
            Some(role) => role.clone(),
        };
        println!(
            "  {:<14}{:>10}  read {:>10}  new {:>10}  {}",
            what,
            bytes(d.size),
            bytes(d.stats.read_bytes),
            bytes(d.stats.stored_bytes),
            d.path.as_deref().unwrap_or("")
        );
    }
    let swap: u64 = r.skipped_swap.iter().map(|s| s.length).sum();
    let disks = p.disks.iter().filter(|d| d.is_disk());
    let (zero, unchanged) = disks.fold((0, 0), |(z, u), d| (z + d.stats.zero_bytes, u + d.stats.unchanged_bytes));
    println!(
        "  read from VM  {} ({} unallocated or zero, {} swap skipped, {} unchanged)",
        bytes(r.vm_read_bytes),
        bytes(zero),
        bytes(swap),
        bytes(unchanged)
    );
    println!("  repository    +{}", bytes(p.stats.repository_growth_bytes));
    let events: Vec<String> = r.events.iter().map(|e| format!("{} +{}ms", e.event, e.t_ms)).collect();
    println!("  events        {}", events.join(", "));
    let total = r.events.last().map(|e| e.t_ms).unwrap_or(p.stats.duration_ms);
    println!("  time          {:.2} s", total as f64 / 1000.0);
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
}
