//! Whole-VM recovery (`cairn restore vm`) against real libvirt and QEMU guests.

mod common;

use common::guest::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An isolated libvirt network (no DHCP, no uplink), removed when dropped.
struct Network {
    name: String,
}

impl Network {
    fn create(tag: &str) -> Network {
        let name = format!("cairn-{tag}-{}", std::process::id());
        let bridge = format!("cbr{}{}", tag.chars().next().unwrap(), std::process::id() % 100000);
        let xml = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&xml, format!("<network><name>{name}</name><bridge name='{bridge}'/></network>")).unwrap();
        let _ = Command::new("virsh").args(["-q", "net-destroy", &name]).output();
        let _ = Command::new("virsh").args(["-q", "net-undefine", &name]).output();
        virsh(&["net-define", xml.to_str().unwrap()]);
        virsh(&["net-start", &name]);
        Network { name }
    }
    fn stop(&self) {
        virsh(&["net-destroy", &self.name]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-q", "net-destroy", &self.name]).output();
        let _ = Command::new("virsh").args(["-q", "net-undefine", &self.name]).output();
    }
}

/// A VM recovered by a test, removed (with its storage files) when dropped.
struct Recovered(String);

impl Drop for Recovered {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-q", "destroy", &self.0]).output();
        let _ = Command::new("virsh").args(["-q", "undefine", &self.0, "--checkpoints-metadata"]).output();
    }
}

