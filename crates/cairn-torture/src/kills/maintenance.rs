//! Kills of `forget` and `prune` (issue 11's proof of prune safety).
//!
//! **prune.** Each kill starts from fresh unused data: one more point of the evolving image
//! (`next_image` mutates the previous one, so points share packs), then `forget --keep-last K`
//! (K from 1 to 3, drawn) leaves packs no point uses and packs some of whose blocks no point
//! uses (repack work); in half the kills (all planned ones) `repair index` then merges the
//! index files, so that a prune must rewrite files listing packs it keeps next to packs it
//! deletes. Then `prune --grace 0` is killed, at a crash point or a random moment; planned
//! kills repack every partly used pack (`--max-unused 0`, as the dry run that planned them),
//! random ones draw the threshold. Plain and encrypted repositories alternate (a fresh one
//! every 25 kills; plain packs are named by their bytes alone, encrypted ones are not).
//!
//! In a share of the kills (drawn), other processes run against the same repository while the
//! prune runs and dies:
//! - a `backup image` (always): of a new image, or of an image whose point the forget just
//!   removed, so that it reuses blocks the prune is about to mark (a mark taken back later);
//! - a `verify` and a `restore image` of a surviving point (each in half of them).
//!
//! They start at drawn offsets around the prune's start, or shortly before it is expected to
//! record its marks (then some take their locks just after the prune looked at the locks,
//! and load the index while it deletes: they must not depend on what it deletes). Each must succeed whatever the prune does:
//! a backup never fails because a prune ran, its point restores to its image, a verify
//! passes, a restore is byte-exact. A kill planned in the deletion phase draws only "alone"
//! or "near the marks" (a lock older than the marks holds deletion off, and the crash point
//! would not be reached). Kills without concurrency let the deletion phase run.
//!
//! After each kill, once the concurrent runs are done:
//! 1. `verify` passes;
//! 2. every surviving point is listed (prune removes none), and no point appeared but the
//!    concurrent backup's;
//! 3. every surviving point restores byte for byte (prune deletes data: all of them);
//! 4. the next `prune --grace 0` succeeds, alone;
//! 5. `verify` passes again and every survivor restores again: a block wrongly deleted by the
//!    killed run, or kept only by its marks, shows here;
//! 6. the prune after it deletes nothing and leaves nothing pending (a repository with
//!    nothing else running converges: marks and their recovery add up), except that a pack
//!    whose mark a run took back is judged by the next run only: then one more run may work
//!    (checked like the first), and the one after it must not;
//! 7. no lock file is left.
//!
//! **forget.** `forget --keep-last 1` is killed with four points to its name. Every point is
//! still listed or is one the policy removes (its dry run says which), as many are gone as
//! the run passed `forget.point_deleted` (one more for a kill between a deletion and its
//! crash point), the survivors restore, the next forget leaves exactly the newest point,
//! verify passes, and no lock is left.
//!
//! Random kill moments and the concurrent runs' offsets scale with how long the last clean
//! run took (the repository grows and shrinks; plain ones need no key derivation).

use super::{list_files, Ended, Harness};
use crate::workload::same_bytes;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// What the maintenance kills removed, ran alongside and reclaimed.
#[derive(Default, Serialize)]
pub struct Figures {
    /// Points removed by forget (before each prune; by the killed forgets and the next ones).
    pub points_forgotten: u64,
    /// prune: what ran against the repository while it was killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<Concurrent>,
    /// prune: what the prunes that finished did (killed ones that finished first, the clean
    /// ones after each kill).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prunes: Option<Reclaimed>,
}

#[derive(Default, Serialize)]
pub struct Concurrent {
    /// Kills during which a backup (and maybe a verify, a restore) ran against the same
    /// repository.
    pub iterations: u64,
    /// Of those: the runs started shortly before the prune was expected to record its marks
    /// (to overlap its lock check and deletion phase).
    pub near_marks: u64,
    /// Of those: the prune began deleting (rewrote an index file, deleted a pack) while a
    /// concurrent run was still going.
    pub deletion_while_running: u64,
    pub backups: u64,
    /// Backups of an image whose point the forget had just removed.
    pub backups_of_forgotten: u64,
    pub verifies: u64,
    pub restores: u64,
    /// Runs that failed or restored other bytes (each is also a violation).
    pub failures: u64,
}

