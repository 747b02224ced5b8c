//! Backup and restore round trips through the real binary: raw and sparse files, image formats
//! through qemu-nbd, NBD URIs, encryption, and deduplication across images.

mod common;
use common::*;
use std::process::Command;

#[test]
fn raw_sparse_round_trip_is_exact_and_stays_sparse() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 48 * MIB + 12345, 1); // a size that is not a block multiple
    let b = e.backup(&img, "web", &[]);
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(stat(&b, "logical_bytes"), 48 * MIB + 12345);
    assert!(stat(&b, "zero_bytes") > 10 * MIB, "holes and zero blocks must not be stored: {b}");
    assert!(stat(&b, "read_bytes") < stat(&b, "logical_bytes"), "holes must not be read");
    assert!(stat(&b, "stored_bytes") < stat(&b, "new_bytes"), "text blocks must compress");

    let out = e.path("out.img");
    let r = e.restore(&format!("web@{}", &id[..8]), &out, &[]);
    assert!(same_content(&img, &out));
    assert!(allocated(&out) < 40 * MIB, "zero blocks must restore as holes ({} allocated)", allocated(&out));
    assert_eq!(r["report"]["size"], 48 * MIB + 12345);
    assert!(!e.path("out.img.cairn-partial").exists());

    // An existing target is never overwritten without --force.
    let err = e.fails(&["restore", "image", "web", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains("already exists"), "{err}");
    e.restore("web", &out, &["--force"]);
    assert!(same_content(&img, &out));

    let v = e.ok(&["verify"]);
    assert!(v.contains("no damage found"), "{v}");
}

#[test]
fn image_formats_through_qemu_nbd_and_nbd_uris() {
    let e = Env::new();
    e.init();
    let raw = e.path("disk.raw");
    make_image(&raw, 32 * MIB, 2);
    for fmt in ["qcow2", "vhdx", "vmdk"] {
        let img = e.path(&format!("disk.{fmt}"));
        run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", fmt]).arg(&raw).arg(&img));
        let b = e.backup(&img, fmt, &[]);
        assert!(b["point"]["source"].as_str().unwrap().contains(&format!("{fmt} through qemu-nbd")), "{b}");
        // qemu-nbd reports unallocated qcow2 clusters: they are not read. (VHDX and VMDK
        // allocate in large blocks, so QEMU reports their whole extent as data.)
        if fmt == "qcow2" {
            assert!(stat(&b, "read_bytes") < 32 * MIB, "{fmt}: holes were read: {b}");
        }
        let out = e.path(&format!("{fmt}.out"));
        e.restore(fmt, &out, &[]);
        assert!(same_content(&raw, &out), "{fmt} round trip differs");
    }
    // The same content from three formats was stored once.
    let pts = e.json(&["points"]);
    let stored: Vec<u64> = pts.as_array().unwrap().iter().map(|p| p["stored_bytes"].as_u64().unwrap()).collect();
    assert!(stored[0] > 0 && stored[1] == 0 && stored[2] == 0, "formats must dedup: {stored:?}");

    // Restore into qcow2, checked by QEMU itself.
    let q = e.path("restored.qcow2");
    e.restore("qcow2", &q, &["--format", "qcow2"]);
    run_tool(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&q));
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(&q).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info["actual-size"].as_u64().unwrap() < 32 * MIB, "qcow2 restore must stay sparse: {info}");

    // An NBD export read by our client directly.
    let srv = QemuNbd::start(e.dir.path(), &raw, &["--read-only", "--format=raw"]);
    let b = e.backup(std::path::Path::new(&srv.uri()), "nbd", &[]);
    assert_eq!(stat(&b, "stored_bytes"), 0, "same data through NBD must dedup fully: {b}");
    let out = e.path("nbd.out");
    e.restore("nbd", &out, &[]);
    assert!(same_content(&raw, &out));
}

#[test]
fn encrypted_repository_round_trip_and_passwords() {
    let mut e = Env::new();
    e.password = Some("correct horse".into());
    e.ok(&["init", "--encrypt"]);
    let img = e.path("disk.img");
    make_image(&img, 16 * MIB, 3);
    // A recognisable plaintext marker in the image must not appear anywhere in the repository.
    let marker = b"CAIRN-PLAINTEXT-MARKER-0123456789".repeat(2000);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&img).unwrap(),
        &marker,
        4 * MIB,
    )
    .unwrap();
    e.backup(&img, "secret", &[]);
    for kind in ["packs", "index", "points"] {
        for f in e.files(kind) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(!bytes.windows(20).any(|w| w == &marker[..20]), "plaintext found in {}", f.display());
        }
    }
    let out = e.path("out.img");
    e.restore("secret", &out, &[]);
    assert!(same_content(&img, &out));

    e.password = Some("wrong".into());
    let err = e.fails(&["points"], 1);
    assert!(err.contains("wrong password"), "{err}");
    e.password = None;
    let err = e.fails(&["points"], 1);
    assert!(err.contains("CAIRN_PASSWORD"), "{err}");
}

