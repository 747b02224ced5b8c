//! Verify acts only on proof, releases what reads sound, never cries wolf during a commit;
//! repair brings back what a damaged index hid. Each test fails on the code the 2026-11 audit
//! read (b64f822).

use cairn_engine::backup::{backup, BackupOptions, DiskInput};
use cairn_engine::restore::{restore_disk, RestoreOptions};
use cairn_engine::source::FileSource;
use cairn_engine::target::TargetFormat;
use cairn_engine::NoProgress;
use cairn_repo::PointId;
use cairn_repo::Repository;
use cairn_storage::{Backend, Kind, Listed, LocalBackend, StorageError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn image(dir: &Path, name: &str, seed: u32, mib: usize) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..mib << 20).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed).to_le_bytes()[2]).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn open(b: Arc<dyn Backend>) -> Arc<Repository> {
    let r = Repository::open(b, || None).unwrap();
    r.load_index().unwrap();
    Arc::new(r)
}

fn back_up(repo: &Arc<Repository>, name: &str, img: &Path) -> PointId {
    let disk = DiskInput::new("disk0", Box::new(FileSource::open(img).unwrap()));
    let opts = BackupOptions { name: name.into(), workers: 1, ..Default::default() };
    backup(repo, vec![disk], &opts, &NoProgress).unwrap().0
}

fn restores(repo: &Repository, id: &PointId, img: &Path, out: &Path) -> anyhow::Result<bool> {
    let p = repo.load_point(id)?;
    let opts = RestoreOptions { format: TargetFormat::Raw, force: true, workers: 1 };
    restore_disk(repo, id, &p, &p.disks[0], out, &opts, &NoProgress)?;
    Ok(std::fs::read(out)? == std::fs::read(img)?)
}

/// A backend whose pack reads fail with EIO while `failing` is set (a disk or server having a
/// bad moment): it proves nothing about the packs' bytes.
struct Flaky {
    inner: LocalBackend,
    failing: AtomicBool,
}

impl Backend for Flaky {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> cairn_storage::Result<()> {
        self.inner.create()
    }
    fn exists(&self, k: Kind, n: &str) -> cairn_storage::Result<bool> {
        self.inner.exists(k, n)
    }
    fn put(&self, k: Kind, n: &str, d: &[u8]) -> cairn_storage::Result<()> {
        self.inner.put(k, n, d)
    }
    fn put_new(&self, k: Kind, n: &str, d: &[u8]) -> cairn_storage::Result<()> {
        self.inner.put_new(k, n, d)
    }
    fn get(&self, k: Kind, n: &str) -> cairn_storage::Result<Vec<u8>> {
        if k == Kind::Pack && self.failing.load(Ordering::SeqCst) {
            return Err(StorageError::Io { what: n.into(), source: std::io::Error::from_raw_os_error(libc::EIO) });
        }
        self.inner.get(k, n)
    }
    fn get_range(&self, k: Kind, n: &str, o: u64, l: u64) -> cairn_storage::Result<Vec<u8>> {
        self.inner.get_range(k, n, o, l)
    }
    fn list(&self, k: Kind) -> cairn_storage::Result<Vec<Listed>> {
        self.inner.list(k)
    }
    fn delete(&self, k: Kind, n: &str) -> cairn_storage::Result<()> {
        self.inner.delete(k, n)
    }
}

#[test]
fn an_io_error_quarantines_nothing_and_is_reported_as_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    Repository::init(Arc::new(LocalBackend::new(&repo_dir)), None).unwrap();
    let img = image(dir.path(), "a.img", 1, 4);
    let id = back_up(&open(Arc::new(LocalBackend::new(&repo_dir))), "a", &img);
    let flaky = Arc::new(Flaky { inner: LocalBackend::new(&repo_dir), failing: AtomicBool::new(true) });
    let repo = open(flaky.clone());
    let run = cairn_engine::verify::run(&repo, 1, Default::default(), &NoProgress).unwrap();
    assert!(!run.report.ok);
    assert!(!run.report.unreadable_packs.is_empty(), "the failed reads are not reported");
    assert!(run.report.damaged_blocks.is_empty(), "an I/O error was taken for damage: {:?}", run.report.damaged_blocks);
    assert!(repo.quarantine().unwrap().is_empty(), "an I/O error quarantined blocks");
    // The medium recovers: everything verifies and restores.
    flaky.failing.store(false, Ordering::SeqCst);
    assert!(cairn_engine::verify::run(&repo, 1, Default::default(), &NoProgress).unwrap().report.ok);
    assert!(restores(&repo, &id, &img, &dir.path().join("out.img")).unwrap());
}

