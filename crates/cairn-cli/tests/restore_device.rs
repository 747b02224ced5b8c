//! `restore image --to /dev/X --force`: a restore into a block device (an LV, a zvol, a disk),
//! written in place, against a real loop device.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file of 0xAA bytes; detached when dropped.
struct Loop {
    dev: PathBuf,
    file: PathBuf,
}

impl Loop {
    fn new(file: &Path, len: u64) -> Option<Loop> {
        std::fs::write(file, vec![0xAAu8; len as usize]).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup failed (no loop devices here?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop { dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()), file: file.to_path_buf() })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn restore_image_writes_into_a_block_device_in_place() {
    let e = Env::new();
    e.init();
    // Data, written zeros and holes: the zero blocks must reach the device as zeros.
    let img = e.path("disk.raw");
    make_image(&img, 24 * MIB, 7);
    let point = e.backup(&img, "dev", &[]);
    assert!(stat(&point, "zero_bytes") > 0, "{point}");
    let Some(lo) = Loop::new(&e.path("backing"), 32 * MIB) else { return };
    // Through a symbolic link, as /dev/vg/lv is one.
    let link = e.path("lv");
    std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
    let to = link.to_str().unwrap();

    let err = e.fails(&["restore", "image", "dev", "--to", to], 1);
    assert!(err.contains("block device") && err.contains("--force"), "{err}");
    let err = e.fails(&["restore", "image", "dev", "--to", to, "--force", "--format", "qcow2"], 1);
    assert!(err.contains("block device") && err.contains("raw"), "{err}");

    let v = e.json(&["restore", "image", "dev", "--to", to, "--force"]);
    assert_eq!(v["report"]["size"], 24 * MIB, "{v}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    assert!(!e.path("lv.cairn-partial").exists());
    // The device: the image byte for byte, then its old bytes past the image's end.
    let dev = std::fs::read(&lo.file).unwrap();
    let want = std::fs::read(&img).unwrap();
    assert!(dev[..want.len()] == want[..], "the device does not hold the image");
    assert!(dev[want.len()..].iter().all(|b| *b == 0xAA), "bytes past the image were touched");
    // Zero ranges were unmapped, not written (BLKZEROOUT would provision them): the backing
    // file keeps holes there, as a thin LV or a zvol keeps its space free.
    let data = v["report"]["data_bytes"].as_u64().unwrap();
    let tail = 8 * MIB; // the device's old bytes past the image
    assert!(
        allocated(&lo.file) <= data + tail + MIB,
        "{} bytes allocated behind the device for {data} bytes of data",
        allocated(&lo.file)
    );
    // Said so: a device has no holes to leave.
    let out = e.ok(&["restore", "image", "dev", "--to", to, "--force"]);
    assert!(out.contains("zeroed on the device") && !out.contains("sparse"), "{out}");

    // A device smaller than the disk: refused, untouched.
    let small = Loop::new(&e.path("small"), 16 * MIB).unwrap();
    let err = e.fails(&["restore", "image", "dev", "--to", small.dev.to_str().unwrap(), "--force"], 1);
    assert!(err.contains("less than the disk"), "{err}");
    assert!(std::fs::read(&small.file).unwrap().iter().all(|b| *b == 0xAA));
}

/// A transient libvirt VM whose disk is `dev`; destroyed when dropped.
struct Vm(String);

impl Vm {
    fn start(name: &str, dev: &Path) -> Option<Vm> {
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices><disk type='block' device='disk'>\
             <driver name='qemu' type='raw'/><source dev='{}'/><target dev='vdb' bus='virtio'/></disk>\
             </devices></domain>",
            dev.display()
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let out = Command::new("virsh").args(["-q", "create"]).arg(&file).output();
        let _ = std::fs::remove_file(&file);
        match out {
            Ok(o) if o.status.success() => Some(Vm(name.to_string())),
            Ok(o) => panic!("virsh create failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                eprintln!("skipped: no virsh ({e})");
                None
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-q", "destroy", &self.0]).output();
    }
}

#[test]
fn restore_image_refuses_a_block_device_a_running_vm_uses() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.raw");
    make_image(&img, 8 * MIB, 3);
    e.backup(&img, "dev", &[]);
    let Some(lo) = Loop::new(&e.path("backing"), 16 * MIB) else { return };
    let link = e.path("lv");
    std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
    let name = format!("cairn-restore-device-{}", std::process::id());
    let Some(vm) = Vm::start(&name, &lo.dev) else { return };
    // Named by another path (the link): the device number tells.
    let err = e.fails(&["restore", "image", "dev", "--to", link.to_str().unwrap(), "--force"], 1);
    assert!(err.contains(&format!("VM {name} (running), disk vdb")) && err.contains("shut it down"), "{err}");
    assert!(std::fs::read(&lo.file).unwrap().iter().all(|b| *b == 0xAA), "the device was written");
    drop(vm);
    // Stopped: the same restore goes through.
    e.ok(&["restore", "image", "dev", "--to", link.to_str().unwrap(), "--force"]);
    assert!(std::fs::read(&lo.file).unwrap()[..(8 * MIB) as usize] == std::fs::read(&img).unwrap()[..]);
}
