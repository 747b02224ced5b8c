//! Immutable repositories on moto, the S3 server that enforces Object Lock (compliance mode):
//! `init --immutable` refuses buckets that cannot hold the locks; every pack, point, key and
//! the config is locked; deletes of locked versions are refused by the store; forget and prune
//! report locked objects as pending; objects hidden by delete markers come back with
//! `repair undelete`; a backup a generation later extends the locks of what it reuses.

mod common;
use common::*;

use cairn_storage::object_lock::{now, DAY};
use cairn_storage::test_servers::{Flavor, TestServer};
use cairn_storage::{Backend, Kind, StorageError};

/// Every pack's and point's lock date, asked of the store.
fn locks_of(b: &dyn Backend, kind: Kind) -> Vec<(String, Option<u64>)> {
    let locks = b.object_lock().unwrap();
    b.list(kind).unwrap().into_iter().map(|l| (l.name.clone(), locks.retained_until(kind, &l.name).unwrap())).collect()
}

#[test]
fn buckets_that_cannot_hold_locks_are_refused() {
    let Some(server) = TestServer::start(Flavor::Moto) else { return };
    let mut e = Env::on(&server, server.bucket("plain-bucket", "r"));
    e.password = Some("pw".into());
    let err = e.fails(&["init", "--immutable", "7"], 1);
    assert!(err.contains("must be encrypted"), "{err}");
    let err = e.fails(&["init", "--encrypt", "--immutable", "7"], 1);
    assert!(err.contains("versioning"), "{err}");
    server.enable_versioning("plain-bucket");
    let err = e.fails(&["init", "--encrypt", "--immutable", "7"], 1);
    assert!(err.contains("Object Lock"), "{err}");
    let mut e = Env::on(&server, server.locked_bucket("defaulted", "r"));
    e.password = Some("pw".into());
    server.set_default_retention("defaulted", 5);
    let err = e.fails(&["init", "--encrypt", "--immutable", "7"], 1);
    assert!(err.contains("default retention"), "{err}");
    // Nothing was written by the refused attempts.
    assert!(server.backend("s3://defaulted/r").list(Kind::Key).unwrap().is_empty());
    // Azurite: the container check is signed and sent to a real Azure Blob server, which
    // answers that the container has no version-level immutability.
    if let Some(azurite) = TestServer::start(Flavor::Azurite) {
        let mut e = Env::on(&azurite, azurite.bucket("azure-plain", "r"));
        e.password = Some("pw".into());
        let err = e.fails(&["init", "--encrypt", "--immutable", "7"], 1);
        assert!(err.contains("version-level immutability"), "{err}");
    }
    // `repair undelete` refuses a repository that is not immutable: there, cairn's own deletes
    // leave delete markers, which it would undo.
    let mut plain = Env::on(&server, "s3://plain-bucket/plain-repo".into());
    plain.password = Some("pw".into());
    plain.ok(&["init", "--encrypt"]);
    let err = plain.fails(&["repair", "undelete"], 1);
    assert!(err.contains("not an immutable repository"), "{err}");
    // An immutable copy of a plain repository: refused, with the reason (it could only be plain).
    let plain_source = Env::new();
    plain_source.init();
    let e = Env::on(&server, server.locked_bucket("copy-of-plain", "r"));
    let from = plain_source.repo().to_str().unwrap().to_string();
    let err = e.fails(&["init", "--copy-from", &from, "--immutable", "7"], 1);
    assert!(err.contains("copy of a plain repository"), "{err}");
    // A local folder cannot be immutable either.
    let mut local = Env::new();
    local.password = Some("pw".into());
    let err = local.fails(&["init", "--encrypt", "--immutable", "7"], 1);
    assert!(err.contains("Object Lock"), "{err}");
}

