//! File-level recovery (`cairn files ls|get`) from a restore point of a GPT disk with an ext4
//! partition and a swap partition, built with the real mke2fs/mkswap/sfdisk.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// A 200 MiB GPT disk: p1 = 160 MiB ext4 holding `src`, p2 = swap.
fn make_disk(e: &Env, src: &std::path::Path) -> std::path::PathBuf {
    let part = e.path("p1.img");
    run_tool(Command::new("mke2fs").args(["-q", "-t", "ext4", "-L", "files", "-d"]).arg(src).arg(&part).arg("160M"));
    let swap = e.path("p2.img");
    std::fs::File::create(&swap).unwrap().set_len(16 << 20).unwrap();
    run_tool(Command::new("mkswap").arg("-q").arg(&swap));
    let disk = e.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(200 << 20).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(&disk).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=160MiB, type=linux\nstart=329728, size=16MiB, type=swap\n")
        .unwrap();
    assert!(c.wait().unwrap().success());
    run_tool(Command::new("dd").arg(format!("if={}", part.display())).arg(format!("of={}", disk.display())).args([
        "bs=1M",
        "seek=1",
        "conv=notrunc,sparse",
        "status=none",
    ]));
    run_tool(Command::new("dd").arg(format!("if={}", swap.display())).arg(format!("of={}", disk.display())).args([
        "bs=512",
        "seek=329728",
        "conv=notrunc,sparse",
        "status=none",
    ]));
    disk
}

/// (name, filesystem) of each volume in `files ls NAME --json`.
fn volume_list(v: &serde_json::Value) -> Vec<(String, String)> {
    v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap().to_string(), x["filesystem"].as_str().unwrap_or("-").to_string()))
        .collect()
}

#[test]
fn files_come_out_of_a_restore_point_reading_little_more_than_their_size() {
    let e = Env::new();
    e.init();
    let src = e.path("src");
    std::fs::create_dir_all(src.join("etc/app")).unwrap();
    let mut big = vec![0u8; 100 << 20];
    Rng::new(5).fill(&mut big);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("etc/app/config.toml"), "answer = 42\n").unwrap();
    std::os::unix::fs::symlink("app/config.toml", src.join("etc/current")).unwrap();
    let disk = make_disk(&e, &src);
    e.backup(&disk, "filesrv", &[]);

    let v = e.json(&["files", "ls", "filesrv"]);
    let vols = volume_list(&v);
    assert_eq!(vols, [("disk01".to_string(), "ext4".to_string()), ("disk02".to_string(), "swap".to_string())]);

    let ls = e.json(&["files", "ls", "filesrv", "disk01", "/etc"]);
    let names: Vec<(&str, &str)> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("app", "dir"), ("current", "symlink")]);
    // With one ext4 volume, it may be left out.
    let root = e.json(&["files", "ls", "filesrv", "/"]);
    assert!(root["entries"].as_array().unwrap().iter().any(|x| x["name"] == "big.bin" && x["size"] == 100u64 << 20));

    // A 100 MiB file: byte for byte, at most 1.2x its size read from the repository.
    let out = e.path("out");
    std::fs::create_dir_all(&out).unwrap();
    let r = e.json(&["files", "get", "filesrv", "disk01", "/big.bin", "--to", out.to_str().unwrap()]);
    assert!(std::fs::read(out.join("big.bin")).unwrap() == big, "big.bin differs");
    let read = r["report"]["repository_bytes_read"].as_u64().unwrap();
    assert!(read as f64 <= 1.2 * (100u64 << 20) as f64, "read {read} bytes from the repository for a 100 MiB file");
    eprintln!("files get: {read} bytes read for 104857600 ({:.3}x)", read as f64 / (100u64 << 20) as f64);
    // A tree, with its symlink.
    e.json(&["files", "get", "filesrv", "disk01", "/etc", "--to", out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.join("etc/app/config.toml")).unwrap(), "answer = 42\n");
    assert_eq!(std::fs::read_link(out.join("etc/current")).unwrap().to_str(), Some("app/config.toml"));
    // Refusals that say what to do.
    let err = e.fails(&["files", "ls", "filesrv", "disk02", "/"], 1);
    assert!(err.contains("swap"), "{err}");
    let err = e.fails(&["files", "get", "filesrv", "disk01", "/nope", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains("/nope"), "{err}");
    let err = e.fails(&["files", "get", "filesrv", "disk01", "/big.bin", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains("already exists"), "{err}");

    // A damaged block of the file: the copy stops, names the block, leaves no file.
    for pack in e.files("packs") {
        let mut data = std::fs::read(&pack).unwrap();
        let mid = data.len() / 3;
        for b in &mut data[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&pack, &data).unwrap();
    }
    let out2 = e.path("out2");
    std::fs::create_dir_all(&out2).unwrap();
    let err = e.fails(&["files", "get", "filesrv", "disk01", "/big.bin", "--to", out2.to_str().unwrap()], 1);
    assert!(err.contains("damaged") || err.contains("hash") || err.contains("authentic"), "{err}");
    assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 0, "partial file left behind");
}