#[derive(Default, Serialize)]
pub struct Reclaimed {
    pub deleted_packs: u64,
    pub reclaimed_bytes: u64,
    pub repacked_packs: u64,
    /// Marks taken back: a marked pack that a point referenced again.
    pub recovered_marks: u64,
    /// Clean prunes that still had work because the run before them took a mark back (the
    /// pack is judged again only by the next run).
    pub runs_after_recovery: u64,
}

/// `prune --grace 0` with this repack threshold (percent).
pub fn prune_args(max_unused: u32) -> Vec<String> {
    ["prune", "--grace", "0s", "--max-unused", &max_unused.to_string(), "--json"].map(String::from).to_vec()
}

/// `forget --keep-last 1` of the image points (or its dry run).
pub fn forget_args(dry_run: bool) -> Vec<String> {
    let mut v: Vec<String> = ["forget", "a", "--keep-last", "1", "--json"].map(String::from).to_vec();
    if dry_run {
        v.push("--dry-run".into());
    }
    v
}

/// When a concurrent run starts: milliseconds after the prune starts (negative: before it).
#[derive(Clone, Copy, Debug)]
struct Start(i64);

/// What runs alongside a killed prune, and when.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Nothing: the deletion phase runs (a live lock older than the marks would hold it off).
    Alone,
    /// Runs starting around the prune's start.
    Around,
    /// Runs starting shortly before the prune records its marks.
    NearMarks,
}

/// What a concurrent run does and how it must end.
enum Job {
    /// Backs up this image as a point of `a`; it must restore to it.
    Backup {
        image: PathBuf,
        forgotten: bool,
    },
    Verify,
    /// Restores this point to `out`; the bytes must be `image`'s.
    Restore {
        id: String,
        image: PathBuf,
        out: PathBuf,
    },
}

struct Writer {
    job: Job,
    start: Start,
    args: Vec<String>,
    child: Option<Child>,
}

impl Writer {
    fn describe(&self) -> String {
        let what = match &self.job {
            Job::Backup { image, forgotten } => format!(
                "backup of {}{}",
                image.file_name().unwrap_or_default().to_string_lossy(),
                if *forgotten { " (a forgotten point's image)" } else { "" }
            ),
            Job::Verify => "verify".into(),
            Job::Restore { id, .. } => format!("restore of point {}", &id[..8]),
        };
        format!("{what} started at {:+} ms", self.start.0)
    }
}

/// The IDs of the points a forget's JSON says it removed (`removed.points`).
fn removed_by(v: &Value) -> Result<Vec<String>> {
    v["removed"]["points"]
        .as_array()
        .context("forget printed no removed.points")?
        .iter()
        .map(|p| p.as_str().map(String::from).context("a removed point is not an ID"))
        .collect()
}

/// The IDs of the points a forget plan removes (`kept_by` null).
fn planned_removals(v: &Value) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for g in v["groups"].as_array().context("forget printed no groups")? {
        for p in g["points"].as_array().context("a forget group has no points")? {
            if p["kept_by"].is_null() {
                out.insert(p["id"].as_str().context("a planned point has no ID")?.to_string());
            }
        }
    }
    Ok(out)
}

/// `packs` and `bytes` of a count in a prune report.
fn packs_of(v: &Value, field: &str) -> Result<(u64, u64)> {
    let c = &v[field];
    Ok((
        c["packs"].as_u64().with_context(|| format!("prune report has no {field}.packs"))?,
        c["bytes"].as_u64().with_context(|| format!("prune report has no {field}.bytes"))?,
    ))
}

/// The last `n` characters of a run's output, on one line (its summary comes last).
fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let cut = s.char_indices().rev().nth(n).map(|(i, _)| i).unwrap_or(0);
    s[cut..].replace('\n', " | ")
}

impl Harness {
    fn figures(&mut self) -> &mut Figures {
        self.summary.maintenance.get_or_insert_with(Default::default)
    }

