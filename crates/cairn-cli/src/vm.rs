//! `cairn vm list`, `cairn backup vm` and the hidden `cairn watchdog`.

use crate::output::{bytes, Bar};
use crate::{bar, open_indexed, print_json, workers, Global};
use anyhow::{Context, Result};
use cairn_engine::Progress;
use cairn_hypervisor::watchdog::{self, Watchdog};
use cairn_hypervisor::{AgentStatus, Hypervisor, VmState};
use cairn_libvirt::{Libvirt, DEFAULT_URI};
use cairn_vm::backup::{
    app_consistent_requirements, backup_vm, choose_method, new_run_token, Method, VmBackupOptions, VmRecord,
};
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
    /// Hypervisor connection URI
    #[arg(long, default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI")]
    connect: String,
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
    /// Hypervisor connection URI
    #[arg(long, default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI")]
    connect: String,
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
    /// Host folder for NBD sockets, scratch (fleecing) files and memory state; created 0700, and
    /// refused if it is a symbolic link, another user's, or writable by other users
    #[arg(long, default_value = DEFAULT_WORK_DIR, value_name = "DIR")]
    work_dir: PathBuf,
    /// The watchdog thaws or resumes a guest frozen or paused longer than this (retrying for
    /// minutes if the thaw or resume fails); a point that took longer to take is discarded
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    freeze_limit: u64,
    /// zstd level (1 fastest .. 19 smallest)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compression: i32,
    /// Right after each backup, boot the new restore point in a sandbox and check it comes up
    /// (see `cairn verify boot`); a point that does not boot makes the command exit 3
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
pub struct RestoreVm {
    /// NAME[@POINT] of a VM restore point (see `cairn points`)
    point: String,
    /// Folder where the VM's disks and files are written
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// Hypervisor connection URI of the host to recover onto
    #[arg(long, default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI")]
    connect: String,
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
    /// running; the same command again finishes the move
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

/// Where `backup vm` and `verify boot` keep sockets, scratch files and sandboxes: root's own
/// folder, not the world-writable /var/tmp where another user could create it first.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/cairn/work";

/// The environment variable naming an inherited file descriptor the repository password can be
/// read from (once, to its end). Helpers we start (the detached NBD server of an instant recovery
/// or a boot check) get the password this way, never in their environment, where it would sit in
/// /proc/PID/environ for their whole life.
pub const PASSWORD_FD_ENV: &str = "CAIRN_PASSWORD_FD";

/// The password passed through [`PASSWORD_FD_ENV`], if any (read once).
pub fn password_from_fd() -> Option<String> {
    static READ: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    READ.get_or_init(|| {
        use std::io::Read;
        use std::os::unix::io::FromRawFd;
        let fd: i32 = std::env::var(PASSWORD_FD_ENV).ok()?.parse().ok()?;
        // Never stdin/stdout/stderr, and only an open descriptor: File takes it over and closes it.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        let mut p = String::new();
        unsafe { std::fs::File::from_raw_fd(fd) }.read_to_string(&mut p).ok()?;
        Some(p)
    })
    .clone()
}

/// The repository password this process was given (prompted, from a descriptor, or from the
/// environment), for a helper that opens the same repository.
fn repository_password() -> Option<String> {
    crate::PROMPTED_PASSWORD.get().cloned().or_else(password_from_fd).or_else(crate::env_password)
}

/// Gives `cmd` the password on descriptor 3 through a pipe ([`PASSWORD_FD_ENV`]); returns the
/// read end to close once the child started.
fn pass_password(cmd: &mut std::process::Command, password: &str) -> Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe for the password");
    }
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A pipe holds 64 KiB: the write completes before the child reads.
    std::fs::File::from(write).write_all(password.as_bytes()).context("writing the password to its pipe")?;
    let r = fds[0];
    cmd.env(PASSWORD_FD_ENV, "3");
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; if it already is 3, clear it by hand.
            if r == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(r, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    Ok(read)
}

