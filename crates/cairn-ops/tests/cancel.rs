//! Cancelling inside a unit of work: a backup, a restore and a verify that are asked to stop
//! part-way through stop at their next batch of blocks with `ErrorKind::Cancelled`, leave no
//! restore point and no partial image behind, and the next run goes through.

use cairn_engine::restore::RestoreOptions;
use cairn_engine::target::TargetFormat;
use cairn_engine::{NoProgress, Progress};
use cairn_ops::check::{verify, VerifyRequest};
use cairn_ops::image::{backup_image, restore_image, BackupImageRequest, Changes, RestoreImageRequest};
use cairn_ops::{Cancel, ErrorKind};
use cairn_repo::Repository;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A caller that asks to stop once `after` units went by (the way a server's task would when
/// its operator presses "cancel"), and counts what went by after that.
struct StopAfter {
    after: u64,
    seen: AtomicU64,
    cancel: Cancel,
}

impl StopAfter {
    fn new(after: u64) -> StopAfter {
        StopAfter { after, seen: AtomicU64::new(0), cancel: Cancel::new() }
    }
}

impl Progress for StopAfter {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, n: u64) {
        if self.seen.fetch_add(n, Ordering::SeqCst) + n >= self.after {
            self.cancel.cancel();
        }
    }
    fn finish(&self) {}
    fn note(&self, _: &str) {}
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

const IMAGE_BYTES: u64 = 48 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    // Incompressible and unique: every block is read, compressed and stored.
    let path = dir.join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..(IMAGE_BYTES >> 20) {
        for (j, chunk) in block.chunks_mut(32).enumerate() {
            chunk.copy_from_slice(blake3::hash(&[i.to_le_bytes(), (j as u64).to_le_bytes()].concat()).as_bytes());
        }
        f.write_all(&block).unwrap();
    }
    path
}

fn backup_request(source: &std::path::Path) -> BackupImageRequest {
    BackupImageRequest {
        source: source.display().to_string(),
        format: None,
        changes: Changes::All,
        name: "disk".into(),
        disk: "disk0".into(),
        compression_level: 1,
        workers: 2,
        lock_wait: Duration::ZERO,
    }
}

#[test]
fn a_backup_restore_and_verify_asked_to_stop_stop_part_way_and_leave_nothing_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let backend = Arc::new(cairn_storage::LocalBackend::new(dir.path().join("repo")));
    let repo = Arc::new(Repository::init(backend, None).unwrap());

    // A backup asked to stop after 4 MiB of 48.
    let stop = StopAfter::new(4 << 20);
    let e = backup_image(&repo, &backup_request(&img), &stop).map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e:#}");
    assert!(format!("{e:#}").contains("cancelled while backing up disk disk0"), "{e:#}");
    let went_by = stop.seen.load(Ordering::SeqCst);
    assert!(went_by < IMAGE_BYTES / 2, "the backup went on after it was asked to stop: {went_by} bytes");
    assert!(repo.list_points().unwrap().points.is_empty(), "a cancelled backup left a restore point");

    // The next backup goes through, and reads back whole.
    let (id, _) = backup_image(&repo, &backup_request(&img), &NoProgress).unwrap();
    assert_eq!(repo.list_points().unwrap().points.len(), 1);

    // A restore asked to stop leaves no image and no partial file.
    let to = dir.path().join("restored.img");
    let request = |to: &std::path::Path| RestoreImageRequest {
        point: format!("disk@{}", id.short()),
        disk: None,
        to: to.to_path_buf(),
        options: RestoreOptions { format: TargetFormat::Raw, force: false, workers: 2 },
        lock_wait: Duration::ZERO,
    };
    let stop = StopAfter::new(4 << 20);
    let e = restore_image(&repo, &request(&to), &stop).map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e:#}");
    let went_by = stop.seen.load(Ordering::SeqCst);
    assert!(went_by < IMAGE_BYTES / 2, "the restore went on after it was asked to stop: {went_by} bytes");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("restored"))
        .collect();
    assert!(leftovers.is_empty(), "a cancelled restore left {leftovers:?}");
    restore_image(&repo, &request(&to), &NoProgress).unwrap();
    assert!(std::fs::read(&to).unwrap() == std::fs::read(&img).unwrap(), "the restore after it differs");

    // A verify asked to stop gives no verdict (not a partial "ok"); the next one passes whole.
    let verify_request = VerifyRequest { points: vec![], sample_percent: None, workers: 1, lock_wait: Duration::ZERO };
    let stop = StopAfter::new(1);
    let e = verify(&repo, &verify_request, &stop).map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e:#}");
    let states = repo.typed_records::<cairn_repo::catalog::VerifyState>().unwrap();
    assert!(states.is_empty(), "a cancelled verify recorded packs as verified: {states:?}");
    let run = verify(&repo, &verify_request, &NoProgress).unwrap();
    assert!(run.report.ok, "{:?}", run.report);
}

#[test]
fn a_cancel_watching_a_progress_passes_events_on_and_answers_for_both() {
    let inner = StopAfter::new(10);
    let cancel = Cancel::new();
    let watching = cancel.watching(&inner);
    watching.advance(3);
    assert!(!watching.cancelled());
    assert_eq!(inner.seen.load(Ordering::SeqCst), 3, "events reach the progress it watches");
    cancel.cancel();
    assert!(watching.cancelled(), "the Cancel is not heard");
    let inner = StopAfter::new(10);
    let untouched = Cancel::new();
    let watching = untouched.watching(&inner);
    watching.advance(10);
    assert!(watching.cancelled(), "the watched progress's own answer is not heard");
}