    fn concurrent(&mut self) -> &mut Concurrent {
        self.figures().concurrent.get_or_insert_with(Default::default)
    }

    fn reclaimed(&mut self) -> &mut Reclaimed {
        self.figures().prunes.get_or_insert_with(Default::default)
    }

    /// A violation that does not end the kill's checks (a concurrent run that failed).
    fn violation(&mut self, what: String) {
        self.summary.violations += 1;
        if self.summary.violation_examples.len() < 10 {
            self.summary.violation_examples.push(what);
        }
    }

    /// Runs cairn with `args` (which ask for JSON) and parses what it prints.
    fn json_of(&self, args: &[String]) -> Result<Value> {
        let out = self.ok(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())?;
        serde_json::from_str(&out).with_context(|| format!("cairn {args:?} printed no JSON"))
    }

    /// The IDs `cairn points` lists.
    pub(super) fn listed(&self) -> Result<BTreeSet<String>> {
        let v = self.json(&["points"])?;
        v.as_array()
            .context("points printed no list")?
            .iter()
            .map(|p| p["id"].as_str().map(String::from).context("a listed point has no ID"))
            .collect()
    }

    fn verify_passes(&self, when: &str) -> Result<()> {
        let o = self.cmd(&["verify"]).output()?;
        if !o.status.success() {
            bail!(
                "verify {when} ({}): {} {}",
                o.status,
                tail(&String::from_utf8_lossy(&o.stdout), 1500),
                tail(&String::from_utf8_lossy(&o.stderr), 500)
            );
        }
        Ok(())
    }

    /// Every point the harness expects restores byte for byte.
    fn all_restore(&self, when: &str) -> Result<()> {
        for (id, img) in &self.points {
            self.check_restore(id, img.as_deref()).with_context(|| format!("{when}: every survivor restores"))?;
        }
        Ok(())
    }

    fn no_lock_left(&self) -> Result<()> {
        let locks: Vec<PathBuf> = list_files(&self.repo.join("locks"))
            .into_iter()
            .filter(|p| !p.file_name().unwrap_or_default().to_string_lossy().starts_with(".tmp-"))
            .collect();
        if !locks.is_empty() {
            bail!("{} lock file(s) left after the next run", locks.len());
        }
        Ok(())
    }

    /// Removes the images no expected point needs (but the newest, which the next image is
    /// made from): a run makes hundreds.
    fn drop_unused_images(&mut self) -> Result<()> {
        let needed: BTreeSet<PathBuf> = self.points.values().flatten().cloned().collect();
        for n in 1..self.images {
            let img = self.dir.join(format!("img-{n}.img"));
            if img.exists() && !needed.contains(&img) {
                std::fs::remove_file(&img)?;
                let _ = std::fs::remove_file(img.with_extension("ranges"));
            }
        }
        self.forgotten.clear();
        Ok(())
    }

    /// Backs up a new image of `a` and records its point.
    fn add_point(&mut self) -> Result<()> {
        let img = self.next_image()?;
        let id = self.backup_image(&img, None)?;
        self.points.insert(id, Some(img.clone()));
        self.latest = Some(img);
        Ok(())
    }

    /// What each kill (and the dry run) starts from: for prune, a new point and a forget of
    /// all but the K newest, and with `merge`, the index rebuilt by `repair index`; for
    /// forget, four points.
    pub(super) fn prepare(&mut self, merge: bool) -> Result<()> {
        self.drop_unused_images()?;
        if self.op == "forget" {
            while self.points.len() < 4 {
                self.add_point()?;
            }
            return Ok(());
        }
        self.add_point()?;
        let n = self.points.len() as u64;
        let keep = 1 + self.rng.below(3.min(n - 1));
        let v = self.json(&["forget", "a", "--keep-last", &keep.to_string()])?;
        let removed = removed_by(&v)?;
        if removed.len() as u64 != n - keep {
            bail!("forget --keep-last {keep} of {n} points removed {}", removed.len());
        }
        for id in &removed {
            match self.points.remove(id) {
                Some(img) => self.forgotten.extend(img),
                None => bail!("forget removed point {} the harness did not know", &id[..8.min(id.len())]),
            }
        }
        self.figures().points_forgotten += removed.len() as u64;
        if merge {
            // Index files that list many packs (as a repair writes them, or a backup that
            // stores more than a few): a prune then rewrites a file listing packs it keeps
            // next to packs it deletes (`prune.index_written`), where one file per backup
            // of a small image would only be deleted whole.
            self.ok(&["repair", "index"])?;
        }
        Ok(())
    }

