//! A guest's disks are the guest's to write: partition tables and LVM metadata crafted to crash,
//! hang or balloon the host-side backup (the audit's §10.4 #2) must cost a warning, never the
//! backup. A shut-off libvirt VM over crafted disks, backed up by the real `cairn`; its LVM
//! physical volumes made by the real lvm tools, then patched.

mod common;

use common::guest::*;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs an LVM tool on one device only, without device-mapper and without writing metadata
/// backups to the host's /etc/lvm.
fn lvm(dev: &str, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .args(["--driverloaded", "n", "--devices", dev, "--config", "backup { backup = 0 archive = 0 }"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A 24 MiB LVM physical volume of VG `vg` with an 8 MiB volume `swap_1` that starts with a
/// swap signature. Returns the PV's bytes and where `swap_1` starts in it.
fn make_pv(e: &Env, vg: &str) -> (Vec<u8>, usize) {
    let pv = e.path(&format!("{vg}.img"));
    std::fs::File::create(&pv).unwrap().set_len(24 << 20).unwrap();
    let out = Command::new("losetup").args(["-f", "--show"]).arg(&pv).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let made = std::panic::catch_unwind(|| {
        lvm(&dev, &["pvcreate", "-q", &dev]);
        lvm(&dev, &["vgcreate", "-q", "-s", "1M", vg, &dev]);
        lvm(&dev, &["lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "swap_1", vg]);
        lvm(&dev, &["pvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "pe_start"])
            .trim()
            .parse::<usize>()
            .unwrap()
    });
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let pe_start = made.unwrap();
    let swap = e.path("swap-sig");
    std::fs::File::create(&swap).unwrap().set_len(8 << 20).unwrap();
    run_tool(Command::new("mkswap").arg("-q").arg(&swap));
    let mut bytes = std::fs::read(&pv).unwrap();
    bytes[pe_start..pe_start + 4096].copy_from_slice(&std::fs::read(&swap).unwrap()[..4096]);
    (bytes, pe_start)
}

/// The offset of a PV's first metadata area, from its label (sector 1, PV header at +32: uuid,
/// size, data areas and metadata areas, each list ended by zeros).
fn metadata_area(pv: &[u8]) -> usize {
    assert_eq!(&pv[512..520], b"LABELONE");
    let le64 = |at: usize| u64::from_le_bytes(pv[at..at + 8].try_into().unwrap());
    let mut at = 512 + 32 + 40;
    while le64(at) != 0 {
        at += 16; // data areas
    }
    at += 16;
    let mda = le64(at) as usize;
    assert_eq!(&pv[mda + 4..mda + 20], b" LVM2 x[5A%r0N*>");
    mda
}

/// A raw image of `size` bytes with a partition table (sfdisk script) and `parts` written at
/// their MiB offsets.
fn disk(path: &Path, size: u64, table: &str, parts: &[(&[u8], u64)]) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(path).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (bytes, mib) in parts {
        use std::os::unix::fs::FileExt;
        f.write_all_at(bytes, mib << 20).unwrap();
    }
}

/// The highest resident set of any child process waited for so far, in bytes.
fn children_peak_rss() -> u64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

#[test]
fn crafted_tables_and_lvm_metadata_cost_a_warning_not_the_backup() {
    let e = VmEnv::new();
    let env = &e.env;
    // vda, MBR: three PVs. p1's metadata is nested 100 000 deep, p2's metadata area header
    // claims 2^41 bytes holding 2^40 bytes of text, p3 is sound: its swap volume is skipped.
    let (mut nested, _) = make_pv(env, "cairnnested");
    let mda = metadata_area(&nested);
    let text = format!("cairnnested {}", "{ a ".repeat(100_000));
    nested[mda + 512..mda + 512 + text.len()].copy_from_slice(text.as_bytes());
    nested[mda + 40..mda + 48].copy_from_slice(&512u64.to_le_bytes());
    nested[mda + 48..mda + 56].copy_from_slice(&(text.len() as u64).to_le_bytes());
    let (mut huge, _) = make_pv(env, "cairnhuge");
    let mda = metadata_area(&huge);
    huge[mda + 32..mda + 40].copy_from_slice(&(1u64 << 41).to_le_bytes());
    huge[mda + 48..mda + 56].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (sound, pe_start) = make_pv(env, "cairnsound");
    let vda = env.path("vda.raw");
    disk(
        &vda,
        80 << 20,
        "label: dos\nstart=2048, size=24MiB, type=8e\nstart=51200, size=24MiB, type=8e\nstart=100352, size=24MiB, type=8e\n",
        &[(&nested, 1), (&huge, 25), (&sound, 49)],
    );
    // vdb, GPT: its partition entries said to lie at sector 2^40, far past the end.
    let vdb = env.path("vdb.raw");
    disk(&vdb, 16 << 20, "label: gpt\nstart=2048, size=8MiB, type=linux\n", &[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&vdb).unwrap();
        f.write_all_at(&(1u64 << 40).to_le_bytes(), 512 + 72).unwrap();
    }

    // A shut-off VM over them (its disks are read from the files).
    let name = format!("cairn-hostile-{}", std::process::id());
    let _ = Command::new(guest_sh()).args(["remove", &name]).output();
    sh(Command::new(guest_sh()).args(["define", &name, "--two-disks"]));
    let g = Guest { name: name.clone() };
    for (raw, target) in [(&vda, "vda"), (&vdb, "vdb")] {
        run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(g.disk(target)));
    }

    let t = std::time::Instant::now();
    let r = e.backup(&g, &[]);
    let took = t.elapsed();
    let peak = children_peak_rss();
    eprintln!("backup of the crafted disks: {took:?}, peak RSS of a child {} MiB", peak >> 20);
    assert!(took.as_secs() < 60, "{took:?}");
    assert!(peak < 300 << 20, "a child process peaked at {} MiB", peak >> 20);
    let rec = record(&r);
    assert_eq!(rec["method"], "offline", "{rec}");
    let warnings: Vec<&str> = rec["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    let has =
        |disk: &str, what: &str| warnings.iter().any(|w| w.starts_with(&format!("disk {disk}: ")) && w.contains(what));
    assert!(has("vda", "partition 1: LVM2 metadata: nested more than 64 deep"), "{warnings:#?}");
    assert!(has("vda", "partition 2: LVM2 metadata area"), "{warnings:#?}");
    assert!(has("vdb", "partition table") && has("vdb", "past the end"), "{warnings:#?}");
    // What could be read still counts: the sound PV's swap volume is skipped.
    let skipped = rec["skipped_swap"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    let swap_at = (49u64 << 20) + pe_start as u64;
    assert_eq!(
        (skipped[0]["disk"].as_str(), skipped[0]["location"].as_str()),
        (Some("vda"), Some("lvm volume cairnsound/swap_1"))
    );
    assert_eq!(skipped[0]["offset"].as_u64(), Some(swap_at + 65536));

    // The point restores byte for byte (the skipped swap as zeros after its header).
    let id = r["id"].as_str().unwrap();
    for (raw, target, zeroed) in [(&vda, "vda", vec![(swap_at + 65536, (8 << 20) - 65536)]), (&vdb, "vdb", vec![])] {
        let out: PathBuf = env.path(&format!("restored-{target}.raw"));
        e.restore(id, &name, target, &out);
        assert_same_except(&out, raw, &zeroed);
    }

    // File-level recovery lists what it can and says what it cannot; mount shows the disks.
    let v = env.json(&["files", "ls", &name]);
    let vols = v["volumes"].as_array().unwrap();
    let vol = |n: &str| vols.iter().find(|x| x["name"] == n).unwrap_or_else(|| panic!("no {n} in {v}"));
    assert!(vol("vdb")["problem"].as_str().unwrap().contains("past the end"), "{v}");
    assert!(vol("vda1")["problem"].as_str().unwrap().contains("nested"), "{v}");
    assert!(vol("vda2")["problem"].as_str().unwrap().contains("metadata area"), "{v}");
    assert_eq!(vol("cairnsound/swap_1")["filesystem"], "swap");
    let err = env.fails(&["files", "ls", &name, "vda1", "/"], 1);
    assert!(err.contains("lvm"), "{err}");
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = env.cmd(&["mount", &name, mnt.to_str().unwrap()]).stdout(Stdio::null()).spawn().unwrap();
    let node = mnt.join("vdb");
    let t = std::time::Instant::now();
    while !node.exists() {
        assert!(t.elapsed().as_secs() < 10, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let same = std::fs::read(&node).unwrap() == std::fs::read(&vdb).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(same, "the mounted disk differs");
}
