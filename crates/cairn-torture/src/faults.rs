//! The fault-injection harness: each operation runs once through a counting backend to learn
//! how many storage calls of each class it makes, then once per (call, fault) pair with that
//! one call failing (`cairn_storage::faulty`). After each run the repository is reopened on a
//! clean backend and checked:
//!
//! 1. the operation returned (a panic is a violation), successfully or with an error;
//! 2. every restore point that existed before is still listed and restores byte for byte;
//!    a new point exists only if it restores to the image that was backed up, and an
//!    operation that returned a point left it listed;
//! 3. verify finds nothing wrong, except the injected object itself after a torn write
//!    (a contract the storage broke, detected and named, never used);
//! 4. nothing is quarantined that is not damaged;
//! 5. the next backup succeeds and restores byte for byte;
//! 6. no lock file is left, unless the fault hit the lock file's own deletion.
//!
//! `prune` runs on a repository with unused packs (a forgotten point's) and partly used ones
//! (repack work), with no grace period, so that marking, repacking and deleting all happen
//! in the one run; after the checks above, a clean prune must complete what the faulty one
//! began and leave verify clean with no unindexed pack, and every point must restore again.
//! `forget` applies a plan that removes one point and one protected meanwhile: only the
//! first may go (and must, if forget succeeded), and the protection stays.
//!
//! `copy` runs `cairn_repo::copy::copy_points` from a source holding two points (P, A) into a
//! target made with `init_copying` that holds a copy of P already, so that the run sends A's
//! blocks and commits A's copy; the faults land on the target's storage (`copy-source`: on the
//! source's, the target then being reached cleanly). On top of the checks above, where the
//! target takes the place of the repository: a new point in the target is a copy of a source
//! point and restores exactly to its image; a clean copy then succeeds and leaves exactly one
//! copy of each source point, each restoring exactly, and verify clean; and the source is
//! unchanged (the same objects, every point restoring, no lock left).

use crate::workload::{self, same_bytes, IMAGE_SIZE};
use anyhow::{anyhow, bail, Context, Result};
use cairn_engine::backup::{backup, BackupOptions, DiskInput};
use cairn_engine::restore::{restore_disk, RestoreOptions};
use cairn_engine::source::FileSource;
use cairn_engine::target::TargetFormat;
use cairn_engine::NoProgress;
use cairn_repo::copy::{copied_from, copy_points, CopyProgress, CopyReport};
use cairn_repo::forget::{self, GroupPlan, Planned};
use cairn_repo::prune::{prune, PruneOptions};
use cairn_repo::retention::Reason;
use cairn_repo::PointId;
use cairn_repo::Repository;
use cairn_storage::faulty::{Fault, FaultPlan, FaultyBackend, Injected, Op};
use cairn_storage::{Backend, Kind, LocalBackend};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OPS: [&str; 11] = [
    "init",
    "backup",
    "backup-encrypted",
    "backup-changed",
    "restore",
    "verify",
    "repair",
    "prune",
    "forget",
    "copy",
    "copy-source",
];
const PASSWORD: &str = "torture";

/// The images and repository templates every run starts from.
struct Setup {
    dir: PathBuf,
    /// Oracles by point ID, per template.
    points: HashMap<&'static str, Vec<(PointId, PathBuf)>>,
    image_p: PathBuf,
    image_a: PathBuf,
    image_a2: PathBuf,
    ranges_a2: Vec<cairn_engine::ranges::Range>,
    /// The damaged copies of the `damaged` template: (pack, block).
    damaged_copies: BTreeSet<(String, String)>,
    /// What `forget` applies to the `forget` template: P removed, A removed but protected
    /// (as if protected while forget ran), A' kept.
    forget_plan: Vec<GroupPlan>,
    /// The point that plan may remove (P), and the protected one it must keep (A).
    forget_removes: Option<PointId>,
    forget_protected: Option<PointId>,
}

#[derive(Default, Serialize)]
pub struct Summary {
    pub harness: &'static str,
    pub op: String,
    pub calls: BTreeMap<String, u64>,
    pub injections: u64,
    pub succeeded: u64,
    pub failed_cleanly: u64,
    pub not_reached: u64,
    pub torn_detected: u64,
    pub violations: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violation_examples: Vec<String>,
    pub leaked_temporaries_max: u64,
    pub leaked_pack_bytes_max: u64,
    /// Bytes the next backup stored, at most, after a failed backup (reuse of what the failed
    /// one uploaded: compare with the clean run's `clean_backup_stored_bytes`).
    pub next_backup_stored_bytes_max: u64,
    pub clean_backup_stored_bytes: u64,
    pub duration_s: f64,
}

