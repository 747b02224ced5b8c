//! The kill harness: runs the real `cairn` binary (a debug build, where crash points are live)
//! and kills it with SIGKILL, either at a random moment of its run or at a crash point of the
//! write ordering (`CAIRN_CRASH_AT=NAME:K`, every point the operation passes, see
//! `cairn_storage::crash_point`). After each kill:
//!
//! 1. `cairn verify` passes (packs left unreferenced by the killed run are allowed);
//! 2. every restore point listed before is still listed, at most one new point appeared, and
//!    it restores to exactly the image the killed run was backing up;
//! 3. old points still restore byte for byte (one per kill, in turn);
//! 4. the next run of the same operation succeeds (a backup reuses what the killed one had
//!    indexed) and no lock file is left after it;
//! 5. for VM backups: the guest runs and is thawed within seconds, and no backup job is left.
//!
//! Leftovers (temporary files, unreferenced packs) are counted: a future gc reclaims them.
//!
//! `forget` and `prune` (not in the default list: they take longer) have their own iteration
//! and checks, with backups, verifies and restores running against the repository while a
//! prune is killed: see [`maintenance`].
//!
//! `copy` (not in the default list either) kills `cairn copy` from the harness's repository
//! into a target made with `init --copy-from`, and checks the target and the source: see
//! [`copy`].

use crate::workload::{self, same_bytes};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod copy;
mod maintenance;

pub const OPS: [&str; 7] = ["backup", "backup-changed", "verify", "verify-damaged", "repair", "restore", "init"];
/// Operations run only when named: each kill costs several backups and restores.
pub const MAINTENANCE_OPS: [&str; 2] = ["prune", "forget"];
/// Run only when named too: each kill makes a target and copies twice.
pub const NAMED_OPS: [&str; 1] = ["copy"];

#[derive(clap::Args)]
pub struct KillArgs {
    /// Operations (default: all but backup-vm, prune, forget and copy): backup, backup-changed,
    /// verify, verify-damaged, repair, restore, init, backup-vm, prune (with concurrent
    /// backups, verifies and restores), forget, copy (into a target made with
    /// `init --copy-from`)
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
    /// Kills at random moments per operation
    #[arg(long, default_value_t = 20)]
    random: usize,
    /// Kills at each crash point: at its first, middle and last passing (up to this many)
    #[arg(long, default_value_t = 3)]
    per_point: usize,
    /// The cairn binary (default: `cairn` next to this program)
    #[arg(long)]
    cairn: Option<PathBuf>,
    /// A libvirt test guest to back up for backup-vm (made by scripts/guest.sh; default: one
    /// is defined and removed by the harness)
    #[arg(long)]
    guest: Option<String>,
    /// Random seed (kill moments, which old point is restored; for prune: what runs alongside
    /// it, and when)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the work folder (printed), and each repository where an invariant was violated
    /// as `<op>/violation-<N>` in it, for inspection
    #[arg(long)]
    keep: bool,
    /// prune and forget: encrypted repositories only (by default plain and encrypted ones
    /// alternate, every 25 kills)
    #[arg(long)]
    encrypted_only: bool,
}

#[derive(Default, Serialize)]
pub struct Summary {
    pub harness: &'static str,
    pub op: String,
    pub kills: u64,
    /// Runs that finished before the kill came (random moments past the end).
    pub finished_first: u64,
    /// Crash points planned from the dry run that this run did not reach (the operation took
    /// another path): listed so that a point never tested is seen.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub planned_not_reached: Vec<String>,
    /// Kills by the last crash point passed before them ("start": none yet).
    pub by_phase: BTreeMap<String, u64>,
    pub violations: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violation_examples: Vec<String>,
    /// Bytes the next backup stored after a kill, relative to what a backup of that image
    /// stores without a kill before it (1.0: nothing the killed run wrote was reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_backup_stored_ratio_max: Option<f64>,
    /// The smallest such ratio: a kill after an index file was written lets the next backup
    /// reuse what the killed one stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_backup_stored_ratio_min: Option<f64>,
    /// Bytes of packs no index lists plus temporary files, in a repository that took up to 25
    /// kills (reclaimed by gc, once it exists).
    pub leaked_bytes_max: u64,
    /// VM backups: the longest a guest stayed frozen or paused after its backup was killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_released_ms_max: Option<u64>,
    /// prune and forget: what ran alongside, and what the prunes reclaimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<maintenance::Figures>,
    pub duration_s: f64,
}

