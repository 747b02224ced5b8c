//! What a repository must refuse or survive: tampered configs and keys, interrupted inits,
//! malformed points, commits racing readers, damaged copies, lost locks and lost writes.
//! Each test fails on the code the 2026-11 audit read (b64f822).

use cairn_repo::{Error, PointId, Repository};
use cairn_storage::faulty::{Fault, FaultPlan, FaultyBackend, Op};
use cairn_storage::{Backend, Kind, LocalBackend};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::*;

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_config_edited_to_turn_encryption_off_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    edit_config(dir.path(), |c| c["encryption"] = "none".into());
    let e = Repository::open(local(dir.path()), pw("pw")).err().expect("a downgraded config must be refused");
    assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("altered"), "{e}");
}

#[test]
fn any_edit_of_an_encrypted_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    edit_config(dir.path(), |c| c["block_size"] = 131072.into());
    let e = Repository::open(local(dir.path()), pw("pw")).err().expect("an edited config must be refused");
    assert!(e.to_string().contains("authenticates the repository config"), "{e}");
}

#[test]
fn configs_with_values_no_reader_can_use_are_refused() {
    for (field, value) in [("block_size", serde_json::json!(0)), ("block_size", 3000.into()), ("id", "../x".into())] {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(local(dir.path()), None).unwrap();
        edit_config(dir.path(), |c| c[field] = value.clone());
        let e = Repository::open(local(dir.path()), || None).err().expect("refused");
        assert!(e.to_string().contains("invalid"), "{field}={value}: {e}");
    }
}

#[test]
fn an_init_that_fails_leaves_no_key_and_the_next_init_leaves_one() {
    let dir = tempfile::tempdir().unwrap();
    // Write calls of an encrypted init: create, the key file, the config. The config fails.
    let plan = FaultPlan { op: Op::Write, at: 3, fault: Fault::Errno(libc::ENOSPC) };
    let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(dir.path()), Some(plan)));
    assert!(Repository::init(faulty, Some("first")).is_err());
    assert_eq!(local(dir.path()).list(Kind::Key).unwrap().len(), 0, "the failed init left its key");
    Repository::init(local(dir.path()), Some("second")).unwrap();
    assert_eq!(local(dir.path()).list(Kind::Key).unwrap().len(), 1);
    assert!(Repository::open(local(dir.path()), pw("second")).is_ok());
    assert!(matches!(Repository::open(local(dir.path()), pw("first")), Err(Error::WrongPassword)));
}

#[test]
fn a_key_left_by_an_interrupted_init_is_not_a_second_master_key() {
    // An init killed between its key file and its config leaves a key that the same password
    // opens; the next init must not end up with two master keys.
    let dir = tempfile::tempdir().unwrap();
    let orphan = tempfile::tempdir().unwrap();
    Repository::init(local(orphan.path()), Some("pw")).unwrap();
    let key = local(orphan.path()).list(Kind::Key).unwrap().remove(0);
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::copy(orphan.path().join("keys").join(&key.name), dir.path().join("keys").join(&key.name)).unwrap();
    let repo = Arc::new(Repository::init(local(dir.path()), Some("pw")).unwrap());
    let id = store_point(&repo, "x", &blocks(1, 2)).unwrap();
    assert_eq!(local(dir.path()).list(Kind::Key).unwrap().len(), 1);
    let again = Repository::open(local(dir.path()), pw("pw")).unwrap();
    again.load_index().unwrap();
    assert_eq!(read_point(&again, &id).unwrap(), blocks(1, 2));
}

#[test]
fn a_key_file_asking_for_absurd_costs_is_skipped_quickly() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    let b = local(dir.path());
    let real = b.list(Kind::Key).unwrap().remove(0);
    let mut v: serde_json::Value = serde_json::from_slice(&b.get(Kind::Key, &real.name).unwrap()).unwrap();
    v["memory_kib"] = u32::MAX.into();
    v["iterations"] = u32::MAX.into();
    let bytes = serde_json::to_vec(&v).unwrap();
    b.put(Kind::Key, &blake3::hash(&bytes).to_hex(), &bytes).unwrap();
    let t = std::time::Instant::now();
    assert!(Repository::open(local(dir.path()), pw("pw")).is_ok());
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}