pub fn list(g: &Global, a: &ListArgs) -> Result<i32> {
    let hv = Libvirt::connect(&a.connect)?;
    let vms = hv.list()?;
    let mut rows = Vec::new();
    for vm in &vms {
        let (method, why) = match choose_method(&hv, vm, Method::Auto) {
            Ok((m, why)) => (m.as_str().to_string(), why),
            Err(e) => ("none".to_string(), e.to_string()),
        };
        let app = app_consistent_requirements(&hv, vm);
        rows.push((vm, method, why, app));
    }
    if g.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(vm, method, why, app)| {
                serde_json::json!({
                    "name": vm.name, "uuid": vm.uuid, "state": vm.state,
                    "disks": vm.config.disks, "files": vm.config.files, "nics": vm.config.nics,
                    "memory_bytes": vm.config.memory_bytes, "vcpus": vm.config.vcpus,
                    "agent": vm.agent, "agent_channel": vm.config.agent_channel,
                    "method": method, "method_reason": why,
                    "app_consistent": app.is_ok(),
                    "app_consistent_reason": match app { Ok(s) | Err(s) => s },
                })
            })
            .collect();
        print_json(&v);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no VMs on {}", a.connect);
    }
    for (vm, method, why, _) in &rows {
        println!("{}  {}  {}", vm.name, vm.uuid, vm.state.as_str());
        println!(
            "  {} vCPU, {} memory, {} NIC(s)",
            vm.config.vcpus,
            bytes(vm.config.memory_bytes),
            vm.config.nics.len()
        );
        for d in &vm.config.disks {
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
        for f in &vm.config.files {
            println!("  file {:<7} {}", f.role, f.path);
        }
        let agent = match &vm.agent {
            AgentStatus::NoChannel => "no channel".to_string(),
            AgentStatus::NotAnswering(e) => format!("channel present, not answering ({e})"),
            AgentStatus::Answering => "answering".to_string(),
        };
        println!("  guest agent: {agent}");
        println!("  backup method: {method} ({why})");
    }
    Ok(0)
}