pub fn run(a: &KillArgs) -> Result<Vec<Summary>> {
    let cairn = match &a.cairn {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("cairn"),
    };
    if !cairn.exists() {
        bail!("{} not found: build it first (cargo build -p cairn-cli)", cairn.display());
    }
    let ops: Vec<String> = if a.ops.is_empty() { OPS.iter().map(|s| s.to_string()).collect() } else { a.ops.clone() };
    let tmp = tempfile::Builder::new().prefix("cairn-kills-").tempdir()?;
    let mut out = Vec::new();
    for op in &ops {
        if !OPS.contains(&op.as_str())
            && !MAINTENANCE_OPS.contains(&op.as_str())
            && !NAMED_OPS.contains(&op.as_str())
            && op != "backup-vm"
        {
            bail!("unknown operation {op:?}");
        }
        let dir = tmp.path().join(op);
        std::fs::create_dir_all(&dir)?;
        let mut h = Harness::new(&cairn, &dir, op, a)?;
        out.push(h.run(a)?);
    }
    if a.keep {
        eprintln!("kept {}", tmp.keep().display());
    }
    Ok(out)
}

/// One operation's harness: its repository, images and the points it expects.
struct Harness {
    cairn: PathBuf,
    dir: PathBuf,
    op: String,
    repo: PathBuf,
    /// Point ID → the image it must restore to (None: a VM point, checked by hash only).
    points: BTreeMap<String, Option<PathBuf>>,
    images: u64,
    /// The image of the newest point (what `restore image a` restores).
    latest: Option<PathBuf>,
    rng: workload::Rng,
    guest: Option<String>,
    own_guest: bool,
    summary: Summary,
    /// What one backup of an image stores when no kill came before it.
    clean_stored: Option<u64>,
    /// prune: the planned crash points (`NAME:K`) the dry run passed after it had recorded
    /// its marks (the deletion phase, which a concurrent lock holds off).
    late: std::collections::BTreeSet<String>,
    /// prune: the images of the points the last forget removed (a concurrent backup may
    /// back one up again, reusing blocks the prune is about to mark).
    forgotten: Vec<PathBuf>,
    /// How long the dry run took (random kill moments, when concurrent runs start).
    took: Duration,
    /// prune: how long after its start the last prune began recording its marks.
    marks_after: Option<Duration>,
    /// Keep the repositories where an invariant was violated (`--keep`).
    keep: bool,
    /// Whether the repository is encrypted: always, but for prune and forget every other fresh
    /// one (the dry run's is, the first kills' is not: a plain one costs no key derivation per
    /// run, and a kill costs some twenty runs).
    encrypted: bool,
    /// Fresh repositories made so far.
    resets: u64,
    /// `--encrypted-only`.
    encrypted_only: bool,
}

/// How one run of the operation ended.
struct Ended {
    killed: bool,
    success: bool,
    last_point: String,
    stdout: String,
    stderr: String,
}

impl Harness {
    fn new(cairn: &Path, dir: &Path, op: &str, a: &KillArgs) -> Result<Harness> {
        let mut h = Harness {
            cairn: cairn.to_path_buf(),
            dir: dir.to_path_buf(),
            op: op.to_string(),
            repo: dir.join("repo"),
            points: BTreeMap::new(),
            images: 0,
            latest: None,
            rng: workload::Rng::new(a.seed),
            guest: a.guest.clone(),
            own_guest: false,
            summary: Summary { harness: "kill", op: op.to_string(), ..Default::default() },
            clean_stored: None,
            late: Default::default(),
            forgotten: Vec::new(),
            took: Duration::ZERO,
            marks_after: None,
            keep: a.keep,
            encrypted: true,
            resets: 0,
            encrypted_only: a.encrypted_only,
        };
        if MAINTENANCE_OPS.contains(&op) {
            h.summary.maintenance = Some(Default::default());
        }
        h.reset()?;
        Ok(h)
    }