pub fn run(ops: &[String], jobs: usize, keep: bool, only: Option<&str>) -> Result<Vec<Summary>> {
    let only = match only {
        None => None,
        Some(o) => {
            let (class, at) = o.split_once(':').context("--only takes CLASS:N, e.g. read:42")?;
            let op = [Op::Write, Op::Read, Op::List, Op::Delete]
                .into_iter()
                .find(|op| format!("{op:?}").eq_ignore_ascii_case(class))
                .with_context(|| format!("no call class {class:?} (write, read, list, delete)"))?;
            Some((op, at.parse::<u64>().context("--only CLASS:N: N is a number")?))
        }
    };
    let tmp = tempfile::Builder::new().prefix("cairn-faults-").tempdir()?;
    for op in ops {
        if !OPS.contains(&op.as_str()) {
            bail!("unknown operation {op:?} (known: {})", OPS.join(", "));
        }
    }
    let setup = Setup::new(tmp.path(), ops)?;
    let mut out = Vec::new();
    for op in ops {
        out.push(run_op(&setup, op, jobs, keep, only)?);
    }
    if keep {
        println!("kept {}", tmp.keep().display());
    }
    Ok(out)
}

impl Setup {
    /// The templates of every operation, and those of the copies only if `ops` copies.
    fn new(dir: &Path, ops: &[String]) -> Result<Setup> {
        let image_p = dir.join("p.img");
        let image_a = dir.join("a.img");
        let image_a2 = dir.join("a2.img");
        workload::make_image(&image_p, 1)?;
        // A shares half of P; A' is A with scattered writes (a changed-ranges backup).
        workload::mutate(&image_p, &image_a, 256, 2)?;
        let ranges = workload::mutate(&image_a, &image_a2, 48, 3)?;
        let ranges_a2 = cairn_engine::ranges::parse_changed_ranges(&ranges)?;
        let mut s = Setup {
            dir: dir.to_path_buf(),
            points: HashMap::new(),
            image_p,
            image_a,
            image_a2,
            ranges_a2,
            damaged_copies: BTreeSet::new(),
            forget_plan: Vec::new(),
            forget_removes: None,
            forget_protected: None,
        };
        // "p": a repository holding P; "pa": P and A; "damaged": "pa" with one byte of A's
        // first pack flipped; "unindexed": "pa" without the index files that list A's packs.
        let p = s.template("p")?;
        let repo = Arc::new(Repository::init(local(&p), None)?);
        let id_p = backup_image(&repo, "p", &s.image_p, None)?;
        s.points.insert("p", vec![(id_p.clone(), s.image_p.clone())]);
        let pa = s.template("pa")?;
        workload::copy_tree(&p, &pa)?;
        let index_before: BTreeSet<String> = list(&pa, Kind::Index)?;
        let packs_before: BTreeSet<String> = list(&pa, Kind::Pack)?;
        let repo = open(local(&pa))?;
        let id_a = backup_image(&repo, "a", &s.image_a, None)?;
        s.points.insert("pa", vec![(id_p.clone(), s.image_p.clone()), (id_a.clone(), s.image_a.clone())]);
        let new_packs: Vec<String> = list(&pa, Kind::Pack)?.difference(&packs_before).cloned().collect();
        let new_index: Vec<String> = list(&pa, Kind::Index)?.difference(&index_before).cloned().collect();

        let damaged = s.template("damaged")?;
        workload::copy_tree(&pa, &damaged)?;
        let pack = new_packs.first().context("backing up A stored no pack")?;
        let path = damaged.join("packs").join(&pack[..2]).join(pack);
        let mut bytes = std::fs::read(&path)?;
        let at = bytes.len() / 3;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes)?;
        let r = cairn_engine::verify::verify(&*open(local(&damaged))?, 1, &NoProgress)?;
        s.damaged_copies = r.damaged_blocks.iter().map(|b| (b.pack.clone(), b.block.clone())).collect();
        if s.damaged_copies.is_empty() {
            bail!("the damaged template shows no damaged block");
        }
        s.points.insert("damaged", s.points["pa"].clone());

        let unindexed = s.template("unindexed")?;
        workload::copy_tree(&pa, &unindexed)?;
        for name in &new_index {
            std::fs::remove_file(unindexed.join("index").join(name))?;
        }
        s.points.insert("unindexed", s.points["pa"].clone());
        s.points.insert("empty", vec![]);
        s.template("empty")?;
        // "pe": P in an encrypted repository (sealed objects, keys, the config tag).
        let pe = s.template("pe")?;
        let repo = Arc::new(Repository::init(local(&pe), Some(PASSWORD))?);
        let id_pe = backup_image(&repo, "p", &s.image_p, None)?;
        s.points.insert("pe", vec![(id_pe, s.image_p.clone())]);

        // "prune": "pa" with A' and Q (an image sharing nothing) backed up, then the points of
        // P and Q deleted, as a forget does: Q's packs are unused, P's partly used (A shares
        // half of P: repack work), A's and A''s used. A prune's work is checked here: a
        // template that gave it none would prove nothing.
        let pr = s.template("prune")?;
        workload::copy_tree(&pa, &pr)?;
        let repo = open(local(&pr))?;
        let id_a2 = backup_image(&repo, "a", &s.image_a2, None)?;
        let image_q = dir.join("q.img");
        workload::make_image(&image_q, 4)?;
        let id_q = backup_image(&repo, "q", &image_q, None)?;
        repo.delete_point(&id_p)?;
        repo.delete_point(&id_q)?;
        s.points.insert("prune", vec![(id_a.clone(), s.image_a.clone()), (id_a2.clone(), s.image_a2.clone())]);
        let opts = PruneOptions { dry_run: true, ..prune_options() };
        let r = prune(&open(local(&pr))?, &opts, &|_| {})?;
        if r.repacked.packs == 0 || r.newly_marked.packs <= r.repacked.packs {
            bail!(
                "the prune template gives prune no work: {} packs to repack, {} to mark",
                r.repacked.packs,
                r.newly_marked.packs
            );
        }

