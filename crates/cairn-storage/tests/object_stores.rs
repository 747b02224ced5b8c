//! The backend contract (crate docs) against real servers on loopback: moto and s3s-fs for
//! S3, Azurite for Azure Blob, and the local folder for comparison. Same checks on each.

use cairn_storage::test_servers::{Flavor, TestServer};
use cairn_storage::{Backend, Kind, LocalBackend, StorageError};

const PACK: &str = "ab00000000000000000000000000000000000000000000000000000000000001";
const INDEX: &str = "cd00000000000000000000000000000000000000000000000000000000000002";

fn contract(b: &dyn Backend) {
    b.create().unwrap();
    assert!(!b.exists(Kind::Config, "").unwrap());
    assert!(b.list(Kind::Pack).unwrap().is_empty());

    // put_new: create-only.
    b.put_new(Kind::Config, "", b"config v1").unwrap();
    match b.put_new(Kind::Config, "", b"config v2") {
        Err(StorageError::AlreadyExists { .. }) => {}
        other => panic!("a second put_new must fail with AlreadyExists, got {other:?}"),
    }
    assert_eq!(b.get(Kind::Config, "").unwrap(), b"config v1");
    assert_eq!(b.list(Kind::Config).unwrap().len(), 1);

    // Whole and ranged reads.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    b.put(Kind::Pack, PACK, &data).unwrap();
    b.put(Kind::Index, INDEX, b"index").unwrap();
    assert_eq!(b.get(Kind::Pack, PACK).unwrap(), data);
    assert_eq!(b.get_range(Kind::Pack, PACK, 1_000_001, 4096).unwrap(), &data[1_000_001..1_004_097]);
    let mut buf = vec![9; 10];
    b.get_range_into(Kind::Pack, PACK, 5, 3, &mut buf).unwrap();
    assert_eq!(buf, &data[5..8]);
    let mut span_buf = Vec::new();
    let r = b.get_span(Kind::Pack, PACK, 12_345, 100_000, &mut span_buf).unwrap();
    assert_eq!(&span_buf[r], &data[12_345..112_345]);

    // A range past the end is a ShortRead naming the real size, never fewer bytes.
    match b.get_range(Kind::Pack, PACK, data.len() as u64 - 10, 20) {
        Err(StorageError::ShortRead { size, .. }) => assert_eq!(size, data.len() as u64),
        other => panic!("expected ShortRead, got {:?}", other.map(|v| v.len())),
    }
    // Missing objects.
    let missing = "ee00000000000000000000000000000000000000000000000000000000000003";
    assert!(matches!(b.get(Kind::Pack, missing), Err(StorageError::NotFound { .. })));
    assert!(matches!(b.get_range(Kind::Index, missing, 0, 1), Err(StorageError::NotFound { .. })));
    assert!(!b.exists(Kind::Pack, missing).unwrap());
    // Names that are not lowercase hex never reach the store.
    assert!(b.put(Kind::Point, "../config", b"x").is_err());
    assert!(b.get(Kind::Point, "ABCDEF0123").is_err());

    // Listing: complete objects of the kind, with sizes.
    let packs = b.list(Kind::Pack).unwrap();
    assert_eq!(packs.len(), 1);
    assert_eq!((packs[0].name.as_str(), packs[0].size), (PACK, data.len() as u64));
    assert_eq!(b.list(Kind::Index).unwrap()[0].name, INDEX);
    assert!(b.list(Kind::Point).unwrap().is_empty());

    // Overwrite (content-named objects are rewritten with the same bytes), delete, delete again.
    b.put(Kind::Index, INDEX, b"index").unwrap();
    b.delete(Kind::Pack, PACK).unwrap();
    b.delete(Kind::Pack, PACK).unwrap();
    assert!(!b.exists(Kind::Pack, PACK).unwrap());
    assert!(b.list(Kind::Pack).unwrap().is_empty());
}

#[test]
fn local_folder_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&LocalBackend::new(dir.path().join("repo")));
}

fn object_store_keeps_the_contract(flavor: Flavor) {
    let Some(server) = TestServer::start(flavor) else { return };
    let url = server.bucket("contract", "team/repo");
    let b = server.backend(&url);
    contract(&b);
    assert_eq!(b.location(), url);
    // Another prefix of the same bucket is another repository.
    let other = server.backend(&url.replace("team/repo", "team/other"));
    assert!(!other.exists(Kind::Config, "").unwrap());
    assert!(other.list(Kind::Index).unwrap().is_empty());
    // A bucket that does not exist: `create` says so before anything is written.
    let absent = server.backend(&url.replace("contract", "no-such-bucket"));
    let err = absent.create().unwrap_err().to_string();
    assert!(err.contains("must exist"), "{err}");
}

#[test]
fn moto_keeps_the_contract() {
    object_store_keeps_the_contract(Flavor::Moto);
}

#[test]
fn s3s_fs_keeps_the_contract() {
    object_store_keeps_the_contract(Flavor::S3sFs);
}