#[test]
fn points_with_unsafe_names_or_maps_that_do_not_fit_are_refused_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::init(local(dir.path()), None).unwrap());
    repo.load_index().unwrap();
    let id = store_point(&repo, "x", &blocks(2, 3)).unwrap();
    let good = repo.load_point(&id).unwrap();
    let mut cases = Vec::new();
    let mut p = good.clone();
    p.disks[0].name = "../../etc/cron.d/x".into();
    cases.push(("a disk name with a path", p));
    let mut p = good.clone();
    p.disks[0].role = Some("kernel/../../x".into());
    cases.push(("a role with a path", p));
    let mut p = good.clone();
    p.disks[0].size = 100 << 20; // needs 1600 blocks: still one page, but the page holds 3
    cases.push(("a page shorter than the disk", p));
    let mut p = good.clone();
    p.disks[0].size = 300 << 20; // needs two pages
    cases.push(("too few map pages", p));
    let mut p = good.clone();
    p.disks[0].block_size = 0;
    cases.push(("block size 0", p));
    for (what, p) in cases {
        let id = repo.save_point(&p).unwrap();
        let r = repo.load_point(&id).and_then(|p| repo.read_map_page(&p.disks[0], 0).map(|_| ()));
        assert!(matches!(r, Err(Error::Corrupt(_))), "{what}: {:?}", r.err());
    }
}

#[test]
fn a_parent_that_is_no_point_id_is_read_as_none_and_a_stray_name_is_listed_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::init(local(dir.path()), None).unwrap());
    repo.load_index().unwrap();
    let id = store_point(&repo, "x", &blocks(2, 3)).unwrap();
    // A point document written by someone else: sealed and named like ours, its parent a path.
    let mut doc = serde_json::to_value(repo.load_point(&id).unwrap()).unwrap();
    doc["parent"] = "../../etc/passwd".into();
    let sealed = repo.crypto().seal(&serde_json::to_vec(&doc).unwrap(), 3);
    let forged = PointId::of_sealed(&sealed);
    repo.backend().put(Kind::Point, forged.as_str(), &sealed).unwrap();
    // `parent` is informational: the point stays readable (its data is whole), without one.
    let loaded = repo.load_point(&forged).unwrap();
    assert_eq!(loaded.parent, None);
    assert_eq!(loaded.disks[0].map, repo.load_point(&id).unwrap().disks[0].map);
    // Storage accepts 8 to 64 hex digits as a name; a point ID is exactly 64.
    repo.backend().put(Kind::Point, "0123456789abcdef", b"x").unwrap();
    let listed = repo.list_points().unwrap();
    assert_eq!(listed.points.len(), 2);
    let damaged: Vec<&str> = listed.damaged.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(damaged, ["0123456789abcdef"], "{:?}", listed.damaged);
}

#[test]
fn an_index_loaded_before_a_commit_covers_the_points_listed_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let reader = Repository::init(local(dir.path()), None).unwrap();
    reader.load_index().unwrap();
    // Another process commits a point after the reader loaded its index.
    let writer = Arc::new(Repository::open(local(dir.path()), || None).unwrap());
    writer.load_index().unwrap();
    let id = store_point(&writer, "x", &blocks(3, 4)).unwrap();
    let listed = reader.list_points().unwrap();
    assert_eq!(listed.points.len(), 1);
    assert_eq!(read_point(&reader, &id).unwrap(), blocks(3, 4));
}

#[test]
fn reads_fall_back_to_a_sound_copy_when_one_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    // Encrypted, so the two copies are different packs (random nonces).
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    // Two sessions that both loaded the index before either committed store the same blocks.
    let a = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    let b = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    a.load_index().unwrap();
    b.load_index().unwrap();
    let data = blocks(4, 2);
    let id = store_point(&a, "x", &data).unwrap();
    store_point(&b, "x", &data).unwrap();
    let packs = local(dir.path()).list(Kind::Pack).unwrap();
    assert_eq!(packs.len(), 2);
    let reader = Repository::open(local(dir.path()), pw("pw")).unwrap();
    reader.load_index().unwrap();
    // Damage the copy readers use first.
    let first = reader.index().get(&reader.crypto().block_id(&data[0])).unwrap().pack_name();
    let path = dir.path().join("packs").join(&first[..2]).join(&first);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(read_point(&reader, &id).unwrap(), data);
}

