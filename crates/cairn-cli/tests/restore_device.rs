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

    // A device smaller than the disk: refused, untouched.
    let small = Loop::new(&e.path("small"), 16 * MIB).unwrap();
    let err = e.fails(&["restore", "image", "dev", "--to", small.dev.to_str().unwrap(), "--force"], 1);
    assert!(err.contains("less than the disk"), "{err}");
    assert!(std::fs::read(&small.file).unwrap().iter().all(|b| *b == 0xAA));
}