        // "forget": "pa" with A' backed up and A protected.
        let fo = s.template("forget")?;
        workload::copy_tree(&pa, &fo)?;
        let repo = open(local(&fo))?;
        let id_a2 = backup_image(&repo, "a", &s.image_a2, None)?;
        forget::set_protected(&repo, &id_a, true)?;
        s.points.insert(
            "forget",
            vec![
                (id_p.clone(), s.image_p.clone()),
                (id_a.clone(), s.image_a.clone()),
                (id_a2.clone(), s.image_a2.clone()),
            ],
        );
        let planned = |id: &PointId, name: &str, kept_by: Option<Reason>| -> Result<Planned> {
            Ok(Planned { id: id.clone(), name: name.into(), time: repo.load_point(id)?.time, kept_by })
        };
        s.forget_plan = vec![
            GroupPlan {
                group: "image:a".into(),
                name: "a".into(),
                points: vec![planned(&id_a2, "a", Some(Reason::Last))?, planned(&id_a, "a", None)?],
                newest_removed: false,
            },
            GroupPlan {
                group: "image:p".into(),
                name: "p".into(),
                points: vec![planned(&id_p, "p", None)?],
                newest_removed: true,
            },
        ];
        s.forget_removes = Some(id_p);
        s.forget_protected = Some(id_a);

        // "copy": the target of the copies from "pa" (P and A), made with `init_copying`,
        // holding a copy of P (a clean copy of P alone), so that a copy of both sends A only.
        if ops.iter().any(|o| source_template(o).is_some()) {
            let co = s.template("copy")?;
            let src = open(local(&pa))?;
            Repository::init_copying(local(&co), None, &src)?;
            let only_p: Vec<_> =
                src.list_points()?.points.into_iter().filter(|(id, _)| *id == s.points["pa"][0].0).collect();
            let r = copy_all(local(&pa), local(&co), Some(&only_p), 1)?;
            let [copied] = r.points.as_slice() else { bail!("the copy of P copied {} points", r.points.len()) };
            s.points.insert("copy", vec![(copied.target_id.clone(), s.image_p.clone())]);
            if !list(&pa, Kind::Lock)?.is_empty() || !list(&co, Kind::Lock)?.is_empty() {
                bail!("the copy of P left a lock");
            }
        }
        Ok(s)
    }

    fn template(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join("templates").join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

/// What the harness prunes with: no grace period (marked packs go in the same run), the
/// default repack threshold.
fn prune_options() -> PruneOptions {
    PruneOptions { grace: Duration::ZERO, lock_wait: Duration::from_secs(5), ..Default::default() }
}

fn local(dir: &Path) -> Arc<dyn Backend> {
    Arc::new(LocalBackend::new(dir))
}

/// Copies `points` (default: all, listed once the locks are held) of the repository at `src`
/// into that at `dst`, as `cairn copy` does: shared locks on both, then both indexes loaded.
fn copy_all(
    src: Arc<dyn Backend>,
    dst: Arc<dyn Backend>,
    points: Option<&[(cairn_repo::PointId, cairn_repo::RestorePoint)]>,
    threads: usize,
) -> Result<CopyReport> {
    let src = Arc::new(Repository::open(src, || Some(PASSWORD.to_string()))?);
    let dst = Arc::new(Repository::open(dst, || Some(PASSWORD.to_string()))?);
    let _src_lock = src.lock(false, "copy (source)", Duration::from_secs(5))?;
    let _dst_lock = dst.lock(false, "copy", Duration::from_secs(5))?;
    src.load_index()?;
    dst.load_index()?;
    let all;
    let points = match points {
        Some(p) => p,
        None => {
            all = src.list_points()?.points;
            &all
        }
    };
    Ok(copy_points(&src, &dst, points, threads, &CopyProgress::default())?)
}

/// Where the source of a copy operation run in `dir` lies.
fn source_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push("-source");
    s.into()
}

/// The template a copy operation copies from (`None`: not a copy).
fn source_template(op: &str) -> Option<&'static str> {
    match op {
        "copy" | "copy-source" => Some("pa"),
        _ => None,
    }
}

/// The repository whose storage the faults hit: the source for `copy-source`, else `dir`.
fn faulted_dir(op: &str, dir: &Path) -> PathBuf {
    if op == "copy-source" {
        source_dir(dir)
    } else {
        dir.to_path_buf()
    }
}

/// Lays out the repositories an operation starts from in `dir` (and the source of a copy).
fn prepare(s: &Setup, op: &str, dir: &Path) -> Result<()> {
    workload::copy_tree(&s.dir.join("templates").join(template_of(op)), dir)?;
    if let Some(t) = source_template(op) {
        workload::copy_tree(&s.dir.join("templates").join(t), &source_dir(dir))?;
    }
    Ok(())
}

