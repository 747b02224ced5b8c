//! Prune against a real local repository: what it deletes, what it keeps while others work,
//! and what it refuses.

mod common;
use common::*;

use cairn_repo::prune::{prune, PruneOptions, PruneReport};
use cairn_repo::{Error, PointId, Repository};
use cairn_storage::Kind;
use std::sync::Arc;
use std::time::Duration;

fn open(dir: &std::path::Path) -> Arc<Repository> {
    let r = Arc::new(Repository::open(local(dir), pw("pw")).unwrap());
    r.load_index().unwrap();
    r
}

fn now_opts() -> PruneOptions {
    PruneOptions { grace: Duration::ZERO, ..Default::default() }
}

fn run(repo: &Arc<Repository>, opts: &PruneOptions) -> PruneReport {
    prune(repo, opts, &|_| {}).unwrap()
}

fn packs(dir: &std::path::Path) -> usize {
    local(dir).list(Kind::Pack).unwrap().len()
}

fn forget(repo: &Repository, id: &PointId) {
    repo.backend().delete(Kind::Point, id.as_str()).unwrap();
}

fn new_repo() -> (tempfile::TempDir, Arc<Repository>) {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    let repo = open(dir.path());
    (dir, repo)
}

#[test]
fn unused_packs_go_and_every_surviving_point_restores() {
    let (dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 40)).unwrap();
    let b = store_point(&repo, "b", &blocks(2, 40)).unwrap();
    assert_eq!(packs(dir.path()), 2);
    forget(&repo, &a);
    let r = run(&repo, &now_opts());
    assert_eq!((r.points, r.deleted.packs, r.newly_marked.packs, r.used.packs), (1, 1, 1, 1), "{r:?}");
    assert!(r.pending.is_empty(), "{r:?}");
    assert_eq!(packs(dir.path()), 1);
    // The prune's own process still reads the survivor, and no longer lists the deleted pack.
    assert_eq!(read_point(&repo, &b).unwrap(), blocks(2, 40));
    assert!(!repo.index().contains(&repo.crypto().block_id(&blocks(1, 40)[0])));
    // A fresh reader finds every block of the survivor, and no index entry of the deleted pack.
    let fresh = open(dir.path());
    assert_eq!(read_point(&fresh, &b).unwrap(), blocks(2, 40));
    assert_eq!(fresh.index().pack_count(), 1);
    // Nothing left to do: a second run deletes nothing and marks nothing.
    let again = run(&fresh, &now_opts());
    assert_eq!((again.deleted.packs, again.newly_marked.packs), (0, 0), "{again:?}");
}

#[test]
fn the_grace_period_keeps_marked_packs_until_a_later_run() {
    let (dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 8)).unwrap();
    forget(&repo, &a);
    let r = run(&repo, &PruneOptions::default());
    assert_eq!((r.newly_marked.packs, r.deleted.packs), (1, 0), "{r:?}");
    assert!(r.pending[0].reason.contains("grace period"), "{r:?}");
    assert_eq!(packs(dir.path()), 1);
    // The prune's own process knows the mark: a backup it runs next stores those blocks again.
    let id = repo.crypto().block_id(&blocks(1, 8)[0]);
    assert!(repo.index().contains(&id) && !repo.index().reusable(&id));
    // The mark survives across runs; with the grace over, the pack goes.
    let r = run(&open(dir.path()), &now_opts());
    assert_eq!((r.newly_marked.packs, r.deleted.packs), (0, 1), "{r:?}");
    assert_eq!(packs(dir.path()), 0);
}

#[test]
fn a_lock_older_than_the_mark_holds_the_deletion() {
    let (dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 8)).unwrap();
    forget(&repo, &a);
    let backup = repo.lock(false, "backup", Duration::ZERO).unwrap();
    let r = run(&repo, &now_opts());
    assert_eq!((r.newly_marked.packs, r.deleted.packs), (1, 0), "{r:?}");
    assert!(r.pending[0].reason.contains("shared lock for backup"), "{r:?}");
    assert_eq!(packs(dir.path()), 1);
    drop(backup);
    let r = run(&open(dir.path()), &now_opts());
    assert_eq!(r.deleted.packs, 1, "{r:?}");
}

