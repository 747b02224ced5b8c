//! Crashes and concurrency: kill -9 mid-backup, an NBD server that dies, two backups at once,
//! and locks left by dead processes.

mod common;
use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A larger image of incompressible and text-like data, slow enough to interrupt.
fn big_image(e: &Env, mib: u64) -> std::path::PathBuf {
    let p = e.path("big.img");
    let f = std::fs::File::create(&p).unwrap();
    let mut rng = Rng::new(99);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..mib {
        if i % 2 == 0 {
            rng.fill(&mut buf);
        } else {
            texty(&mut rng, &mut buf);
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, i * MIB).unwrap();
    }
    p
}

#[test]
fn kill_9_mid_backup_leaves_a_valid_repository_and_the_next_backup_reuses_uploads() {
    let e = Env::new();
    e.init();
    let img = big_image(&e, 384);
    let mut child = e
        .cmd(&["backup", "image", img.to_str().unwrap(), "--name", "big", "--threads", "1", "--compression", "7"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while e.files("index").is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished before it could be interrupted; make the test image larger"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "no index file appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(e.files("points").is_empty(), "an interrupted backup must not publish a point");

    // The repository verifies (leftover packs are harmless) and is not locked.
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["points_checked"], 0);

    let b = e.backup(&img, "big", &[]);
    assert!(stat(&b, "dedup_bytes") > 0, "blocks uploaded before the kill must be reused: {b}");
    let out = e.path("out.img");
    e.restore("big", &out, &[]);
    assert!(same_content(&img, &out));
    assert_eq!(e.json(&["verify"])["ok"], true);
}

#[test]
fn nbd_server_dying_mid_backup_is_a_clear_error() {
    let e = Env::new();
    e.init();
    let img = big_image(&e, 256);
    let mut srv = QemuNbd::start(e.dir.path(), &img, &["--read-only", "--format=raw"]);
    let child = e
        .cmd(&["backup", "image", &srv.uri(), "--name", "nbd", "--threads", "1", "--compression", "9"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("NBD connection"), "{err}");
    assert!(e.files("points").is_empty());
    assert_eq!(e.json(&["verify"])["ok"], true);
}

#[test]
fn concurrent_backups_into_one_repository() {
    let e = Env::new();
    e.init();
    let imgs: Vec<_> = (0..3)
        .map(|i| {
            let p = e.path(&format!("d{i}.img"));
            make_image(&p, 24 * MIB, 100 + i);
            p
        })
        .collect();
    let children: Vec<_> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.cmd(&["backup", "image", p.to_str().unwrap(), "--name", &format!("d{i}"), "--json"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(e.json(&["points"]).as_array().unwrap().len(), 3);
    assert_eq!(e.json(&["verify"])["ok"], true);
    for (i, p) in imgs.iter().enumerate() {
        let out = e.path(&format!("o{i}"));
        e.restore(&format!("d{i}"), &out, &[]);
        assert!(same_content(p, &out));
    }
    assert!(e.files("locks").is_empty(), "locks are removed when commands end");
}

#[test]
fn exclusive_locks_block_and_dead_holders_do_not() {
    let e = Env::new();
    e.init();
    let img = e.path("d.img");
    make_image(&img, 4 * MIB, 9);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // A live process holding an exclusive lock (as a future gc would).
    let mut holder = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let lock =
        serde_json::json!({"hostname": host, "pid": holder.id(), "time": now, "exclusive": true, "purpose": "gc"});
    std::fs::write(e.repo().join("locks/0123456789abcdef"), lock.to_string()).unwrap();
    let err = e.fails(&["backup", "image", img.to_str().unwrap(), "--name", "d", "--lock-wait", "1"], 1);
    assert!(err.contains("locked") && err.contains("exclusive lock for gc"), "{err}");
    // Once its holder is dead, the lock is stale and ignored.
    holder.kill().unwrap();
    holder.wait().unwrap();
    e.backup(&img, "d", &[]);
    assert!(e.files("locks").is_empty(), "the stale lock was cleaned up");
}