/// Removes what [`prepare`] laid out.
fn remove_run(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(source_dir(dir));
}

fn open(b: Arc<dyn Backend>) -> Result<Arc<Repository>> {
    let repo = Repository::open(b, || Some(PASSWORD.to_string()))?;
    repo.load_index()?;
    Ok(Arc::new(repo))
}

fn list(dir: &Path, kind: Kind) -> Result<BTreeSet<String>> {
    Ok(LocalBackend::new(dir).list(kind)?.into_iter().map(|l| l.name).collect())
}

/// Backs up an image as a point named `name` (with changed ranges relative to the newest
/// point of that name, if given).
fn backup_image(
    repo: &Arc<Repository>,
    name: &str,
    image: &Path,
    changed: Option<&[cairn_engine::ranges::Range]>,
) -> Result<PointId> {
    let _lock = repo.lock(false, "backup", Duration::from_secs(5))?;
    let parent = match changed {
        Some(_) => Some(repo.select_point(name)?),
        None => None,
    };
    let mut disk = DiskInput::new("disk0", Box::new(FileSource::open(image)?));
    disk.changed = changed.map(|c| c.to_vec());
    let opts = BackupOptions { name: name.into(), workers: 1, parent, ..Default::default() };
    Ok(backup(repo, vec![disk], &opts, &NoProgress)?.0)
}

/// Restores a point's disk and compares it with its oracle.
fn restores_exactly(repo: &Repository, id: &PointId, oracle: &Path, scratch: &Path) -> Result<()> {
    let point = repo.load_point(id)?;
    let out = scratch.join(format!("restore-{}.img", id.short()));
    let opts = RestoreOptions { format: TargetFormat::Raw, force: true, workers: 1 };
    restore_disk(repo, id, &point, &point.disks[0], &out, &opts, &NoProgress)?;
    let same = same_bytes(&out, oracle)?;
    std::fs::remove_file(&out)?;
    if !same {
        bail!("point {} restores to bytes that differ from its image", id.short());
    }
    Ok(())
}

/// The operation under test, on a repository in `dir` reached through `backend` (for
/// `copy-source`, `backend` reaches the source instead). Returns the ID of the point it made,
/// if it made one.
fn operation(op: &str, s: &Setup, dir: &Path, backend: Arc<dyn Backend>) -> Result<Option<PointId>> {
    match op {
        "init" => {
            Repository::init(backend, Some(PASSWORD))?;
            Ok(None)
        }
        "backup" | "backup-encrypted" => Ok(Some(backup_image(&open(backend)?, "a", &s.image_a, None)?)),
        "backup-changed" => Ok(Some(backup_image(&open(backend)?, "a", &s.image_a2, Some(&s.ranges_a2))?)),
        "restore" => {
            let repo = open(backend)?;
            let _lock = repo.lock(false, "restore", Duration::from_secs(5))?;
            let (id, point) = repo.select_point("a")?;
            let out = dir.join("restored.img");
            let opts = RestoreOptions { format: TargetFormat::Raw, force: true, workers: 1 };
            restore_disk(&repo, &id, &point, &point.disks[0], &out, &opts, &NoProgress)?;
            if !same_bytes(&out, &s.image_a)? {
                bail!("VIOLATION: restore succeeded with bytes that differ from the image");
            }
            Ok(None)
        }
        "verify" => {
            let repo = open(backend)?;
            let _lock = repo.lock(false, "verify", Duration::from_secs(5))?;
            cairn_engine::verify::run(&repo, 1, Default::default(), &NoProgress)?;
            Ok(None)
        }
        "repair" => {
            let repo = Repository::open(backend, || Some(PASSWORD.into()))?;
            let _lock = repo.lock(true, "repair index", Duration::from_secs(5))?;
            cairn_engine::repair::rebuild_index(&repo, false, &NoProgress)?;
            Ok(None)
        }
        "prune" => {
            prune(&open(backend)?, &prune_options(), &|_| {})?;
            Ok(None)
        }
        "forget" => {
            let repo = open(backend)?;
            let _lock = repo.lock(false, "forget", Duration::from_secs(5))?;
            forget::apply(&repo, &s.forget_plan)?;
            Ok(None)
        }
        "copy" | "copy-source" => {
            let (src, dst) = if op == "copy" { (local(&source_dir(dir)), backend) } else { (backend, local(dir)) };
            // One thread: the same calls in the same order on every run.
            let r = copy_all(src, dst, None, 1)?;
            Ok(r.points.iter().find(|p| !p.already_there).map(|p| p.target_id.clone()))
        }
        _ => unreachable!(),
    }
}

/// The template each operation starts from.
fn template_of(op: &str) -> &'static str {
    match op {
        "init" => "empty",
        "backup" => "p",
        "backup-encrypted" => "pe",
        "backup-changed" | "restore" => "pa",
        "verify" => "damaged",
        "repair" => "unindexed",
        "prune" => "prune",
        "forget" => "forget",
        "copy" | "copy-source" => "copy",
        _ => unreachable!(),
    }
}