#[test]
fn a_writer_that_missed_the_mark_keeps_what_it_referenced() {
    let (dir, repo) = new_repo();
    let data = blocks(1, 8);
    let a = store_point(&repo, "a", &data).unwrap();
    forget(&repo, &a);
    // A backup that loaded the index before the prune: it will reuse the forgotten blocks.
    let writer = open(dir.path());
    let lock = writer.lock(false, "backup", Duration::ZERO).unwrap();
    let r = run(&repo, &now_opts());
    assert_eq!((r.newly_marked.packs, r.deleted.packs), (1, 0), "{r:?}");
    let c = store_point(&writer, "c", &data).unwrap();
    assert_eq!(packs(dir.path()), 1, "the writer reused the marked pack");
    drop(lock);
    // Its point restores, and the next prune takes the mark back instead of deleting.
    let r = run(&open(dir.path()), &now_opts());
    assert_eq!((r.recovered.packs, r.deleted.packs), (1, 0), "{r:?}");
    assert_eq!(read_point(&open(dir.path()), &c).unwrap(), data);
    // A writer that knows the mark stores the blocks again rather than rely on a marked pack.
    let (dir2, repo2) = new_repo();
    let a = store_point(&repo2, "a", &data).unwrap();
    forget(&repo2, &a);
    let _hold = open(dir2.path()).lock(false, "restore", Duration::ZERO).unwrap();
    run(&repo2, &now_opts());
    let late = open(dir2.path());
    assert!(!late.index().reusable(&late.crypto().block_id(&data[0])));
    let d = store_point(&late, "d", &data).unwrap();
    assert_eq!(packs(dir2.path()), 2, "blocks only a marked pack holds are stored again");
    assert_eq!(read_point(&late, &d).unwrap(), data);
}

#[test]
fn partly_used_packs_are_repacked_and_the_old_one_goes() {
    let (dir, repo) = new_repo();
    let data = blocks(3, 40);
    let a = store_point(&repo, "a", &data).unwrap();
    let b = store_point(&repo, "b", &data[..10]).unwrap();
    assert_eq!(packs(dir.path()), 2, "b stores only its map page");
    forget(&repo, &a);
    let r = run(&repo, &now_opts());
    assert_eq!((r.repacked.packs, r.repack_written.packs, r.deleted.packs), (1, 1, 1), "{r:?}");
    assert_eq!(packs(dir.path()), 2);
    let fresh = open(dir.path());
    assert_eq!(read_point(&fresh, &b).unwrap(), data[..10].to_vec());
    // Under the threshold nothing is rewritten.
    let (_dir2, repo2) = new_repo();
    let a = store_point(&repo2, "a", &data).unwrap();
    store_point(&repo2, "b", &data[..39]).unwrap();
    forget(&repo2, &a);
    let r = run(&repo2, &PruneOptions { max_unused: 0.5, ..now_opts() });
    assert_eq!((r.repacked.packs, r.partly_used.packs, r.deleted.packs), (0, 1, 0), "{r:?}");
}

#[test]
fn a_pack_no_index_lists_is_marked_and_deleted_like_an_unused_one() {
    let (dir, repo) = new_repo();
    let b = store_point(&repo, "b", &blocks(2, 4)).unwrap();
    let stray = vec![7u8; 4096];
    let name = blake3::hash(&stray).to_hex().to_string();
    repo.backend().put(Kind::Pack, &name, &stray).unwrap();
    let r = run(&repo, &now_opts());
    assert_eq!((r.unindexed.packs, r.deleted.packs), (1, 1), "{r:?}");
    assert!(!repo.backend().exists(Kind::Pack, &name).unwrap());
    assert_eq!(read_point(&open(dir.path()), &b).unwrap(), blocks(2, 4));
}