    pub(super) fn one_maintenance_kill(&mut self, crash: Option<&str>, after: Option<Duration>) -> Result<()> {
        match self.op.as_str() {
            "prune" => self.one_prune_kill(crash, after),
            "forget" => self.one_forget_kill(crash, after),
            _ => unreachable!(),
        }
    }

    /// Kills, finished runs and phases, as for the other operations.
    pub(super) fn count_end(&mut self, ended: &Ended, crash: Option<&str>) {
        self.summary.kills += ended.killed as u64;
        if ended.killed {
            *self.summary.by_phase.entry(ended.last_point.clone()).or_default() += 1;
        } else {
            self.summary.finished_first += 1;
            if let Some(point) = crash {
                self.summary.planned_not_reached.push(point.to_string());
            }
        }
    }

    /// Adds what a finished prune reports to the figures.
    fn fold_report(&mut self, v: &Value) -> Result<()> {
        let (deleted, reclaimed) = packs_of(v, "deleted")?;
        let (repacked, _) = packs_of(v, "repacked")?;
        let (recovered, _) = packs_of(v, "recovered")?;
        let f = self.reclaimed();
        f.deleted_packs += deleted;
        f.reclaimed_bytes += reclaimed;
        f.repacked_packs += repacked;
        f.recovered_marks += recovered;
        Ok(())
    }