/// The image the next backup after the operation reads (and the name it goes under).
fn next_image<'a>(op: &str, s: &'a Setup) -> (&'static str, &'a Path) {
    match op {
        "backup-changed" => ("a", &s.image_a2),
        _ => ("a", &s.image_a),
    }
}

/// What one injected run found.
#[derive(Default)]
struct Finding {
    succeeded: bool,
    reached: bool,
    torn_detected: bool,
    violations: Vec<String>,
    temporaries: u64,
    unindexed_bytes: u64,
    next_stored: u64,
    /// The call the fault landed on (`get` of index file 1a2b…), for the examples.
    target: String,
}

fn run_op(s: &Setup, op: &str, jobs: usize, keep: bool, only: Option<(Op, u64)>) -> Result<Summary> {
    let started = Instant::now();
    let mut summary = Summary { harness: "faults", op: op.to_string(), ..Default::default() };
    // The clean run: how many calls of each class, and what a clean backup stores.
    let dir = s.dir.join("runs").join(format!("{op}-clean"));
    prepare(s, op, &dir)?;
    let counting = Arc::new(FaultyBackend::counting(LocalBackend::new(faulted_dir(op, &dir))));
    let clean = operation(op, s, &dir, counting.clone());
    if let Err(e) = &clean {
        bail!("{op} fails without any fault: {e:#}");
    }
    let plans: Vec<FaultPlan> = [Op::Write, Op::Read, Op::List, Op::Delete]
        .into_iter()
        .flat_map(|o| {
            summary.calls.insert(format!("{o:?}").to_lowercase(), counting.calls(o));
            (1..=counting.calls(o))
                .filter(move |&at| only.is_none_or(|only| only == (o, at)))
                .flat_map(move |at| Fault::for_op(o).iter().map(move |&fault| FaultPlan { op: o, at, fault }))
        })
        .collect();
    if op.starts_with("backup") {
        summary.clean_backup_stored_bytes = open(local(&dir))?.select_point("a")?.1.stats.repository_growth_bytes;
    }
    remove_run(&dir);

    let queue = Mutex::new(plans.into_iter().enumerate().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let Some((n, plan)) = queue.lock().unwrap().pop() else { break };
                let f = one_injection(s, op, n, plan, keep);
                results.lock().unwrap().push((plan, f));
            });
        }
    });
    for (plan, f) in results.into_inner().unwrap() {
        summary.injections += 1;
        if !f.reached {
            summary.not_reached += 1;
        } else if f.succeeded {
            summary.succeeded += 1;
        } else {
            summary.failed_cleanly += 1;
        }
        summary.torn_detected += f.torn_detected as u64;
        summary.leaked_temporaries_max = summary.leaked_temporaries_max.max(f.temporaries);
        summary.leaked_pack_bytes_max = summary.leaked_pack_bytes_max.max(f.unindexed_bytes);
        if !f.succeeded {
            summary.next_backup_stored_bytes_max = summary.next_backup_stored_bytes_max.max(f.next_stored);
        }
        if !f.violations.is_empty() {
            summary.violations += 1;
            if summary.violation_examples.len() < 10 {
                summary.violation_examples.push(format!(
                    "{} at {:?} call {} ({}): {}",
                    plan.fault.name(),
                    plan.op,
                    plan.at,
                    f.target,
                    f.violations.join("; ")
                ));
            }
        }
    }
    summary.duration_s = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    Ok(summary)
}

fn one_injection(s: &Setup, op: &str, n: usize, plan: FaultPlan, keep: bool) -> Finding {
    let dir = s.dir.join("runs").join(format!("{op}-{n}"));
    let mut f = Finding::default();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        prepare(s, op, &dir)?;
        let faulty = Arc::new(FaultyBackend::new(LocalBackend::new(faulted_dir(op, &dir)), Some(plan)));
        let outcome = operation(op, s, &dir, faulty.clone());
        let injected = faulty.injected();
        f.target = injected
            .as_ref()
            .map(|i| format!("{} of {} {}", i.call, i.kind, &i.name[..i.name.len().min(8)]))
            .unwrap_or_default();
        // A fault with no meaning for the call it landed on (a flipped bit on `exists`)
        // injected nothing: counted as not reached.
        f.reached = injected.as_ref().is_some_and(|i| i.applied);
        f.succeeded = outcome.is_ok();
        if let Err(e) = &outcome {
            if format!("{e:#}").contains("VIOLATION") {
                f.violations.push(format!("{e:#}"));
            }
        }
        check(s, op, &dir, plan, injected.as_ref(), outcome.as_ref().ok().cloned().flatten(), &mut f)
    }));
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => f.violations.push(format!("{e:#}")),
        Err(p) => f.violations.push(format!(
            "panicked: {}",
            p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        )),
    }
    // Kept for inspection: the repository as the checks left it.
    if !keep || f.violations.is_empty() {
        remove_run(&dir);
    }
    f
}