#[test]
fn prune_refuses_when_a_point_or_an_index_file_cannot_be_read() {
    let (dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 4)).unwrap();
    store_point(&repo, "b", &blocks(2, 4)).unwrap();
    forget(&repo, &a);
    let points = local(dir.path()).list(Kind::Point).unwrap();
    let victim = dir.path().join("points").join(&points[0].name);
    let saved = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, b"garbage").unwrap();
    let e = prune(&repo, &now_opts(), &|_| {}).err().expect("an unreadable point must stop the prune");
    assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("cannot be read"), "{e}");
    assert_eq!(packs(dir.path()), 2, "nothing deleted");
    std::fs::write(&victim, saved).unwrap();
    let idx = local(dir.path()).list(Kind::Index).unwrap();
    let victim = dir.path().join("index").join(&idx[0].name);
    std::fs::write(&victim, b"garbage").unwrap();
    let e = prune(&open(dir.path()), &now_opts(), &|_| {}).err().expect("a damaged index file must stop the prune");
    assert!(matches!(e, Error::DamagedIndex { .. }), "{e}");
    assert_eq!(packs(dir.path()), 2, "nothing deleted");
}

#[test]
fn a_dry_run_changes_nothing_and_says_what_would_go() {
    let (dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 8)).unwrap();
    store_point(&repo, "b", &blocks(2, 8)).unwrap();
    forget(&repo, &a);
    let before: Vec<_> =
        [Kind::Pack, Kind::Index, Kind::Catalog].iter().map(|k| local(dir.path()).list(*k).unwrap().len()).collect();
    let r = run(&repo, &PruneOptions { dry_run: true, ..now_opts() });
    assert!(r.dry_run);
    assert_eq!(r.newly_marked.packs, 1, "{r:?}");
    let after: Vec<_> =
        [Kind::Pack, Kind::Index, Kind::Catalog].iter().map(|k| local(dir.path()).list(*k).unwrap().len()).collect();
    assert_eq!(before, after);
}

#[test]
fn two_prunes_never_run_at_once_but_a_backup_runs_during_one() {
    let (dir, repo) = new_repo();
    let _running = repo.lock_mode(cairn_repo::lock::LockMode::Maintenance, "prune", Duration::ZERO).unwrap();
    let e = prune(&open(dir.path()), &now_opts(), &|_| {}).err().expect("a second prune must wait");
    assert!(matches!(e, Error::Locked(_)), "{e}");
    let other = open(dir.path());
    store_point(&other, "b", &blocks(2, 4)).unwrap();
}

/// A prune that fails anywhere (here: an I/O error on any read, the confirmation of a
/// repacked pack among them) and the clean prune after it lose nothing. Found by the fault
/// harness: the failed run left its repacked pack unindexed; the next run marked it as
/// unindexed, wrote the very same pack again (names are content hashes) as its own repack, and
/// deleted it with the packs it replaced.
#[test]
fn a_failed_prune_and_the_clean_one_after_it_lose_nothing() {
    use cairn_storage::faulty::{Fault, FaultPlan, FaultyBackend, Op};
    use cairn_storage::LocalBackend;
    let data = blocks(3, 40);
    let setup = |dir: &std::path::Path| partly_used_plain_repository(dir, &data);
    let counting = {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let f = Arc::new(FaultyBackend::counting(LocalBackend::new(dir.path())));
        let repo = Arc::new(Repository::open(f.clone(), || None).unwrap());
        run(&repo, &now_opts());
        f.calls(Op::Read)
    };
    assert!(counting > 10);
    for at in 1..=counting {
        let dir = tempfile::tempdir().unwrap();
        let b = setup(dir.path());
        let plan = FaultPlan { op: Op::Read, at, fault: Fault::Errno(libc::EIO) };
        let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(dir.path()), Some(plan)));
        if let Ok(r) = Repository::open(faulty, || None) {
            let _ = prune(&Arc::new(r), &now_opts(), &|_| {});
        }
        let clean = Arc::new(Repository::open(local(dir.path()), || None).unwrap());
        prune(&clean, &now_opts(), &|_| {}).unwrap_or_else(|e| panic!("read {at}: the clean prune failed: {e}"));
        let fresh = open_plain(dir.path());
        let back = read_point(&fresh, &b).unwrap_or_else(|e| panic!("read {at}: point b lost data: {e}"));
        assert_eq!(back, data[..10].to_vec(), "read {at}");
    }
}

