//! `cairn serve-nbd`: restore points served read-only over NBD, read by QEMU's own tools.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_reads_a_restore_point_served_over_nbd_and_cannot_write_it() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 64 * MIB + 12345 * 512, 11);
    e.backup(&img, "served", &[]);
    let sock = e.path("nbd.sock");
    let mut child = e
        .cmd(&["serve-nbd", "served", "--socket", sock.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The server prints its exports once it listens.
    let mut out = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    while !out.contains('}') || serde_json::from_str::<serde_json::Value>(&out).is_err() {
        assert!(reader.read_line(&mut out).unwrap() > 0, "serve-nbd ended: {out}");
    }
    let _server = Server(child);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let uri = v["exports"][0]["uri"].as_str().unwrap().to_string();
    assert_eq!(v["exports"][0]["export"], "disk0");

    // qemu-img reads it whole; the copy is the image, byte for byte.
    let copy = e.path("copy.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    assert!(same_content(&img, &copy), "served image differs");
    // Holes are reported (base:allocation), so the copy is as sparse as the image.
    assert!(allocated(&copy) <= allocated(&img) + MIB, "copy {} vs image {}", allocated(&copy), allocated(&img));
    // Our own NBD client too: a backup of the served point is the same point again.
    let again = e.backup(Path::new(&uri), "again", &[]);
    assert_eq!(stat(&again, "new_bytes"), 0, "{again}");
    // Writes are refused.
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 0 4096", &uri]).output().unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success() && text.contains("Permission denied"), "write not refused: {text}");
    let copy2 = e.path("copy2.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy2));
    assert!(same_content(&img, &copy2));
}

use std::path::Path;