#[test]
fn a_quarantined_copy_that_reads_sound_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    Repository::init(Arc::new(LocalBackend::new(&repo_dir)), None).unwrap();
    let img = image(dir.path(), "a.img", 2, 2);
    let repo = open(Arc::new(LocalBackend::new(&repo_dir)));
    let id = back_up(&repo, "a", &img);
    // A misread once made verify quarantine a sound copy.
    let page = repo.read_map_page(&repo.load_point(&id).unwrap().disks[0], 0).unwrap();
    let loc = repo.index().get(&page[0]).unwrap();
    repo.update_quarantine(&[(loc.pack_name(), page[0].to_hex())], &[]).unwrap();
    assert_eq!(repo.quarantine().unwrap().len(), 1);
    // Even before verify runs again, a restore uses it (hash-checked) as the last resort.
    assert!(restores(&repo, &id, &img, &dir.path().join("out.img")).unwrap());
    let run = cairn_engine::verify::run(&repo, 1, Default::default(), &NoProgress).unwrap();
    assert_eq!(run.report.released_copies.len(), 1);
    // The run that releases it does not report the block as damaged.
    assert!(run.report.ok, "{:?}", run.report.damaged_blocks);
    assert!(repo.quarantine().unwrap().is_empty(), "the sound copy stays quarantined");
    assert!(cairn_engine::verify::verify(&repo, 1, &NoProgress).unwrap().ok);
}

#[test]
fn verify_during_commits_never_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    Repository::init(Arc::new(LocalBackend::new(&repo_dir)), None).unwrap();
    let images: Vec<PathBuf> = (0..6).map(|i| image(dir.path(), &format!("{i}.img"), 100 + i, 3)).collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for img in &images {
                back_up(&open(Arc::new(LocalBackend::new(&repo_dir))), "a", img);
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut runs = 0;
        while !done.load(Ordering::SeqCst) || runs == 0 {
            // A reader that loaded its index before a commit and lists points after it.
            let repo = open(Arc::new(LocalBackend::new(&repo_dir)));
            std::thread::sleep(std::time::Duration::from_millis(30));
            let r = cairn_engine::verify::verify(&repo, 1, &NoProgress).unwrap();
            assert!(r.ok, "verify reported damage during a commit: {:?}", r.damaged_blocks.first());
            runs += 1;
        }
    });
}

#[test]
fn repair_index_brings_back_points_a_damaged_index_file_hid() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(&repo_dir));
    Repository::init(b.clone(), None).unwrap();
    let img = image(dir.path(), "a.img", 3, 3);
    let id = back_up(&open(b.clone()), "a", &img);
    for l in b.list(Kind::Index).unwrap() {
        let p = repo_dir.join("index").join(&l.name);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&p, bytes).unwrap();
    }
    let repo = open(b.clone());
    assert!(restores(&repo, &id, &img, &dir.path().join("out.img")).is_err(), "the damaged index hides nothing?");
    let report = cairn_engine::repair::rebuild_index(&repo, false, &NoProgress).unwrap();
    assert_eq!(report.damaged_index_files.len(), 1);
    assert!(!report.packs_from_trailers.is_empty());
    // The rebuilt file has the damaged one's original bytes, so its name: it replaced it.
    assert_eq!(report.index_files_written, 1);
    let repo = open(b.clone());
    assert!(restores(&repo, &id, &img, &dir.path().join("out.img")).unwrap());
    assert!(cairn_engine::verify::verify(&repo, 1, &NoProgress).unwrap().ok);
}