/// A plain repository where point "a" (all of `data`) was forgotten and point "b" (its first
/// 10 blocks) remains: one unused share of a pack to repack. Returns b's ID.
fn partly_used_plain_repository(dir: &std::path::Path, data: &[Vec<u8>]) -> PointId {
    Repository::init(local(dir), None).unwrap();
    let repo = open_plain(dir);
    let a = store_point(&repo, "a", data).unwrap();
    let b = store_point(&repo, "b", &data[..10]).unwrap();
    forget(&repo, &a);
    b
}

fn open_plain(dir: &std::path::Path) -> Arc<Repository> {
    let r = Arc::new(Repository::open(local(dir), || None).unwrap());
    r.load_index().unwrap();
    r
}

#[test]
fn a_prune_whose_write_is_torn_and_the_clean_one_after_it_lose_nothing() {
    use cairn_storage::faulty::{Fault, FaultPlan, FaultyBackend, Op};
    use cairn_storage::LocalBackend;
    let data = blocks(3, 40);
    let setup = |dir: &std::path::Path| partly_used_plain_repository(dir, &data);
    for at in 1..=6 {
        let dir = tempfile::tempdir().unwrap();
        let b = setup(dir.path());
        let plan = FaultPlan { op: Op::Write, at, fault: Fault::Torn };
        let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(dir.path()), Some(plan)));
        let r = Repository::open(faulty.clone(), || None).unwrap();
        let e = prune(&Arc::new(r), &now_opts(), &|_| {});
        let torn = faulty.injected();
        eprintln!(
            "write {at}: {:?} -> {:?}",
            torn.as_ref().map(|i| format!("{i:?}")),
            e.as_ref().err().map(|e| e.to_string())
        );
        // The storage broke its contract: the torn object is named by verify; remove it as an
        // operator would, then prune again.
        if let Some(i) = torn {
            let _ = local(dir.path()).delete(i.kind, &i.name);
        }
        let clean = open_plain(dir.path());
        let r = prune(&clean, &now_opts(), &|_| {});
        eprintln!("  clean: {:?}", r.as_ref().map(|r| (r.deleted.packs, r.repacked.packs)).map_err(|e| e.to_string()));
        let fresh = open_plain(dir.path());
        let back = read_point(&fresh, &b).unwrap_or_else(|e| panic!("write {at}: point b lost data: {e}"));
        assert_eq!(back, data[..10].to_vec(), "write {at}");
    }
}