    fn one_forget_kill(&mut self, crash: Option<&str>, after: Option<Duration>) -> Result<()> {
        self.prepare(false)?;
        let before: BTreeSet<String> = self.points.keys().cloned().collect();
        let plan = self.json_of(&forget_args(true))?;
        let to_remove = planned_removals(&plan)?;
        if to_remove.len() + 1 != before.len() {
            bail!("the dry run of forget --keep-last 1 removes {} of {} points", to_remove.len(), before.len());
        }
        let ended = self.run_cairn(&forget_args(false), crash, after)?;
        self.count_end(&ended, crash);
        if !ended.killed && !ended.success {
            bail!("forget failed without a kill: {}", ended.stderr.trim());
        }
        let passes = std::fs::read_to_string(self.dir.join("trace"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "forget.point_deleted")
            .count();
        // 1. Only what the policy removes is gone, as many as the run passed its crash point.
        let listed = self.listed()?;
        let gone: Vec<String> = before.iter().filter(|id| !listed.contains(*id)).cloned().collect();
        for id in &gone {
            if !to_remove.contains(id) {
                bail!("point {} is gone, but the policy keeps it", &id[..8]);
            }
        }
        if let Some(id) = listed.iter().find(|id| !before.contains(*id)) {
            bail!("point {} appeared during a forget", &id[..8]);
        }
        if gone.len() < passes || gone.len() > passes + 1 || (ended.success && gone.len() != to_remove.len()) {
            bail!(
                "{} point(s) gone after a forget that passed forget.point_deleted {passes} time(s){}",
                gone.len(),
                if ended.success { " and finished" } else { "" }
            );
        }
        for id in &gone {
            self.points.remove(id);
        }
        self.figures().points_forgotten += gone.len() as u64;
        // 2. The survivors restore.
        self.all_restore("after the killed forget")?;
        // 3. The next forget completes and leaves the newest point alone.
        let t = Instant::now();
        let v = self.json_of(&forget_args(false))?;
        self.took = t.elapsed();
        let removed = removed_by(&v)?;
        for id in &removed {
            if !to_remove.contains(id) || self.points.remove(id).is_none() {
                bail!("the next forget removed point {}, which was not left to remove", &id[..8.min(id.len())]);
            }
        }
        self.figures().points_forgotten += removed.len() as u64;
        let listed = self.listed()?;
        let kept: Vec<&String> = before.iter().filter(|id| !to_remove.contains(*id)).collect();
        if listed.len() != 1 || kept.first().is_none_or(|k| !listed.contains(*k)) {
            bail!("after the next forget {} point(s) are listed, not the one the policy keeps", listed.len());
        }
        // 4. verify passes, the point restores, no lock is left.
        self.verify_passes("after the next forget")?;
        self.all_restore("after the next forget")?;
        self.no_lock_left()
    }

    /// The concurrent runs of one kill: none, or a backup and maybe a verify and a restore,
    /// starting around the prune's start or shortly before it records its marks.
    fn plan_writers(&mut self, late: bool) -> Result<(Mode, Vec<Writer>)> {
        let r = self.rng.below(100);
        let mode = match (late, r) {
            (true, 0..50) | (false, 0..35) => Mode::Alone,
            (false, 35..80) => Mode::Around,
            _ => Mode::NearMarks,
        };
        if mode == Mode::Alone {
            return Ok((mode, Vec::new()));
        }
        let took = self.took.as_millis().max(20) as u64;
        // When the last prune began recording its marks (half the run, before the first).
        let marks = self.marks_after.map_or(took / 2, |d| d.as_millis() as u64) as i64;
        // How long before taking its lock a run may start: its start-up (with the key
        // derivation of an encrypted repository).
        let startup = if self.encrypted { 250 } else { 40 };
        let start = |rng: &mut crate::workload::Rng| match mode {
            // From well before the prune (a backup that may finish before it looks at the
            // locks) to well into it.
            Mode::Around => Start(rng.below(took * 3 / 2) as i64 - (took * 3 / 5) as i64),
            _ => Start(marks - rng.below(startup) as i64),
        };
        let mut writers = Vec::new();
        let (image, forgotten) = if !self.forgotten.is_empty() && self.rng.below(2) == 0 {
            let i = self.rng.below(self.forgotten.len() as u64) as usize;
            (self.forgotten[i].clone(), true)
        } else {
            (self.next_image()?, false)
        };
        writers.push(Writer {
            args: vec![
                "backup".into(),
                "image".into(),
                image.display().to_string(),
                "--name".into(),
                "a".into(),
                "--json".into(),
            ],
            job: Job::Backup { image, forgotten },
            start: start(&mut self.rng),
            child: None,
        });
        if self.rng.below(2) == 0 {
            writers.push(Writer {
                job: Job::Verify,
                args: vec!["verify".into()],
                start: start(&mut self.rng),
                child: None,
            });
        }
        if self.rng.below(2) == 0 && !self.points.is_empty() {
            let i = self.rng.below(self.points.len() as u64) as usize;
            let (id, image) = self.points.iter().nth(i).map(|(id, img)| (id.clone(), img.clone())).unwrap();
            let image = image.context("an image point without its image")?;
            let out = self.dir.join("concurrent-restore.img");
            let _ = std::fs::remove_file(&out);
            writers.push(Writer {
                args: vec![
                    "restore".into(),
                    "image".into(),
                    format!("a@{}", &id[..12]),
                    "--to".into(),
                    out.display().to_string(),
                    "--force".into(),
                ],
                job: Job::Restore { id, image, out },
                start: start(&mut self.rng),
                child: None,
            });
        }
        Ok((mode, writers))
    }

    /// Runs the prune (killed at `crash` or after `after`) with the writers starting as
    /// planned; returns once the prune ended and every writer started (they are waited for
    /// by the caller), with whether the prune began deleting while a writer was running.
    fn run_with_writers(
        &self,
        args: &[String],
        crash: Option<&str>,
        after: Option<Duration>,
        writers: &mut [Writer],
    ) -> Result<(Ended, bool, Option<Duration>)> {
        let trace = self.dir.join("trace");
        let _ = std::fs::remove_file(&trace);
        let spawn = |args: &[String], crash: Option<&str>| -> Result<Child> {
            let mut c = self.cmd(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            if let Some(at) = crash {
                c.env("CAIRN_CRASH_TRACE", &trace).env("CAIRN_CRASH_AT", at);
            } else if args[0] == "prune" {
                c.env("CAIRN_CRASH_TRACE", &trace);
            }
            Ok(c.spawn()?)
        };
        // Writers that start before the prune set when it starts.
        let lead = writers.iter().map(|w| -w.start.0).max().unwrap_or(0).max(0);
        let t0 = Instant::now();
        let mut prune: Option<(Child, Instant)> = None;
        let mut status = None;
        let mut marked: Option<Duration> = None;
        let mut deleting: Option<bool> = None;
        loop {
            let now = t0.elapsed().as_millis() as i64;
            if prune.is_none() && now >= lead {
                prune = Some((spawn(args, crash)?, Instant::now()));
            }
            if let Some((child, started)) = prune.as_mut() {
                if status.is_none() {
                    status = child.try_wait()?;
                    if status.is_none() && after.is_some_and(|d| started.elapsed() >= d) {
                        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    }
                }
                let passed = std::fs::read_to_string(&trace).unwrap_or_default();
                // The marks record is the prune's first catalog write.
                if marked.is_none() && (passed.contains("catalog.") || passed.contains("prune.marks_written")) {
                    marked = Some(started.elapsed());
                }
                // The deletion phase begins with the index rewrite.
                if deleting.is_none() && ["prune.index_", "prune.pack_deleted"].iter().any(|p| passed.contains(p)) {
                    let mut running = false;
                    for c in writers.iter_mut().filter_map(|w| w.child.as_mut()) {
                        running |= c.try_wait()?.is_none();
                    }
                    deleting = Some(running);
                }
            }
            for w in writers.iter_mut().filter(|w| w.child.is_none()) {
                if now >= lead + w.start.0 {
                    w.child = Some(spawn(&w.args, None)?);
                }
            }
            if status.is_some() && writers.iter().all(|w| w.child.is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (child, _) = prune.context("the prune never started")?;
        let o = child.wait_with_output()?;
        let last_point = std::fs::read_to_string(&trace)
            .ok()
            .and_then(|t| t.lines().last().map(|l| l.to_string()))
            .unwrap_or("start".into());
        let ended = Ended {
            killed: o.status.signal() == Some(libc::SIGKILL),
            success: o.status.success(),
            last_point,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        Ok((ended, deleting == Some(true), marked))
    }

    /// Waits for a concurrent run and checks how it ended; a failure is a violation (the
    /// kill's other checks go on). A backup's point joins the expected points.
    fn finish_writer(&mut self, mut w: Writer, context: &str) -> Result<()> {
        let child = w.child.take().context("a concurrent run never started")?;
        let o = child.wait_with_output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        let failure = match &w.job {
            Job::Backup { image, forgotten } => {
                let f = self.concurrent();
                f.backups += 1;
                f.backups_of_forgotten += *forgotten as u64;
                if o.status.success() {
                    let v: Value = serde_json::from_str(&stdout).context("a concurrent backup printed no JSON")?;
                    let id = v["id"].as_str().context("a concurrent backup printed no point ID")?.to_string();
                    self.points.insert(id, Some(image.clone()));
                    None
                } else {
                    Some(format!("failed ({}): {}", o.status, tail(&stderr, 800)))
                }
            }
            Job::Verify => {
                self.concurrent().verifies += 1;
                (!o.status.success())
                    .then(|| format!("failed ({}): {} {}", o.status, tail(&stdout, 1500), tail(&stderr, 500)))
            }
            Job::Restore { image, out, .. } => {
                self.concurrent().restores += 1;
                if !o.status.success() {
                    Some(format!("failed ({}): {}", o.status, tail(&stderr, 800)))
                } else if !same_bytes(out, image)? {
                    Some("succeeded with bytes that differ from the point's image".into())
                } else {
                    let _ = std::fs::remove_file(out);
                    None
                }
            }
        };
        if let Some(why) = failure {
            self.concurrent().failures += 1;
            self.violation(format!("{context}: concurrent {}: {why}", w.describe()));
        }
        Ok(())
    }

    fn one_prune_kill(&mut self, crash: Option<&str>, after: Option<Duration>) -> Result<()> {
        // Planned kills start as the dry run did (merged index files, a repack of every
        // partly used pack), so that their crash point comes; random ones draw.
        let merge = crash.is_some() || self.rng.below(2) == 0;
        self.prepare(merge)?;
        let late = crash.is_some_and(|c| self.late.contains(c));
        let max_unused = if crash.is_some() { 0 } else { [0, 5, 25, 100][self.rng.below(4) as usize] };
        let (mode, mut writers) = self.plan_writers(late)?;
        let alongside: Vec<String> = writers.iter().map(|w| w.describe()).collect();
        let (ended, overlapped, marked) = self.run_with_writers(&prune_args(max_unused), crash, after, &mut writers)?;
        if marked.is_some() {
            self.marks_after = marked;
        }
        self.count_end(&ended, crash);
        let context = format!(
            "prune --max-unused {max_unused}{} {} at {}{}",
            if merge { " (index merged by a repair)" } else { "" },
            if ended.killed { "killed" } else { "finished" },
            crash.map(String::from).unwrap_or_else(|| format!(
                "{:?} ({})",
                after.unwrap_or_default(),
                ended.last_point
            )),
            if alongside.is_empty() { ", alone".to_string() } else { format!(", alongside: {}", alongside.join("; ")) }
        );
        let f = self.concurrent();
        if !writers.is_empty() {
            f.iterations += 1;
            f.near_marks += (mode == Mode::NearMarks) as u64;
            f.deletion_while_running += overlapped as u64;
        }
        for w in writers {
            self.finish_writer(w, &context)?;
        }
        if !ended.killed {
            if !ended.success {
                bail!("{context}: prune failed without a kill: {}", tail(&ended.stderr, 800));
            }
            let v: Value = serde_json::from_str(&ended.stdout).context("the prune printed no JSON")?;
            self.fold_report(&v)?;
        }
        let context = context.as_str();
        // 1. verify passes (marked and unindexed packs are allowed).
        self.verify_passes("after the kill").context(context.to_string())?;
        // 2. No point lost, none made but the concurrent backup's (already expected).
        let listed = self.listed()?;
        if let Some(id) = self.points.keys().find(|id| !listed.contains(*id)) {
            bail!("{context}: point {} is gone", &id[..8]);
        }
        if let Some(id) = listed.iter().find(|id| !self.points.contains_key(*id)) {
            bail!("{context}: point {} appeared, not the concurrent backup's", &id[..8]);
        }
        // 3. Every survivor restores.
        self.all_restore("after the kill").context(context.to_string())?;
        // 4. The next prune, alone, succeeds (and deletes what the killed one left marked);
        // 5. nothing a survivor needs went with it;
        // 6. the one after deletes nothing and leaves nothing pending. A pack whose mark a
        //    run took back is judged only by the run after it (repacked then, its unused part
        //    marked and deleted): after such a run, one more may work.
        let mut recovered = true;
        for run in 0.. {
            if run == 5 {
                bail!("{context}: prunes after the kill still had work after 5 runs");
            }
            let t = Instant::now();
            let v = self.json(&["prune", "--grace", "0s"]).with_context(|| format!("{context}: prune {run} after"))?;
            if run == 0 {
                self.took = t.elapsed();
            }
            self.fold_report(&v)?;
            let deleted = packs_of(&v, "deleted")?.0;
            let pending = v["pending"].as_array().context("prune report has no pending")?.len();
            if run > 0 && (deleted > 0 || pending > 0) {
                if !recovered {
                    bail!(
                        "{context}: prune {run} after the kill (its predecessor took no mark back) deleted {deleted} \
                         pack(s) and left {pending} pending: {}",
                        tail(&v.to_string(), 800)
                    );
                }
                self.reclaimed().runs_after_recovery += 1;
            }
            if run > 0 && deleted == 0 && pending == 0 {
                break;
            }
            if run == 0 || deleted > 0 {
                let when = format!("after prune {run} after the kill");
                self.verify_passes(&when).context(context.to_string())?;
                self.all_restore(&when).context(context.to_string())?;
            }
            recovered = packs_of(&v, "recovered")?.0 > 0;
        }
        // 7. No lock is left.
        self.no_lock_left().context(context.to_string())
    }
}