#[test]
fn an_immutable_repository_keeps_every_point_until_its_lock_ends() {
    let Some(server) = TestServer::start(Flavor::Moto) else { return };
    let url = server.locked_bucket("vault", "site-a");
    let mut e = Env::on(&server, url.clone());
    e.password = Some("vault secret".into());
    let init = e.json(&["init", "--encrypt", "--immutable", "3", "--lock-generation", "1"]);
    assert_eq!(init["immutability"]["days"], 3, "{init}");
    let b = server.backend(&url);

    let img = e.path("img.raw");
    make_image(&img, 12 * MIB, 5);
    let first = e.backup(&img, "db", &[]);
    let v1 = e.path("v1.raw");
    std::fs::copy(&img, &v1).unwrap();

    // Everything a point needs is locked at least 3 days, at most a generation more.
    let t = now();
    for kind in [Kind::Pack, Kind::Point, Kind::Key, Kind::Config] {
        let all = if kind == Kind::Config {
            vec![("config".to_string(), b.object_lock().unwrap().retained_until(kind, "config").unwrap())]
        } else {
            locks_of(&b, kind)
        };
        assert!(!all.is_empty(), "{kind}");
        for (name, until) in all {
            let until = until.unwrap_or_else(|| panic!("{kind} {name} is not locked"));
            assert!(until >= t + 3 * DAY - 60 && until <= t + 4 * DAY + 60, "{kind} {name}: {until} at {t}");
        }
    }
    // Index files are not locked (repair index rebuilds them from the packs).
    assert!(locks_of(&b, Kind::Index).iter().all(|(_, u)| u.is_none()));
    let points = e.json(&["points"]);
    let locked_until = points[0]["locked_until"].as_u64().expect("points show their lock");
    assert!(locked_until >= t + 3 * DAY - 60, "{points}");

    // The store refuses to delete a locked version, whoever asks.
    let pack = b.list(Kind::Pack).unwrap()[0].name.clone();
    b.object_lock().unwrap().lock_writes(cairn_storage::LockPolicy { days: 3, generation_days: 1 });
    match b.delete(Kind::Pack, &pack) {
        Err(StorageError::Locked { .. }) => {}
        other => panic!("a locked pack was not refused: {other:?}"),
    }

    // `verify locks` asks the store about every object the point needs.
    let audit = e.json(&["verify", "locks"]);
    assert_eq!(audit["ok"], true, "{audit}");
    assert!(audit["objects_checked"].as_u64().unwrap() >= 4, "{audit}"); // point, config, key, packs
                                                                         // Someone overwrites a pack: a new, unlocked version (here garbage) on top of the locked
                                                                         // one. Verify and `verify locks` see it; `repair undelete` makes the locked version
                                                                         // current again.
    let overwriter = server.backend(&url);
    overwriter.put(Kind::Pack, &pack, b"encrypted by ransomware").unwrap();
    let o = e.run(&["verify", "locks", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let audit: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The point's map page is in that pack: the audit says it could not read it.
    assert_eq!(audit["unreadable"].as_array().unwrap().len(), 1, "{audit}");
    assert!(!e.run(&["verify", "--json"]).status.success());
    let back = e.json(&["repair", "undelete"]);
    assert_eq!(back["overwritten"], 1, "{back}");
    // (verify first: it releases what the earlier verify quarantined in the overwritten pack)
    let released = e.json(&["verify"]);
    assert!(!released["released_copies"].as_array().unwrap().is_empty(), "{released}");
    assert_eq!(e.json(&["verify", "locks"])["ok"], true);

    // The config overwritten: every command refuses the repository (the keys authenticate the
    // config), and undelete, which trusts only the locked config cairn wrote, restores it.
    overwriter.put(Kind::Config, "", br#"{"version": 1, "id": "0123456789abcdef0123456789abcdef"}"#).unwrap();
    assert!(!e.run(&["points"]).status.success());
    let back = e.json(&["repair", "undelete"]);
    assert_eq!(back["overwritten"], 1, "{back}");
    assert_eq!(e.json(&["points"]).as_array().unwrap().len(), 1);

    // A second backup; forget keeping one point leaves the first, locked, as pending.
    scatter_writes(&img, 20, 6);
    e.backup(&img, "db", &[]);
    let done = e.json(&["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"]["points"].as_array().unwrap().len(), 0, "{done}");
    let pending = done["removed"]["locked"].as_array().unwrap();
    assert_eq!(pending.len(), 1, "{done}");
    assert_eq!(pending[0]["id"], first["id"], "{done}");
    assert_eq!(e.json(&["points"]).as_array().unwrap().len(), 2);

    // A pack nothing needs (as a killed backup leaves), locked: prune marks it, then keeps it
    // as pending with its date instead of failing.
    let stray_bytes = b"not a pack anyone needs";
    let stray = blake3::hash(stray_bytes).to_hex().to_string();
    b.put(Kind::Pack, &stray, stray_bytes).unwrap();
    e.json(&["prune", "--grace", "0"]);
    let r = e.json(&["prune", "--grace", "0"]);
    assert!(r["locked"]["packs"].as_u64().unwrap() >= 1, "{r}");
    let reasons: Vec<&str> = r["pending"].as_array().unwrap().iter().filter_map(|p| p["reason"].as_str()).collect();
    assert!(reasons.iter().any(|w| w.contains("locked by the store until")), "{r}");
    assert!(b.exists(Kind::Pack, &stray).unwrap());

    // Someone with the keys deletes every object the plain way: delete markers hide them
    // (S3 allows that on locked objects). The repository looks gone; undelete brings it back.
    let attacker = server.backend(&url);
    for kind in [Kind::Point, Kind::Pack, Kind::Index, Kind::Key, Kind::Config] {
        for l in attacker.list(kind).unwrap() {
            attacker.delete(kind, &l.name).unwrap();
        }
    }
    assert!(attacker.list(Kind::Point).unwrap().is_empty());
    let err = e.fails(&["points"], 1);
    assert!(err.contains("no cairn repository"), "{err}");
    let dry = e.json(&["repair", "undelete", "--dry-run"]);
    assert!(dry["hidden"].as_u64().unwrap() >= 6, "{dry}");
    let back = e.json(&["repair", "undelete"]);
    assert_eq!(back["hidden"], dry["hidden"], "{back}");
    assert_eq!(e.json(&["points"]).as_array().unwrap().len(), 2);
    let out = e.path("out.raw");
    e.restore(&format!("db@{}", &first["id"].as_str().unwrap()[..12]), &out, &[]);
    assert!(same_content(&out, &v1));
    // Verify finds every point whole; the one damaged pack is the stray, which no point needs.
    let o = e.run(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let damaged: Vec<&str> = v["damaged_packs"].as_array().unwrap().iter().filter_map(|d| d["pack"].as_str()).collect();
    assert_eq!(damaged, vec![stray.as_str()], "{v}");
    assert!(v["affected_points"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn a_backup_a_generation_later_extends_the_locks_it_relies_on() {
    let Some(server) = TestServer::start(Flavor::Moto) else { return };
    let url = server.locked_bucket("generations", "");
    let mut e = Env::on(&server, url.clone());
    e.password = Some("gen secret".into());
    e.ok(&["init", "--encrypt", "--immutable", "2", "--lock-generation", "1"]);
    let img = e.path("img.raw");
    make_image(&img, 8 * MIB, 9);
    e.backup(&img, "web", &[]);
    let b = server.backend(&url);
    let before: std::collections::HashMap<String, u64> =
        locks_of(&b, Kind::Pack).into_iter().map(|(n, u)| (n, u.unwrap())).collect();

    // Five days later (the clock of cairn only: the store's locks are real), a backup that
    // changed little reuses every earlier pack: each is extended to 2 days past then.
    let mut later = Env::on(&server, url.clone());
    later.password = e.password.clone();
    later.dir = tempfile::tempdir().unwrap();
    later.remote.as_mut().unwrap().1.push(("CAIRN_TEST_CLOCK_OFFSET_DAYS", "5".into()));
    scatter_writes(&img, 10, 10);
    let second = later.backup(&img, "web", &[]);
    // An incremental (changed ranges) in the same generation: only what changed is looked at.
    let ranges = later.path("ranges.txt");
    std::fs::write(&ranges, r#"[{"offset": 0, "length": 65536}]"#).unwrap();
    let third = later.backup(&img, "web", &["--changed-ranges", ranges.to_str().unwrap()]);
    assert_eq!(third["point"]["stats"]["mode"], "changed-ranges", "{third}");
    let then = now() + 5 * DAY;
    for (name, until) in locks_of(&b, Kind::Pack) {
        let until = until.unwrap();
        assert!(until >= then + 2 * DAY - 60, "pack {name} was not extended: {until} < {}", then + 2 * DAY);
        if let Some(old) = before.get(&name) {
            assert!(until > *old, "pack {name}");
        }
    }
    let p = later.json(&["points"]);
    let newest = p.as_array().unwrap().iter().find(|x| x["id"] == second["id"]).unwrap();
    assert!(newest["locked_until"].as_u64().unwrap() >= then + 2 * DAY - 60, "{p}");
    // What the extensions were is recorded for the next backup (no need to ask the store),
    // one record per backup until a prune merges them into one.
    // (records are sealed: counted as the catalog's objects, all object-locks records until
    // the prune, which merges them into one and writes its marks record)
    assert!(b.list(Kind::Catalog).unwrap().len() >= 2);
    later.json(&["prune"]);
    assert_eq!(b.list(Kind::Catalog).unwrap().len(), 2);
    assert_eq!(later.json(&["verify"])["ok"], true);
}

#[test]
fn copies_into_an_immutable_repository_are_locked_like_backups() {
    let Some(server) = TestServer::start(Flavor::Moto) else { return };
    let mut source = Env::new();
    source.password = Some("source secret".into());
    source.ok(&["init", "--encrypt"]);
    let img = source.path("img.raw");
    make_image(&img, 8 * MIB, 21);
    source.backup(&img, "files", &[]);
    scatter_writes(&img, 10, 22);
    source.backup(&img, "files", &[]);
    let from = source.repo().to_str().unwrap().to_string();

    let url = server.locked_bucket("offsite", "copies");
    let mut target = Env::on(&server, url.clone());
    target.password = Some("target secret".into());
    target.remote.as_mut().unwrap().1.push(("CAIRN_FROM_PASSWORD", "source secret".into()));
    target.ok(&["init", "--copy-from", &from, "--immutable", "4"]);
    let copied = target.json(&["copy", "--from", &from]);
    assert_eq!(copied["points"].as_array().unwrap().len(), 2, "{copied}");
    let t = now();
    let b = server.backend(&url);
    let points = locks_of(&b, Kind::Point);
    assert_eq!(points.len(), 2);
    for (kind, all) in [(Kind::Pack, locks_of(&b, Kind::Pack)), (Kind::Point, points)] {
        for (name, until) in all {
            assert!(until.is_some_and(|u| u >= t + 4 * DAY - 60), "{kind} {name} is not locked for 4 days: {until:?}");
        }
    }
    for p in target.json(&["points"]).as_array().unwrap() {
        assert!(p["locked_until"].as_u64().unwrap() >= t + 4 * DAY - 60, "{p}");
    }
    let out = target.path("out.raw");
    target.restore("files", &out, &[]);
    assert!(same_content(&out, &img));
}