#[test]
fn dedup_across_images_and_restore_points() {
    let e = Env::new();
    e.init();
    let a = e.path("a.img");
    make_image(&a, 32 * MIB, 4);
    let first = e.backup(&a, "a", &[]);
    // b = a with 16 blocks changed (2% of the image).
    let b = e.path("b.img");
    std::fs::copy(&a, &b).unwrap();
    scatter_writes(&b, 16, 44);
    let second = e.backup(&b, "b", &[]);
    assert_eq!(stat(&second, "new_blocks"), 16, "only the changed blocks are new: {second}");
    assert!(stat(&second, "repository_growth_bytes") < 16 * BLOCK * 2, "{second}");
    assert!(stat(&second, "dedup_bytes") > stat(&first, "new_bytes") / 2);
    // The same image again costs nothing but a map.
    let third = e.backup(&a, "a", &[]);
    assert_eq!(stat(&third, "new_blocks"), 0);
    let out = e.path("out");
    e.restore("b", &out, &[]);
    assert!(same_content(&b, &out));
    e.restore("a", &out, &["--force"]);
    assert!(same_content(&a, &out));

    let pts = e.json(&["points", "a"]);
    assert_eq!(pts.as_array().unwrap().len(), 2);
    let human = e.ok(&["points"]);
    assert!(human.contains("DEDUP") && human.lines().count() == 4, "{human}");
}

#[test]
fn a_repository_whose_config_was_altered_to_turn_encryption_off_is_refused() {
    let mut e = Env::new();
    e.password = Some("pw".into());
    e.ok(&["init", "--encrypt"]);
    let img = e.path("disk.img");
    make_image(&img, 4 * MIB, 5);
    e.backup(&img, "x", &[]);
    let config = e.repo().join("config");
    let text = std::fs::read_to_string(&config).unwrap().replace("aes-256-gcm", "none");
    std::fs::write(&config, text).unwrap();
    let packs_before = e.files("packs").len();
    // Without a password (an operator at a terminal), and with one (a scheduled job).
    for password in [None, Some("pw")] {
        e.password = password.map(String::from);
        let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "x"], 1);
        assert!(err.contains("altered"), "{err}");
    }
    assert_eq!(e.files("packs").len(), packs_before, "nothing may be written in plaintext");
    // A plain repository with a password given is the wrong repository, or an altered one.
    let mut plain = Env::new();
    plain.init();
    plain.password = Some("pw".into());
    let err = plain.fails(&["points"], 1);
    assert!(err.contains("not encrypted") && err.contains("CAIRN_PASSWORD"), "{err}");
}

#[test]
fn an_interrupted_backup_and_restore_stop_cleanly_and_the_next_ones_go_through() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};
    let e = Env::new();
    e.init();
    // Incompressible and unique, so that the backup runs long enough to be interrupted.
    let img = e.path("disk.img");
    let mut f = std::fs::File::create(&img).unwrap();
    let (mut rng, mut buf) = (Rng::new(7), vec![0u8; MIB as usize]);
    for _ in 0..512 {
        rng.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
    drop(f);
    // Interrupts `args` once `started` says its work is under way, as a terminal's Ctrl-C does
    // (SIGINT to its whole process group: qemu-nbd too, when it has one); returns the exit and
    // stderr.
    let interrupt = |args: &[&str], started: &dyn Fn() -> bool| {
        use std::os::unix::process::CommandExt;
        let mut child = e.cmd(args).stderr(std::process::Stdio::piped()).process_group(0).spawn().unwrap();
        let t = Instant::now();
        while !started() {
            assert!(child.try_wait().unwrap().is_none(), "cairn {args:?} ended before it could be interrupted");
            assert!(t.elapsed() < Duration::from_secs(120), "cairn {args:?} did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, err) =
        interrupt(&["backup", "image", img.to_str().unwrap(), "--name", "big"], &|| !e.files("packs").is_empty());
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("cancelled while backing up disk"), "{err}");
    assert!(e.json(&["points"]).as_array().unwrap().is_empty(), "an interrupted backup left a point");

    let b = e.backup(&img, "big", &[]);
    let out = e.path("out.img");
    let partial = e.path("out.img.cairn-partial");
    // Into qcow2: written through a qemu-nbd of cairn's, which must outlive the interrupt.
    let (code, err) =
        interrupt(&["restore", "image", "big", "--to", out.to_str().unwrap(), "--format", "qcow2"], &|| {
            std::fs::metadata(&partial).is_ok_and(|m| m.blocks() > 1024)
        });
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("cancelled while restoring disk"), "{err}");
    assert!(!out.exists() && !partial.exists(), "an interrupted restore left an image or its partial file");
    e.restore(&format!("big@{}", &b["id"].as_str().unwrap()[..8]), &out, &["--format", "qcow2"]);
    let raw = e.path("out.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&out).arg(&raw));
    assert!(same_content(&img, &raw));
    let v = e.ok(&["verify"]);
    assert!(v.contains("no damage found"), "{v}");
}