#[test]
fn azurite_keeps_the_contract() {
    object_store_keeps_the_contract(Flavor::Azurite);
}

#[test]
fn a_store_that_goes_away_mid_run_is_waited_for_not_failed() {
    // s3s-fs keeps its objects on disk, so it can come back with them.
    let Some(mut server) = TestServer::start(Flavor::S3sFs) else { return };
    let url = server.bucket("restart", "");
    let b = std::sync::Arc::new(server.backend(&url));
    b.put(Kind::Index, INDEX, b"before").unwrap();
    server.stop();
    // Requests made while it is down are retried with backoff until it is back.
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || b.put(Kind::Pack, PACK, b"during"))
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    server.resume();
    writer.join().unwrap().expect("a put made while the store was down succeeds once it is back");
    assert_eq!(b.get(Kind::Index, INDEX).unwrap(), b"before");
    assert_eq!(b.get(Kind::Pack, PACK).unwrap(), b"during");
}

#[test]
fn a_flaky_store_costs_retries_never_data() {
    use cairn_storage::test_servers::FlakyProxy;
    use cairn_storage::{Location, ObjectBackend};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let url = server.bucket("flaky", "p");
    // One request in five fails: 503 SlowDown, 500, a dropped connection, a torn response.
    let proxy = FlakyProxy::start(server.port, 5, 7);
    let mut opts = server.options();
    opts.s3_endpoint = Some(proxy.endpoint());
    let b = ObjectBackend::open(&Location::parse(&url).unwrap(), &opts).unwrap();
    b.create().unwrap();
    b.put_new(Kind::Config, "", b"the config").unwrap();
    let objects: Vec<(String, Vec<u8>)> = (0..24u32)
        .map(|i| {
            let data: Vec<u8> = (0..(i * 7919 % 300_000)).map(|j| (j * 31 + i) as u8).collect();
            (format!("{:064x}", i as u64 + 1000), data)
        })
        .collect();
    for (name, data) in &objects {
        b.put(Kind::Pack, name, data).unwrap();
    }
    for (name, data) in &objects {
        assert_eq!(&b.get(Kind::Pack, name).unwrap(), data, "object {name}");
        if data.len() > 100 {
            assert_eq!(b.get_range(Kind::Pack, name, 50, 40).unwrap(), &data[50..90]);
        }
    }
    assert_eq!(b.list(Kind::Pack).unwrap().len(), objects.len());
    for (name, _) in &objects[..12] {
        b.delete(Kind::Pack, name).unwrap();
    }
    assert_eq!(b.list(Kind::Pack).unwrap().len(), 12);
    assert_eq!(b.get(Kind::Config, "").unwrap(), b"the config");
    let faults = proxy.faults.load(std::sync::atomic::Ordering::Relaxed);
    assert!(faults >= 8, "only {faults} faults were injected");
}

#[test]
fn uploads_keep_to_the_rate_limit() {
    use cairn_storage::{Location, ObjectBackend};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let url = server.bucket("paced", "");
    let mut opts = server.options();
    opts.upload_limit = Some(512 << 10);
    let b = ObjectBackend::open(&Location::parse(&url).unwrap(), &opts).unwrap();
    let start = std::time::Instant::now();
    for i in 0..5u64 {
        b.put(Kind::Pack, &format!("{:064x}", i + 1), &vec![i as u8; 256 << 10]).unwrap();
    }
    // 1.25 MiB at 512 KiB/s: the fifth upload starts 2 s after the first.
    let took = start.elapsed().as_secs_f64();
    assert!(took >= 1.9, "5 x 256 KiB at 512 KiB/s took {took:.2} s");
    assert!(took < 6.0, "pacing overshot: {took:.2} s");
}

