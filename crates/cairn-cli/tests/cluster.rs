//! Several hosts (issue 14): real libvirtd "hosts" in their own namespaces on this machine
//! (`scripts/hosts.sh`), joined on addresses the script makes, with a shared folder, each with
//! its own sshd: VMs of those hosts are backed up from this machine over SSH, as from a real
//! backup server. The tests share the hosts, so they run one at a time.

mod common;

use common::guest::sh;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const STATE: &str = "/var/lib/cairn-test/hosts";
const A: &str = "qemu+tcp://10.77.0.1/system";
const B: &str = "qemu+tcp://10.77.0.2/system";
/// Host c runs QEMU as a stock Debian host does (unprivileged, libvirt's ownership changes).
const C: &str = "qemu+tcp://10.77.0.3/system";

fn uri_of(host: &str) -> &'static str {
    match host {
        "a" => A,
        "b" => B,
        _ => C,
    }
}

fn hosts_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hosts.sh")
}

fn virsh(uri: &str, args: &[&str]) -> String {
    sh(Command::new("virsh").args(["-q", "-c", uri]).args(args))
}

/// The same hosts over SSH (what backups need), their keys checked.
fn ssh_uri(ip: &str) -> String {
    format!(
        "qemu+ssh://root@{ip}/system?keyfile={STATE}/ssh/id_ed25519&known_hosts={STATE}/ssh/known_hosts&no_verify=1"
    )
}

