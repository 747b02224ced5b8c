//! Damaged repositories: verify names every affected restore point, restores refuse to write
//! a block whose hash does not match, and bad input gets a clear error.

mod common;
use common::*;
use std::os::unix::fs::FileExt;

/// Two points of two images that share most blocks, in a repository of one pack.
fn two_points(e: &Env) -> (String, String, std::path::PathBuf) {
    e.init();
    let a = e.path("a.img");
    make_image(&a, 8 * MIB, 8);
    let b = e.path("b.img");
    std::fs::copy(&a, &b).unwrap();
    scatter_writes(&b, 2, 88);
    let pa = e.backup(&a, "a", &[])["id"].as_str().unwrap().to_string();
    let pb = e.backup(&b, "b", &[])["id"].as_str().unwrap().to_string();
    (pa, pb, a)
}

fn flip(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

fn affected(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> =
        v["affected_points"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[test]
fn flipped_byte_is_found_named_and_never_restored() {
    let e = Env::new();
    let (pa, pb, _) = two_points(&e);
    let packs = e.files("packs");
    let first = packs.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    flip(first, 100); // inside the first frame

    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3), "verify must exit 3 on damage");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(!v["damaged_blocks"].as_array().unwrap().is_empty());
    let mut both = vec![pa.clone(), pb.clone()];
    both.sort();
    assert_eq!(affected(&v), both, "both points share the damaged frame");
    let offsets = &v["affected_points"][0]["disks"][0]["offsets"];
    assert!(!offsets.as_array().unwrap().is_empty());
    let human = String::from_utf8(e.run(&["verify"]).stdout).unwrap();
    assert!(human.contains(&format!("AFFECTED restore point {}", &pa[..8])), "{human}");

    let out = e.path("out.img");
    let err = e.fails(&["restore", "image", "a", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains("is damaged") && err.contains(&pa[..8]) && err.contains("offset"), "{err}");
    assert!(!out.exists() && !e.path("out.img.cairn-partial").exists(), "a failed restore leaves nothing");
}

#[test]
fn truncated_and_missing_packs() {
    let e = Env::new();
    let (pa, pb, _) = two_points(&e);
    let packs = e.files("packs");
    let big = packs.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap().clone();
    let len = std::fs::metadata(&big).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&big).unwrap().set_len(len / 2).unwrap();
    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = serde_json::to_string(&v["damaged_packs"]).unwrap();
    assert!(problems.contains("truncated") || problems.contains("footer"), "{problems}");
    assert_eq!(affected(&v).len(), 2);
    let err = e.fails(&["restore", "image", "b", "--to", e.path("o").to_str().unwrap()], 1);
    assert!(err.contains(&pb[..8]), "{err}");

    std::fs::remove_file(&big).unwrap();
    let o = e.run(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(serde_json::to_string(&v["damaged_packs"]).unwrap().contains("missing"));
    assert!(affected(&v).contains(&pa));
    // A restore that needs the missing pack names the point and leaves no file behind.
    let out = e.path("o2");
    let err = e.fails(&["restore", "image", "a", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains(&pa[..8]) && err.contains("missing"), "{err}");
    assert!(!out.exists() && !e.path("o2.cairn-partial").exists(), "a failed restore leaves nothing");
}

#[test]
fn damaged_index_and_point_files_are_reported_and_backups_go_on() {
    let e = Env::new();
    let (_, pb, a) = two_points(&e);
    let idx = e.files("index");
    for f in &idx {
        flip(f, 20);
    }
    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["damaged_index_files"].as_array().unwrap().len(), idx.len());
    // A backup still works: it stores the blocks again rather than trusting a damaged index.
    let o = e.run(&["backup", "image", a.to_str().unwrap(), "--name", "again", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("index file"), "a warning names the damaged index");
    let out = e.path("again.img");
    e.restore("again", &out, &[]);
    assert!(same_content(&a, &out));

    let point = e.files("points").into_iter().find(|p| p.file_name().unwrap().to_str().unwrap() == pb).unwrap();
    flip(&point, 30);
    let o = e.run(&["points"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("restore point {} cannot be read", &pb[..8])));
    let v: serde_json::Value = serde_json::from_slice(&e.run(&["verify", "--json"]).stdout).unwrap();
    assert!(serde_json::to_string(&v["damaged_points"]).unwrap().contains(&pb));
}

#[test]
fn bad_repositories_get_clear_errors() {
    let e = Env::new();
    let err = e.fails(&["points"], 1);
    assert!(err.contains("no cairn repository at") && err.contains("cairn init"), "{err}");
    let err = e.fails(&["backup", "image", "/nonexistent.img", "--name", "x"], 1);
    assert!(err.contains("no cairn repository"), "{err}");
    e.init();
    let err = e.fails(&["init"], 1);
    assert!(err.contains("already exists"), "{err}");
    let err = e.fails(&["backup", "image", "/nonexistent.img", "--name", "x"], 1);
    assert!(err.contains("/nonexistent.img"), "{err}");
    let err = e.fails(&["restore", "image", "ghost", "--to", e.path("o").to_str().unwrap()], 1);
    assert!(err.contains("no restore point named \"ghost\""), "{err}");
    assert!(e.ok(&["points"]).contains("no restore points"));
    std::fs::write(e.repo().join("config"), b"{ not json").unwrap();
    let err = e.fails(&["points"], 1);
    assert!(err.contains("config") && err.contains("unreadable"), "{err}");
    let o = e.cmd(&["points"]).env_remove("CAIRN_REPO").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--repo"));
}

#[test]
fn sampled_and_selected_verification_covers_the_repository_over_runs() {
    let e = Env::new();
    e.init();
    for i in 1..=3 {
        let img = e.path(&format!("img{i}.raw"));
        make_image(&img, 40 * MIB, 100 + i);
        e.backup(&img, &format!("img{i}"), &[]);
    }
    // A third of the packs per run, least recently verified first: three runs cover everything.
    let mut seen = std::collections::HashSet::new();
    let mut last = serde_json::Value::Null;
    for _ in 0..3 {
        last = e.json(&["verify", "--sample", "34"]);
        assert_eq!(last["ok"], true, "{last}");
        for p in last["packs_verified"].as_array().unwrap() {
            seen.insert(p.as_str().unwrap().to_string());
        }
        assert!(last["packs_verified"].as_array().unwrap().len() < last["packs_total"].as_u64().unwrap() as usize);
    }
    assert_eq!(seen.len() as u64, last["packs_total"].as_u64().unwrap());
    assert_eq!(last["packs_never_verified"], 0);
    assert!(last["all_verified_since"].is_string());

    // Damage in a pack only img1 uses: verifying img2 alone does not read it; img1 does, and
    // names img1.
    let img1_only = |name: &str| -> Vec<String> {
        let v = e.json(&["verify", "--points", name]);
        v["packs_verified"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
    };
    let p1 = img1_only("img1");
    let p2 = img1_only("img2");
    let target = p1.iter().find(|p| !p2.contains(p)).expect("a pack of img1 alone").clone();
    let path = e.files("packs").into_iter().find(|f| f.file_name().unwrap().to_str() == Some(&target)).unwrap();
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let v = e.json(&["verify", "--points", "img2"]);
    assert_eq!(v["ok"], true, "{v}");
    let o = e.run(&["verify", "--points", "img1", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> =
        v["affected_points"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["img1"]);
}

#[test]
fn the_next_backup_heals_damaged_blocks_and_verify_then_passes() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.raw");
    make_image(&img, 48 * MIB, 77);
    let first = e.backup(&img, "heal", &[]);
    let first_id = first["id"].as_str().unwrap().to_string();
    // Damage a data frame in the middle of the biggest pack.
    let pack = e.files("packs").into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut data = std::fs::read(&pack).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 256] {
        *b ^= 0xa5;
    }
    std::fs::write(&pack, &data).unwrap();
    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["affected_points"][0]["name"], "heal", "{v}");
    // Until a backup reads those blocks again, verify keeps saying so, and why.
    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["damaged_blocks"][0]["problem"].as_str().unwrap().contains("quarantined"), "{v}");
    // An incremental with nothing changed still reads the quarantined blocks from the source.
    let ranges = e.path("none.txt");
    std::fs::write(&ranges, "").unwrap();
    let healed = e.backup(&img, "heal", &["--changed-ranges", ranges.to_str().unwrap()]);
    assert!(stat(&healed, "read_bytes") > 0, "{healed}");
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(!v["quarantined_packs"].as_array().unwrap().is_empty());
    // The old point restores again, byte for byte.
    let out = e.path("restored.raw");
    e.restore(&format!("heal@{}", &first_id[..8]), &out, &[]);
    assert!(same_content(&img, &out));
}

#[test]
fn repair_index_brings_back_what_a_damaged_index_file_hid() {
    let e = Env::new();
    let (pa, _pb, a) = two_points(&e);
    for f in e.files("index") {
        flip(&f, 20);
    }
    let out = e.path("out.img");
    let err = e.fails(&["restore", "image", "a", "--to", out.to_str().unwrap()], 1);
    assert!(err.contains("missing"), "{err}");
    let dry = e.json(&["repair", "index", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert!(!dry["packs_from_trailers"].as_array().unwrap().is_empty(), "{dry}");
    let e2 = e.fails(&["restore", "image", "a", "--to", out.to_str().unwrap()], 1);
    assert!(e2.contains("missing"), "a dry run changed something: {e2}");
    let human = e.ok(&["repair", "index"]);
    assert!(human.contains("read from their trailers") && human.contains("damaged index file"), "{human}");
    e.restore(&format!("a@{}", &pa[..12]), &out, &[]);
    assert!(same_content(&a, &out));
    assert_eq!(e.json(&["verify"])["ok"], true);
}

#[test]
fn a_pack_that_cannot_be_read_is_reported_but_never_quarantined() {
    let e = Env::new();
    let (_pa, _pb, a) = two_points(&e);
    // A pack that reads with an I/O error (here EISDIR: the path is a folder), which proves
    // nothing about its bytes.
    let pack = e.files("packs").into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let aside = e.path("aside");
    std::fs::rename(&pack, &aside).unwrap();
    std::fs::create_dir(&pack).unwrap();
    let o = e.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["unreadable_packs"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["damaged_blocks"].as_array().unwrap().is_empty(), "an I/O error taken for damage: {v}");
    let human = String::from_utf8(e.run(&["verify"]).stdout).unwrap();
    assert!(human.contains("UNREADABLE") && human.contains("INCOMPLETE"), "{human}");
    std::fs::remove_dir(&pack).unwrap();
    std::fs::rename(&aside, &pack).unwrap();
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v.get("quarantined_packs").is_none(), "something was quarantined: {v}");
    let out = e.path("out.img");
    e.restore("a", &out, &[]);
    assert!(same_content(&a, &out));
}