/// The invariants of the module docs, on a clean backend.
fn check(
    s: &Setup,
    op: &str,
    dir: &Path,
    plan: FaultPlan,
    injected: Option<&Injected>,
    made: Option<PointId>,
    f: &mut Finding,
) -> Result<()> {
    let torn = plan.fault == Fault::Torn && injected.is_some();
    let hit = |kind: Kind| injected.is_some_and(|i| i.kind == kind);
    let fault_on = |kind: Kind, call: &str| injected.is_some_and(|i| i.kind == kind && i.call == call);
    if op == "restore" {
        let out = dir.join("restored.img");
        let partial = dir.join("restored.img.cairn-partial");
        if !f.succeeded && (out.exists() || partial.exists()) {
            f.violations.push("a failed restore left its image behind".into());
        }
    }
    // Locks: the operation dropped its lock, which deletes the file (a copy: one in each
    // repository; only the faulty one's may stay).
    let mut repos = vec![dir.to_path_buf()];
    if source_template(op).is_some() {
        repos.push(source_dir(dir));
    }
    for d in &repos {
        let locks = list(d, Kind::Lock)?;
        let excused = *d == faulted_dir(op, dir) && (fault_on(Kind::Lock, "delete") || (torn && hit(Kind::Lock)));
        if !locks.is_empty() && !excused {
            f.violations.push(format!("{} lock file(s) left in {}", locks.len(), d.display()));
        }
        for l in &locks {
            std::fs::remove_file(d.join("locks").join(l))?;
        }
    }
    if op == "init" {
        return check_init(dir, torn && hit(Kind::Config), f);
    }
    if op == "verify" {
        // Straight after the faulty run: nothing sound was quarantined (verify reads a pack
        // twice before it believes damage; a single misread must not do it).
        let repo = open(local(dir))?;
        let q: BTreeSet<(String, String)> =
            repo.quarantine()?.into_iter().map(|(p, b)| (hex::encode(p), b.to_hex())).collect();
        if !q.is_subset(&s.damaged_copies) {
            f.violations.push(format!(
                "the faulty verify quarantined {} sound copies",
                q.difference(&s.damaged_copies).count()
            ));
        }
    }
    if op == "repair" {
        // Straight after the faulty run: every point that restored before still does (a
        // repair never hides what a point needs, whatever failed).
        let repo = open(local(dir))?;
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        for (id, oracle) in &s.points["p"] {
            if let Err(e) = restores_exactly(&repo, id, oracle, &scratch) {
                f.violations.push(format!("after the faulty repair: {e:#}"));
            }
        }
    }
    if op == "repair" {
        // Whatever the faulty run did, a clean one must bring every point back.
        let repo = Repository::open(local(dir), || None)?;
        let _lock = repo.lock(true, "repair index", Duration::from_secs(5))?;
        cairn_engine::repair::rebuild_index(&repo, false, &NoProgress)?;
    }
    let repo = open(local(dir))?;
    let listed = repo.list_points()?;
    let before = &s.points[template_of(op)];
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    // On the damaged template, A's point cannot restore until a backup heals it (below).
    let healed_later = |id: &PointId| op == "verify" && s.points["pa"].last().is_some_and(|(a, _)| a == id);
    for (id, oracle) in before {
        if !listed.points.iter().any(|(i, _)| i == id) {
            // The one point the forget plan removes may be gone (and must be, if it succeeded).
            if !(op == "forget" && s.forget_removes.as_ref() == Some(id)) {
                f.violations.push(format!("point {} that existed before is gone", id.short()));
            }
            continue;
        }
        if op == "forget" && s.forget_removes.as_ref() == Some(id) && f.succeeded {
            f.violations.push(format!("forget succeeded but point {} it removes is listed", id.short()));
        }
        if healed_later(id) {
            continue;
        }
        if let Err(e) = restores_exactly(&repo, id, oracle, &scratch) {
            f.violations.push(format!("old point: {e:#}"));
        }
    }
    let (next_name, next_image) = next_image(op, s);
    for (id, point) in listed.points.iter().filter(|(i, _)| !before.iter().any(|(b, _)| b == i)) {
        if let Some(t) = source_template(op) {
            // A copy's new point is a copy of a source point (one the target lacked) and
            // restores to that point's image.
            let source = copied_from(point).and_then(|from| s.points[t].iter().find(|(i, _)| *i == from));
            match source {
                None => f.violations.push(format!("{op} made point {}, a copy of no source point", id.short())),
                Some((from, oracle)) => {
                    let copies = listed.points.iter().filter(|(_, p)| copied_from(p) == Some(from.clone())).count();
                    if copies > 1 {
                        f.violations.push(format!("{copies} copies of source point {}", from.short()));
                    }
                    if let Err(e) = restores_exactly(&repo, id, oracle, &scratch) {
                        f.violations.push(format!("new point: {e:#}"));
                    }
                }
            }
        } else if !op.starts_with("backup") {
            f.violations.push(format!("{op} made a restore point {}", id.short()));
        } else if let Err(e) = restores_exactly(&repo, id, next_image, &scratch) {
            f.violations.push(format!("new point: {e:#}"));
        }
    }
    if let Some(id) = &made {
        if !listed.points.iter().any(|(i, _)| i == id) {
            f.violations.push(format!("the {op} returned point {} but it is not listed", id.short()));
        }
    }
    if op == "verify" {
        // A clean verify first: what a misread during the faulty one put in quarantine, it
        // releases (and it quarantines the real damage if the faulty run could not).
        cairn_engine::verify::run(&repo, 1, Default::default(), &NoProgress)?;
    }
    let report = cairn_engine::verify::verify(&repo, 1, &NoProgress)?;
    f.unindexed_bytes = report
        .unindexed_packs
        .iter()
        .filter_map(|p| std::fs::metadata(dir.join("packs").join(&p[..2]).join(p)).ok())
        .map(|m| m.len())
        .sum();
    f.temporaries = workload::temporaries(dir).0;
    let damage = damage_names(&report);
    // The damaged template's damage is expected: its pack, and its blocks (named by ID once
    // quarantined).
    let expected: BTreeSet<String> = if op == "verify" {
        s.damaged_copies.iter().flat_map(|(p, b)| [p.clone(), b.clone()]).collect()
    } else {
        BTreeSet::new()
    };
    let unexpected: Vec<&String> = damage.iter().filter(|d| !expected.contains(*d)).collect();
    let injected_name = injected.map(|i| i.name.clone()).unwrap_or_default();
    if !unexpected.is_empty() {
        if torn && unexpected.iter().all(|d| **d == injected_name) {
            f.torn_detected = true;
        } else {
            f.violations.push(format!(
                "verify reports {} damaged object(s) the fault does not explain: {:?}",
                unexpected.len(),
                unexpected.iter().take(3).collect::<Vec<_>>()
            ));
        }
    }
    if op == "verify" {
        // The clean verify left exactly the damaged copies in quarantine.
        let q: BTreeSet<(String, String)> =
            repo.quarantine()?.into_iter().map(|(p, b)| (hex::encode(p), b.to_hex())).collect();
        if q != s.damaged_copies {
            f.violations.push(format!("quarantine holds {} copies, {} are damaged", q.len(), s.damaged_copies.len()));
        }
    } else if !repo.quarantine()?.is_empty() {
        f.violations.push("something was quarantined".into());
    }
    // A copy: a clean copy completes what the faulty one began (before the next backup, which
    // would store A's blocks itself).
    let repo = match source_template(op) {
        Some(t) => {
            let injected_name = (torn && faulted_dir(op, dir) == dir).then_some(injected_name.as_str());
            check_clean_copy(s, t, dir, injected_name, &scratch, f)?;
            open(local(dir))?
        }
        None => repo,
    };
    // The next backup succeeds and restores exactly.
    let parent_ranges = (op == "backup-changed").then_some(s.ranges_a2.as_slice());
    let id = if parent_ranges.is_some() && !listed.points.iter().any(|(_, p)| p.name == "a") {
        None
    } else {
        Some(backup_image(&repo, next_name, next_image, parent_ranges).context("the next backup failed")?)
    };
    if let Some(id) = &id {
        restores_exactly(&repo, id, next_image, &scratch).context("the next backup's point")?;
        f.next_stored = repo.load_point(id)?.stats.repository_growth_bytes;
    }
    if op == "forget"
        && !forget::protected_points(&repo)?.contains(s.forget_protected.as_ref().expect("set up with the forget op"))
    {
        f.violations.push("the protected point lost its protection".into());
    }
    if op == "prune" {
        check_clean_prune(s, &repo, torn && hit(Kind::Index), id.as_ref(), &scratch, f)?;
    }
    // The damaged point is healed by that backup (its damaged blocks were quarantined).
    for (id, oracle) in before.iter().filter(|(id, _)| healed_later(id)) {
        restores_exactly(&repo, id, oracle, &scratch).context("the damaged point after the healing backup")?;
    }
    let _ = IMAGE_SIZE;
    Ok(())
}

