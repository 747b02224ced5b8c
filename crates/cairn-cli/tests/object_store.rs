//! Repositories on object storage, through the real binary: `--repo s3://…` on moto and
//! s3s-fs, `--repo az://…` on Azurite, each a real server on loopback.

mod common;
use common::*;

use cairn_storage::test_servers::{Flavor, TestServer};
use cairn_storage::{Backend, Kind};

/// init, two backups (the second incremental), restores of both checked byte for byte,
/// verify, forget + prune, and the kept point still restores.
fn round_trip(flavor: Flavor, encrypted: bool) {
    let Some(server) = TestServer::start(flavor) else { return };
    let url = server.bucket("backups", "site-a/repo");
    let mut e = Env::on(&server, url.clone());
    if encrypted {
        e.password = Some("offsite secret".into());
        e.ok(&["init", "--encrypt"]);
    } else {
        e.init();
    }
    let v1 = e.path("v1.raw");
    make_image(&v1, 24 * MIB, 11);
    let first = e.backup(&v1, "webfront", &[]);
    let v2 = e.path("v2.raw");
    std::fs::copy(&v1, &v2).unwrap();
    scatter_writes(&v2, 30, 12);
    let second = e.backup(&v2, "webfront", &[]);
    // Only what changed travelled the second time.
    assert!(stat(&second, "new_bytes") < stat(&first, "new_bytes") / 4, "{second}");

    for (point, img) in [(&first, &v1), (&second, &v2)] {
        let out = e.path("out.raw");
        let _ = std::fs::remove_file(&out);
        let id = point["id"].as_str().unwrap();
        e.restore(&format!("webfront@{}", &id[..12]), &out, &[]);
        assert!(same_content(&out, img), "{flavor:?}: point {} does not restore to its image", &id[..8]);
    }
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    // Index files and points were kept in the local cache for the next process.
    let cached = |kind: &str| {
        std::fs::read_dir(e.path("cache/objects"))
            .unwrap()
            .flatten()
            .filter_map(|d| std::fs::read_dir(d.path().join(kind)).ok())
            .flat_map(|r| r.flatten())
            .count()
    };
    assert!(cached("index") > 0 && cached("points") == 2, "index {} points {}", cached("index"), cached("points"));

    let done = e.json(&["forget", "--keep-last", "1", "--prune", "--grace", "0", "--max-unused", "0"]);
    assert_eq!(done["removed"]["points"].as_array().unwrap().len(), 1, "{done}");
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let out = e.path("kept.raw");
    e.restore(&format!("webfront@{}", &second["id"].as_str().unwrap()[..12]), &out, &[]);
    assert!(same_content(&out, &v2));

    // The objects are where the layout says, under the prefix, and (encrypted) carry no
    // plaintext of the image.
    let b = server.backend(&url);
    let packs = b.list(Kind::Pack).unwrap();
    assert!(!packs.is_empty());
    if encrypted {
        let marker = std::fs::read(&v2).unwrap()[..4096].to_vec();
        for p in &packs {
            let bytes = b.get(Kind::Pack, &p.name).unwrap();
            assert!(!bytes.windows(64).any(|w| w == &marker[..64]), "plaintext found in pack {}", p.name);
        }
        let config = b.get(Kind::Config, "").unwrap();
        assert!(String::from_utf8_lossy(&config).contains("encryption"), "config is readable JSON");
        for p in e.json(&["points"]).as_array().unwrap() {
            let id = p["id"].as_str().unwrap();
            let raw = b.get(Kind::Point, id).unwrap();
            assert!(!String::from_utf8_lossy(&raw).contains("webfront"), "point {id} names its image in plaintext");
        }
    }
}

#[test]
fn s3_on_moto_round_trip_encrypted() {
    round_trip(Flavor::Moto, true);
}

#[test]
fn s3_on_s3s_fs_round_trip() {
    round_trip(Flavor::S3sFs, false);
}

#[test]
fn azure_on_azurite_round_trip_encrypted() {
    round_trip(Flavor::Azurite, true);
}