/// S3 Object Lock on moto (which enforces compliance locks): the bucket checks, locked writes,
/// deletes refused while locked, delete markers undone, extensions that never shorten.
#[test]
fn object_lock_on_moto() {
    use cairn_storage::object_lock::{now, LockPolicy, DAY};
    let Some(server) = TestServer::start(Flavor::Moto) else { return };

    // Refused: a plain bucket, a versioned one without Object Lock, one with a default rule.
    let plain = server.backend(&server.bucket("plain", "r"));
    let err = plain.object_lock().unwrap().check_bucket().unwrap_err().to_string();
    assert!(err.contains("versioning"), "{err}");
    server.enable_versioning("plain");
    let err = plain.object_lock().unwrap().check_bucket().unwrap_err().to_string();
    assert!(err.contains("Object Lock"), "{err}");
    let with_default = server.backend(&server.locked_bucket("defaulted", "r"));
    server.set_default_retention("defaulted", 3);
    let err = with_default.object_lock().unwrap().check_bucket().unwrap_err().to_string();
    assert!(err.contains("default retention (GOVERNANCE for 3 days)"), "{err}");

    let b = server.backend(&server.locked_bucket("locked", "repo"));
    let locks = b.object_lock().expect("S3 has object locks");
    locks.check_bucket().unwrap();
    let policy = LockPolicy { days: 2, generation_days: 1 };
    locks.lock_writes(policy);
    // Named by its content, as every repository object but the config is.
    let pack = blake3::hash(b"pack bytes").to_hex().to_string();
    let pack = pack.as_str();

    // A pack is written locked for the generation; deleting it is refused with its date.
    b.put(Kind::Pack, pack, b"pack bytes").unwrap();
    let until = locks.retained_until(Kind::Pack, pack).unwrap().expect("the pack is locked");
    assert!(until >= policy.required(now()) && until == policy.until(now()), "{until}");
    match b.delete(Kind::Pack, pack) {
        Err(StorageError::Locked { until: u, .. }) => assert_eq!(u, until),
        other => panic!("deleting a locked pack must fail with Locked, got {other:?}"),
    }
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"pack bytes");

    // Index files, locks and records are not locked: they go, versions and all.
    b.put(Kind::Index, INDEX, b"index").unwrap();
    assert_eq!(locks.retained_until(Kind::Index, INDEX).unwrap(), None);
    b.delete(Kind::Index, INDEX).unwrap();
    assert!(!b.exists(Kind::Index, INDEX).unwrap());

    // Someone with the keys deletes the pack the plain way: a delete marker hides it (S3
    // lets that through), undelete brings it back.
    let unlocked = server.backend("s3://locked/repo");
    unlocked.delete(Kind::Pack, pack).unwrap();
    assert!(!b.exists(Kind::Pack, pack).unwrap());
    let found = locks.undelete(true).unwrap();
    let hidden =
        cairn_storage::Restored { kind: Kind::Pack, name: pack.to_string(), how: cairn_storage::Restoration::Hidden };
    assert_eq!(found, vec![hidden]);
    assert!(!b.exists(Kind::Pack, pack).unwrap(), "a dry run changes nothing");
    assert_eq!(locks.undelete(false).unwrap().len(), 1);
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"pack bytes");
    assert!(locks.undelete(false).unwrap().is_empty());

    // Overwritten: an unlocked version over the locked one; undelete removes it.
    unlocked.put(Kind::Pack, pack, b"ransomware was here").unwrap();
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"ransomware was here");
    let found = locks.undelete(false).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].how, cairn_storage::Restoration::Overwritten);
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"pack bytes");
    assert!(locks.undelete(false).unwrap().is_empty());

    // Overwritten again, and cairn extends: its own version gets the extension, the one on
    // top (unlocked) does not; undelete deletes the one on top.
    unlocked.put(Kind::Pack, pack, b"ransomware, again").unwrap();
    let far = policy.until(now()) + 5 * DAY;
    assert_eq!(locks.extend(Kind::Pack, pack, far).unwrap(), far);
    assert_eq!(locks.retained_until(Kind::Pack, pack).unwrap(), None, "the version on top got the extension");
    assert_eq!(locks.lowest_retained(Kind::Pack, pack).unwrap(), Some(far));
    assert_eq!(locks.undelete(false).unwrap().len(), 1);
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"pack bytes");
    assert_eq!(locks.retained_until(Kind::Pack, pack).unwrap(), Some(far));

    // Overwritten with a locked version (the attacker holds a writer's rights): it cannot be
    // deleted, so cairn's version is copied back on top, locked as it was.
    let locking_attacker = server.backend("s3://locked/repo");
    locking_attacker.object_lock().unwrap().lock_writes(policy);
    locking_attacker.put(Kind::Pack, pack, b"ransomware, locked").unwrap();
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"ransomware, locked");
    assert_eq!(locks.undelete(false).unwrap().len(), 1);
    assert_eq!(b.get(Kind::Pack, pack).unwrap(), b"pack bytes");
    assert_eq!(locks.retained_until(Kind::Pack, pack).unwrap(), Some(far), "the copy is locked as cairn's was");
    assert!(locks.undelete(false).unwrap().is_empty());

    // Extensions: later only. moto would shorten a compliance lock; cairn never asks it to.
    let later = far + 30 * DAY;
    assert_eq!(locks.extend(Kind::Pack, pack, later).unwrap(), later);
    assert_eq!(locks.retained_until(Kind::Pack, pack).unwrap(), Some(later));
    assert!(locks.extend(Kind::Pack, pack, until).unwrap() >= far);
    assert_eq!(locks.retained_until(Kind::Pack, pack).unwrap(), Some(later));
    assert!(locks.locked_here().iter().any(|(k, n, _)| *k == Kind::Pack && n == pack));
    assert!(locks.locked_here().contains(&(Kind::Pack, pack.to_string(), later)));

    // The config is written create-only and locked too.
    b.put_new(Kind::Config, "", b"config").unwrap();
    assert!(matches!(b.put_new(Kind::Config, "", b"other"), Err(StorageError::AlreadyExists { .. })));
    assert!(locks.retained_until(Kind::Config, "config").unwrap().is_some());
}