/// A repack can write, under the same name, a pack that it is repacking: names are content
/// hashes, and gathering the used blocks of two packs can give back exactly one of them. Here
/// pack R was made by an earlier repack of S1 and S2, then lost its index file (a torn write),
/// so a backup stored S1 again (pack Z); once R is listed again, S1 has two copies. When the
/// next prune takes Z's copies of S1, it repacks Z (S1 used) with R (S2 used) into [S1, S2]:
/// R itself. Found by the fault harness: R was then marked with the packs it replaced and
/// deleted. Which copy of S1 a prune takes depends on names, so several data sets are tried,
/// the point checked after each, and the collision must have happened at least once.
#[test]
fn a_repack_that_writes_a_pack_it_repacks_keeps_it() {
    let mut collisions = 0;
    for seed in 0..12u8 {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(local(dir.path()), None).unwrap();
        let repo = open_plain(dir.path());
        let set = |k: u8| blocks(seed * 8 + k, 6);
        let (s1, s2) = (set(1), set(2));
        let x = store_point(&repo, "x", &[s1.clone(), set(3)].concat()).unwrap();
        let y = store_point(&repo, "y", &[s2.clone(), set(4)].concat()).unwrap();
        let keep = store_point(&repo, "keep", &[s1.clone(), s2.clone()].concat()).unwrap();
        forget(&repo, &x);
        forget(&repo, &y);
        let first = run(&repo, &PruneOptions { threads: 1, ..now_opts() });
        assert_eq!(first.repack_written.packs, 1, "{first:?}");
        // R's index file is lost; a backup stores S1 again.
        let r_pack = repo.index().get(&repo.crypto().block_id(&s1[0])).unwrap().pack;
        let (r_file, r_listing) = repo
            .index_file_names()
            .unwrap()
            .into_iter()
            .map(|n| (n.clone(), repo.read_index_file(&n).unwrap()))
            .find(|(_, l)| l.iter().any(|(p, _)| *p == r_pack))
            .unwrap();
        repo.delete_index_file(&r_file).unwrap();
        let repo = open_plain(dir.path());
        let z = store_point(&repo, "z", &[s1.clone(), set(5)].concat()).unwrap();
        forget(&repo, &z);
        // `repair index` lists R again.
        repo.write_index_file(&r_listing).unwrap();
        let repo = open_plain(dir.path());
        // One thread: one pack written from both (two would each write their own).
        let second = run(&repo, &PruneOptions { threads: 1, ..now_opts() });
        let r_name = hex::encode(r_pack);
        if second.repacked.packs == 2 && local(dir.path()).exists(Kind::Pack, &r_name).unwrap() {
            collisions += 1;
        }
        let fresh = open_plain(dir.path());
        let back = read_point(&fresh, &keep).unwrap_or_else(|e| panic!("seed {seed}: {e}; {second:?}"));
        assert_eq!(back, [s1, s2].concat(), "seed {seed}");
        let third = run(&fresh, &now_opts());
        assert_eq!((third.deleted.packs, third.repacked.packs), (0, 0), "seed {seed}: {third:?}");
    }
    assert!(collisions > 0, "no data set made a repack write a pack it was repacking");
}

#[test]
fn a_catalog_record_whose_body_does_not_fit_its_kind_stops_forget_and_prune() {
    let (_dir, repo) = new_repo();
    let a = store_point(&repo, "a", &blocks(1, 4)).unwrap();
    let b = store_point(&repo, "b", &blocks(2, 4)).unwrap();
    // A protection of `a` in a shape no version writes: read as a protection, it would be lost.
    let bad = repo
        .save_record(&serde_json::json!({"kind": "protection", "point": a.as_str(), "time": "t", "by": 7}))
        .unwrap();
    let records = repo.load_records().unwrap();
    assert!(records.iter().all(|(n, _)| *n != bad), "a misfit record was read as sound");
    let damaged = repo.damaged_records();
    assert!(damaged.iter().any(|(n, why)| *n == bad && why.contains("not a valid protection record")), "{damaged:?}");
    let plan = cairn_repo::forget::plan_points(&repo, &[format!("a@{}", a.short())]).unwrap();
    let e = cairn_repo::forget::apply(&repo, &plan).unwrap_err();
    assert!(e.to_string().contains("may protect a point"), "{e}");
    let e = prune(&repo, &now_opts(), &|_| {}).unwrap_err();
    assert!(matches!(e, Error::Corrupt(ref m) if m.contains("is damaged")), "{e}");
    assert!(repo.load_point(&a).is_ok() && repo.load_point(&b).is_ok());
    // Once the record is gone, both go on.
    repo.delete_record(&bad).unwrap();
    cairn_repo::forget::apply(&repo, &plan).unwrap();
    prune(&repo, &now_opts(), &|_| {}).unwrap();
    assert!(repo.load_point(&b).is_ok());
}
