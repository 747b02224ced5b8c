//! VM backups against real libvirt and real QEMU guests (TCG), built and started by
//! `scripts/guest.sh` (scripts/setup.sh starts libvirtd and builds the guest).

mod common;

use common::guest::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn full_then_incremental_of_a_two_disk_vm_match_the_exports_byte_for_byte() {
    let e = VmEnv::new();
    let g = Guest::start("inc", &["--two-disks"]);
    // A pre-freeze command kept with the VM (domain metadata) and one from the command line.
    virsh(&[
        "metadata",
        &g.name,
        "https://cairn.dev/xmlns/hooks/1",
        "--key",
        "cairn",
        "--set",
        "<hooks><pre-freeze>echo quiesced &gt; /run/app-state</pre-freeze></hooks>",
    ]);
    let o1 = e.env.path("oracle1");
    let r1 = e.backup(&g, &["--debug-oracle", o1.to_str().unwrap(), "--post-thaw", "cat /run/app-state"]);
    let rec = record(&r1);
    let hooks = rec["hooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert_eq!((hooks[0]["when"].as_str(), hooks[0]["exit_code"].as_i64()), (Some("pre-freeze"), Some(0)));
    assert_eq!((hooks[1]["when"].as_str(), hooks[1]["output"].as_str()), (Some("post-thaw"), Some("quiesced\n")));
    assert_eq!(rec["method"], "app-consistent", "{rec}");
    assert_eq!(rec["chain"], "full");
    assert!(rec["frozen_window_ms"].as_u64().unwrap() < 1000, "frozen window {}", rec["frozen_window_ms"]);
    let events: Vec<&str> = rec["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    for want in ["prepare", "freeze", "frozen", "point created", "thawed", "data copied"] {
        assert!(events.contains(&want), "event {want} missing: {events:?}");
    }
    // The GPT disk's swap partition (1 MiB .. 65 MiB, in use by the guest) is not copied, but for
    // its header (signature, UUID, label: the first 64 KiB).
    let swap = rec["skipped_swap"].as_array().unwrap();
    assert_eq!(swap.len(), 1, "{swap:?}");
    let kept = 64 * 1024;
    assert_eq!(
        (swap[0]["disk"].as_str(), swap[0]["offset"].as_u64(), swap[0]["length"].as_u64()),
        (Some("vdb"), Some(MIB + kept), Some(64 * MIB - kept))
    );
    let roles: Vec<_> = r1["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["role"].as_str().unwrap_or(d["name"].as_str().unwrap()).to_string())
        .collect();
    assert_eq!(roles, ["vda", "vdb", "kernel", "initrd"]);

    // The guest's writer keeps appending while we back up; add a burst of new data too.
    g.exec("dd if=/dev/urandom of=/data/burst.bin bs=64k count=48 conv=fsync 2>/dev/null");
    let o2 = e.env.path("oracle2");
    let r2 = e.backup(&g, &["--debug-oracle", o2.to_str().unwrap()]);
    assert_eq!(record(&r2)["chain"], "incremental", "{}", record(&r2));
    let read2 = record(&r2)["vm_read_bytes"].as_u64().unwrap();
    assert!(read2 >= 3 * MIB && read2 < 8 * MIB, "incremental read {read2} bytes for a 3 MiB burst");

    for (r, o) in [(&r1, &o1), (&r2, &o2)] {
        let id = r["id"].as_str().unwrap();
        for disk in ["vda", "vdb"] {
            let out = e.env.path(&format!("{}-{disk}.raw", &id[..8]));
            e.restore(id, &g.name, disk, &out);
            let zeroed: &[(u64, u64)] = if disk == "vdb" { &[(MIB + 65536, 64 * MIB - 65536)] } else { &[] };
            assert_same_except(&out, &o.join(format!("{disk}.raw")), zeroed);
            std::fs::remove_file(&out).unwrap();
        }
    }
    // The kernel the VM boots from is in the point too, byte for byte.
    let k = e.env.path("kernel");
    e.restore(r2["id"].as_str().unwrap(), &g.name, "kernel", &k);
    assert!(same_content(&k, Path::new("/var/lib/cairn-test/guest/kernel")));
    // One checkpoint is left: the one the newest point refers to.
    assert_eq!(g.checkpoints(), [record(&r2)["checkpoint"].as_str().unwrap().to_string()]);
    assert_eq!(g.state(), "running");
    let v = e.env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn incremental_reads_exactly_the_guests_writes() {
    let e = VmEnv::new();
    let g = Guest::start("exact", &[]);
    // Quiet guest: writer paused, everything flushed.
    g.exec("touch /run/writer.pause; sync; sleep 1");
    let r1 = e.backup(&g, &["--method", "crash-consistent"]);
    assert_eq!(record(&r1)["chain"], "full");
    // Known bytes at known offsets in the raw scratch area (192..256 MiB): 4 KiB, 128 KiB, 1 MiB.
    let writes = [(192 * MIB, 4096u64), (200 * MIB + 32 * 1024, 128 * 1024), (250 * MIB, MIB)];
    let mut sums = Vec::new();
    for (i, (off, len)) in writes.iter().enumerate() {
        g.exec(&format!(
            "dd if=/dev/urandom of=/tmp/w{i} bs={len} count=1 2>/dev/null; dd if=/tmp/w{i} of=/dev/vda bs=4096 seek={} oflag=direct conv=notrunc 2>/dev/null",
            off / 4096
        ));
        sums.push(g.exec(&format!("sha256sum /tmp/w{i} | cut -d' ' -f1")).trim().to_string());
    }
    let written: u64 = writes.iter().map(|w| w.1).sum();
    let o = e.env.path("oracle");
    let r2 = e.backup(&g, &["--method", "crash-consistent", "--debug-oracle", o.to_str().unwrap()]);
    let rec = record(&r2);
    assert_eq!(rec["chain"], "incremental", "{rec}");
    let read = rec["vm_read_bytes"].as_u64().unwrap();
    // 64 KiB granularity: the writes cover 64 KiB + 192 KiB + 1 MiB of clusters.
    assert_eq!(read, 64 * 1024 + 192 * 1024 + MIB, "read {read} bytes for {written} written");
    assert!(read as f64 <= 1.5 * written as f64);
    let out = e.env.path("vda.raw");
    e.restore(r2["id"].as_str().unwrap(), &g.name, "vda", &out);
    assert_same_except(&out, &o.join("vda.raw"), &[]);
    let data = std::fs::read(&out).unwrap();
    for ((off, len), sum) in writes.iter().zip(&sums) {
        let mut f = std::fs::File::create(e.env.path("region")).unwrap();
        std::io::Write::write_all(&mut f, &data[*off as usize..(*off + *len) as usize]).unwrap();
        let got = sh(Command::new("sha256sum").arg(e.env.path("region")));
        assert_eq!(got.split_whitespace().next().unwrap(), sum, "region at {off}");
    }

    // Damage in the repository: verify names the VM's points; the next (incremental) backup of
    // the VM reads the damaged blocks from the VM again; verify then passes.
    let pack = e.env.files("packs").into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 128] {
        *b ^= 0x3c;
    }
    std::fs::write(&pack, &bytes).unwrap();
    let o = e.env.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["affected_points"].as_array().unwrap().iter().all(|p| p["name"] == g.name.as_str()), "{v}");
    let r3 = e.backup(&g, &["--method", "crash-consistent"]);
    assert_eq!(record(&r3)["chain"], "incremental");
    let v = e.env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let healed = e.env.path("vda-healed.raw");
    e.restore(r2["id"].as_str().unwrap(), &g.name, "vda", &healed);
    assert!(same_content(&healed, &out));
}

#[test]
fn auto_falls_back_to_saved_state_without_an_agent() {
    let e = VmEnv::new();
    let g = Guest::start("noagent", &["--no-agent"]);
    let list = e.env.json(&["vm", "list"]);
    let me = list.as_array().unwrap().iter().find(|v| v["name"] == g.name.as_str()).unwrap().clone();
    assert_eq!(me["method"], "saved-state", "{me}");
    assert!(me["method_reason"].as_str().unwrap().contains("no guest agent channel"), "{me}");
    let r = e.backup(&g, &[]);
    let rec = record(&r);
    assert_eq!(rec["method"], "saved-state");
    assert!(rec["method_reason"].as_str().unwrap().contains("no guest agent channel"), "{rec}");
    let offline = rec["offline_window_ms"].as_u64().unwrap();
    assert!(offline < 2000, "offline for {offline} ms");
    assert_eq!(rec["memory_state"], "memory-state");
    let mem = r["disks"].as_array().unwrap().iter().find(|d| d["role"] == "memory-state").cloned().unwrap();
    assert!(mem["size"].as_u64().unwrap() > 10 * MIB, "{mem}");
    assert_eq!(g.state(), "running");
    // The stored memory state is a libvirt save image of this VM.
    let st = e.env.path("state");
    e.restore(r["id"].as_str().unwrap(), &g.name, "memory-state", &st);
    let xml = virsh(&["save-image-dumpxml", st.to_str().unwrap()]);
    assert!(xml.contains(&format!("<name>{}</name>", g.name)), "{xml}");
    // No leftovers: no snapshot metadata, no memory file, no scratch files.
    assert_eq!(virsh(&["snapshot-list", &g.name, "--name"]).trim(), "");
    let uuid = rec["uuid"].as_str().unwrap();
    let left: Vec<_> =
        std::fs::read_dir(e.env.path("work").join(uuid)).unwrap().flatten().map(|f| f.file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(e.env.path("work").join("locks").join(format!("vm-{uuid}.lock")).exists(), "the VM's lock is elsewhere");

    // The next saved-state backup is incremental (the changes are listed while the VM is paused,
    // before its memory is saved) and equals what QEMU itself exports at that point.
    std::thread::sleep(Duration::from_secs(2)); // the guest's logger appends once a second
    let o = e.env.path("oracle");
    let r2 = e.backup(&g, &["--debug-oracle", o.to_str().unwrap()]);
    let rec2 = record(&r2);
    assert_eq!((rec2["method"].as_str(), rec2["chain"].as_str()), (Some("saved-state"), Some("incremental")), "{rec2}");
    assert!(rec2["offline_window_ms"].as_u64().unwrap() < 2000);
    let read = rec2["vm_read_bytes"].as_u64().unwrap();
    assert!(read > 0 && read < 4 * MIB, "saved-state incremental read {read} bytes");
    let out = e.env.path("vda.raw");
    e.restore(r2["id"].as_str().unwrap(), &g.name, "vda", &out);
    assert_same_except(&out, &o.join("vda.raw"), &[]);
    assert_eq!(g.checkpoints(), [rec2["checkpoint"].as_str().unwrap().to_string()]);
}

#[test]
fn untrustworthy_checkpoints_and_changed_disks_force_full_reads_with_the_reason() {
    let e = VmEnv::new();
    let g = Guest::start("chain", &[]);
    let full = |r: &Value, why: &str| {
        let rec = record(r);
        assert_eq!(rec["chain"], "full", "{rec}");
        assert!(rec["chain_reason"].as_str().unwrap().contains(why), "expected {why:?} in {}", rec["chain_reason"]);
    };
    let r = e.backup(&g, &[]);
    full(&r, "first backup");
    // A removed checkpoint (bitmap gone).
    virsh(&["checkpoint-delete", &g.name, record(&r)["checkpoint"].as_str().unwrap()]);
    let r = e.backup(&g, &[]);
    full(&r, "no longer exists");
    let r = e.backup(&g, &[]);
    assert_eq!(record(&r)["chain"], "incremental");
    let r = e.backup(&g, &["--full"]);
    full(&r, "a full read was asked for");
    // The newest point forgotten: the next backup says the chain restarts, and why.
    let newest = format!("{}@{}", g.name, &r["id"].as_str().unwrap()[..12]);
    let f = e.env.json(&["forget", &newest]);
    assert_eq!(f["groups"][0]["newest_removed"], true, "{f}");
    let r = e.backup(&g, &[]);
    full(&r, "was removed (forget)");

    // QEMU killed: its bitmaps were never written to the image.
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", g.name)).unwrap();
    sh(Command::new("kill").args(["-9", pid.trim()]));
    let t = Instant::now();
    while g.state() == "running" && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    virsh(&["start", &g.name]);
    sh(Command::new(guest_sh()).args(["wait", &g.name]));
    let r = e.backup(&g, &[]);
    full(&r, "cannot be used");
    let r = e.backup(&g, &[]);
    assert_eq!(record(&r)["chain"], "incremental");

    // Shut off cleanly (QEMU stores the bitmaps in the images): read from the files, with no
    // method, and still only what changed.
    g.exec("dd if=/dev/urandom of=/dev/vda bs=65536 seek=3200 count=16 oflag=direct 2>/dev/null");
    virsh(&["destroy", "--graceful", &g.name]);
    let r = e.backup(&g, &[]);
    let rec = record(&r);
    assert_eq!((rec["method"].as_str(), rec["chain"].as_str()), (Some("offline"), Some("incremental")), "{rec}");
    let read = rec["vm_read_bytes"].as_u64().unwrap();
    assert!((MIB..4 * MIB).contains(&read), "offline incremental read {read} bytes for 1 MiB written");
    let o = e.env.path("vda-offline.raw");
    sh(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(g.disk("vda")).arg(&o));
    let out = e.env.path("vda-restored.raw");
    e.restore(r["id"].as_str().unwrap(), &g.name, "vda", &out);
    assert_same_except(&out, &o, &[]);

    // A disk added: a new chain.
    let extra = g.disk("vdc");
    sh(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&extra).arg("64M"));
    virsh(&["attach-disk", &g.name, extra.to_str().unwrap(), "vdc", "--subdriver", "qcow2", "--config"]);
    virsh(&["start", &g.name]);
    sh(Command::new(guest_sh()).args(["wait", &g.name]));
    let r = e.backup(&g, &[]);
    full(&r, "disks changed");
    let names: Vec<_> = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["role"].is_null())
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["vda", "vdc"]);
    let r = e.backup(&g, &[]);
    assert_eq!(record(&r)["chain"], "incremental");
    let v = e.env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