pub fn backup(g: &Global, a: &BackupVm) -> Result<i32> {
    let hv = Libvirt::connect(&a.connect)?;
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
        run_token: String::new(), // one per VM, in backup_one
        freeze_limit: Duration::from_secs(a.freeze_limit),
    };
    // Checked before any backup: a mail setting that cannot work should not wait for a boot.
    let mail = if a.verify_boot { Some(crate::boot::BootMail::from(&a.mail).settings()?) } else { None };
    let mut results = Vec::new();
    let mut failed = 0;
    let mut unbootable = 0;
    for name in &a.vms {
        match backup_one(&hv, &repo, name, &opts, a, &progress) {
            Ok((id, point, record)) => {
                if !g.json {
                    print_vm_backup(&id, &point, &record);
                }
                let mut rec = serde_json::to_value(&record)?;
                rec.as_object_mut().map(|o| o.remove("config"));
                let mut result = serde_json::json!({"vm": name, "ok": true, "id": id, "record": rec, "stats": point.stats,
                    "disks": point.disks.iter().map(|d| serde_json::json!({"name": d.name, "role": d.role, "size": d.size, "stats": d.stats})).collect::<Vec<_>>()});
                if let Some(mail) = &mail {
                    match crate::boot::boot_and_report(g, &hv, &repo, &id, &point, &opts.work_dir, mail) {
                        Ok((check, record_id, mailed, shot)) => {
                            if !check.passed() {
                                unbootable += 1;
                            }
                            if !g.json {
                                crate::boot::print_check(&check, &record_id, mailed.clone(), shot.as_deref());
                            }
                            result["boot_verification"] = serde_json::to_value(&check)?;
                            result["boot_verification"]["mailed_to"] = mailed.into();
                        }
                        Err(e) => {
                            unbootable += 1;
                            progress.note(&format!("error: boot verification of {name} failed: {e:#}"));
                            result["boot_verification"] = serde_json::json!({"error": format!("{e:#}")});
                        }
                    }
                }
                results.push(result);
            }
            Err(e) => {
                failed += 1;
                progress.note(&format!("error: backup of VM {name} failed: {e:#}"));
                results.push(serde_json::json!({"vm": name, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if g.json {
        print_json(&results);
    }
    Ok(if failed > 0 {
        1
    } else if unbootable > 0 {
        crate::EXIT_DAMAGED
    } else {
        0
    })
}

fn backup_one(
    hv: &Libvirt,
    repo: &std::sync::Arc<cairn_repo::Repository>,
    name: &str,
    opts: &VmBackupOptions,
    a: &BackupVm,
    progress: &Bar,
) -> Result<(String, cairn_repo::RestorePoint, VmRecord)> {
    let vm = hv.find(name)?;
    let opts = VmBackupOptions { run_token: new_run_token(), ..opts.clone() };
    // A shut-off VM has nothing to guard: no freeze, no pause, no backup job.
    let mut dog = if vm.state != VmState::ShutOff {
        let exe = std::env::current_exe().context("locating the cairn executable for the watchdog")?;
        let args: Vec<String> = vec![
            "watchdog".into(),
            "--connect".into(),
            a.connect.clone(),
            "--vm".into(),
            vm.uuid.clone(),
            "--limit".into(),
            a.freeze_limit.to_string(),
            "--job-token".into(),
            opts.run_token.clone(),
        ];
        let dog = Watchdog::start(&exe, &args)?;
        progress.note(&format!("{}: watchdog running {}", vm.name, dog.mode()));
        dog
    } else {
        Watchdog::none()
    };
    let r = backup_vm(hv, repo, &vm, &opts, &mut dog, progress as &dyn Progress);
    if r.is_ok() {
        dog.done();
    }
    r
}

pub fn restore(g: &Global, a: &RestoreVm) -> Result<i32> {
    use cairn_engine::target::TargetFormat;
    use cairn_vm::recover::{recover_vm, RecoverOptions};
    use std::io::{BufRead, IsTerminal, Write};
    let hv = Libvirt::connect(&a.connect)?;
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
        workers: workers(g),
    };
    let yes = a.yes;
    let confirm = move |question: &str| -> bool {
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
    };
    let progress = bar(g);
    let repo_dir = crate::repo_for_helper(g)?;
    let server_point = format!("{}@{}", point.name, id);
    let launch = |socket: &std::path::Path| launch_nbd_server(&repo_dir, &server_point, socket);
    let instant = cairn_vm::recover::InstantMode { launch_server: &launch, stop_after_start: a.debug_stop_after_start };
    let report = recover_vm(
        &hv,
        &repo,
        &id,
        &point,
        &opts,
        &confirm,
        a.instant.then_some(&instant),
        &progress as &dyn Progress,
    )?;
    if g.json {
        print_json(&report);
        return Ok(0);
    }
    println!(
        "{} VM {} ({}) from restore point {} of {} ({})",
        if report.replaced { "replaced" } else { "recovered" },
        report.name,
        report.uuid,
        &id[..8],
        point.name,
        point.time
    );
    for f in &report.files {
        println!(
            "  {:<14} {}  ({} data)",
            f.role.as_deref().map(|r| r.to_string()).unwrap_or(format!("disk {}", f.name)),
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

/// Starts `cairn serve-nbd POINT --socket SOCKET` as a detached process (its own process group,
/// so it outlives this command and its Ctrl-C) and returns its PID once it listens.
pub fn launch_nbd_server(repo_dir: &std::path::Path, point: &str, socket: &std::path::Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(socket.with_extension("log"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["serve-nbd", point, "--socket"]).arg(socket).arg("--repo").arg(repo_dir);
    let pipe = match repository_password() {
        Some(p) => Some(pass_password(&mut cmd, &p)?),
        None => None,
    };
    cmd.process_group(0).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let spawned = cmd.spawn().context("starting the NBD server");
    drop(pipe); // the child has its copy
    let mut child = spawned?;
    let t = std::time::Instant::now();
    while !socket.exists() {
        if let Some(st) = child.try_wait()? {
            anyhow::bail!("the NBD server exited ({st}); see {}", socket.with_extension("log").display());
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            anyhow::bail!("the NBD server did not start listening in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.id())
}

pub fn run_watchdog(a: &WatchdogArgs) -> Result<i32> {
    let connect = || -> Result<Box<dyn Hypervisor>> { Ok(Box::new(Libvirt::connect(&a.connect)?)) };
    watchdog::run(&connect, &a.vm, Duration::from_secs(a.limit), &a.job_token)?;
    Ok(0)
}

fn print_vm_backup(id: &str, p: &cairn_repo::RestorePoint, r: &VmRecord) {
    println!("restore point {} of VM {} ({}), {}", &id[..8], p.name, r.uuid, p.time);
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
