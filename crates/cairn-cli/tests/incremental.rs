//! Incremental backups: changed ranges from a file or a QEMU dirty bitmap read only what
//! changed, and every restore point still restores to its own exact image.

mod common;
use common::*;
use std::process::Command;

fn ranges_file(e: &Env, name: &str, offs: &[u64], len: u64) -> std::path::PathBuf {
    let p = e.path(name);
    let text: String = offs.iter().map(|o| format!("{o} {len}\n")).collect();
    std::fs::write(&p, format!("# changed since the last backup\n{text}")).unwrap();
    p
}

#[test]
fn changed_ranges_read_only_what_changed_and_every_point_restores() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 64 * MIB, 5);
    let v1 = e.path("v1.img");
    std::fs::copy(&img, &v1).unwrap();
    let full = e.backup(&img, "db", &[]);

    let offs = scatter_writes(&img, 20, 55);
    let ranges = ranges_file(&e, "changed.txt", &offs, BLOCK);
    let inc = e.backup(&img, "db", &["--changed-ranges", ranges.to_str().unwrap()]);
    assert_eq!(inc["point"]["stats"]["mode"], "changed-ranges");
    assert_eq!(inc["point"]["parent"], full["id"]);
    assert_eq!(stat(&inc, "read_bytes"), 20 * BLOCK, "exactly the changed blocks are read: {inc}");
    assert_eq!(stat(&inc, "new_blocks"), 20);
    assert_eq!(stat(&inc, "unchanged_bytes"), 64 * MIB - 20 * BLOCK);
    assert!(stat(&inc, "repository_growth_bytes") < 2 * 20 * BLOCK, "{inc}");

    // Unaligned ranges widen to whole blocks; JSON form as `nbdinfo --map --json` prints it.
    let v2 = e.path("v2.img");
    std::fs::copy(&img, &v2).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"small change", 3 * MIB + 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![7u8; 70000], 9 * MIB - 10).unwrap();
    let j = e.path("changed.json");
    std::fs::write(
        &j,
        format!(
            r#"[{{"offset":{},"length":12,"type":1,"description":"dirty"}},{{"offset":0,"length":1,"type":0,"description":"clean"}},{{"offset":{},"length":70000}}]"#,
            3 * MIB + 100,
            9 * MIB - 10
        ),
    )
    .unwrap();
    let inc2 = e.backup(&img, "db", &["--changed-ranges", j.to_str().unwrap()]);
    assert_eq!(stat(&inc2, "read_bytes"), 4 * BLOCK, "1 block + 70000 bytes across 3 blocks: {inc2}");

    // Every point restores to the image as it was.
    let pts = e.json(&["points", "db"]);
    let ids: Vec<String> = pts.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3);
    for (id, expect) in ids.iter().zip([&v1, &v2, &img]) {
        let out = e.path(&format!("r-{}", &id[..8]));
        e.restore(&format!("db@{}", &id[..12]), &out, &[]);
        assert!(same_content(expect, &out), "point {id} differs");
    }

    // Without ranges: everything is read again, but only changed blocks are stored.
    scatter_writes(&img, 5, 555);
    let reread = e.backup(&img, "db", &[]);
    assert_eq!(reread["point"]["stats"]["mode"], "full");
    assert_eq!(stat(&reread, "new_blocks"), 5);
    assert!(stat(&reread, "read_bytes") > 30 * MIB);
    assert!(e.ok(&["verify"]).contains("no damage found"));
}

#[test]
fn dirty_bitmap_of_a_qcow2_drives_the_incremental() {
    let e = Env::new();
    e.init();
    let raw = e.path("base.raw");
    make_image(&raw, 32 * MIB, 6);
    let q = e.path("vm.qcow2");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&q));
    e.backup(&q, "vm", &[]);
    run_tool(Command::new("qemu-img").args(["bitmap", "--add", "-f", "qcow2"]).arg(&q).arg("since-full"));
    run_tool(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 5M 64k", "-c", "write -P 0xcd 20M 192k"])
            .arg(&q),
    );
    let inc = e.backup(&q, "vm", &["--dirty-bitmap", "since-full"]);
    assert_eq!(stat(&inc, "read_bytes"), 4 * BLOCK, "{inc}");
    let out = e.path("out.raw");
    e.restore("vm", &out, &[]);
    let expect = e.path("expect.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&q).arg(&expect));
    assert!(same_content(&expect, &out));

    let err = e.fails(&["backup", "image", q.to_str().unwrap(), "--name", "vm", "--dirty-bitmap", "nope"], 1);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn changed_ranges_refuse_what_they_cannot_describe() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 8 * MIB, 7);
    let r = ranges_file(&e, "c.txt", &[0], BLOCK);
    let rs = r.to_str().unwrap();
    // No previous point: the first backup must be full.
    let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "x", "--changed-ranges", rs], 1);
    assert!(err.contains("first backup must read everything"), "{err}");
    e.backup(&img, "x", &[]);
    // The image grew: changed ranges cannot describe that.
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(9 * MIB).unwrap();
    let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "x", "--changed-ranges", rs], 1);
    assert!(err.contains("cannot describe a resize"), "{err}");
    // A range beyond the end, and a malformed file.
    std::fs::write(&r, format!("{} 10\n", 20 * MIB)).unwrap();
    let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "x", "--changed-ranges", rs], 1);
    assert!(err.contains("beyond the end"), "{err}");
    std::fs::write(&r, "12 potato\n").unwrap();
    let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "x", "--changed-ranges", rs], 1);
    assert!(err.contains("line 1"), "{err}");
    // A full backup of the resized image is fine, and the repository stays valid.
    let b = e.backup(&img, "x", &[]);
    assert_eq!(stat(&b, "logical_bytes"), 9 * MIB);
    assert_eq!(e.json(&["points", "x"]).as_array().unwrap().len(), 2);
    assert!(e.ok(&["verify"]).contains("no damage found"));
}