/// After a faulty prune (and the checks every operation gets): a clean prune completes what
/// the faulty one began (after `repair index` if the fault tore an index file: prune refuses
/// a damaged index, as it says), verify then finds nothing wrong and no unindexed pack, and
/// every point, the template's and the next backup's, restores byte for byte.
fn check_clean_prune(
    s: &Setup,
    repo: &Arc<Repository>,
    torn_index: bool,
    next: Option<&PointId>,
    scratch: &Path,
    f: &mut Finding,
) -> Result<()> {
    if torn_index && !repo.damaged_index_files().is_empty() {
        let _lock = repo.lock(true, "repair index", Duration::from_secs(5))?;
        cairn_engine::repair::rebuild_index(repo, false, &NoProgress).context("repair after a torn index file")?;
    }
    let r = prune(repo, &prune_options(), &|_| {}).context("a clean prune after the faulty one")?;
    if !r.pending.is_empty() {
        f.violations.push(format!("a clean prune, alone, left {} pack(s) pending", r.pending.len()));
    }
    let report = cairn_engine::verify::verify(repo, 1, &NoProgress)?;
    let damage = damage_names(&report);
    if !damage.is_empty() {
        f.violations.push(format!(
            "verify after a clean prune reports {} damaged object(s): {:?}, {} pack(s) missing",
            damage.len(),
            damage.iter().take(3).collect::<Vec<_>>(),
            report.damaged_packs.iter().filter(|d| d.problem.contains("missing")).count()
        ));
    }
    if !report.unindexed_packs.is_empty() {
        f.violations.push(format!("a clean prune left {} unindexed pack(s)", report.unindexed_packs.len()));
    }
    for (id, oracle) in &s.points["prune"] {
        if let Err(e) = restores_exactly(repo, id, oracle, scratch) {
            f.violations.push(format!("after a clean prune: {e:#}"));
        }
    }
    if let Some(id) = next {
        if let Err(e) = restores_exactly(repo, id, &s.image_a, scratch) {
            f.violations.push(format!("after a clean prune, the next backup's point: {e:#}"));
        }
    }
    Ok(())
}