#[test]
fn mount_exposes_disks_and_partitions_that_loop_mount() {
    let e = Env::new();
    e.init();
    let src = e.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "from the restore point\n").unwrap();
    let disk = make_disk(&e, &src);
    e.backup(&disk, "mnt", &[]);
    let mnt = e.path("mnt");
    let inner = e.path("inner");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&inner).unwrap();
    let mut child = e.cmd(&["mount", "mnt", mnt.to_str().unwrap()]).stdout(Stdio::null()).spawn().unwrap();
    let part = mnt.join("disk01");
    let t = std::time::Instant::now();
    while !part.exists() {
        assert!(t.elapsed().as_secs() < 10, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The partition file is exactly that slice of the disk.
    let whole = std::fs::read(&disk).unwrap();
    let p = std::fs::read(&part).unwrap();
    assert_eq!(p.len(), 160 << 20);
    assert!(p[..] == whole[1 << 20..(1 << 20) + (160 << 20)], "partition content differs");
    assert!(std::fs::read(mnt.join("disk0")).unwrap() == whole, "disk content differs");
    run_tool(Command::new("mount").args(["-o", "loop,ro"]).arg(&part).arg(&inner));
    let text = std::fs::read_to_string(inner.join("hello.txt"));
    let _ = Command::new("umount").arg(&inner).status();
    assert_eq!(text.unwrap(), "from the restore point\n");
    // Ctrl-C unmounts and ends it.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mnt.to_str().unwrap()), "still mounted");
}

#[test]
fn reads_are_safe_while_a_backup_writes_into_the_repository() {
    let e = Env::new();
    e.init();
    let src = e.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 8 << 20];
    Rng::new(9).fill(&mut data);
    std::fs::write(src.join("data.bin"), &data).unwrap();
    let disk = make_disk(&e, &src);
    e.backup(&disk, "steady", &[]);
    // A second, big image is backed up while we read the first one's files and serve it.
    let big = e.path("big.img");
    make_image(&big, 512 * MIB, 3);
    let mut writer = e.cmd(&["backup", "image", big.to_str().unwrap(), "--name", "busy", "-q"]).spawn().unwrap();
    for i in 0..5 {
        let out = e.path(&format!("out{i}"));
        e.json(&["files", "get", "steady", "disk01", "/data.bin", "--to", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == data);
        let img = e.path(&format!("restored{i}.img"));
        e.restore("steady", &img, &[]);
        assert!(same_content(&img, &disk));
        std::fs::remove_file(&img).unwrap();
    }
    assert!(writer.wait().unwrap().success());
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

/// A Windows-style disk: GPT with a FAT32 EFI system partition (p1, filled with mtools) and an
/// NTFS partition (p2, made by mkntfs and filled through ntfs-3g).
fn make_windows_disk(e: &Env, big: &[u8]) -> std::path::PathBuf {
    let esp = e.path("esp.img");
    std::fs::File::create(&esp).unwrap().set_len(40 << 20).unwrap();
    run_tool(Command::new("mkfs.vfat").args(["-F", "32", "-n", "EFI"]).arg(&esp));
    let boot = e.path("bootx64.efi");
    std::fs::write(&boot, b"MZ not really a boot loader\n").unwrap();
    let img = format!("{}", esp.display());
    run_tool(Command::new("mmd").args(["-i", &img, "::/EFI", "::/EFI/Boot"]));
    run_tool(Command::new("mcopy").args(["-i", &img]).arg(&boot).arg("::/EFI/Boot/bootx64.efi"));

    let ntfs = e.path("ntfs.img");
    std::fs::File::create(&ntfs).unwrap().set_len(120 << 20).unwrap();
    run_tool(Command::new("mkntfs").args(["-F", "-Q", "-q", "-L", "Windows"]).arg(&ntfs));
    let mnt = e.path("ntfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_tool(Command::new("ntfs-3g").arg(&ntfs).arg(&mnt));
    let filled = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(mnt.join("Users/Alice/Documents"))?;
        std::fs::write(mnt.join("Users/Alice/Documents/Quarterly Report 2026.txt"), "revenue: up\r\n")?;
        std::fs::write(mnt.join("Users/Alice/big.bin"), big)?;
        std::fs::write(mnt.join("pagefile.sys"), vec![7u8; 1 << 20])?;
        Ok(())
    })();
    run_tool(Command::new("umount").arg(&mnt));
    filled.unwrap();

    let disk = e.path("win.img");
    std::fs::File::create(&disk).unwrap().set_len(200 << 20).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(&disk).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=40MiB, type=uefi\nstart=83968, size=120MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
        .unwrap();
    assert!(c.wait().unwrap().success());
    for (part, seek) in [(&esp, "1"), (&ntfs, "41")] {
        run_tool(
            Command::new("dd").arg(format!("if={}", part.display())).arg(format!("of={}", disk.display())).args([
                "bs=1M",
                &format!("seek={seek}"),
                "conv=notrunc,sparse",
                "status=none",
            ]),
        );
    }
    disk
}

#[test]
fn files_come_out_of_ntfs_and_fat_volumes() {
    let e = Env::new();
    e.init();
    let mut big = vec![0u8; 30 << 20];
    Rng::new(11).fill(&mut big);
    let disk = make_windows_disk(&e, &big);
    e.backup(&disk, "winsrv", &[]);

    let v = e.json(&["files", "ls", "winsrv"]);
    let vols = volume_list(&v);
    assert_eq!(vols, [("disk01".to_string(), "fat".to_string()), ("disk02".to_string(), "ntfs".to_string())]);

    // NTFS: the root without the metadata files ($MFT, ...), names as Windows shows them.
    let names = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["name"].as_str().unwrap().to_string(), x["kind"].as_str().unwrap().to_string()))
            .collect()
    };
    let root = e.json(&["files", "ls", "winsrv", "disk02", "/"]);
    let root_names = names(&root);
    assert!(root_names.contains(&("Users".into(), "dir".into())), "{root_names:?}");
    assert!(root_names.contains(&("pagefile.sys".into(), "file".into())), "{root_names:?}");
    assert!(root_names.iter().all(|(n, _)| !n.starts_with('$') && n != "."), "{root_names:?}");
    let docs = e.json(&["files", "ls", "winsrv", "disk02", "/Users/Alice/Documents"]);
    assert_eq!(names(&docs), [("Quarterly Report 2026.txt".to_string(), "file".to_string())]);
    let alice = e.json(&["files", "ls", "winsrv", "disk02", "/Users/Alice"]);
    let big_entry = alice["entries"].as_array().unwrap().iter().find(|x| x["name"] == "big.bin").unwrap().clone();
    assert_eq!(big_entry["size"], 30u64 << 20);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((big_entry["modified"].as_i64().unwrap() - now).abs() < 600, "{big_entry}");

    // Windows paths are case-insensitive; a file and a whole tree come out byte for byte.
    let out = e.path("out");
    std::fs::create_dir_all(&out).unwrap();
    let r = e.json(&[
        "files",
        "get",
        "winsrv",
        "disk02",
        "/users/alice/BIG.BIN",
        "--to",
        out.join("big.bin").to_str().unwrap(),
    ]);
    assert!(std::fs::read(out.join("big.bin")).unwrap() == big, "big.bin differs");
    let read = r["report"]["repository_bytes_read"].as_u64().unwrap();
    assert!(read as f64 <= 1.2 * big.len() as f64, "read {read} bytes for a 30 MiB file");
    e.json(&["files", "get", "winsrv", "disk02", "/Users", "--to", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(out.join("Users/Alice/Documents/Quarterly Report 2026.txt")).unwrap(),
        "revenue: up\r\n"
    );
    assert!(std::fs::read(out.join("Users/Alice/big.bin")).unwrap() == big);

    // FAT32: the EFI system partition.
    let efi = e.json(&["files", "ls", "winsrv", "disk01", "/EFI/Boot"]);
    assert_eq!(names(&efi), [("bootx64.efi".to_string(), "file".to_string())]);
    e.json(&[
        "files",
        "get",
        "winsrv",
        "disk01",
        "/efi/boot/BOOTX64.EFI",
        "--to",
        out.join("boot.efi").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(out.join("boot.efi")).unwrap(), b"MZ not really a boot loader\n");
    let err = e.fails(&["files", "ls", "winsrv", "disk02", "/Users/Bob"], 1);
    assert!(err.contains("/Users/Bob"), "{err}");
}

/// Runs an LVM tool on one device only, without device-mapper (volumes stay inactive) and
/// without writing metadata backups to the host's /etc/lvm.
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

/// A GPT disk whose partition 1 is an LVM physical volume (made by the real lvm tools) of
/// volume group `cairntest`: `data` (60 MiB in two segments, the second after `small`) holds
/// an ext4 filesystem with `src`; `small` (20 MiB) holds nothing. Returns the disk and the
/// ext4 image written into `data`.
fn make_lvm_disk(e: &Env, src: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pv = e.path("pv.img");
    std::fs::File::create(&pv).unwrap().set_len(120 << 20).unwrap();
    let out = Command::new("losetup").args(["-f", "--show"]).arg(&pv).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let made = std::panic::catch_unwind(|| {
        lvm(&dev, &["pvcreate", "-q", &dev]);
        lvm(&dev, &["vgcreate", "-q", "cairntest", &dev]);
        lvm(&dev, &["lvcreate", "-q", "-an", "-Zn", "-L", "40M", "-n", "data", "cairntest"]);
        lvm(&dev, &["lvcreate", "-q", "-an", "-Zn", "-L", "20M", "-n", "small", "cairntest"]);
        lvm(&dev, &["lvextend", "-q", "-L", "+20M", "cairntest/data"]);
        let pe_start: u64 =
            lvm(&dev, &["pvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "pe_start"]).trim().parse().unwrap();
        // "0 10 /dev/loop0:0-9" per segment: start and size in extents (4 MiB), PV extents.
        let segs =
            lvm(&dev, &["lvs", "--noheadings", "-o", "seg_start_pe,seg_size_pe,seg_pe_ranges", "cairntest/data"]);
        (pe_start, segs)
    });
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let (pe_start, segs) = made.unwrap();
    let fs = e.path("lv.img");
    run_tool(Command::new("mke2fs").args(["-q", "-t", "ext4", "-d"]).arg(src).arg(&fs).arg("60M"));
    let segments: Vec<Vec<u64>> = segs
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let first_pe = f[2].rsplit(':').next().unwrap().split('-').next().unwrap();
            vec![f[0].parse().unwrap(), f[1].parse().unwrap(), first_pe.parse().unwrap()]
        })
        .collect();
    assert_eq!(segments.len(), 2, "{segs}");
    for s in &segments {
        run_tool(Command::new("dd").arg(format!("if={}", fs.display())).arg(format!("of={}", pv.display())).args([
            "bs=1M",
            &format!("skip={}", s[0] * 4),
            &format!("seek={}", pe_start / (1 << 20) + s[2] * 4),
            &format!("count={}", s[1] * 4),
            "conv=notrunc",
            "status=none",
        ]));
    }
    let disk = e.path("lvm-disk.img");
    std::fs::File::create(&disk).unwrap().set_len(130 << 20).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(&disk).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(b"label: gpt\nstart=2048, size=120MiB, type=lvm\n").unwrap();
    assert!(c.wait().unwrap().success());
    run_tool(Command::new("dd").arg(format!("if={}", pv.display())).arg(format!("of={}", disk.display())).args([
        "bs=1M",
        "seek=1",
        "conv=notrunc,sparse",
        "status=none",
    ]));
    (disk, fs)
}

#[test]
fn files_come_out_of_lvm_logical_volumes_in_several_segments() {
    let e = Env::new();
    e.init();
    let src = e.path("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    // Larger than the volume's first segment (40 MiB): its end lies in the second.
    let mut big = vec![0u8; 45 << 20];
    Rng::new(13).fill(&mut big);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("etc/hostname"), "lvm-guest\n").unwrap();
    let (disk, fs) = make_lvm_disk(&e, &src);
    e.backup(&disk, "lvmsrv", &[]);

    let v = e.json(&["files", "ls", "lvmsrv"]);
    assert_eq!(
        volume_list(&v),
        [
            ("disk01".to_string(), "lvm".to_string()),
            ("cairntest/data".to_string(), "ext4".to_string()),
            ("cairntest/small".to_string(), "-".to_string())
        ]
    );
    let data = v["volumes"].as_array().unwrap().iter().find(|x| x["name"] == "cairntest/data").unwrap();
    assert_eq!(data["length"], 60u64 << 20);
    assert_eq!(data["runs"].as_array().unwrap().len(), 2, "{data}");

    // The one filesystem may be left out; a file across both segments comes out whole.
    let root = e.json(&["files", "ls", "lvmsrv", "/etc"]);
    assert_eq!(root["entries"][0]["name"], "hostname");
    let out = e.path("out");
    std::fs::create_dir_all(&out).unwrap();
    e.json(&["files", "get", "lvmsrv", "cairntest/data", "/big.bin", "--to", out.to_str().unwrap()]);
    assert!(std::fs::read(out.join("big.bin")).unwrap() == big, "big.bin differs");

    // `cairn mount` shows the volume as one file, byte for byte the filesystem image.
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = e.cmd(&["mount", "lvmsrv", mnt.to_str().unwrap()]).stdout(Stdio::null()).spawn().unwrap();
    let node = mnt.join("cairntest-data");
    let t = std::time::Instant::now();
    while !node.exists() {
        assert!(t.elapsed().as_secs() < 10, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let same = std::fs::read(&node).unwrap() == std::fs::read(&fs).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(same, "the mounted volume differs from the filesystem image");
}