/// A backup that holds the guest frozen (or paused) for a minute once the point is taken.
fn spawn_held_backup(e: &VmEnv, g: &Guest, work: &Path) -> std::process::Child {
    e.env
        .cmd(&[
            "backup",
            "vm",
            &g.name,
            "--work-dir",
            work.to_str().unwrap(),
            "--debug-hold",
            "60",
            "--freeze-limit",
            "30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_backup_never_leaves_the_guest_frozen_and_the_next_run_cleans_up() {
    let e = VmEnv::new();
    let g = Guest::start("kill", &[]);
    let work = e.env.path("work");
    let mut child = spawn_held_backup(&e, &g, &work);
    let frozen = |g: &Guest| g.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"] == "frozen";
    let t = Instant::now();
    while !frozen(&g) {
        assert!(t.elapsed() < Duration::from_secs(30), "the guest never froze");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second backup of the same VM, even with another work folder, is refused at once and
    // leaves the guest as it is.
    let other = e.env.path("other-work");
    let err = e.env.fails(&["backup", "vm", &g.name, "--work-dir", other.to_str().unwrap()], 1);
    assert!(err.contains("another cairn backup"), "{err}");
    assert!(frozen(&g), "the refused backup thawed the guest");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    while frozen(&g) {
        assert!(killed.elapsed() < Duration::from_secs(5), "guest still frozen 5 s after cairn was killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("thawed {} ms after the kill", killed.elapsed().as_millis());
    // The watchdog ended the backup job too (it may have started after the kill: the watchdog
    // watches for it a while); the half-made checkpoint is cleaned by the next run.
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let t = Instant::now();
    while Command::new("pgrep")
        .args(["-f", &format!("watchdog --connect .* --vm {uuid}")])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(t.elapsed() < Duration::from_secs(20), "watchdog still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    while Command::new("virsh").args(["-q", "backup-dumpxml", &g.name]).output().unwrap().status.success() {
        assert!(t.elapsed() < Duration::from_secs(10), "backup job still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = e.backup(&g, &[]);
    assert_eq!(record(&r)["chain"], "full");
    assert_eq!(g.checkpoints(), [record(&r)["checkpoint"].as_str().unwrap().to_string()]);
    let uuid = record(&r)["uuid"].as_str().unwrap().to_string();
    let left: Vec<_> = std::fs::read_dir(work.join(uuid)).unwrap().flatten().map(|f| f.file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_killed_saved_state_backup_never_leaves_the_vm_paused() {
    let e = VmEnv::new();
    let g = Guest::start("killpause", &["--no-agent"]);
    let work = e.env.path("work");
    let mut child = spawn_held_backup(&e, &g, &work);
    let t = Instant::now();
    while g.state() != "paused" {
        assert!(t.elapsed() < Duration::from_secs(30), "the VM never paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the memory save: the backup job exists once the point is created.
    while !Command::new("virsh").args(["-q", "backup-dumpxml", &g.name]).output().unwrap().status.success() {
        assert!(t.elapsed() < Duration::from_secs(30), "the point was never created");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while g.state() != "running" {
        assert!(killed.elapsed() < Duration::from_secs(5), "VM still {} 5 s after cairn was killed", g.state());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("running again {} ms after the kill", killed.elapsed().as_millis());
    let r = e.backup(&g, &[]);
    assert_eq!(record(&r)["method"], "saved-state");
    assert_eq!(g.checkpoints(), [record(&r)["checkpoint"].as_str().unwrap().to_string()]);
    assert_eq!(virsh(&["snapshot-list", &g.name, "--name"]).trim(), "");
}

#[test]
fn an_unreachable_libvirt_gives_a_clear_error() {
    let e = Env::new();
    e.init();
    let err = e.fails(&["vm", "list", "--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"], 1);
    assert!(err.contains("cannot connect to libvirt") && err.contains("Is libvirtd running"), "{err}");
    let err =
        e.fails(&["backup", "vm", "nope", "--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"], 1);
    assert!(err.contains("Is libvirtd running"), "{err}");
    let err = e.fails(&["backup", "vm", "no-such-vm-here"], 1);
    assert!(err.contains("no VM named"), "{err}");
    // A limit of 0 would discard every point: refused before anything runs.
    let err = e.fails(&["backup", "vm", "no-such-vm-here", "--freeze-limit", "0"], 2);
    assert!(err.contains("--freeze-limit"), "{err}");
}

#[test]
fn mail_flags_without_verify_boot_are_refused() {
    let e = Env::new();
    e.init();
    for flag in [
        &["--mail-to", "ops@example.com"][..],
        &["--smtp-server", "mail:25"],
        &["--smtp-tls", "starttls"],
        &["--boot-timeout", "30"],
        &["--mail-from", "a@b"],
    ] {
        let mut args = vec!["backup", "vm", "web"];
        args.extend_from_slice(flag);
        let err = e.fails(&args, 2);
        assert!(err.contains("--verify-boot"), "{flag:?}: {err}");
    }
    // From the environment (or the host's configuration file), the settings are no flags given.
    let o = e.cmd(&["backup", "vm", "no-such-vm-here"]).env("CAIRN_SMTP_SERVER", "mail:25").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no VM named"));
    // Credentials are never sent in clear.
    let err =
        e.fails(&["backup", "vm", "web", "--verify-boot", "--mail-to", "ops@example.com", "--smtp-user", "backup"], 1);
    assert!(err.contains("unencrypted") && err.contains("--smtp-tls"), "{err}");
}

#[test]
fn the_watchdog_outlives_signals_aimed_at_the_job_and_ends_on_stdin_eof() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["watchdog", "--connect", "qemu:///system", "--vm", "00000000-0000-4000-8000-000000000000"])
        .args(["--limit", "10", "--job-token", "t0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the watchdog died of a signal meant for the job");
    drop(child.stdin.take()); // the job goes away
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the watchdog did not end after its job went away");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn the_watchdog_outlives_its_stderr_reader() {
    // `cairn backup vm ... 2>&1 | tee log`, and Ctrl-C stops tee: the watchdog's stderr is a pipe
    // nobody reads. Its next message must not kill it (SIGPIPE) or panic it (EPIPE).
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read); // the reader is gone before the watchdog says anything
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["watchdog", "--connect", "qemu:///system", "--vm", "00000000-0000-4000-8000-000000000000"])
        .args(["--limit", "1", "--job-token", "t0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(write))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut stdin = child.stdin.take().unwrap();
    // "Frozen" past its 1 s limit: it thaws (a VM that does not exist: the thaw fails) and says
    // so on stderr, again and again.
    writeln!(stdin, "frozen").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the watchdog died writing to a closed stderr");
    writeln!(stdin, "thawed").unwrap();
    writeln!(stdin, "done").unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the watchdog did not end on done");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn an_unsafe_work_folder_is_refused_before_the_guest_is_touched() {
    let e = VmEnv::new();
    let g = Guest::start("workdir", &[]);
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let refused = |work: &Path, why: &str| {
        let err = e.env.fails(&["backup", "vm", &g.name, "--work-dir", work.to_str().unwrap()], 1);
        assert!(err.contains("refusing to use folder") && err.contains(why), "{err}");
        assert!(!frozen(&g), "the guest was frozen");
        assert!(g.checkpoints().is_empty(), "a checkpoint was made: {:?}", g.checkpoints());
        assert!(!Command::new("virsh").args(["-q", "backup-dumpxml", &g.name]).output().unwrap().status.success());
    };
    // Made by another user (here nobody) before us: they could swap our sockets.
    let theirs = e.env.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    sh(Command::new("chown").args(["nobody"]).arg(&theirs));
    refused(&theirs, "belongs to user");
    // The VM's own folder inside a good one, made by another user.
    let work = e.env.path("work");
    std::fs::create_dir_all(work.join(&uuid)).unwrap();
    sh(Command::new("chown").args(["nobody"]).arg(work.join(&uuid)));
    refused(&work, "belongs to user");
    // A symbolic link to a good folder.
    let good = e.env.path("good");
    std::fs::create_dir(&good).unwrap();
    let link = e.env.path("link");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    refused(&link, "symbolic link");
    // Group-writable.
    let open = e.env.path("open");
    std::fs::create_dir(&open).unwrap();
    sh(Command::new("chmod").args(["0770"]).arg(&open));
    refused(&open, "other users can write");
    // A new folder is made 0700 (a missing folder above it 0711: others may pass, not list or
    // write), and the backup runs.
    let fresh = e.env.path("fresh/work");
    let v = e.env.json(&["backup", "vm", &g.name, "--work-dir", fresh.to_str().unwrap()]);
    assert_eq!(v[0]["ok"], true, "{v}");
    for (d, want) in [(e.env.path("fresh"), 0o711), (fresh.clone(), 0o700), (fresh.join(&uuid), 0o700)] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&d).unwrap().permissions());
        assert_eq!(mode & 0o777, want, "{}", d.display());
    }
}

#[test]
fn the_freeze_limit_thaws_the_guest_while_cairn_still_runs() {
    // Encrypted: the password must reach no helper process through its environment.
    let e = VmEnv::encrypted();
    let g = Guest::start("limit", &[]);
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let work = e.env.path("work");
    let limit = 2;
    let mut child = e
        .env
        .cmd(&["backup", "vm", &g.name, "--work-dir", work.to_str().unwrap(), "--json"])
        .args(["--debug-hold", "8", "--freeze-limit", &limit.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !frozen(&g) {
        assert!(t.elapsed() < Duration::from_secs(30), "the guest never froze");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen_frozen = Instant::now();
    let dogs = pgrep(&format!("watchdog --connect .* --vm {uuid}"));
    assert_eq!(dogs.len(), 1, "{dogs:?}");
    assert!(!env_has(dogs[0], "CAIRN_PASSWORD"), "the watchdog was given the repository password");
    while frozen(&g) {
        assert!(
            seen_frozen.elapsed() < Duration::from_secs(limit + 2),
            "still frozen {:.1} s after it froze, with a limit of {limit} s",
            seen_frozen.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let thawed = seen_frozen.elapsed();
    eprintln!("thawed by the watchdog {:.1} s after the freeze was seen", thawed.as_secs_f64());
    assert!(thawed >= Duration::from_secs(limit) - Duration::from_millis(500), "thawed before the limit");
    assert!(child.try_wait().unwrap().is_none(), "cairn had ended: the thaw was not the limit's");
    // The point was created while the guest was frozen (before the limit): the backup completes,
    // and says the watchdog thawed the guest.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rec = record(&v[0]);
    assert_eq!(rec["method"], "app-consistent");
    let events: Vec<&str> = rec["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(events.contains(&"already thawed by the watchdog"), "{events:?}");
    assert!(!frozen(&g));
    assert_eq!(g.checkpoints(), [rec["checkpoint"].as_str().unwrap().to_string()]);
    let v = e.env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn a_dead_runs_watchdog_never_ends_the_next_runs_job() {
    let e = VmEnv::new();
    let g = Guest::start("token", &[]);
    let work = e.env.path("work");
    // Killed while a pre-freeze command runs: its watchdog was told of a job that does not exist
    // yet, and looks for it for a while after the kill.
    let mut child = e
        .env
        .cmd(&["backup", "vm", &g.name, "--work-dir", work.to_str().unwrap(), "--pre-freeze", "sleep 20"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let t = Instant::now();
    while pgrep(&format!("watchdog --connect .* --vm {uuid}")).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "no watchdog");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2)); // in the pre-freeze command
    child.kill().unwrap();
    child.wait().unwrap();
    // At once, in the same folder: the new run's job must survive the old watchdog's search.
    let o2 = e.env.path("oracle");
    let r = e.backup(&g, &["--debug-oracle", o2.to_str().unwrap()]);
    assert_eq!(record(&r)["method"], "app-consistent");
    assert!(!frozen(&g));
}

/// libvirt's own test driver (`test:///PATH`): a hypervisor defined by a file, no daemon.
fn test_host(dir: &Path, name: &str, domains: &[(&str, &str, bool)]) -> String {
    let mut xml = String::from("<node>\n");
    for (vm, uuid, running) in domains {
        xml.push_str(&format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{vm}</name>\
             <uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/shared/{vm}.qcow2'/>\
             <target dev='vda'/></disk></devices>{}</domain>\n",
            if *running { "" } else { "<test:runstate>5</test:runstate>" }
        ));
    }
    xml.push_str("</node>\n");
    let path = dir.join(format!("{name}.xml"));
    std::fs::write(&path, xml).unwrap();
    format!("test://{}", path.display())
}

#[test]
fn vm_list_of_several_hosts_lists_a_vm_once_where_it_runs_and_names_a_host_that_is_down() {
    let e = Env::new();
    let web = "6a2f0d3e-1111-4c2b-9d7a-000000000001";
    let db = "6a2f0d3e-1111-4c2b-9d7a-000000000002";
    // web is defined on both hosts and runs on b (as after a migration); db runs on a.
    let a = test_host(e.dir.path(), "a", &[("web", web, false), ("db", db, true)]);
    let b = test_host(e.dir.path(), "b", &[("web", web, true)]);
    let down = "qemu+tcp://127.0.0.1:1/system"; // nothing listens on port 1
    let o = e.run(&["vm", "list", "--host", &a, "--host", down, "--host", &b, "--json"]);
    assert_eq!(o.status.code(), Some(1), "a host that is down must fail the listing");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("host {down} was not listed")), "{err}");
    let vms: Value = serde_json::from_slice(&o.stdout).unwrap();
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 2, "one row per VM: {vms:?}");
    let row = |uuid: &str| vms.iter().find(|v| v["uuid"] == uuid).unwrap();
    assert_eq!((row(web)["host"].as_str(), row(web)["state"].as_str()), (Some(b.as_str()), Some("running")));
    let seen: Vec<(&str, &str)> = row(web)["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["host"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [(a.as_str(), "shut-off"), (b.as_str(), "running")]);
    assert_eq!(row(db)["host"], a.as_str());
    // The same, for people; and the hosts may come from CAIRN_HOSTS.
    let o = e.cmd(&["vm", "list"]).env("CAIRN_HOSTS", format!("{a} {b}")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("web  {web}  running  on {b}")), "{text}");
    assert!(text.contains(&format!("also defined on {a} (shut off)")), "{text}");
    // Or from the host configuration file.
    let config = e.path("cairn.toml");
    std::fs::write(&config, format!("[hosts]\nuris = [\"{a}\", \"{b}\"]\n")).unwrap();
    let o = e.cmd(&["vm", "list", "--json"]).env("CAIRN_CONFIG", &config).env_remove("CAIRN_HOSTS").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vms: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 2, "{vms}");
}