#[test]
fn three_processes_back_up_into_one_s3_repository_at_once() {
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let url = server.bucket("shared", "");
    let e = Env::on(&server, url);
    e.init();
    let images: Vec<_> = (0..3u64)
        .map(|i| {
            let p = e.path(&format!("vm{i}.raw"));
            // Half of each image is common to all three (deduplicated across processes).
            make_image(&p, 16 * MIB, 40);
            scatter_writes(&p, 60, 50 + i);
            p
        })
        .collect();
    let children: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.cmd(&["backup", "image", p.to_str().unwrap(), "--name", &format!("vm{i}"), "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "a concurrent backup failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    for (i, img) in images.iter().enumerate() {
        let out = e.path(&format!("out{i}.raw"));
        e.restore(&format!("vm{i}"), &out, &[]);
        assert!(same_content(&out, img));
    }
}

#[test]
fn a_missing_bucket_or_bad_url_is_a_clear_error() {
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let e = Env::on(&server, "s3://no-such-bucket/x".into());
    let err = e.fails(&["init"], 1);
    assert!(err.contains("must exist"), "{err}");
    let e = Env::on(&server, "gs://bucket/x".into());
    let err = e.fails(&["init"], 1);
    assert!(err.contains("unknown scheme"), "{err}");
    // A wrong endpoint (nothing listens there): a clear error in seconds, not after the
    // minutes of retries a store that went away mid-run gets.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if *k == "AWS_ENDPOINT_URL" {
            *v = format!("http://127.0.0.1:{closed}");
        }
    }
    let e = Env { remote: Some(("s3://bucket/x".into(), env)), ..Env::new() };
    let start = std::time::Instant::now();
    let err = e.fails(&["points"], 1);
    assert!(err.contains("s3://bucket/x"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(40), "took {:?}", start.elapsed());
}

/// `init --copy-from` and `copy`: an encrypted local repository copied to S3 under its own
/// password; only what the target lacks travels; a second copy sends nothing; a copy killed
/// part way leaves no point and the next run completes it.
#[test]
fn copies_to_s3_send_only_what_the_target_lacks_and_resume_after_a_kill() {
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let mut local = Env::new();
    local.password = Some("local secret".into());
    local.ok(&["init", "--encrypt"]);
    let v1 = local.path("v1.raw");
    make_image(&v1, 24 * MIB, 21);
    local.backup(&v1, "db", &[]);
    let v2 = local.path("v2.raw");
    std::fs::copy(&v1, &v2).unwrap();
    scatter_writes(&v2, 20, 22);
    let second = local.backup(&v2, "db", &[]);

    let url = server.bucket("offsite", "site-a");
    let mut remote = Env::on(&server, url.clone());
    remote.password = Some("offsite secret".into());
    let from = local.repo();
    let from = from.to_str().unwrap();
    let with_source_password = |mut c: std::process::Command| {
        c.env("CAIRN_FROM_PASSWORD", "local secret");
        c
    };
    let run = |args: &[&str]| with_source_password(remote.cmd(args)).output().unwrap();
    // A target that names blocks its own way is refused with the way out.
    let mut other = Env::on(&server, server.bucket("other", ""));
    other.password = Some("x".into());
    other.ok(&["init", "--encrypt"]);
    let o = with_source_password(other.cmd(&["copy", "--from", from])).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--copy-from"), "{}", String::from_utf8_lossy(&o.stderr));

    let o = run(&["init", "--copy-from", from]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Only the first point, then both: the second copy sends only the second point's news.
    let first_id = local.json(&["points"])[0]["id"].as_str().unwrap().to_string();
    let o = run(&["copy", "--from", from, &format!("db@{}", &first_id[..12]), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r1: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = run(&["copy", "--from", from, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r2["points"][0]["already_there"], true, "{r2}");
    assert_eq!(r2["points"][1]["already_there"], false, "{r2}");
    let sent2 = r2["raw_bytes_sent"].as_u64().unwrap();
    let new2 = stat(&second, "new_bytes");
    assert!(sent2 <= new2 + new2 / 10 + 64 * 1024, "second copy sent {sent2} for {new2} new bytes: {r2}");
    assert!(r1["raw_bytes_sent"].as_u64().unwrap() > 10 * MIB, "{r1}");

    // Everything again: nothing travels.
    let o = run(&["copy", "--from", from, "--json"]);
    let r3: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r3["blocks_sent"], 0, "{r3}");

    // The copies restore and verify in the target, under the target's password only.
    for (point, img) in [(0usize, &v1), (1, &v2)] {
        let id = remote.json(&["points"])[point]["id"].as_str().unwrap().to_string();
        let out = remote.path(&format!("r{point}.raw"));
        remote.restore(&format!("db@{}", &id[..12]), &out, &[]);
        assert!(same_content(&out, img));
    }
    assert_eq!(remote.json(&["verify"])["ok"], true);

    // A copy killed after its first index file: no point appears; the rerun sends only what
    // was not indexed, and the point restores.
    let v3 = local.path("v3.raw");
    make_image(&v3, 40 * MIB, 23);
    local.backup(&v3, "files", &[]);
    let target = Env::new();
    let t = target.repo();
    let t = t.to_str().unwrap();
    let mut c = with_source_password(local.cmd(&["init", "--copy-from", from, "--repo", t]));
    c.env("CAIRN_PASSWORD", "third");
    assert!(c.output().unwrap().status.success());
    let mut c = with_source_password(local.cmd(&["copy", "--from", from, "--to", t, "files"]));
    c.env("CAIRN_PASSWORD", "third").env("CAIRN_CRASH_AT", "index.dir_synced:1");
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), None, "killed: {}", String::from_utf8_lossy(&o.stderr));
    let mut c = with_source_password(local.cmd(&["points", "--repo", t, "--json"]));
    c.env("CAIRN_PASSWORD", "third");
    let pts: serde_json::Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    assert!(pts.as_array().unwrap().is_empty(), "a killed copy left a point: {pts}");
    let mut c = with_source_password(local.cmd(&["copy", "--from", from, "--to", t, "files", "--json"]));
    c.env("CAIRN_PASSWORD", "third");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["blocks_present"].as_u64().unwrap() > 0, "the rerun sent everything again: {r}");
    let mut c = local.cmd(&["restore", "image", "files", "--repo", t, "--to", target.path("f.raw").to_str().unwrap()]);
    c.env("CAIRN_PASSWORD", "third");
    assert!(c.output().unwrap().status.success());
    assert!(same_content(&target.path("f.raw"), &v3));
}

/// A backup, a restore and a verify through a store that fails one request in four
/// (throttling, server errors, dropped connections, torn responses): retries, never damage.
#[test]
fn a_flaky_store_slows_backups_down_but_never_fails_or_damages_them() {
    use cairn_storage::test_servers::FlakyProxy;
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let url = server.bucket("flaky", "repo");
    let proxy = FlakyProxy::start(server.port, 4, 11);
    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if *k == "AWS_ENDPOINT_URL" {
            *v = proxy.endpoint();
        }
    }
    let e = Env { remote: Some((url, env)), ..Env::new() };
    e.init();
    let img = e.path("img.raw");
    make_image(&img, 32 * MIB, 31);
    e.backup(&img, "flaky", &[]);
    scatter_writes(&img, 25, 32);
    e.backup(&img, "flaky", &[]);
    let out = e.path("out.raw");
    e.restore("flaky", &out, &[]);
    assert!(same_content(&out, &img));
    assert_eq!(e.json(&["verify"])["ok"], true);
    let faults = proxy.faults.load(std::sync::atomic::Ordering::Relaxed);
    assert!(faults >= 10, "only {faults} faults were injected");
}

