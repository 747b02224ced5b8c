//! A backup whose index load lists the catalog just before a prune replaces its marks record
//! (write new, delete old) must still learn the marks: found by review, failed before the fix
//! (the backup loaded no marks, reused a marked pack, and the prune deleted it under the point).

mod common;
use common::*;

use cairn_repo::prune::{prune, PruneOptions};
use cairn_repo::Repository;
use cairn_storage::{Backend, Kind, Listed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Hook = Box<dyn FnOnce() + Send>;

/// Runs `hook` once, right after the next catalog listing (before its records are read).
struct AfterCatalogList {
    inner: Arc<dyn Backend>,
    hook: Mutex<Option<Hook>>,
}

impl Backend for AfterCatalogList {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> cairn_storage::Result<()> {
        self.inner.create()
    }
    fn exists(&self, kind: Kind, name: &str) -> cairn_storage::Result<bool> {
        self.inner.exists(kind, name)
    }
    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> cairn_storage::Result<()> {
        self.inner.put(kind, name, data)
    }
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> cairn_storage::Result<()> {
        self.inner.put_new(kind, name, data)
    }
    fn get(&self, kind: Kind, name: &str) -> cairn_storage::Result<Vec<u8>> {
        self.inner.get(kind, name)
    }
    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> cairn_storage::Result<Vec<u8>> {
        self.inner.get_range(kind, name, offset, len)
    }
    fn list(&self, kind: Kind) -> cairn_storage::Result<Vec<Listed>> {
        let l = self.inner.list(kind)?;
        if kind == Kind::Catalog {
            if let Some(h) = self.hook.lock().unwrap().take() {
                h();
            }
        }
        Ok(l)
    }
    fn delete(&self, kind: Kind, name: &str) -> cairn_storage::Result<()> {
        self.inner.delete(kind, name)
    }
}

#[test]
fn a_backup_loading_the_index_while_prune_rewrites_its_marks_record_still_learns_them() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), Some("pw")).unwrap();
    let repo = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    repo.load_index().unwrap();
    let data = blocks(1, 8);
    let a = store_point(&repo, "a", &data).unwrap();
    repo.backend().delete(Kind::Point, a.as_str()).unwrap(); // forget
                                                             // What yesterday's prune left: the (now unused) pack marked two hours ago.
    let pack = local(dir.path()).list(Kind::Pack).unwrap()[0].name.clone();
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 7200;
    repo.save_record(&serde_json::json!({"kind": "prune-marks", "time": "x", "packs": [[pack, at]]})).unwrap();

    // A backup starts now (its lock is created well after the mark, as the rule expects).
    let hooked = Arc::new(AfterCatalogList { inner: local(dir.path()), hook: Mutex::new(None) });
    let backup = Arc::new(Repository::open(hooked.clone(), pw("pw")).unwrap());
    let lock = backup.lock(false, "backup", Duration::ZERO).unwrap();
    // Today's prune replaces the marks record (prune.rs `write_marks`: new record durable, old
    // deleted) between the backup's catalog listing and its reads.
    let pruner = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    *hooked.hook.lock().unwrap() = Some(Box::new(move || {
        let records = pruner.load_records().unwrap();
        let (old, r) = records.iter().find(|(_, r)| r["kind"] == "prune-marks").unwrap();
        let mut r = r.clone();
        r["time"] = "y".into();
        pruner.save_record(&r).unwrap();
        pruner.delete_record(old).unwrap();
    }));
    backup.load_index().unwrap();
    let id0 = backup.crypto().block_id(&data[0]);
    // FORMAT.md §12.3: a writer MUST NOT rely on a block only marked packs hold.
    let knows_mark = !backup.index().reusable(&id0);

    // The prune goes on to delete the pack: the mark is past grace, the backup's lock is newer.
    let p = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    p.load_index().unwrap();
    let r = prune(&p, &PruneOptions { grace: Duration::from_secs(3600), ..Default::default() }, &|_| {}).unwrap();
    eprintln!("prune: deleted {:?}, pending {:?}", r.deleted, r.pending);
    // The backup (same data as the forgotten point) commits.
    let c = store_point(&backup, "c", &data).unwrap();
    drop(lock);
    let fresh = Arc::new(Repository::open(local(dir.path()), pw("pw")).unwrap());
    fresh.load_index().unwrap();
    let restored = read_point(&fresh, &c);
    eprintln!("backup knew the mark: {knows_mark}");
    assert!(restored.is_ok(), "point c lost its blocks: {:?}", restored.err());
    assert!(knows_mark, "the backup loaded no marks: it will dedup against a marked pack");
}