/// One test at a time has the hosts.
static HOSTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Hosts (a and b, or others), up while this lives; their guests destroyed and undefined when
/// it goes.
struct Hosts {
    names: Vec<&'static str>,
    guests: Vec<String>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl Hosts {
    fn up(names: &[&'static str]) -> Hosts {
        let serial = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
        // The cairn of each host (cairn_vm::ssh runs it there) is this one: the hosts see this
        // machine's files, except their private libvirt folders, where its work folder goes.
        // SAFETY: every test of this file sets the same values, under the lock.
        unsafe {
            std::env::set_var("CAIRN_REMOTE_CAIRN", env!("CARGO_BIN_EXE_cairn"));
            std::env::set_var("CAIRN_REMOTE_WORK_DIR", "/var/lib/libvirt/cairn-work");
        }
        // Made first, so that a start that fails part-way is still taken down.
        let hosts = Hosts { names: names.to_vec(), guests: Vec::new(), _one_at_a_time: serial };
        sh(Command::new(hosts_sh()).arg("up").args(names));
        hosts
    }

    fn remove(&self, name: &str) {
        for uri in self.names.iter().map(|h| uri_of(h)) {
            let _ = Command::new("virsh").args(["-q", "-c", uri, "destroy", name]).output();
            // Its checkpoints' metadata too (stale copies stay on a host the VM left).
            let _ = Command::new("virsh").args(["-q", "-c", uri, "undefine", name, "--checkpoints-metadata"]).output();
        }
        // What a recovery wrote into a host's own images folder.
        for h in &self.names {
            let images = Path::new(STATE).join("hosts").join(h).join("lib/images");
            for f in std::fs::read_dir(images).into_iter().flatten().flatten() {
                let file = f.file_name().to_string_lossy().into_owned();
                if file.starts_with(&format!("{name}-")) || file == format!("{name}.qcow2") {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    /// Defines the test guest `name` on every host, its disk in the shared folder; starts it on a.
    fn guest_on_a_defined_on_both(&mut self, name: &str) -> String {
        self.guest(name, "a")
    }

    /// Defines the test guest `name` on every host, its disk in the shared folder; starts it on
    /// `host`.
    fn guest(&mut self, name: &str, host: &str) -> String {
        // One a killed run left behind (Drop never ran) would keep its name with another UUID,
        // and its disk open.
        self.remove(name);
        let guest = Path::new(STATE).join("guest");
        let disk = Path::new(STATE).join("shared").join(format!("{name}.qcow2"));
        sh(Command::new("cp").arg("--sparse=always").arg(guest.join("data.qcow2")).arg(&disk));
        // One VM is one UUID: the same on both hosts.
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>console=ttyS0 panic=-1 loglevel=4</cmdline></os><cpu mode='maximum' check='none'/>\
             <on_reboot>destroy</on_reboot><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{d}'/><target dev='vda' bus='virtio'/></disk>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <memballoon model='none'/></devices></domain>",
            k = guest.join("kernel").display(),
            i = guest.join("initramfs.img").display(),
            d = disk.display()
        );
        let file = Path::new(STATE).join("shared").join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        self.guests.push(name.to_string());
        for h in &self.names {
            virsh(uri_of(h), &["define", file.to_str().unwrap()]);
        }
        virsh(uri_of(host), &["start", name]);
        uuid
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.guests {
            self.remove(name);
        }
        let _ = Command::new(hosts_sh()).arg("down").output();
    }
}

/// `cairn vm list` over both hosts: (host it is placed on, [(host, state)]) of the VM `uuid`.
fn placement(e: &Env, uuid: &str) -> (String, Vec<(String, String)>) {
    let vms: Value = e.json(&["vm", "list", "--host", A, "--host", B]);
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["uuid"] == uuid)
        .unwrap_or_else(|| panic!("{uuid} not listed: {vms}"));
    let hosts = vm["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["host"].as_str().unwrap().to_string(), p["state"].as_str().unwrap().to_string()))
        .collect();
    (vm["host"].as_str().unwrap().to_string(), hosts)
}

#[test]
fn a_vm_defined_on_two_hosts_is_listed_once_where_it_runs_and_followed_across_a_live_migration() {
    let e = Env::new();
    let mut hosts = Hosts::up(&["a", "b"]);
    // Two hosts, two identities.
    let uuid_of = |uri: &str| {
        let caps = virsh(uri, &["capabilities"]);
        caps.split("<uuid>").nth(1).and_then(|s| s.split("</uuid>").next()).unwrap().to_string()
    };
    assert_ne!(uuid_of(A), uuid_of(B), "the two hosts are one");

    let uuid = hosts.guest_on_a_defined_on_both("cluster-web");
    let (host, seen) = placement(&e, &uuid);
    assert_eq!(host, A);
    assert_eq!(seen, [(A.to_string(), "running".to_string()), (B.to_string(), "shut-off".to_string())]);

    // A live migration on shared storage (a local folder: libvirt needs --unsafe to allow it).
    virsh(A, &["migrate", "--live", "--unsafe", "cluster-web", B]);
    // Under load the destination may still say "paused" for a moment after the migration returns
    // (it is placed there all the same); the states are checked once they settle.
    let want = [(A.to_string(), "shut-off".to_string()), (B.to_string(), "running".to_string())];
    let t = std::time::Instant::now();
    let (mut host, mut seen) = placement(&e, &uuid);
    while seen != want && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        (host, seen) = placement(&e, &uuid);
    }
    assert_eq!(host, B, "the VM is not placed where it runs now");
    assert_eq!(seen, [(A.to_string(), "shut-off".to_string()), (B.to_string(), "running".to_string())]);
}

/// A new repository, hosts a and b, and the test guest `name` defined on both, running on a with
/// its agent answering; its UUID.
fn guest_running_on_a(name: &str) -> (Env, Hosts, String) {
    let e = Env::new();
    e.init();
    let mut hosts = Hosts::up(&["a", "b"]);
    let uuid = hosts.guest_on_a_defined_on_both(name);
    wait_for_agent(A, name);
    (e, hosts, uuid)
}

/// Runs a shell command in guest `name` on host `uri` through its agent; its output.
fn guest_exec(uri: &str, name: &str, cmd: &str) -> String {
    sh(Command::new(common::guest::guest_sh()).env("LIBVIRT_DEFAULT_URI", uri).args(["exec", name, cmd]))
}

/// Waits until the guest agent of `name` on `uri` answers.
fn wait_for_agent(uri: &str, name: &str) {
    for _ in 0..600 {
        let ping = Command::new("virsh")
            .args(["-q", "-c", uri, "qemu-agent-command", name, r#"{"execute":"guest-ping"}"#])
            .output()
            .unwrap();
        if ping.status.success() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("the guest agent of {name} on {uri} never answered");
}

/// `cairn backup vm ... --json` over `hosts`: (exit code, outcomes, stderr).
fn backup_vms(e: &Env, vms: &[&str], hosts: &[&str]) -> (i32, Vec<Value>, String) {
    backup_vms_with(e, vms, hosts, &[])
}

/// [`backup_vms`] with more arguments.
fn backup_vms_with(e: &Env, vms: &[&str], hosts: &[&str], more: &[&str]) -> (i32, Vec<Value>, String) {
    let work = e.path("work");
    let mut args = vec!["backup", "vm"];
    args.extend_from_slice(more);
    args.extend_from_slice(vms);
    for h in hosts {
        args.extend(["--host", h]);
    }
    args.extend(["--work-dir", work.to_str().unwrap(), "--json"]);
    let o = e.run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|err| panic!("{err}: {stderr}"));
    (o.status.code().unwrap(), v.as_array().unwrap().clone(), stderr)
}

fn sha256_of(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_vm_is_backed_up_on_the_host_it_runs_on_and_its_chain_survives_a_live_migration() {
    let name = "cluster-db";
    let (e, mut hosts, uuid) = guest_running_on_a(name);
    let (a, b) = (ssh_uri("10.77.0.1"), ssh_uri("10.77.0.2"));
    // A host that is not up (an address of the hosts' network that none has): listed, it cannot
    // be asked.
    let c = ssh_uri("10.77.0.9");

    // The first backup: found on a, its data read there over SSH.
    let (code, out, err) = backup_vms(&e, &[name], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    let first = &out[0];
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["host"], a.as_str(), "{first}");
    assert_eq!(first["record"]["uuid"], uuid.as_str());
    assert_eq!(first["record"]["chain"], "full");
    assert!(err.contains(&format!("{name}: watchdog running on root@10.77.0.1")), "the watchdog ran elsewhere: {err}");

    // The guest writes 8 MiB, then moves to b while it runs.
    let written: u64 = 8 << 20;
    let sum = guest_exec(
        A,
        name,
        "dd if=/dev/urandom of=/data/moved bs=1M count=8 2>/dev/null && sync && sha256sum /data/moved",
    );
    let sum = sum.split_whitespace().next().unwrap().to_string();
    virsh(A, &["migrate", "--live", "--unsafe", name, B]);

    // Found on b; its checkpoint, which libvirt did not migrate, registered again there from the
    // point: an incremental that reads about what the guest wrote. A VM nobody has, with a host
    // down, is reported with that host; the others are backed up all the same.
    let (code, out, err) = backup_vms(&e, &[name, "no-such-vm"], &[&a, &b, &c]);
    assert_eq!(code, 1, "one VM could not be found: {err}");
    let moved = &out[0];
    assert_eq!(moved["ok"], true, "{moved}");
    assert_eq!(moved["host"], b.as_str(), "{moved}");
    let record = &moved["record"];
    assert_eq!(record["chain"], "incremental", "{record}");
    let reason = record["chain_reason"].as_str().unwrap();
    assert!(reason.contains("registered again on qemu+ssh://root@10.77.0.2/system"), "{reason}");
    assert!(!reason.contains("keyfile"), "a URI's parameters in a message: {reason}");
    let read = record["vm_read_bytes"].as_u64().unwrap();
    assert!(read >= written && read <= written * 3 / 2, "read {read} bytes for {written} written");
    assert_eq!(out[1]["ok"], false);
    let why = out[1]["error"].as_str().unwrap();
    assert!(why.contains("10.77.0.9") && why.contains("could not be asked"), "{why}");

    // The point holds the guest's file.
    let got = e.path("moved");
    e.ok(&["files", "get", name, "vda", "/moved", "--to", got.to_str().unwrap()]);
    assert_eq!(sha256_of(&got), sum, "the file restored from the point is not the guest's");

    // A bitmap removed on b (its checkpoint deleted there): not registered again, a full read
    // with the reason, never a wrong incremental.
    let cp = record["checkpoint"].as_str().unwrap();
    virsh(B, &["checkpoint-delete", name, cp]);
    let (code, out, err) = backup_vms(&e, &[name], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    let record = &out[0]["record"];
    assert_eq!(record["chain"], "full", "{record}");
    let reason = record["chain_reason"].as_str().unwrap();
    assert!(reason.contains(&format!("checkpoint {cp}")) && reason.contains("cannot be registered again"), "{reason}");

    // The point taken on b, recovered as a new VM on a, into a folder of a's own (not shared):
    // its disks written there over SSH. It boots, and holds the guest's file.
    let point = format!("{name}@{}", &moved["id"].as_str().unwrap()[..8]);
    let restored = format!("{name}-on-a");
    hosts.guests.push(restored.clone());
    let storage = "/var/lib/libvirt/images";
    let r = e.json(&["restore", "vm", &point, "--host", &a, "--storage", storage, "--as", &restored, "--start"]);
    assert_eq!(r["name"], restored.as_str(), "{r}");
    let disk = format!("{storage}/{restored}-vda.qcow2");
    assert!(r["files"].as_array().unwrap().iter().any(|f| f["path"] == disk.as_str()), "{r}");
    assert!(!Path::new(&disk).exists(), "the disk was written on this machine, not on host a");
    let listed = sh(Command::new(hosts_sh()).args(["exec", "a", "ls", storage]));
    assert!(listed.lines().any(|l| l == format!("{restored}-vda.qcow2")), "not on host a: {listed}");
    assert!(!listed.contains("cairn-partial"), "a partial image was left: {listed}");
    wait_for_agent(A, &restored);
    let again = guest_exec(A, &restored, "sha256sum /data/moved");
    assert_eq!(again.split_whitespace().next().unwrap(), sum, "the recovered VM does not hold the guest's file");

    // Back to a, where libvirt still holds the first point's checkpoint (stale, its bitmap gone
    // with the guest): it goes, the newest is registered again, and the backup is incremental.
    let back: u64 = 2 << 20;
    guest_exec(B, name, "dd if=/dev/urandom of=/data/back bs=1M count=2 2>/dev/null && sync");
    virsh(B, &["migrate", "--live", "--unsafe", name, A]);
    let (code, out, err) = backup_vms(&e, &[name], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["host"], a.as_str(), "{}", out[0]);
    let record = &out[0]["record"];
    assert_eq!(record["chain"], "incremental", "{record}");
    let read = record["vm_read_bytes"].as_u64().unwrap();
    assert!(read >= back && read <= back * 3 / 2, "read {read} bytes for {back} written");

    // Renamed (libvirt renames a VM only while it is shut off): still the same VM, by its UUID.
    let renamed = format!("{name}-renamed");
    hosts.guests.push(renamed.clone());
    virsh(A, &["destroy", name]);
    virsh(A, &["domrename", name, &renamed]);
    let (code, out, err) = backup_vms(&e, &[&uuid], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    let record = &out[0]["record"];
    assert_eq!(
        (record["name"].as_str(), record["uuid"].as_str()),
        (Some(renamed.as_str()), Some(uuid.as_str())),
        "{record}"
    );
    assert_eq!(out[0]["host"], a.as_str(), "found where it was renamed, not where the old name is defined");
    // Its points, under both names, are one chain: the newest of its UUID is its parent.
    let points: Value = e.json(&["points"]);
    let mine: Vec<&Value> = points.as_array().unwrap().iter().filter(|p| p["vm"]["uuid"] == uuid.as_str()).collect();
    assert!(mine.len() >= 5 && mine.iter().any(|p| p["name"] == renamed.as_str()), "{points}");
}

/// What the guest agent of `name` on `uri` says of its filesystems: "frozen" or "thawed".
fn freeze_status(uri: &str, name: &str) -> String {
    let out = virsh(uri, &["qemu-agent-command", name, r#"{"execute":"guest-fsfreeze-status"}"#]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["return"].as_str().unwrap().to_string()
}

/// A backup of VM `name` (running on host a) through `uri`, which stays frozen `hold` seconds
/// after its point (a testing aid) under a watchdog whose limit is `limit`; returned once the
/// guest is frozen.
fn frozen_backup(e: &Env, name: &str, uri: &str, hold: u32, limit: u32) -> std::process::Child {
    let work = e.path("work");
    let mut backup = e
        .cmd(&["backup", "vm", name, "--host", uri, "--work-dir", work.to_str().unwrap()])
        .args(["--debug-hold", &hold.to_string(), "--freeze-limit", &limit.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while freeze_status(A, name) != "frozen" {
        assert!(t.elapsed().as_secs() < 60, "the guest was never frozen");
        assert!(backup.try_wait().unwrap().is_none(), "the backup ended before the freeze");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    backup
}

#[test]
fn a_backup_killed_while_a_guest_of_another_host_is_frozen_leaves_it_thawed_by_its_watchdog_there() {
    let name = "cluster-frozen";
    let (e, _hosts, _) = guest_running_on_a(name);
    let a = ssh_uri("10.77.0.1");
    // Frozen for 60 s after the point unless something thaws it; the watchdog's own limit is
    // 30 s: a thaw within seconds of the kill is the watchdog seeing its backup gone.
    let mut backup = frozen_backup(&e, name, &a, 60, 30);
    // Meanwhile a second backup server (its own repository and work folder) backs up the same
    // VM: the VM's lock on host a refuses it, instead of it ending the first one's job as a
    // leftover of a killed run.
    let other = Env::new();
    other.init();
    let (code, out, _) = backup_vms(&other, &[name], &[&a]);
    assert_ne!(code, 0);
    let said = out[0]["error"].to_string();
    assert!(said.contains("another cairn backup") && said.contains("10.77.0.1"), "{}", out[0]);
    assert_eq!(freeze_status(A, name), "frozen", "the second server's attempt touched the guest");
    assert!(backup.try_wait().unwrap().is_none(), "the first backup ended");
    unsafe { libc::kill(backup.id() as i32, libc::SIGKILL) };
    backup.wait().unwrap();
    let killed = std::time::Instant::now();
    while freeze_status(A, name) != "thawed" {
        assert!(killed.elapsed().as_secs() < 10, "the guest stayed frozen after its backup was killed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Its backup job was ended there too, and the next run goes through.
    let t = std::time::Instant::now();
    while Command::new("virsh").args(["-q", "-c", A, "backup-dumpxml", name]).output().unwrap().status.success() {
        assert!(t.elapsed().as_secs() < 30, "the killed run's backup job still runs on host a");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (code, out, err) = backup_vms(&e, &[name], &[&a]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["record"]["chain"], "full", "{}", out[0]);
}

#[test]
fn on_a_stock_host_whose_qemu_runs_unprivileged_a_vm_is_backed_up_incrementally_and_recovered() {
    let e = Env::new();
    e.init();
    let mut hosts = Hosts::up(&["c"]);
    let name = "cluster-stock";
    hosts.guest(name, "c");
    wait_for_agent(C, name);
    let live = virsh(C, &["dumpxml", name]);
    let label = live.split("<label>").nth(1).and_then(|l| l.split("</label>").next()).unwrap_or("");
    assert!(!label.is_empty() && !label.starts_with("+0:"), "QEMU runs as root on host c: {label:?}");
    let c = ssh_uri("10.77.0.3");

    let (code, out, err) = backup_vms(&e, &[name], &[&c]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["record"]["method"], "app-consistent", "{}", out[0]);
    let written: u64 = 4 << 20;
    let sum = guest_exec(
        C,
        name,
        "dd if=/dev/urandom of=/data/stock bs=1M count=4 2>/dev/null && sync && sha256sum /data/stock",
    );
    let sum = sum.split_whitespace().next().unwrap().to_string();
    let (code, out, err) = backup_vms(&e, &[name], &[&c]);
    assert_eq!(code, 0, "{err}");
    let record = &out[0]["record"];
    assert_eq!(record["chain"], "incremental", "{record}");
    let read = record["vm_read_bytes"].as_u64().unwrap();
    assert!(read >= written && read <= written * 3 / 2, "read {read} bytes for {written} written");

    let point = format!("{name}@{}", &out[0]["id"].as_str().unwrap()[..8]);
    let restored = format!("{name}-again");
    hosts.guests.push(restored.clone());
    e.json(&[
        "restore",
        "vm",
        &point,
        "--host",
        &c,
        "--storage",
        "/var/lib/libvirt/images",
        "--as",
        &restored,
        "--start",
    ]);
    wait_for_agent(C, &restored);
    let again = guest_exec(C, &restored, "sha256sum /data/stock");
    assert_eq!(again.split_whitespace().next().unwrap(), sum, "the recovered VM does not hold the guest's file");

    // Host devices are checked on the host the VM is recovered onto: a shut-off VM passing
    // through a PCI device nobody has, backed up from its disk on c.
    let dev_vm = format!("{name}-dev");
    hosts.guests.push(dev_vm.clone());
    let disk = Path::new(STATE).join("shared").join(format!("{dev_vm}.qcow2"));
    sh(Command::new("cp").arg("--sparse=always").arg(Path::new(STATE).join("guest/data.qcow2")).arg(&disk));
    let xml = virsh(C, &["dumpxml", "--inactive", name]);
    let uuid_line = xml.lines().find(|l| l.contains("<uuid>")).unwrap().to_string();
    let hostdev = "<hostdev mode='subsystem' type='pci' managed='yes'><source>\
                   <address domain='0x0000' bus='0xfe' slot='0x1f' function='0x7'/></source></hostdev>";
    let xml = xml
        .replace(&uuid_line, "")
        .replace(&format!("<name>{name}</name>"), &format!("<name>{dev_vm}</name>"))
        .replace(&format!("shared/{name}.qcow2"), &format!("shared/{dev_vm}.qcow2"))
        .replacen("</devices>", &format!("{hostdev}</devices>"), 1);
    let file = e.path("dev.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(C, &["define", file.to_str().unwrap()]);
    let (code, out, err) = backup_vms(&e, &[&dev_vm], &[&c]);
    assert_eq!(code, 0, "{err}");
    let point = format!("{dev_vm}@{}", &out[0]["id"].as_str().unwrap()[..8]);
    let storage = "/var/lib/libvirt/images";
    let again = format!("{dev_vm}-again");
    hosts.guests.push(again.clone());
    let args = ["restore", "vm", &point, "--host", &c, "--storage", storage, "--as", &again, "--keep-host-devices"];
    let o = e.run(&args);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && said.contains("host device pci 0000:fe:1f.7"), "{said}");
    let images = Path::new(STATE).join("hosts/c/lib/images");
    let written =
        std::fs::read_dir(&images).unwrap().flatten().any(|f| f.file_name().to_string_lossy().starts_with(&again));
    assert!(!written, "a refused recovery wrote into {}", images.display());
    let mut dropping = args.to_vec();
    dropping.push("--drop-missing");
    let rep = e.json(&dropping);
    assert_eq!(rep["dropped"][0], "host device pci 0000:fe:1f.7", "{rep}");
    assert!(!virsh(C, &["dumpxml", &again]).contains("<hostdev"));
}

/// The state of the instant recovery of VM `name` this machine keeps (cairn_vm::recover): its
/// file and contents.
fn instant_state_of(name: &str) -> (PathBuf, Value) {
    let root = Path::new("/var/lib/cairn/work/instant");
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let file = dir.path().join("state.json");
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let state: Value = serde_json::from_str(&text).unwrap();
        if state["disks"].to_string().contains(&format!("/{name}-vda.instant.qcow2")) {
            return (file, state);
        }
    }
    panic!("no instant recovery state of {name} under {}", root.display());
}

fn process_alive(pid: u64) -> bool {
    // A zombie (exited, not yet reaped by its parent) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn an_instant_recovery_onto_a_stock_host_runs_from_this_machines_repository_and_a_rerun_finishes_it() {
    let e = Env::new();
    e.init();
    let mut hosts = Hosts::up(&["c"]);
    let name = "cluster-inst";
    hosts.guest(name, "c");
    wait_for_agent(C, name);
    let sum = guest_exec(
        C,
        name,
        "dd if=/dev/urandom of=/data/kept bs=1M count=2 2>/dev/null && sync && sha256sum /data/kept",
    );
    let sum = sum.split_whitespace().next().unwrap().to_string();
    let c = ssh_uri("10.77.0.3");
    // Boot-checked on host c (its emulator, QEMU unprivileged), read from the repository here.
    let (code, out, err) = backup_vms_with(&e, &[name], &[&c], &["--verify-boot", "--boot-timeout", "90"]);
    assert_eq!(code, 0, "{err}");
    let check = &out[0]["boot_verification"];
    assert_eq!(check["verdict"], "passed", "{check}");
    assert_eq!(check["method"], "guest agent", "{check}");
    let sandboxes = Path::new(STATE).join("hosts/c/lib/cairn-work/verify");
    let left: Vec<_> = std::fs::read_dir(&sandboxes).unwrap().flatten().map(|f| f.path()).collect();
    assert!(left.is_empty(), "the sandbox left {left:?} on host c");
    let point = format!("{name}@{}", &out[0]["id"].as_str().unwrap()[..8]);

    let restored = format!("{name}-now");
    hosts.guests.push(restored.clone());
    let images = "/var/lib/libvirt/images";
    let args = ["restore", "vm", &point, "--host", &c, "--storage", images, "--as", &restored, "--instant"];
    // Interrupted once the VM runs, as a killed or disconnected recovery would be.
    let mut first = args.to_vec();
    first.push("--debug-stop-after-start");
    let t0 = std::time::Instant::now();
    let o = e.run(&first);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for_agent(C, &restored);
    eprintln!("instant recovery onto host c: guest agent answered after {:.1} s", t0.elapsed().as_secs_f64());
    let blk = virsh(C, &["domblklist", &restored]);
    assert!(blk.contains(".instant.qcow2"), "{blk}");
    // Read on host c, as QEMU's unprivileged user, from the repository here.
    let read = guest_exec(C, &restored, "sha256sum /data/kept");
    assert_eq!(read.split_whitespace().next().unwrap(), sum, "the VM running from the repository reads other data");
    guest_exec(C, &restored, "echo written-meanwhile > /data/meanwhile; sync; echo same-boot > /run/marker");

    // The link to host c is lost (its process killed); the server here keeps running.
    let (state_file, state) = instant_state_of(&restored);
    let link_pid = state["link"]["pid"].as_u64().unwrap();
    let server_pid = state["server_pid"].as_u64().unwrap();
    let host_socket = state["link"]["socket"].as_str().unwrap().to_string();
    assert!(host_socket.starts_with("/var/lib/libvirt/cairn-work/instant/"), "{host_socket}");
    assert!(process_alive(link_pid) && process_alive(server_pid), "{state}");
    sh(Command::new("kill").args(["-KILL", &link_pid.to_string()]));

    // The rerun links it again and moves the disks onto host c's storage while the VM runs.
    let t0 = std::time::Instant::now();
    let o = e.run(&args);
    eprintln!("instant recovery onto host c: the rerun finished in {:.1} s", t0.elapsed().as_secs_f64());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fin = format!("{images}/{restored}-vda.qcow2");
    let blk = virsh(C, &["domblklist", &restored]);
    assert!(blk.contains(&fin), "{blk}");
    assert_eq!(guest_exec(C, &restored, "cat /run/marker /data/meanwhile"), "same-boot\nwritten-meanwhile\n");
    let read = guest_exec(C, &restored, "sha256sum /data/kept; dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null");
    assert_eq!(read.split_whitespace().next().unwrap(), sum);
    assert!(virsh(C, &["dumpxml", &restored, "--inactive"]).contains(&fin));
    // Nothing of the recovery is left: no overlay on c, no link folder there, no state or
    // process here.
    let on_c = Path::new(STATE).join("hosts/c/lib");
    assert_no_instant_files(&on_c.join("images"));
    // WORK/instant/KEY/nbd.sock
    let link_dir = on_c.join(host_socket.trim_start_matches("/var/lib/libvirt/")).parent().unwrap().to_path_buf();
    assert!(!link_dir.exists(), "{} is left on host c", link_dir.display());
    assert!(!state_file.exists(), "{} is left", state_file.display());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!process_alive(server_pid), "the NBD server of the point still runs");
    let links = Command::new("pgrep").args(["-f", &format!("-R {host_socket}")]).output().unwrap();
    assert!(!links.status.success(), "a link to host c still runs");

    // The same recovery by a cairn on host c itself, next to its unprivileged QEMU: the point's
    // server's socket (in a folder of root's) is handed to QEMU's user there.
    hosts.remove(&restored);
    let here = format!("{name}-here");
    hosts.guests.push(here.clone());
    let o = on_host(
        "c",
        e.cmd(&["restore", "vm", &point, "--host", "qemu:///system", "--storage", images, "--as", &here, "--instant"]),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for_agent(C, &here);
    let read = guest_exec(C, &here, "sha256sum /data/kept");
    assert_eq!(read.split_whitespace().next().unwrap(), sum);
    assert!(virsh(C, &["dumpxml", &here, "--inactive"]).contains(&format!("{images}/{here}-vda.qcow2")));
    assert_no_instant_files(&on_c.join("images"));
}

/// No overlay (`*.instant.qcow2`) nor server folder (`.cairn-instant-*`) of an instant recovery
/// is left in `images`.
fn assert_no_instant_files(images: &Path) {
    let left: Vec<String> = std::fs::read_dir(images)
        .unwrap()
        .flatten()
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains("instant"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Runs `cmd` inside host `host` (its namespaces), with `cmd`'s environment.
fn on_host(host: &str, cmd: Command) -> std::process::Output {
    let mut inside = Command::new(hosts_sh());
    inside.args(["exec", host]).arg(cmd.get_program()).args(cmd.get_args()).stdin(std::process::Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => inside.env(k, v),
            None => inside.env_remove(k),
        };
    }
    inside.output().unwrap()
}

#[test]
fn vms_of_two_hosts_in_one_run_and_a_migration_that_copies_the_storage_keeps_the_chain() {
    let e = Env::new();
    e.init();
    let mut hosts = Hosts::up(&["a", "b"]);
    let (a, b) = (ssh_uri("10.77.0.1"), ssh_uri("10.77.0.2"));
    // One VM on shared storage, running on b; one whose disk is in a's own folder, running on a.
    let shared = "cluster-shared";
    hosts.guest(shared, "b");
    let local = "cluster-local";
    hosts.guests.push(local.to_string());
    hosts.remove(local);
    let images = Path::new(STATE).join("hosts/a/lib/images");
    let disk_in_a = images.join(format!("{local}.qcow2"));
    sh(Command::new("cp").arg("--sparse=always").arg(Path::new(STATE).join("guest/data.qcow2")).arg(&disk_in_a));
    let disk = format!("/var/lib/libvirt/images/{local}.qcow2");
    let xml = std::fs::read_to_string(Path::new(STATE).join("shared").join(format!("{shared}.xml")))
        .unwrap()
        .replace(shared, local)
        .replace(&format!("{STATE}/shared/{local}.qcow2"), &disk);
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
    let xml = {
        let start = xml.find("<uuid>").unwrap() + 6;
        let end = xml.find("</uuid>").unwrap();
        format!("{}{uuid}{}", &xml[..start], &xml[end..])
    };
    let file = e.path("local.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(A, &["define", file.to_str().unwrap()]);
    virsh(A, &["start", local]);
    wait_for_agent(A, local);
    wait_for_agent(B, shared);

    // Both in one run, each read on its own host.
    let (code, out, err) = backup_vms(&e, &[local, shared], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((out[0]["vm"].as_str(), out[0]["host"].as_str()), (Some(local), Some(a.as_str())), "{}", out[0]);
    assert_eq!((out[1]["vm"].as_str(), out[1]["host"].as_str()), (Some(shared), Some(b.as_str())), "{}", out[1]);

    // The local VM moves to b with its storage (QEMU copies the disk, and its bitmaps, while the
    // guest runs): the next backup, on b, is still incremental.
    let written: u64 = 4 << 20;
    guest_exec(A, local, "dd if=/dev/urandom of=/data/copied bs=1M count=4 2>/dev/null && sync");
    sh(Command::new(hosts_sh()).args(["exec", "b", "qemu-img", "create", "-q", "-f", "qcow2", &disk, "256M"]));
    virsh(A, &["migrate", "--live", "--copy-storage-all", "--persistent", "--undefinesource", local, B]);
    let (code, out, err) = backup_vms(&e, &[local], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["host"], b.as_str(), "{}", out[0]);
    let record = &out[0]["record"];
    assert_eq!(record["chain"], "incremental", "{record}");
    let read = record["vm_read_bytes"].as_u64().unwrap();
    assert!(read >= written && read <= written * 3 / 2, "read {read} bytes for {written} written");

    // Stopped cleanly on b (QEMU stores the bitmaps in the image): its files are read there, by
    // a qemu-nbd that cairn starts on b, only the changes since the last point.
    guest_exec(B, local, "dd if=/dev/urandom of=/data/offline bs=1M count=1 2>/dev/null && sync");
    virsh(B, &["destroy", "--graceful", local]);
    let (code, out, err) = backup_vms(&e, &[local], &[&a, &b]);
    assert_eq!(code, 0, "{err}");
    let record = &out[0]["record"];
    assert_eq!(
        (record["method"].as_str(), record["chain"].as_str()),
        (Some("offline"), Some("incremental")),
        "{record}"
    );
    let read = record["vm_read_bytes"].as_u64().unwrap();
    assert!(((1 << 20)..=(3 << 19)).contains(&read), "read {read} bytes for 1 MiB written");
}

/// `virsh` run inside a host (its own unix socket), for when the network to it is cut.
fn virsh_inside(host: &str, args: &[&str]) -> std::process::Output {
    Command::new(hosts_sh()).args(["exec", host, "virsh", "-q"]).args(args).output().unwrap()
}

#[test]
fn a_host_cut_off_in_the_middle_of_a_backup_thaws_its_guest_by_itself() {
    let name = "cluster-cut";
    let (e, _hosts, _) = guest_running_on_a(name);
    let a = ssh_uri("10.77.0.1");
    let mut backup = frozen_backup(&e, name, &a, 40, 15);
    // The link between this machine and host a goes down; everything after is asked inside a.
    sh(Command::new("ip").args(["link", "set", "cns-a", "down"]));
    let _up_again = LinkUp("cns-a");
    let cut = std::time::Instant::now();
    let status = r#"{"execute":"guest-fsfreeze-status"}"#;
    loop {
        let o = virsh_inside("a", &["qemu-agent-command", name, status]);
        if String::from_utf8_lossy(&o.stdout).contains("thawed") {
            break;
        }
        // The watchdog on a thaws it at its limit (15 s after the freeze), whatever the network:
        // a stock sshd does not notice a silent client for hours (no ClientAliveInterval).
        assert!(cut.elapsed().as_secs() < 30, "the guest stayed frozen with its backup cut off");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // The watchdog on a hears nothing more from its run (no "alive" for 30 s) and ends the backup
    // job there: no scratch file growing until sshd or the next run notices.
    loop {
        let o = virsh_inside("a", &["backup-dumpxml", name]);
        if !o.status.success() {
            break;
        }
        assert!(
            cut.elapsed().as_secs() < 60,
            "the cut-off run's backup job still runs on host a: {}",
            String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // cairn's side notices too (ServerAliveInterval, libvirt's keepalive), fails that VM, and
    // leaves no point.
    let t = std::time::Instant::now();
    let st = loop {
        if let Some(st) = backup.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed().as_secs() < 120, "cairn hangs on a host that went away");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(!st.success(), "a backup whose host went away succeeded");
    drop(_up_again);
    let points: Value = e.json(&["points"]);
    assert!(points.as_array().unwrap().is_empty(), "{points}");
    // Back on the network, the next run ends what is left on a and goes through.
    let (code, out, err) = backup_vms(&e, &[name], &[&a]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["ok"], true, "{}", out[0]);
}

/// Sets a link up again when dropped (a failed assertion must not leave a host cut off).
struct LinkUp(&'static str);

impl Drop for LinkUp {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "set", self.0, "up"]).status();
    }
}