/// Copies of copies keep their first origin: A -> B -> C, then A -> C, sends nothing and makes
/// no second point; a copy into a replica of the source (the same point IDs) finds it all there.
#[test]
fn a_copy_of_a_copy_is_known_by_its_origin() {
    let a = Env::new();
    a.init();
    let img = a.path("img.raw");
    make_image(&img, 8 * MIB, 41);
    a.backup(&img, "vm", &[]);
    let repo = |e: &Env| e.repo().to_str().unwrap().to_string();
    let (b, c) = (Env::new(), Env::new());
    b.ok(&["init", "--copy-from", &repo(&a)]);
    b.ok(&["copy", "--from", &repo(&a)]);
    c.ok(&["init", "--copy-from", &repo(&b)]);
    c.ok(&["copy", "--from", &repo(&b)]);
    let again = c.json(&["copy", "--from", &repo(&a)]);
    assert_eq!(again["points"][0]["already_there"], true, "{again}");
    assert_eq!(again["blocks_sent"], 0, "{again}");
    assert_eq!(c.json(&["points"]).as_array().unwrap().len(), 1);
    // A replica made file for file (as rclone would): the same point, by its ID.
    let replica = Env::new();
    run_tool(std::process::Command::new("cp").arg("-a").arg(a.repo()).arg(replica.repo()));
    let r = replica.json(&["copy", "--from", &repo(&a)]);
    assert_eq!(r["points"][0]["already_there"], true, "{r}");
    assert_eq!(replica.json(&["points"]).as_array().unwrap().len(), 1);
}

/// A copy refuses, before anything moves, a target that is its source and a point name the
/// source does not have, and says where to look.
#[test]
fn a_copy_refuses_its_own_source_and_points_the_source_lacks() {
    let a = Env::new();
    a.init();
    let img = a.path("img.raw");
    make_image(&img, 4 * MIB, 43);
    a.backup(&img, "vm", &[]);
    let repo = a.repo().to_str().unwrap().to_string();
    let err = a.fails(&["copy", "--from", &repo], 1);
    assert!(err.contains("the source and the target are the same repository"), "{err}");
    let b = Env::new();
    b.ok(&["init", "--copy-from", &repo]);
    let err = b.fails(&["copy", "--from", &repo, "ghost"], 1);
    assert!(err.contains("no restore point named \"ghost\"") && err.contains("cairn points --repo SOURCE"), "{err}");
    assert!(b.json(&["points"]).as_array().unwrap().is_empty(), "a refused copy wrote a point");
}