    /// A fresh repository with two points (and damage, for verify-damaged).
    fn reset(&mut self) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.repo);
        self.points.clear();
        self.resets += 1;
        if self.op == "init" {
            return Ok(());
        }
        self.encrypted = !MAINTENANCE_OPS.contains(&self.op.as_str()) || self.encrypted_only || self.resets % 2 == 1;
        self.ok(if self.encrypted { &["init", "--encrypt"] } else { &["init"] })?;
        if self.op == "backup-vm" {
            if self.guest.is_none() {
                let name = format!("cairn-torture-{}", std::process::id());
                let guest_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest.sh");
                let _ = Command::new(&guest_sh).args(["remove", &name]).output();
                let o = Command::new(&guest_sh).args(["define", &name, "--two-disks", "--start", "--wait"]).output()?;
                if !o.status.success() {
                    bail!("defining a test guest failed: {}", String::from_utf8_lossy(&o.stderr));
                }
                self.guest = Some(name);
                self.own_guest = true;
            }
            let g = self.guest.clone().unwrap();
            let v = self.json(&["backup", "vm", &g])?;
            self.points.insert(v[0]["id"].as_str().context("no point id")?.to_string(), None);
            return Ok(());
        }
        // prune needs history to forget (and packs the points share); forget, points to remove.
        let initial = match self.op.as_str() {
            "prune" => 4,
            "forget" => 3,
            _ => 2,
        };
        for _ in 0..initial {
            let img = self.next_image()?;
            let id = self.backup_image(&img, None)?;
            self.points.insert(id, Some(img.clone()));
            self.latest = Some(img);
        }
        if self.op == "verify-damaged" {
            // One flipped byte in the middle of the newest pack.
            let packs = list_files(&self.repo.join("packs"));
            let newest =
                packs.iter().max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok()).context("no pack")?;
            let mut b = std::fs::read(newest)?;
            let at = b.len() / 2;
            b[at] ^= 0x20;
            std::fs::write(newest, b)?;
        }
        if self.op == "repair" {
            // Work for repair: a pack no index lists (as a killed backup leaves).
            let img = self.next_image()?;
            let e = self.run_cairn(&self.backup_args(&img, None), Some("session.pack_stored:1"), None)?;
            if !e.killed {
                bail!("the crash point session.pack_stored was not reached");
            }
        }
        Ok(())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cairn);
        c.args(args)
            .env("CAIRN_REPO", &self.repo)
            .env_remove("CAIRN_PASSWORD")
            .env_remove("CAIRN_FROM_PASSWORD")
            .env_remove("CAIRN_CRASH_AT")
            .env_remove("CAIRN_CRASH_TRACE")
            .stdin(Stdio::null());
        if self.encrypted {
            // The source's password when this repository is copied from.
            c.env("CAIRN_PASSWORD", "torture").env("CAIRN_FROM_PASSWORD", "torture");
        }
        c
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.cmd(args).output()?;
        if !o.status.success() {
            bail!("cairn {args:?} failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        Ok(serde_json::from_str(&self.ok(&a)?)?)
    }

    /// A new image: the previous one with scattered writes (or a fresh one).
    fn next_image(&mut self) -> Result<PathBuf> {
        self.images += 1;
        let path = self.dir.join(format!("img-{}.img", self.images));
        let prev = self.dir.join(format!("img-{}.img", self.images - 1));
        if prev.exists() {
            let ranges = workload::mutate(&prev, &path, 96, self.images * 31)?;
            std::fs::write(path.with_extension("ranges"), ranges)?;
        } else {
            workload::make_image(&path, self.images)?;
        }
        Ok(path)
    }

    fn backup_args(&self, img: &Path, ranges: Option<&Path>) -> Vec<String> {
        let mut v: Vec<String> =
            vec!["backup".into(), "image".into(), img.display().to_string(), "--name".into(), "a".into()];
        if let Some(r) = ranges {
            v.extend(["--changed-ranges".into(), r.display().to_string()]);
        }
        v
    }

    fn backup_image(&self, img: &Path, ranges: Option<&Path>) -> Result<String> {
        let args = self.backup_args(img, ranges);
        let v = self.json(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())?;
        Ok(v["id"].as_str().context("no point id")?.to_string())
    }

    /// Runs cairn with `args`, killed at `crash` (NAME:K) or after `after`; returns how it ended.
    fn run_cairn(&self, args: &[String], crash: Option<&str>, after: Option<Duration>) -> Result<Ended> {
        let trace = self.dir.join("trace");
        let _ = std::fs::remove_file(&trace);
        let mut c = self.cmd(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        c.env("CAIRN_CRASH_TRACE", &trace).stdout(Stdio::piped()).stderr(Stdio::piped());
        if self.op == "copy" {
            self.target_env(&mut c);
        }
        if let Some(at) = crash {
            c.env("CAIRN_CRASH_AT", at);
        }
        let mut child = c.spawn()?;
        if let Some(d) = after {
            let t = Instant::now();
            while t.elapsed() < d {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait()?.is_none() {
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            }
        }
        let o = child.wait_with_output()?;
        let last_point = std::fs::read_to_string(&trace)
            .ok()
            .and_then(|t| t.lines().last().map(|l| l.to_string()))
            .unwrap_or("start".into());
        Ok(Ended {
            killed: o.status.signal() == Some(libc::SIGKILL),
            success: o.status.success(),
            last_point,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
    }

    /// The arguments of one run of the operation (and the image a backup reads).
    fn op_args(&mut self) -> Result<(Vec<String>, Option<PathBuf>)> {
        Ok(match self.op.as_str() {
            "backup" => {
                let img = self.next_image()?;
                (self.backup_args(&img, None), Some(img))
            }
            "backup-changed" => {
                let img = self.next_image()?;
                let r = img.with_extension("ranges");
                (self.backup_args(&img, Some(&r)), Some(img))
            }
            "verify" | "verify-damaged" => (vec!["verify".into()], None),
            "repair" => (vec!["repair".into(), "index".into()], None),
            "restore" => {
                let out = self.dir.join("restored.img");
                (
                    vec![
                        "restore".into(),
                        "image".into(),
                        "a".into(),
                        "--to".into(),
                        out.display().to_string(),
                        "--force".into(),
                    ],
                    None,
                )
            }
            "init" => (vec!["init".into(), "--encrypt".into()], None),
            "backup-vm" => (vec!["backup".into(), "vm".into(), self.guest.clone().unwrap()], None),
            // The dry run's: a repack happens, marks are made and deleted at once.
            "prune" => (maintenance::prune_args(0), None),
            "forget" => (maintenance::forget_args(false), None),
            "copy" => (copy::copy_args(&self.repo, &self.target()), None),
            _ => unreachable!(),
        })
    }

    fn run(&mut self, a: &KillArgs) -> Result<Summary> {
        let started = Instant::now();
        // A dry run: how long the operation takes and which crash points it passes.
        let maintenance = MAINTENANCE_OPS.contains(&self.op.as_str());
        if maintenance {
            // Unused data for the prune, points for the forget: what each kill starts from.
            self.prepare(true)?;
        }
        if self.op == "copy" {
            // Into an empty encrypted target, as the planned kills start.
            self.prepare_target(false)?;
        }
        let (args, _) = self.op_args()?;
        let t = Instant::now();
        let trace = self.dir.join("dry-trace");
        let mut c = self.cmd(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        if self.op == "copy" {
            self.target_env(&mut c);
        }
        let o = c.env("CAIRN_CRASH_TRACE", &trace).output()?;
        self.took = t.elapsed();
        if !o.status.success() && self.op != "verify-damaged" {
            bail!("{} fails without a kill: {}", self.op, String::from_utf8_lossy(&o.stderr));
        }
        let mut passes: BTreeMap<String, usize> = BTreeMap::new();
        let dry_trace = std::fs::read_to_string(&trace).unwrap_or_default();
        // Where the prune had its marks durable: what it passes after that, it passes in the
        // deletion phase.
        let marked_at = dry_trace.lines().position(|l| l == "prune.marks_written");
        for (i, l) in dry_trace.lines().enumerate() {
            let n = passes.entry(l.to_string()).or_default();
            *n += 1;
            if marked_at.is_some_and(|m| i > m) {
                self.late.insert(format!("{l}:{n}"));
            }
        }
        if self.op.starts_with("backup") && self.op != "backup-vm" {
            // What a backup stores with no kill before it (the dry run's point).
            let pts = self.json(&["points", "a"])?;
            let last = pts.as_array().and_then(|v| v.last()).context("no point")?;
            self.clean_stored = last["repository_growth_bytes"].as_u64();
        }
        self.reset()?;
        let mut plan: Vec<Option<String>> = Vec::new();
        for (point, n) in &passes {
            let mut ks: Vec<usize> = vec![1, n.div_ceil(2), *n];
            ks.sort();
            ks.dedup();
            for k in ks.into_iter().take(a.per_point) {
                plan.push(Some(format!("{point}:{k}")));
            }
        }
        plan.extend(std::iter::repeat_n(None, a.random));
        for (i, crash) in plan.into_iter().enumerate() {
            // Repositories are kept small: a fresh one every 25 kills; repair and verify of
            // damage only have work to do on a fresh one.
            let fresh_each = matches!(self.op.as_str(), "repair" | "verify-damaged");
            if i > 0 && (fresh_each || i % 25 == 0) {
                self.reset()?;
            }
            // prune and forget update `took` as they go (the repository grows and shrinks,
            // plain and encrypted ones alternate).
            let after = crash.is_none().then(|| self.took.mul_f64(1.2 * (self.rng.below(1000) as f64 / 1000.0)));
            let outcome = if maintenance {
                self.one_maintenance_kill(crash.as_deref(), after)
            } else if self.op == "copy" {
                self.one_copy_kill(crash.as_deref(), after)
            } else {
                self.one_kill(crash.as_deref(), after)
            };
            if let Err(e) = outcome {
                self.summary.violations += 1;
                if self.summary.violation_examples.len() < 10 {
                    self.summary
                        .violation_examples
                        .push(format!("{}: {e:#}", crash.as_deref().unwrap_or("random moment")));
                }
                if self.keep {
                    let _ = std::fs::rename(&self.repo, self.dir.join(format!("violation-{i}")));
                }
                self.reset()?;
            }
        }
        if self.own_guest {
            let guest_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest.sh");
            let _ = Command::new(guest_sh).args(["remove", self.guest.as_deref().unwrap()]).output();
        }
        self.summary.duration_s = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        Ok(std::mem::take(&mut self.summary))
    }

    /// One kill and the checks after it.
    fn one_kill(&mut self, crash: Option<&str>, after: Option<Duration>) -> Result<()> {
        let (args, image) = self.op_args()?;
        // Whatever a restore leaves at its destination after the kill, the killed run wrote.
        let _ = std::fs::remove_file(self.dir.join("restored.img"));
        let ended = self.run_cairn(&args, crash, after)?;
        self.summary.kills += ended.killed as u64;
        if !ended.killed {
            self.summary.finished_first += 1;
            if let Some(point) = crash {
                self.summary.planned_not_reached.push(point.to_string());
            }
            if !ended.success && self.op != "verify-damaged" {
                bail!("{} failed without a kill: {}", self.op, ended.stderr.trim());
            }
        } else {
            *self.summary.by_phase.entry(ended.last_point.clone()).or_default() += 1;
        }
        if self.op == "backup-vm" {
            self.check_guest()?;
        }
        if self.op == "init" {
            return self.check_init();
        }
        if self.op == "restore" {
            let out = self.dir.join("restored.img");
            if ended.killed && out.exists() && !same_bytes(&out, self.latest.as_ref().unwrap())? {
                bail!("a killed restore left a complete-looking image with wrong bytes");
            }
        }
        // 1. verify passes (on a damaged repository: finds exactly that damage).
        let o = self.cmd(&["verify", "--json"]).output()?;
        let v: Value = serde_json::from_slice(&o.stdout).context("verify printed no JSON")?;
        if self.op == "verify-damaged" {
            if v["damaged_blocks"].as_array().is_none_or(|b| b.is_empty()) {
                bail!("verify no longer finds the damage");
            }
            // The first verify after the kill: a sound copy the killed run quarantined would
            // be released here.
            if v["released_copies"].as_array().is_some_and(|r| !r.is_empty()) {
                bail!("the killed verify had quarantined a sound copy");
            }
            if v["unreadable_packs"].as_array().is_some_and(|u| !u.is_empty()) {
                bail!("verify reports unreadable packs");
            }
        } else if !o.status.success() {
            bail!("verify after the kill: {}", String::from_utf8_lossy(&o.stdout));
        }
        let unindexed: u64 = v["unindexed_packs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .filter_map(|p| std::fs::metadata(self.repo.join("packs").join(&p[..2]).join(p)).ok())
            .map(|m| m.len())
            .sum();
        let (_, tmp_bytes) = workload::temporaries(&self.repo);
        self.summary.leaked_bytes_max = self.summary.leaked_bytes_max.max(unindexed + tmp_bytes);
        // 2. points: nothing lost, at most one new, and it is the image being backed up.
        let listed: Vec<String> =
            self.json(&["points"])?.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
        for id in self.points.keys() {
            if !listed.contains(id) {
                bail!("point {} is gone", &id[..8]);
            }
        }
        let new: Vec<&String> = listed.iter().filter(|id| !self.points.contains_key(*id)).collect();
        if new.len() > 1 || (!self.op.starts_with("backup") && !new.is_empty()) {
            bail!("{} new point(s) after one killed {}", new.len(), self.op);
        }
        if self.op.starts_with("backup") && ended.success && new.is_empty() {
            bail!("the backup finished but left no point");
        }
        if let Some(id) = new.first().map(|s| s.to_string()) {
            self.check_restore(&id, image.as_deref())?;
            self.points.insert(id, image.clone());
            self.latest = image.clone();
        }
        // 3. one old point restores, in turn (not one verify names as damaged on purpose).
        let damaged: Vec<&str> =
            v["affected_points"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_str()).collect();
        let sound: Vec<(String, Option<PathBuf>)> = self
            .points
            .iter()
            .filter(|(id, _)| !damaged.contains(&id.as_str()))
            .map(|(i, m)| (i.clone(), m.clone()))
            .collect();
        if !sound.is_empty() {
            let (id, img) = &sound[self.rng.below(sound.len() as u64) as usize];
            self.check_restore(id, img.as_deref())?;
        }
        // 4. the next run succeeds, and leaves no lock.
        match self.op.as_str() {
            "backup" | "backup-changed" => {
                let img = image.unwrap();
                let ranges = img.with_extension("ranges");
                let id = self.backup_image(&img, (self.op == "backup-changed").then_some(ranges.as_path()))?;
                self.check_restore(&id, Some(&img))?;
                let p = self.json(&["points", "a"])?;
                let stored = p.as_array().unwrap().iter().find(|x| x["id"] == id.as_str()).unwrap()
                    ["repository_growth_bytes"]
                    .as_u64()
                    .unwrap_or(0);
                if let (Some(clean), true) = (self.clean_stored, ended.killed) {
                    let r = stored as f64 / clean.max(1) as f64;
                    let r = (r * 1000.0).round() / 1000.0;
                    let m = self.summary.next_backup_stored_ratio_max.get_or_insert(0.0);
                    *m = m.max(r);
                    let m = self.summary.next_backup_stored_ratio_min.get_or_insert(f64::MAX);
                    *m = m.min(r);
                }
                self.points.insert(id, Some(img.clone()));
                self.latest = Some(img);
            }
            "backup-vm" => {
                let g = self.guest.clone().unwrap();
                let v = self.json(&["backup", "vm", &g])?;
                if v[0]["ok"] == false {
                    bail!("the next VM backup failed: {}", v[0]["error"]);
                }
                self.points.insert(v[0]["id"].as_str().context("no point id")?.to_string(), None);
            }
            "repair" => {
                self.ok(&["repair", "index"])?;
            }
            "restore" => {
                let (args, _) = self.op_args()?;
                self.ok(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())?;
                let out = self.dir.join("restored.img");
                let latest = self.latest.clone().unwrap();
                if !same_bytes(&out, &latest)? || out.with_extension("img.cairn-partial").exists() {
                    bail!("the restore after a killed one is wrong or left its partial file");
                }
            }
            _ => {
                let o = self.cmd(&["verify"]).output()?;
                if o.status.code() != Some(if self.op == "verify-damaged" { 3 } else { 0 }) {
                    bail!("the next verify: {}", String::from_utf8_lossy(&o.stdout));
                }
            }
        }
        let locks: Vec<PathBuf> = list_files(&self.repo.join("locks"))
            .into_iter()
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp-"))
            .collect();
        if !locks.is_empty() {
            bail!("{} lock file(s) left after the next run", locks.len());
        }
        Ok(())
    }

    fn check_restore(&self, id: &str, oracle: Option<&Path>) -> Result<()> {
        let out = self.dir.join("check.img");
        let _ = std::fs::remove_file(&out);
        let spec =
            format!("{}@{}", if self.op == "backup-vm" { self.guest.as_deref().unwrap() } else { "a" }, &id[..12]);
        let mut args = vec!["restore", "image", spec.as_str(), "--to", out.to_str().unwrap(), "--force"];
        if self.op == "backup-vm" {
            args.extend(["--disk", "vda"]);
        }
        self.ok(&args).with_context(|| format!("restoring point {}", &id[..8]))?;
        if let Some(img) = oracle {
            if !same_bytes(&out, img)? {
                bail!("point {} restores to bytes that differ from its image", &id[..8]);
            }
        }
        std::fs::remove_file(&out)?;
        Ok(())
    }

    fn check_init(&mut self) -> Result<()> {
        if !self.repo.join("config").exists() {
            self.ok(&["init", "--encrypt"]).context("init after a killed init")?;
        }
        let keys = list_files(&self.repo.join("keys"))
            .iter()
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp-"))
            .count();
        if keys != 1 {
            bail!("{keys} key files after a killed init");
        }
        self.ok(&["points"]).context("the repository does not open")?;
        let _ = std::fs::remove_dir_all(&self.repo);
        Ok(())
    }

    /// The guest runs, is thawed and has no backup job, within a few seconds of the kill.
    fn check_guest(&mut self) -> Result<()> {
        let g = self.guest.clone().unwrap();
        let t = Instant::now();
        loop {
            let state = virsh(&["domstate", &g]);
            let frozen = virsh(&["qemu-agent-command", &g, r#"{"execute":"guest-fsfreeze-status"}"#]);
            let job = virsh(&["domjobinfo", &g]);
            let released = state.trim() == "running" && frozen.contains("thawed") && !job.contains("Backup");
            if released {
                let ms = t.elapsed().as_millis() as u64;
                let m = self.summary.guest_released_ms_max.get_or_insert(0);
                *m = (*m).max(ms);
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(15) {
                bail!(
                    "15 s after the kill the guest is {:?}, freeze {:?}, job {:?}",
                    state.trim(),
                    frozen.trim(),
                    job.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn virsh(args: &[&str]) -> String {
    Command::new("virsh")
        .arg("-q")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
        .unwrap_or_default()
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