/// After a faulty copy (and the checks every operation gets): a clean copy of every source
/// point succeeds; then the target holds exactly one copy of each, restoring exactly, verify
/// finds nothing wrong (but the object a torn write left, `torn`), and the source is as its
/// template was: the same objects, the same points, each restoring exactly.
fn check_clean_copy(
    s: &Setup,
    source: &str,
    dir: &Path,
    torn: Option<&str>,
    scratch: &Path,
    f: &mut Finding,
) -> Result<()> {
    let src_dir = source_dir(dir);
    copy_all(local(&src_dir), local(dir), None, 2).context("a clean copy after the faulty one")?;
    let dst = open(local(dir))?;
    let listed = dst.list_points()?;
    for (from, oracle) in &s.points[source] {
        let copies: Vec<&PointId> =
            listed.points.iter().filter(|(_, p)| copied_from(p) == Some(from.clone())).map(|(id, _)| id).collect();
        if copies.len() != 1 {
            f.violations.push(format!(
                "after a clean copy the target holds {} copies of source point {}",
                copies.len(),
                from.short()
            ));
        }
        for id in copies {
            if let Err(e) = restores_exactly(&dst, id, oracle, scratch) {
                f.violations.push(format!("after a clean copy: {e:#}"));
            }
        }
    }
    let report = cairn_engine::verify::verify(&dst, 1, &NoProgress)?;
    let damage: Vec<String> = damage_names(&report).into_iter().filter(|d| Some(d.as_str()) != torn).collect();
    if !damage.is_empty() {
        f.violations.push(format!(
            "verify after a clean copy reports {} damaged object(s): {:?}",
            damage.len(),
            damage.iter().take(3).collect::<Vec<_>>()
        ));
    }
    // The source: nothing written (but locks, gone), nothing lost.
    let template = s.dir.join("templates").join(source);
    for kind in Kind::ALL {
        if list(&src_dir, kind)? != list(&template, kind)? {
            f.violations.push(format!("the copy changed the source's {kind} objects"));
        }
    }
    let src = open(local(&src_dir))?;
    let ids: Vec<PointId> = src.list_points()?.points.into_iter().map(|(id, _)| id).collect();
    if ids.len() != s.points[source].len() {
        f.violations.push(format!("the source lists {} points, {} before", ids.len(), s.points[source].len()));
    }
    for (id, oracle) in &s.points[source] {
        if let Err(e) = restores_exactly(&src, id, oracle, scratch) {
            f.violations.push(format!("the source after the copies: {e:#}"));
        }
    }
    Ok(())
}

/// Every object verify names as damaged (packs, index files, point documents; blocks by pack).
fn damage_names(r: &cairn_engine::verify::VerifyReport) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.extend(r.damaged_packs.iter().map(|d| d.pack.clone()));
    out.extend(r.damaged_blocks.iter().map(|d| if d.pack.is_empty() { d.block.clone() } else { d.pack.clone() }));
    out.extend(r.damaged_index_files.iter().map(|d| d.id.clone()));
    out.extend(r.damaged_points.iter().map(|d| d.id.clone()));
    out.extend(r.unreadable_packs.iter().map(|d| d.pack.clone()));
    out
}

/// After an `init` with a fault: either a repository that opens with its password and holds
/// exactly one key, or no repository, and then a clean init succeeds (and leaves one key).
fn check_init(dir: &Path, torn_config: bool, f: &mut Finding) -> Result<()> {
    let b = local(dir);
    if b.exists(Kind::Config, "")? {
        match Repository::open(b.clone(), || Some(PASSWORD.into())) {
            Ok(_) => {}
            Err(e) if torn_config => {
                f.torn_detected = true;
                let _ = e;
                return Ok(());
            }
            Err(e) => f.violations.push(format!("init left a config that does not open: {e}")),
        }
    } else {
        if f.succeeded {
            f.violations.push("init succeeded but left no config".into());
        }
        Repository::init(b.clone(), Some(PASSWORD)).map_err(|e| anyhow!("a clean init after the failed one: {e}"))?;
    }
    let keys = b.list(Kind::Key)?.len();
    if keys != 1 {
        f.violations.push(format!("{keys} key files"));
    }
    Repository::open(b, || Some(PASSWORD.into())).map_err(|e| anyhow!("the repository does not open: {e}"))?;
    Ok(())
}