fn storage(e: &VmEnv, name: &str) -> PathBuf {
    let d = e.env.path(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn restore_vm(e: &VmEnv, args: &[&str]) -> Value {
    let mut a = vec!["restore", "vm"];
    a.extend_from_slice(args);
    e.env.json(&a)
}

fn dumpxml(name: &str) -> String {
    virsh(&["dumpxml", name, "--inactive"])
}

#[test]
fn recovers_a_vm_next_to_the_original_and_checks_devices_before_writing() {
    let e = VmEnv::new();
    let net = Network::create("rec");
    let g = Guest::start("rec", &["--two-disks", "--network", &net.name]);
    g.exec("echo precious-data > /data/precious.txt; sync");
    let r = e.backup(&g, &[]);
    let point = format!("{}@{}", g.name, &r["id"].as_str().unwrap()[..8]);
    g.exec("echo after-the-backup > /data/precious.txt; sync");

    // As a new VM next to the original: new identity, disks in the storage folder, booted.
    let st = storage(&e, "storage");
    let new_name = format!("{}-copy", g.name);
    let _cleanup = Recovered(new_name.clone());
    let rep = restore_vm(&e, &[&point, "--storage", st.to_str().unwrap(), "--as", &new_name, "--start"]);
    assert_eq!(rep["name"], new_name.as_str());
    assert_eq!(rep["started"], true);
    let orig_uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    assert_ne!(rep["uuid"].as_str().unwrap(), orig_uuid);
    let xml = dumpxml(&new_name);
    let orig_xml = dumpxml(&g.name);
    let mac = |x: &str| x.split("<mac address='").nth(1).map(|m| m[..17].to_string());
    assert!(mac(&xml).is_some() && mac(&xml) != mac(&orig_xml), "MAC not renewed");
    assert!(xml.contains(&net.name));
    for disk in ["vda", "vdb"] {
        let p = st.join(format!("{new_name}-{disk}.qcow2"));
        assert!(xml.contains(p.to_str().unwrap()), "{disk} not in storage: {xml}");
        let info = sh(Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&p));
        assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    }
    sh(Command::new(guest_sh()).args(["wait", &new_name]));
    let copy = Guest { name: new_name.clone() };
    assert_eq!(copy.exec("cat /data/precious.txt").trim(), "precious-data");
    // Swap was not copied, but its header was: the guest has its swap again.
    assert!(copy.exec("cat /proc/swaps").contains("/dev/vdb1"));
    std::mem::forget(copy); // removed by _cleanup; its files live in the test folder
    assert_eq!(g.state(), "running");
    assert_eq!(g.exec("cat /data/precious.txt").trim(), "after-the-backup");

    // A name in use is refused.
    let err = e.env.fails(&["restore", "vm", &point, "--storage", st.to_str().unwrap(), "--as", &g.name], 1);
    assert!(err.contains("already exists"), "{err}");

    // The network is gone: reported before anything is written, then mapped or left out.
    net.stop();
    let st2 = storage(&e, "storage2");
    let err = e.env.fails(&["restore", "vm", &point, "--storage", st2.to_str().unwrap(), "--as", "cairn-never"], 1);
    assert!(err.contains(&format!("network {}", net.name)) && err.contains("--map-network"), "{err}");
    assert!(files_in(&st2).is_empty(), "{:?}", files_in(&st2));
    let other = Network::create("oth");
    let mapped = format!("{}-mapped", g.name);
    let _c2 = Recovered(mapped.clone());
    let map = format!("{}={}", net.name, other.name);
    restore_vm(&e, &[&point, "--storage", st2.to_str().unwrap(), "--as", &mapped, "--map-network", &map]);
    let x = dumpxml(&mapped);
    assert!(x.contains(&format!("network='{}'", other.name)) && !x.contains(&format!("network='{}'", net.name)), "{x}");
    let st3 = storage(&e, "storage3");
    let dropped = format!("{}-nonic", g.name);
    let _c3 = Recovered(dropped.clone());
    let rep = restore_vm(&e, &[&point, "--storage", st3.to_str().unwrap(), "--as", &dropped, "--drop-missing"]);
    assert_eq!(rep["dropped"].as_array().unwrap().len(), 1, "{rep}");
    assert!(!dumpxml(&dropped).contains("<interface"));
}

#[test]
fn replace_with_resume_state_continues_the_guest_where_it_was() {
    let e = VmEnv::new();
    let g = Guest::start("resume", &[]);
    // In memory only (tmpfs): survives a resume, not a boot.
    g.exec("echo in-memory > /run/marker");
    let r = e.backup(&g, &["--method", "saved-state"]);
    assert_eq!(record(&r)["method"], "saved-state");
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    g.exec("echo after-the-backup > /data/after.txt; sync");
    let st = storage(&e, "storage");
    // Without --yes and without a terminal, nothing is replaced.
    let err =
        e.env.fails(&["restore", "vm", &g.name, "--storage", st.to_str().unwrap(), "--replace", "--resume-state"], 1);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(g.state(), "running");
    assert!(files_in(&st).is_empty(), "{:?}", files_in(&st));

    let rep = restore_vm(&e, &[&g.name, "--storage", st.to_str().unwrap(), "--replace", "--yes", "--resume-state"]);
    assert_eq!((rep["replaced"].as_bool(), rep["resumed_state"].as_bool()), (Some(true), Some(true)), "{rep}");
    assert_eq!(rep["uuid"].as_str().unwrap(), uuid);
    assert_eq!(g.state(), "running");
    sh(Command::new(guest_sh()).args(["wait", &g.name]));
    assert_eq!(g.exec("cat /run/marker").trim(), "in-memory");
    assert_eq!(g.exec("test -e /data/after.txt && echo present || echo absent").trim(), "absent");
    assert!(dumpxml(&g.name).contains(st.to_str().unwrap()));
    assert!(!files_in(&st).iter().any(|f| f.contains("memory-state")), "{:?}", files_in(&st));
}

#[test]
fn a_damaged_block_stops_recovery_and_leaves_nothing_behind() {
    let e = VmEnv::new();
    let g = Guest::start("damage", &[]);
    let r = e.backup(&g, &[]);
    let id = r["id"].as_str().unwrap();
    // Flip bytes in the middle of every pack: every data frame there fails its hash check.
    for pack in e.env.files("packs") {
        let mut data = std::fs::read(&pack).unwrap();
        let mid = data.len() / 2;
        for b in &mut data[mid..mid + 64] {
            *b ^= 0xff;
        }
        std::fs::write(&pack, &data).unwrap();
    }
    let st = storage(&e, "storage");
    let name = format!("{}-broken", g.name);
    let err = e.env.fails(
        &["restore", "vm", &format!("{}@{}", g.name, &id[..8]), "--storage", st.to_str().unwrap(), "--as", &name],
        1,
    );
    assert!(err.contains("damaged") || err.contains("hash"), "{err}");
    assert!(files_in(&st).is_empty(), "left behind: {:?}", files_in(&st));
    assert!(!Command::new("virsh").args(["-q", "dominfo", &name]).output().unwrap().status.success(), "VM defined");
    // Not enough room: refused before writing.
    let tiny = e.env.path("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    sh(Command::new("mount").args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"]).arg(&tiny));
    let err = e.env.fails(&["restore", "vm", &g.name, "--storage", tiny.to_str().unwrap()], 1);
    let _ = Command::new("umount").arg(&tiny).output();
    assert!(err.contains("free"), "{err}");
}

