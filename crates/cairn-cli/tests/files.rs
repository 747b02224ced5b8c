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

/// Runs cairn with --json under `strace`, recording its sync calls (with the paths of their
/// descriptors) in `log`; without strace, runs it plainly.
fn strace_syncs(e: &Env, log: &std::path::Path, args: &[&str]) -> serde_json::Value {
    if Command::new("strace").arg("-V").output().is_err() {
        return e.json(args);
    }
    let plain = e.cmd(args);
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,syncfs,sync,sync_file_range", "-o"]).arg(log);
    c.arg(plain.get_program()).args(plain.get_args()).arg("--json");
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The sync calls `strace_syncs` saw on `dir` and descriptors under it, by name; None without
/// a log.
fn syncs_of(log: &std::path::Path, dir: &std::path::Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(log).ok()?;
    let dir = dir.to_str().unwrap();
    Some(
        text.lines()
            .filter_map(|l| {
                // "PID syncfs(5</tmp/x/out>) = 0": the call and the path of its descriptor.
                let call = l.split_whitespace().nth(1)?;
                let (name, rest) = call.split_once('(')?;
                let path = rest.split_once('<')?.1.split('>').next()?;
                (path == dir || path.starts_with(&format!("{dir}/"))).then(|| name.to_string())
            })
            .collect(),
    )
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
    // ext4 allows names of 255 bytes: no temporary suffix may make one too long here.
    let long = "l".repeat(250);
    std::fs::write(src.join("etc/app").join(&long), "long name\n").unwrap();
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
    let app = e.json(&["files", "ls", "filesrv", "disk01", "/etc/app"]);
    assert_eq!(app["entries"].as_array().unwrap().len(), 2, "{app}");
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
    // A tree, with its symlink and its longest name; synced once, not file by file.
    let syncs = e.path("syncs.strace");
    let r = strace_syncs(&e, &syncs, &["files", "get", "filesrv", "disk01", "/etc", "--to", out.to_str().unwrap()]);
    assert_eq!(r["report"]["warnings"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(std::fs::read_to_string(out.join("etc/app/config.toml")).unwrap(), "answer = 42\n");
    assert_eq!(std::fs::read_link(out.join("etc/current")).unwrap().to_str(), Some("app/config.toml"));
    assert_eq!(std::fs::read_to_string(out.join("etc/app").join(&long)).unwrap(), "long name\n");
    if let Some(calls) = syncs_of(&syncs, &out) {
        assert_eq!(calls, ["syncfs"], "sync calls on the copy");
    }
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

/// Every path under `root` (not following symlinks), except the repository.
fn tree(root: &std::path::Path, repo: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.starts_with(repo) {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect()
}

fn positions(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

/// Renames, in a FAT image, every long file name `from` to `to` (no longer): long names are
/// spread over directory entries of attribute 0x0F, 13 characters each at bytes 1, 14 and 28,
/// the last part first, ended by a 0 and padded with 0xFFFF. The names' checksums cover the
/// short name only.
fn fat_rename(img: &mut [u8], from: &str, to: &[u16]) -> usize {
    const SLOTS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    let from: Vec<u16> = from.encode_utf16().collect();
    assert!(from.len() >= to.len());
    let mut to = to.to_vec();
    if to.len() < from.len() {
        to.push(0);
        to.resize(from.len(), 0xffff);
    }
    let mut renamed = 0;
    let mut at = 0;
    while at + 32 <= img.len() {
        // A run of long-name entries starting with the one flagged last (0x40), down to part 1.
        let parts = (img[at] & 0x3f) as usize;
        if img[at + 11] != 0x0f || img[at] & 0x40 == 0 || parts == 0 || at + 32 * (parts + 1) > img.len() {
            at += 32;
            continue;
        }
        let entry = |k: usize| at + 32 * (parts - 1 - k); // part k+1
        let mut name = Vec::new();
        for k in 0..parts {
            for s in SLOTS {
                let e = entry(k);
                name.push(u16::from_le_bytes([img[e + s], img[e + s + 1]]));
            }
        }
        let len = name.iter().position(|&c| c == 0 || c == 0xffff).unwrap_or(name.len());
        if name[..len] == from[..] {
            for (i, c) in to.iter().enumerate() {
                let e = entry(i / 13) + SLOTS[i % 13];
                img[e..e + 2].copy_from_slice(&c.to_le_bytes());
            }
            renamed += 1;
        }
        at += 32 * parts;
    }
    renamed
}

/// In an NTFS image (sector-aligned), renames every name `from` to `to` (no longer) in the
/// files' $FILE_NAME attributes and their folders' index entries alike: the name's length
/// (the byte before its namespace) and its characters. Bytes at the end of a sector are where
/// NTFS keeps its update sequence: a name there would need the array changed too (asserted
/// not).
fn ntfs_rename(img: &mut [u8], from: &str, to: &[u16]) -> usize {
    let hits = positions(img, &utf16(from));
    for &p in &hits {
        assert!((p - 2..p + 2 * to.len()).all(|b| b % 512 < 510), "{from}: a name across a sector's update sequence");
        assert_eq!(img[p - 2] as usize, from.encode_utf16().count());
        img[p - 2] = to.len() as u8;
        for (i, c) in to.iter().enumerate() {
            img[p + 2 * i..p + 2 * i + 2].copy_from_slice(&c.to_le_bytes());
        }
    }
    hits.len()
}

/// The NTFS index entries naming `name`: (offset of the entry, its file reference).
fn ntfs_index_entries(img: &[u8], name: &str) -> Vec<(usize, u64)> {
    positions(img, &utf16(name))
        .into_iter()
        .filter_map(|p| {
            let e = p.checked_sub(0x52)?;
            let key_len = u16::from_le_bytes([img[e + 10], img[e + 11]]) as usize;
            (key_len == 0x42 + 2 * name.encode_utf16().count() && img[p - 2] as usize == name.encode_utf16().count())
                .then(|| (e, u64::from_le_bytes(img[e..e + 8].try_into().unwrap()) & 0xffff_ffff_ffff))
        })
        .collect()
}

/// Mode bits of a path, without following it.
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Names a guest may write into its directories that must never become host paths.
struct Hostile {
    /// (placeholder the tools create, what the name is patched to)
    names: Vec<(String, Vec<u16>)>,
}

impl Hostile {
    fn new(kind: &str, letter: char, escape_to: &std::path::Path) -> Hostile {
        let targets: Vec<Vec<u16>> = vec![
            format!("../../escape-{kind}").encode_utf16().collect(),
            format!("{}/abs-{kind}", escape_to.display()).encode_utf16().collect(),
            "..".encode_utf16().collect(),
            ".".encode_utf16().collect(),
            format!("sub/../../../escape2-{kind}").encode_utf16().collect(),
        ];
        // Distinct placeholders, mixed case and at least 6 characters so that FAT keeps a long
        // name: an upper-case letter, then `letter`s. The letter sorts on the same side of
        // `good.txt` as the name it becomes: NTFS finds names in its index by their order.
        let names = targets
            .into_iter()
            .zip("ABCDS".chars())
            .map(|(t, first)| {
                let p: String = std::iter::once(first).chain(std::iter::repeat_n(letter, t.len().max(6) - 1)).collect();
                (p, t)
            })
            .collect();
        Hostile { names }
    }

    /// Creates the placeholders in `dir`, and a file at `dir` + `escape_to`/abs-KIND, so that
    /// the absolute name resolves in the guest's own tree (a reader that joined paths would
    /// find a file to copy there).
    fn create(&self, dir: &std::path::Path, kind: &str, escape_to: &std::path::Path) {
        for (p, _) in &self.names {
            std::fs::write(dir.join(p), b"guest bytes that must not land outside --to\n").unwrap();
        }
        let inside = dir.join(escape_to.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join(format!("abs-{kind}")), b"resolvable\n").unwrap();
    }
}

/// Runs `files get` of `path` into a fresh folder under `work`, and checks that nothing
/// appeared anywhere but under it. Returns the report and the folder.
fn get_confined(
    e: &Env,
    point: &str,
    volume: &str,
    path: &str,
    work: &std::path::Path,
) -> (serde_json::Value, std::path::PathBuf) {
    let out = work.join(format!("out-{}", volume.replace('/', "-")));
    std::fs::create_dir_all(&out).unwrap();
    let before = tree(e.dir.path(), &e.repo());
    let t = std::time::Instant::now();
    let r = e.json(&["files", "get", point, volume, path, "--to", out.to_str().unwrap()]);
    assert!(t.elapsed().as_secs() < 60, "files get took {:?}", t.elapsed());
    let after = tree(e.dir.path(), &e.repo());
    let outside: Vec<_> = after.difference(&before).filter(|p| !p.starts_with(&out)).collect();
    assert!(outside.is_empty(), "files get {volume} {path} wrote outside --to: {outside:?}");
    // Temporary files (where the filesystem has no O_TMPFILE) are named .cairn-<random>.
    let temporary = |p: &std::path::Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".cairn-"));
    let leftovers: Vec<_> = after.iter().filter(|p| temporary(p)).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    (r["report"].clone(), out)
}

fn warnings(report: &serde_json::Value) -> Vec<String> {
    report["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect()
}

#[test]
fn guest_names_modes_and_loops_never_reach_outside_files_get_destination() {
    let e = Env::new();
    e.init();
    let work = e.path("w");
    std::fs::create_dir_all(&work).unwrap();

    // ext4 (mke2fs -d, no metadata checksums so that debugfs may link a folder into itself):
    // setuid, setgid and sticky modes, and /a/b/loop, a hard link to /a.
    let src = e.path("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::create_dir_all(src.join("shared")).unwrap();
    std::fs::create_dir_all(src.join("group")).unwrap();
    std::fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
    std::fs::write(src.join("a/b/deep.txt"), b"deep\n").unwrap();
    std::fs::write(src.join("group/file"), b"g\n").unwrap();
    let chmod = |p: &str, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    chmod("suid", 0o4755);
    chmod("shared", 0o1777);
    chmod("group", 0o2775);
    let ext4 = e.path("ext4.img");
    run_tool(
        Command::new("mke2fs").args(["-q", "-t", "ext4", "-O", "^metadata_csum", "-d"]).arg(&src).arg(&ext4).arg("16M"),
    );
    run_tool(Command::new("debugfs").args(["-w", "-R", "link /a /a/b/loop"]).arg(&ext4));

    // FAT16 (mkfs.vfat + mtools): hostile long names, and /cyc/sub whose cluster is /cyc's.
    let fat = e.path("fat.img");
    std::fs::File::create(&fat).unwrap().set_len(16 << 20).unwrap();
    run_tool(Command::new("mkfs.vfat").args(["-F", "16"]).arg(&fat));
    let fat_src = e.path("fat-src");
    std::fs::create_dir_all(fat_src.join("dir")).unwrap();
    std::fs::write(fat_src.join("dir/good.txt"), b"good\n").unwrap();
    let fat_names = Hostile::new("fat", 'f', &work);
    fat_names.create(&fat_src.join("dir"), "fat", &work);
    std::fs::create_dir_all(fat_src.join("cyc/sub")).unwrap();
    std::fs::write(fat_src.join("cyc/sub/x.txt"), b"x\n").unwrap();
    let fi = fat.to_str().unwrap().to_string();
    run_tool(
        Command::new("mcopy").args(["-s", "-i", &fi]).arg(fat_src.join("dir")).arg(fat_src.join("cyc")).arg("::/"),
    );
    let mut img = std::fs::read(&fat).unwrap();
    for (p, to) in &fat_names.names {
        assert_eq!(fat_rename(&mut img, p, to), 1, "{p}");
    }
    let short = |name: &[u8; 11]| {
        let at = positions(&img, name).into_iter().find(|&p| p % 32 == 0 && img[p + 11] == 0x10).unwrap();
        (at, u16::from_le_bytes([img[at + 26], img[at + 27]]))
    };
    let ((sub, _), (_, cyc_cluster)) = (short(b"SUB        "), short(b"CYC        "));
    img[sub + 26..sub + 28].copy_from_slice(&cyc_cluster.to_le_bytes());
    std::fs::write(&fat, &img).unwrap();

    // NTFS (mkntfs + ntfs-3g): hostile names (also a NUL inside one, and an empty one), and
    // /loop/inner whose index entry points at /loop's own record.
    let ntfs = e.path("ntfs.img");
    std::fs::File::create(&ntfs).unwrap().set_len(16 << 20).unwrap();
    run_tool(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&ntfs));
    let mnt = e.path("ntfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_tool(Command::new("ntfs-3g").arg(&ntfs).arg(&mnt));
    let mut ntfs_names = Hostile::new("ntfs", 'n', &work);
    ntfs_names.names.push(("NulXbyte".into(), "nul\0byte".encode_utf16().collect()));
    ntfs_names.names.push(("Emptyname".into(), vec![]));
    let filled = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(mnt.join("dir"))?;
        std::fs::write(mnt.join("dir/good.txt"), b"good\n")?;
        ntfs_names.create(&mnt.join("dir"), "ntfs", &work);
        std::fs::create_dir_all(mnt.join("loop/inner"))?;
        std::fs::write(mnt.join("loop/inner/x.txt"), b"x\n")
    })();
    run_tool(Command::new("umount").arg(&mnt));
    filled.unwrap();
    let mut img = std::fs::read(&ntfs).unwrap();
    for (p, to) in &ntfs_names.names {
        assert!(ntfs_rename(&mut img, p, to) >= 2, "{p}: in its record and its folder's index");
    }
    let loop_record = ntfs_index_entries(&img, "loop")[0].1;
    let inner = ntfs_index_entries(&img, "inner");
    assert_eq!(inner.len(), 1);
    img[inner[0].0..inner[0].0 + 6].copy_from_slice(&loop_record.to_le_bytes()[..6]);
    std::fs::write(&ntfs, &img).unwrap();

    // One GPT disk: p1 ext4, p2 FAT, p3 NTFS.
    let disk = e.path("hostile.img");
    std::fs::File::create(&disk).unwrap().set_len(52 << 20).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(&disk).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=16MiB, type=linux\nstart=34816, size=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nstart=67584, size=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
        .unwrap();
    assert!(c.wait().unwrap().success());
    for (part, seek) in [(&ext4, "1"), (&fat, "17"), (&ntfs, "33")] {
        run_tool(
            Command::new("dd").arg(format!("if={}", part.display())).arg(format!("of={}", disk.display())).args([
                "bs=1M",
                &format!("seek={seek}"),
                "conv=notrunc",
                "status=none",
            ]),
        );
    }
    e.backup(&disk, "hostile", &[]);
    let v = e.json(&["files", "ls", "hostile"]);
    assert_eq!(
        volume_list(&v),
        [("disk01".into(), "ext4".into()), ("disk02".into(), "fat".into()), ("disk03".into(), "ntfs".into())]
    );

    // ext4: modes lose setuid, setgid and sticky bits; the folder linked into itself is copied
    // a bounded number of times and reported.
    let (r, out) = get_confined(&e, "hostile", "disk01", "/", &work);
    let root = out.join("root");
    assert_eq!(std::fs::read(root.join("a/b/deep.txt")).unwrap(), b"deep\n");
    assert_eq!(mode(&root.join("suid")), 0o755);
    assert_eq!(mode(&root.join("shared")), 0o777);
    assert_eq!(mode(&root.join("group")), 0o775);
    let w = warnings(&r);
    assert!(w.iter().any(|w| w.contains("/a/b/loop") && w.contains("loop")), "{w:?}");
    assert_eq!(r["skipped"].as_u64().unwrap() as usize, w.len());
    let copies = tree(&root, &e.repo()).iter().filter(|p| p.ends_with("deep.txt")).count();
    assert!((2..=4).contains(&copies), "{copies} copies of the looping folder's file");

    // FAT and NTFS: each bad name is skipped and named, the good entries come out, the loop
    // ends.
    for (volume, names, looped) in [("disk02", &fat_names, "/cyc/sub"), ("disk03", &ntfs_names, "/loop/inner")] {
        let (r, out) = get_confined(&e, "hostile", volume, "/dir", &work);
        assert_eq!(std::fs::read(out.join("dir/good.txt")).unwrap(), b"good\n", "{volume}");
        let w = warnings(&r);
        for (_, to) in &names.names {
            let name = String::from_utf16(to).unwrap();
            assert!(
                w.iter().any(|w| w.contains(&format!("{:?}", format!("/dir/{name}")))),
                "{volume}: {name:?}: {w:?}"
            );
        }
        assert_eq!(r["skipped"].as_u64().unwrap() as usize, names.names.len(), "{volume}: {w:?}");
        let copied: Vec<_> = std::fs::read_dir(out.join("dir")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(copied.len(), 2, "{volume}: only good.txt and tmp/: {copied:?}");
        let inside = out.join("dir").join(work.strip_prefix("/").unwrap());
        assert!(inside.is_dir(), "{volume}: the tree the absolute name resolves to is copied, inside");
        let top = looped.split('/').nth(1).unwrap();
        let (r, out) = get_confined(&e, "hostile", volume, &format!("/{top}"), &work);
        let w = warnings(&r);
        assert!(w.iter().any(|w| w.contains("loop")), "{volume}: {w:?}");
        let depth = tree(&out, &e.repo()).iter().map(|p| p.components().count()).max().unwrap();
        assert!(depth <= out.components().count() + 8, "{volume}: {depth} levels deep");
    }
}

/// File-level recovery from a repository on S3 (s3s-fs on loopback): the same commands, the
/// same bytes.
#[test]
fn files_come_out_of_a_restore_point_on_s3() {
    use cairn_storage::test_servers::{Flavor, TestServer};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let e = Env::on(&server, server.bucket("files", "site"));
    e.init();
    let src = e.path("src");
    std::fs::create_dir_all(src.join("var/lib")).unwrap();
    let mut data = vec![0u8; 6 << 20];
    Rng::new(9).fill(&mut data);
    std::fs::write(src.join("var/lib/db.bin"), &data).unwrap();
    std::fs::write(src.join("var/lib/notes.txt"), "kept offsite\n").unwrap();
    let disk = make_disk(&e, &src);
    e.backup(&disk, "offsite-files", &[]);
    let vols = volume_list(&e.json(&["files", "ls", "offsite-files"]));
    assert_eq!(vols[0], ("disk01".to_string(), "ext4".to_string()));
    let ls = e.json(&["files", "ls", "offsite-files", "disk01", "/var/lib"]);
    assert_eq!(ls["entries"].as_array().unwrap().len(), 2, "{ls}");
    let out = e.path("out");
    std::fs::create_dir_all(&out).unwrap();
    e.json(&["files", "get", "offsite-files", "disk01", "/var/lib", "--to", out.to_str().unwrap()]);
    assert!(std::fs::read(out.join("lib/db.bin")).unwrap() == data, "db.bin differs");
    assert_eq!(std::fs::read_to_string(out.join("lib/notes.txt")).unwrap(), "kept offsite\n");
}