#[test]
fn a_commit_whose_lock_was_lost_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::init(local(dir.path()), None).unwrap());
    repo.load_index().unwrap();
    let lock = repo.lock(false, "backup", Duration::ZERO).unwrap();
    // Another host judged it stale and removed it (say, a gc).
    local(dir.path()).delete(Kind::Lock, lock.name()).unwrap();
    let e = store_point(&repo, "x", &blocks(5, 1)).err().expect("commit without a lock");
    assert!(matches!(e, Error::Locked(_)), "{e}");
    assert!(repo.list_points().unwrap().points.is_empty());
}

#[test]
fn a_write_the_storage_loses_fails_the_backup_before_its_point_exists() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), None).unwrap();
    // The first write of the session is its pack; the storage acknowledges it and drops it.
    let plan = FaultPlan { op: Op::Write, at: 1, fault: Fault::Lost };
    let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(dir.path()), Some(plan)));
    let repo = Arc::new(Repository::open(faulty, || None).unwrap());
    repo.load_index().unwrap();
    let e = store_point(&repo, "x", &blocks(6, 2)).err().expect("a lost pack must fail the commit");
    assert!(e.to_string().contains("does not hold it"), "{e}");
    let clean = Repository::open(local(dir.path()), || None).unwrap();
    assert!(clean.list_points().unwrap().points.is_empty());
}

#[test]
fn init_refuses_a_place_that_holds_data_but_lost_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::init(local(dir.path()), Some("pw")).unwrap());
    repo.load_index().unwrap();
    let id = store_point(&repo, "x", &blocks(7, 2)).unwrap();
    let config = std::fs::read(dir.path().join("config")).unwrap();
    std::fs::remove_file(dir.path().join("config")).unwrap();
    let e = Repository::init(local(dir.path()), Some("other")).err().expect("init over data");
    assert!(e.to_string().contains("no config"), "{e}");
    // The key is untouched: with the config back, everything reads again.
    std::fs::write(dir.path().join("config"), config).unwrap();
    let again = Repository::open(local(dir.path()), pw("pw")).unwrap();
    again.load_index().unwrap();
    assert_eq!(read_point(&again, &id).unwrap(), blocks(7, 2));
}

/// A backend on which another init, racing, removes every key file (taking them for orphans)
/// just before our config is written.
struct RacingInit(LocalBackend);

impl Backend for RacingInit {
    fn location(&self) -> String {
        self.0.location()
    }
    fn create(&self) -> cairn_storage::Result<()> {
        self.0.create()
    }
    fn exists(&self, k: Kind, n: &str) -> cairn_storage::Result<bool> {
        self.0.exists(k, n)
    }
    fn put(&self, k: Kind, n: &str, d: &[u8]) -> cairn_storage::Result<()> {
        self.0.put(k, n, d)
    }
    fn put_new(&self, k: Kind, n: &str, d: &[u8]) -> cairn_storage::Result<()> {
        if k == Kind::Config {
            for key in self.0.list(Kind::Key)? {
                self.0.delete(Kind::Key, &key.name)?;
            }
        }
        self.0.put_new(k, n, d)
    }
    fn get(&self, k: Kind, n: &str) -> cairn_storage::Result<Vec<u8>> {
        self.0.get(k, n)
    }
    fn get_range(&self, k: Kind, n: &str, o: u64, l: u64) -> cairn_storage::Result<Vec<u8>> {
        self.0.get_range(k, n, o, l)
    }
    fn list(&self, k: Kind) -> cairn_storage::Result<Vec<cairn_storage::Listed>> {
        self.0.list(k)
    }
    fn delete(&self, k: Kind, n: &str) -> cairn_storage::Result<()> {
        self.0.delete(k, n)
    }
}

#[test]
fn an_init_whose_key_a_racing_init_removed_puts_it_back() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(Arc::new(RacingInit(LocalBackend::new(dir.path()))), Some("pw")).unwrap();
    assert_eq!(local(dir.path()).list(Kind::Key).unwrap().len(), 1);
    assert!(Repository::open(local(dir.path()), pw("pw")).is_ok());
}