#[test]
fn instant_recovery_boots_from_the_repository_and_an_interrupted_move_is_finished_by_a_rerun() {
    // Encrypted: the detached NBD server needs the password, but never in its environment.
    let e = VmEnv::encrypted();
    let g = Guest::start("instant", &[]);
    g.exec("echo precious-data > /data/precious.txt; sync");
    e.backup(&g, &[]);
    let st = storage(&e, "storage");
    let name = format!("{}-inst", g.name);
    let _cleanup = Recovered(name.clone());
    let args =
        ["restore", "vm", g.name.as_str(), "--storage", st.to_str().unwrap(), "--as", name.as_str(), "--instant"];
    // Interrupted right after the start, as a killed or disconnected recovery would be.
    let t0 = std::time::Instant::now();
    let mut first = args.to_vec();
    first.push("--debug-stop-after-start");
    e.env.ok(&first);
    sh(Command::new(guest_sh()).args(["wait", &name]));
    let up = t0.elapsed();
    assert!(up.as_secs_f64() < 15.0, "guest agent answered {:.1} s after the command", up.as_secs_f64());
    eprintln!("instant recovery: guest agent answered after {:.1} s", up.as_secs_f64());
    let copy = Guest { name: name.clone() };
    assert_eq!(copy.exec("cat /data/precious.txt").trim(), "precious-data");
    assert!(virsh(&["domblklist", &name]).contains(".instant.qcow2"));
    // The guest writes while on the overlay; the marker in memory shows it never reboots.
    copy.exec("echo written-during-recovery > /data/during.txt; sync; echo same-boot > /run/marker");
    // The server serves the encrypted repository without the password in its environment.
    let state_file = st.join(format!(".cairn-instant-{name}")).join("state.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let server = state["server_pid"].as_u64().unwrap() as u32;
    assert!(!env_has(server, "CAIRN_PASSWORD"), "the NBD server has the password in its environment");
    // A state file naming an unrelated live process (a reused PID, an older state file).
    let mut unrelated = Command::new("sleep").arg("120").spawn().unwrap();
    state["server_pid"] = unrelated.id().into();
    state["server_start"] = Value::Null;
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();

    // The rerun finishes the move: the VM runs on its own disk, with no tie to the repository.
    e.env.ok(&args);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(unrelated.try_wait().unwrap().is_none(), "the rerun signalled a process it did not start");
    let _ = unrelated.kill();
    let _ = unrelated.wait();
    let blk = virsh(&["domblklist", &name]);
    let fin = st.join(format!("{name}-vda.qcow2"));
    assert!(blk.contains(fin.to_str().unwrap()), "{blk}");
    let info = sh(Command::new("qemu-img").args(["info", "-U"]).arg(&fin));
    assert!(!info.contains("backing file"), "{info}");
    assert!(
        !files_in(&st).iter().any(|f| f.ends_with(".instant.qcow2") || f.starts_with(".cairn-instant")),
        "{:?}",
        files_in(&st)
    );
    // Its own server was found by its socket, and stopped.
    assert!(!Command::new("pgrep").args(["-f", &format!("serve-nbd {}@", g.name)]).output().unwrap().status.success());
    assert_eq!(copy.exec("cat /run/marker").trim(), "same-boot");
    assert_eq!(copy.exec("cat /data/precious.txt /data/during.txt"), "precious-data\nwritten-during-recovery\n");
    // The whole disk reads back from local storage alone.
    copy.exec("dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null");
    assert!(virsh(&["dumpxml", &name, "--inactive"]).contains(fin.to_str().unwrap()));
    std::mem::forget(copy);
}

#[test]
fn resume_state_keeps_what_the_guest_had_swapped_out() {
    let e = VmEnv::new();
    let g = Guest::start("swapres", &["--two-disks"]);
    // Random bytes in tmpfs, more than the guest's free memory: part of them must go to swap
    // (vdb1). Only their checksum, taken now, knows what they are.
    let sum = g
        .exec(
            "mkdir -p /mnt/big && mount -t tmpfs -o size=400M tmpfs /mnt/big && \
             n=$(awk '/MemAvailable/{print int($2/1024)+24}' /proc/meminfo) && \
             dd if=/dev/urandom of=/mnt/big/f bs=1M count=$n 2>/dev/null && sha256sum /mnt/big/f | cut -d' ' -f1",
        )
        .trim()
        .to_string();
    let kib = |k: &str| -> u64 {
        let m = g.exec("cat /proc/meminfo");
        m.lines().find(|l| l.starts_with(k)).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let swapped = kib("SwapTotal:") - kib("SwapFree:");
    eprintln!("{} MiB of the guest's memory in swap", swapped >> 10);
    assert!(swapped > 8 << 10, "only {swapped} KiB in swap: the test would prove nothing");

    let o = e.env.path("oracle");
    let r = e.backup(&g, &["--method", "saved-state", "--debug-oracle", o.to_str().unwrap()]);
    let rec = record(&r);
    assert_eq!(rec["method"], "saved-state");
    // The swap partition is in the point as it was exported: not skipped, not zeros.
    assert_eq!(rec["skipped_swap"].as_array().unwrap().len(), 0, "{rec}");
    let vdb = e.env.path("vdb.raw");
    e.restore(r["id"].as_str().unwrap(), &g.name, "vdb", &vdb);
    assert_same_except(&vdb, &o.join("vdb.raw"), &[]);
    std::fs::remove_file(&vdb).unwrap();

    let st = storage(&e, "storage");
    let rep = restore_vm(&e, &[&g.name, "--storage", st.to_str().unwrap(), "--replace", "--yes", "--resume-state"]);
    assert_eq!(rep["resumed_state"], true, "{rep}");
    sh(Command::new(guest_sh()).args(["wait", &g.name]));
    // The pages come back from swap as they were.
    assert_eq!(g.exec("sha256sum /mnt/big/f | cut -d' ' -f1").trim(), sum);
}

#[test]
fn a_stored_configuration_never_brings_its_own_emulator_or_qemu_arguments() {
    let e = VmEnv::new();
    // A shut-off VM whose configuration (as a tampered repository could hold it) names an
    // emulator of its own (a link to the real one, so it would run) and extra QEMU arguments.
    let name = format!("cairn-qemuns-{}", std::process::id());
    let _ = Command::new(guest_sh()).args(["remove", &name]).output();
    sh(Command::new(guest_sh()).args(["define", &name]));
    let g = Guest { name: name.clone() };
    let emulator = Path::new("/var/lib/cairn-test/vms").join(&name).join("my-qemu");
    std::os::unix::fs::symlink("/usr/bin/qemu-system-x86_64", &emulator).unwrap();
    let xml = dumpxml(&name);
    let start = xml.find("<emulator>").unwrap();
    let end = xml.find("</emulator>").unwrap() + "</emulator>".len();
    let xml = format!("{}<emulator>{}</emulator>{}", &xml[..start], emulator.display(), &xml[end..])
        .replacen("<domain type='qemu'>", "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>", 1)
        .replacen(
            "</domain>",
            "<qemu:commandline><qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/cairn.test,string=tampered'/></qemu:commandline></domain>",
            1,
        );
    let f = e.env.path("tampered.xml");
    std::fs::write(&f, xml).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
    let stored = dumpxml(&name);
    assert!(stored.contains("qemu:commandline") && stored.contains("my-qemu"), "libvirt dropped them: {stored}");
    e.backup(&g, &[]);

    let st = storage(&e, "storage");
    let copy = format!("{name}-restored");
    let _c = Recovered(copy.clone());
    let rep = restore_vm(&e, &[&name, "--storage", st.to_str().unwrap(), "--start"]);
    let said = rep["removed"].to_string();
    assert!(said.contains("qemu:commandline") && said.contains("my-qemu"), "{rep}");
    assert_eq!(rep["started"], true);
    let live = virsh(&["dumpxml", &copy]);
    for x in [live.as_str(), dumpxml(&copy).as_str()] {
        assert!(!x.contains("commandline") && !x.contains("fw_cfg") && !x.contains("my-qemu"), "{x}");
        assert!(x.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"), "{x}");
    }
    // The boot check's sandbox gets the same treatment.
    let o = e.env.run(&["verify", "boot", &name, "--timeout", "60", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("left out <qemu:commandline>") && err.contains("my-qemu"), "{err}");
}

#[test]
fn a_missing_host_device_is_reported_before_writing_and_can_be_left_out() {
    let e = VmEnv::new();
    // A shut-off VM (never started) passing through a PCI device this host does not have.
    let name = format!("cairn-hostdev-{}", std::process::id());
    let _ = Command::new(guest_sh()).args(["remove", &name]).output();
    sh(Command::new(guest_sh()).args(["define", &name]));
    let g = Guest { name: name.clone() };
    let xml = dumpxml(&name);
    let hostdev = "<hostdev mode='subsystem' type='pci' managed='yes'><source>\
                   <address domain='0x0000' bus='0xfe' slot='0x1f' function='0x7'/></source></hostdev>";
    let with = xml.replacen("</devices>", &format!("{hostdev}</devices>"), 1);
    let f = e.env.path("hostdev.xml");
    std::fs::write(&f, with).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
    e.backup(&g, &[]);
    let st = storage(&e, "storage");
    // Host devices are kept only when asked; then a missing one is refused before writing.
    let err = e.env.fails(&["restore", "vm", &name, "--storage", st.to_str().unwrap(), "--keep-host-devices"], 1);
    assert!(err.contains("host device pci 0000:fe:1f.7") && err.contains("--drop-missing"), "{err}");
    assert!(files_in(&st).is_empty(), "{:?}", files_in(&st));
    let copy = format!("{name}-restored");
    let _c = Recovered(copy.clone());
    let rep = restore_vm(&e, &[&name, "--storage", st.to_str().unwrap(), "--keep-host-devices", "--drop-missing"]);
    assert_eq!(rep["dropped"][0], "host device pci 0000:fe:1f.7", "{rep}");
    assert!(!dumpxml(&copy).contains("<hostdev"));
    // Not asked: left out, and said.
    let st2 = storage(&e, "storage2");
    let unasked = format!("{name}-unasked");
    let _c2 = Recovered(unasked.clone());
    let rep = restore_vm(&e, &[&name, "--storage", st2.to_str().unwrap(), "--as", &unasked]);
    assert!(rep["removed"].to_string().contains("host device pci 0000:fe:1f.7"), "{rep}");
    assert!(!dumpxml(&unasked).contains("<hostdev"));
}

#[test]
fn a_stored_configuration_never_reaches_the_host() {
    // A shut-off VM whose configuration (as a tampered repository could hold it, and as libvirt
    // accepts it without running anything) would, once recovered and started, run a script of
    // its choice as root, have virtlogd write a file of its choice, read a host file into the
    // guest, run QEMU as root, give the guest a host file as a CD and share a host folder.
    let e = VmEnv::new();
    let name = format!("cairn-hostile-{}", std::process::id());
    let _ = Command::new(guest_sh()).args(["remove", &name]).output();
    sh(Command::new(guest_sh()).args(["define", &name]));
    let g = Guest { name: name.clone() };
    let watched = e.env.path("watched");
    std::fs::create_dir_all(watched.join("share")).unwrap();
    let w = |f: &str| watched.join(f).to_string_lossy().into_owned();
    for (f, body) in [("up.sh", format!("#!/bin/sh\ntouch {}\n", w("script-ran"))), ("secret", "host secret".into())] {
        std::fs::write(watched.join(f), body).unwrap();
    }
    std::fs::write(watched.join("host.iso"), vec![0u8; 1 << 20]).unwrap();
    sh(Command::new("chmod").arg("755").arg(watched.join("up.sh")));
    let before = files_in(&watched);
    let xml = dumpxml(&name)
        .replacen(
            "<os>",
            &format!(
                "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\
                 <sysinfo type='fwcfg'><entry name='opt/cairn/secret' file='{}'/></sysinfo><os>",
                w("secret")
            ),
            1,
        )
        .replacen(
            "</devices>",
            &format!(
                "<interface type='ethernet'><script path='{up}'/><downscript path='{up}'/><model type='virtio'/></interface>\
                 <serial type='pty'><log file='{log}'/><target port='1'/></serial>\
                 <disk type='file' device='cdrom'><source file='{iso}'/><target dev='sda' bus='sata'/><readonly/></disk>\
                 <filesystem type='mount' accessmode='passthrough'><source dir='{share}'/><target dir='share'/></filesystem>\
                 </devices>",
                up = w("up.sh"),
                log = w("serial1.log"),
                iso = w("host.iso"),
                share = w("share"),
            ),
            1,
        );
    let f = e.env.path("hostile.xml");
    std::fs::write(&f, xml).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
    let stored = dumpxml(&name);
    for x in ["<script", "<log file", "fwcfg", "+0:+0", "host.iso", "<filesystem"] {
        assert!(stored.contains(x), "libvirt did not keep {x}: {stored}");
    }
    e.backup(&g, &[]);

    let st = storage(&e, "storage");
    let copy = format!("{name}-restored");
    let _c = Recovered(copy.clone());
    let rep = restore_vm(&e, &[&name, "--storage", st.to_str().unwrap(), "--start"]);
    assert_eq!(rep["started"], true, "{rep}");
    let said = rep["removed"].to_string();
    for what in
        ["NIC of type ethernet", "up.sh", "log file of serial 1", "fwcfg", "<seclabel>", "host.iso", "host folder"]
    {
        assert!(said.contains(what), "{what} not said: {rep}");
    }
    sh(Command::new(guest_sh()).args(["wait", &copy]));
    for x in [virsh(&["dumpxml", &copy]), dumpxml(&copy)] {
        assert!(!x.contains(watched.to_str().unwrap()), "a watched path is in the recovered VM:\n{x}");
        // (This host's own label, dynamic, is libvirt's: qemu.conf may say root.)
        for gone in ["<script", "type='ethernet'", "<log file", "fwcfg", "type='static'", "<filesystem"] {
            assert!(!x.contains(gone), "{gone} in the recovered VM:\n{x}");
        }
    }
    // The boot check's sandbox gets the same treatment.
    let o = e.env.run(&["verify", "boot", &name, "--timeout", "60", "--json"]);
    let check: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let left_out = check["left_out"].to_string();
    for what in ["fwcfg", "log file of serial 1", "<seclabel>", "host.iso", "host folder"] {
        assert!(left_out.contains(what), "{what} not said: {check}\n{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(check["verdict"], "passed", "{check}");
    // Nothing ran, nothing was written where the configuration said.
    assert_eq!(files_in(&watched), before, "files appeared in the watched folder");
    assert_eq!(std::fs::read_to_string(watched.join("secret")).unwrap(), "host secret");
}

/// A VM recovered instantly from a repository on S3 (the offsite copy): it boots from the
/// bucket through cairn's NBD server, then the rerun moves its disk to local storage.
#[test]
fn instant_recovery_from_a_repository_on_s3() {
    use cairn_storage::test_servers::{Flavor, TestServer};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let mut env = common::Env::on(&server, server.bucket("vms", "offsite"));
    env.password = Some("offsite vm secret".into());
    env.ok(&["init", "--encrypt"]);
    let e = VmEnv { env };
    let g = Guest::start("s3inst", &[]);
    g.exec("echo from-the-bucket > /data/offsite.txt; sync");
    e.backup(&g, &[]);
    let st = storage(&e, "storage");
    let name = format!("{}-rec", g.name);
    let _cleanup = Recovered(name.clone());
    let args =
        ["restore", "vm", g.name.as_str(), "--storage", st.to_str().unwrap(), "--as", name.as_str(), "--instant"];
    let t0 = std::time::Instant::now();
    let mut first = args.to_vec();
    first.push("--debug-stop-after-start");
    e.env.ok(&first);
    sh(Command::new(guest_sh()).args(["wait", &name]));
    eprintln!("instant recovery from S3: guest agent answered after {:.1} s", t0.elapsed().as_secs_f64());
    let copy = Guest { name: name.clone() };
    assert_eq!(copy.exec("cat /data/offsite.txt").trim(), "from-the-bucket");
    // The rerun finishes the move: the disk is local, with no tie to the bucket.
    let t1 = std::time::Instant::now();
    e.env.ok(&args);
    eprintln!("instant recovery from S3: move finished in {:.1} s", t1.elapsed().as_secs_f64());
    let fin = st.join(format!("{name}-vda.qcow2"));
    assert!(virsh(&["domblklist", &name]).contains(fin.to_str().unwrap()));
    let info = sh(Command::new("qemu-img").args(["info", "-U"]).arg(&fin));
    assert!(!info.contains("backing file"), "{info}");
    assert_eq!(copy.exec("cat /data/offsite.txt").trim(), "from-the-bucket");
    std::mem::forget(copy);
}