#[test]
fn a_pack_a_prune_deletes_while_verify_runs_is_reclaimed_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    Repository::init(Arc::new(LocalBackend::new(&repo_dir)), None).unwrap();
    let repo = open(Arc::new(LocalBackend::new(&repo_dir)));
    let a = back_up(&repo, "a", &image(dir.path(), "a.img", 1 << 16, 3));
    back_up(&repo, "b", &image(dir.path(), "b.img", 2 << 16, 3));
    repo.delete_point(&a).unwrap(); // forget
                                    // Yesterday's prune marked a's pack (two hours ago: past the clock margin).
    let packs = LocalBackend::new(&repo_dir).list(Kind::Pack).unwrap();
    let index_of = |name: &str| repo.index().has_pack(&cairn_repo::index::pack_id_from_name(name).unwrap());
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 7200;
    let unused: Vec<_> = {
        let p = repo.load_point(&repo.list_points().unwrap().points[0].0).unwrap();
        let page = repo.read_map_page(&p.disks[0], 0).unwrap();
        let used: std::collections::HashSet<_> =
            page.iter().filter_map(|b| repo.index().get(b)).map(|l| l.pack_name()).collect();
        packs.iter().filter(|l| index_of(&l.name) && !used.contains(&l.name)).map(|l| l.name.clone()).collect()
    };
    assert!(!unused.is_empty());
    let marks: Vec<_> = unused.iter().map(|n| serde_json::json!([n, at])).collect();
    repo.save_record(&serde_json::json!({"kind": "prune-marks", "time": "t", "packs": marks})).unwrap();
    // A verify loads the index (with the marks) and takes its lock after the mark...
    let verifier = open(Arc::new(LocalBackend::new(&repo_dir)));
    let _lock = verifier.lock(false, "verify", std::time::Duration::ZERO).unwrap();
    // ...so a prune may delete the marked pack under it.
    let pruner = open(Arc::new(LocalBackend::new(&repo_dir)));
    let opts = cairn_repo::prune::PruneOptions { grace: std::time::Duration::from_secs(3600), ..Default::default() };
    let r = cairn_repo::prune::prune(&pruner, &opts, &|_| {}).unwrap();
    assert!(r.deleted.packs >= 1, "{r:?}");
    let v = cairn_engine::verify::verify(&verifier, 1, &NoProgress).unwrap();
    assert!(v.ok, "a pack reclaimed by prune reported as damage: {:?}", v.damaged_packs);
    assert_eq!(v.reclaimed_packs.len(), unused.len(), "{:?}", v.reclaimed_packs);
}

#[test]
fn a_repair_after_a_prune_tore_its_index_file_and_the_clean_prune_lose_nothing() {
    use cairn_storage::faulty::{Fault, FaultPlan, FaultyBackend, Op};
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    Repository::init(Arc::new(LocalBackend::new(&repo_dir)), None).unwrap();
    let a_img = image(dir.path(), "a.img", 5 << 16, 3);
    let b_img = dir.path().join("b.img");
    std::fs::write(&b_img, &std::fs::read(&a_img).unwrap()[..1 << 20]).unwrap();
    let repo = open(Arc::new(LocalBackend::new(&repo_dir)));
    let a = back_up(&repo, "a", &a_img);
    let b = back_up(&repo, "b", &b_img);
    repo.delete_point(&a).unwrap();
    let opts =
        cairn_repo::prune::PruneOptions { grace: std::time::Duration::ZERO, max_unused: 0.0, ..Default::default() };
    let plan = FaultPlan { op: Op::Write, at: 3, fault: Fault::Torn };
    let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(&repo_dir), Some(plan)));
    let r = Arc::new(Repository::open(faulty.clone(), || None).unwrap());
    let e = cairn_repo::prune::prune(&r, &opts, &|_| {});
    eprintln!("faulty: {:?} {:?}", faulty.injected(), e.as_ref().err().map(|e| e.to_string()));
    let clean = open(Arc::new(LocalBackend::new(&repo_dir)));
    if !clean.damaged_index_files().is_empty() {
        let _l = clean.lock(true, "repair", std::time::Duration::ZERO).unwrap();
        cairn_engine::repair::rebuild_index(&clean, false, &NoProgress).unwrap();
    }
    let r = cairn_repo::prune::prune(&clean, &opts, &|_| {}).unwrap();
    eprintln!("clean: deleted {:?} repacked {:?} marked {:?}", r.deleted, r.repacked, r.newly_marked);
    let fresh = open(Arc::new(LocalBackend::new(&repo_dir)));
    assert!(restores(&fresh, &b, &b_img, &dir.path().join("out.img")).unwrap(), "point b restores wrong");
}
