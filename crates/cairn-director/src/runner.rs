//! Tasks: a job's run, in a thread of its own, through the same operations as the CLI
//! (`cairn_ops::vm_backup::backup_vms`, then `cairn_ops::maintenance::forget` for its retention).
//!
//! One task at a time per repository (the others wait, queued): a job's retention then never
//! decides while another job's points of the same VMs are being written, and the runs of one
//! repository do not compete for its disk. Within a task, the hosts are backed up
//! in parallel, `per_host` VMs of each at a time. A task's progress and log go to the catalog
//! as it runs; a cancelled task stops between VMs and between batches of blocks (its guests
//! thawed, no point written for the VM it was in).

use crate::catalog::{Catalog, Task, TaskState};
use crate::jobs::{BackupMethod, JobSpec};
use crate::{DirectorError, Settings};
use anyhow::{Context, Result};
use cairn_engine::Progress;
use cairn_ops::vm_backup::{backup_vms, BackupVmsRequest, VmBackupOutcome};
use cairn_ops::Cancel;
use cairn_repo::Repository;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Runner {
    catalog: Arc<Catalog>,
    settings: Arc<Settings>,
    /// One mutex per repository location: its tasks run one at a time.
    repositories: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The cancel flags of the tasks not ended yet.
    cancels: Mutex<HashMap<i64, Cancel>>,
    /// The threads of the tasks not ended yet, for a clean stop.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Held from the check that a job is not active to its task's queueing: the scheduler and
    /// the API must not queue one job twice.
    submitting: Mutex<()>,
    /// The server is stopping: tasks stopped now end `interrupted`, not `cancelled`.
    stopping: std::sync::atomic::AtomicBool,
    /// VM backups at once per host, across tasks (a job's `per_host` is its own share).
    host_limits: Arc<cairn_ops::vm_backup::HostLimits>,
}

impl Runner {
    pub fn new(catalog: Arc<Catalog>, settings: Arc<Settings>) -> Arc<Runner> {
        Arc::new(Runner {
            catalog,
            repositories: Mutex::default(),
            cancels: Mutex::default(),
            threads: Mutex::default(),
            submitting: Mutex::default(),
            stopping: Default::default(),
            host_limits: cairn_ops::vm_backup::HostLimits::new(settings.per_host_limit),
            settings,
        })
    }

    /// Queues a run of job `job_id` (`trigger`: api, schedule, missed; `by`: who asked) and
    /// starts its thread; without `retention`, the job's retention is not applied after it. A job
    /// already queued or running is not queued twice.
    pub fn submit(
        self: &Arc<Self>,
        job_id: i64,
        spec: JobSpec,
        trigger: &str,
        by: &str,
        retention: bool,
    ) -> Result<Task> {
        let _one_at_a_time = self.submitting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(active) = self.catalog.tasks(Some(job_id), 1)?.into_iter().find(|t| !t.state.is_finished()) {
            return Err(DirectorError::Conflict(format!(
                "job {} is already {} (task {})",
                spec.name,
                active.state.as_str(),
                active.id
            ))
            .into());
        }
        let task = self.catalog.enqueue(Some(job_id), "backup", trigger, by)?;
        let id = task.id;
        self.start_thread(task, move |me, cancel| me.run(id, job_id, spec, cancel, retention))
    }

    /// Starts task `task`'s thread running `body` with the task's cancel flag, which stays
    /// registered (for `cancel` and `stop_all`) until `body` returns. A thread that cannot be
    /// started fails the task.
    fn start_thread(
        self: &Arc<Self>,
        task: Task,
        body: impl FnOnce(&Arc<Runner>, Cancel) + Send + 'static,
    ) -> Result<Task> {
        let id = task.id;
        let cancel = Cancel::new();
        self.cancels.lock().unwrap().insert(id, cancel.clone());
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("task-{id}")).spawn(move || {
            body(&me, cancel);
            me.cancels.lock().unwrap().remove(&id);
        });
        match spawned {
            Ok(handle) => {
                let mut threads = self.threads.lock().unwrap();
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
                Ok(task)
            }
            Err(e) => {
                self.cancels.lock().unwrap().remove(&id);
                let _ =
                    self.catalog.finish_task(id, TaskState::Failed, None, Some(&format!("starting its thread: {e}")));
                Err(anyhow::Error::new(e).context("starting the task's thread"))
            }
        }
    }

    /// Queues a restore of `point` (of repository `at`) as `req` asks, checked already,
    /// and starts its thread. A restore is not a job's run: it has no job, and does not wait
    /// for the repository's backups (it reads under the repository's shared lock). Once it has
    /// started, a cancel is not heard: a recovery half done is worse than one finished.
    pub fn submit_restore(
        self: &Arc<Self>,
        req: crate::restores::RestoreRequest,
        point: crate::catalog::PointRow,
        at: crate::repos::Location,
        by: &str,
    ) -> Result<Task> {
        let task = self.catalog.enqueue(None, "restore", "api", by)?;
        let id = task.id;
        self.start_thread(task, move |me, cancel| {
            let log = |line: &str| {
                let _ = me.catalog.log(id, line);
            };
            let (state, result, error) = if cancel.is_cancelled() {
                (TaskState::Cancelled, None, Some("cancelled before it started".to_string()))
            } else {
                let _ = me.catalog.start_task(id);
                let progress = TaskProgress::new(me.catalog.clone(), id);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::restores::restore(&me.settings, &at, &point, &req, &progress)
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the task's thread panicked")));
                match run {
                    Ok(report) => (TaskState::Ok, Some(report), None),
                    Err(e) => {
                        log(&format!("failed: {e:#}"));
                        (TaskState::Failed, None, Some(format!("{e:#}")))
                    }
                }
            };
            log(&format!("ended: {}", state.as_str()));
            let _ = me.catalog.finish_task(id, state, result.as_ref(), error.as_deref());
        })
    }

    /// Asks a task to stop; false if it is not running here.
    pub fn cancel(&self, id: i64) -> bool {
        match self.cancels.lock().unwrap().get(&id) {
            Some(c) => {
                c.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every task and waits for their threads (at most `wait`).
    pub fn stop_all(&self, wait: Duration) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.cancels.lock().unwrap().values() {
            c.cancel();
        }
        let t = Instant::now();
        while t.elapsed() < wait && self.threads.lock().unwrap().iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The mutex of a repository: one per location, spelled the same (`/srv/repo/` is `/srv/repo`).
    fn repository_mutex(&self, location: &str) -> Arc<Mutex<()>> {
        self.repositories.lock().unwrap().entry(crate::repos::key(location)).or_default().clone()
    }

    fn run(&self, id: i64, job_id: i64, spec: JobSpec, cancel: Cancel, retention: bool) {
        let repo_mutex = self.repository_mutex(&spec.repository);
        let turn = repo_mutex.lock().unwrap_or_else(|e| e.into_inner());
        let log = |line: &str| {
            let _ = self.catalog.log(id, line);
        };
        let outcome = if cancel.is_cancelled() {
            Ok(Ended::nothing(TaskState::Cancelled, "cancelled before it started"))
        } else {
            let _ = self.catalog.start_task(id);
            log(&format!("backup job {} started", spec.name));
            // A panic ends the task as failed, not left running for ever.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.back_up(id, job_id, &spec, &cancel, retention)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the task's thread panicked")))
        };
        drop(turn);
        let mut ended = outcome.unwrap_or_else(|e| Ended::nothing(TaskState::Failed, &format!("{e:#}")));
        if ended.state == TaskState::Cancelled && self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            ended.state = TaskState::Interrupted;
            ended.error =
                Some("the server was stopped while the task ran; a scheduled run runs again at its start".into());
        }
        log(&format!("ended: {}", ended.state.as_str()));
        let result = (!ended.result.is_null()).then_some(&ended.result);
        let _ = self.catalog.finish_task(id, ended.state, result, ended.error.as_deref());
        if let Ok(Some(task)) = self.catalog.task(id) {
            crate::notify::task_ended(&self.settings, &spec, &task, &ended.screenshots, &log);
        }
    }

    /// The job's backup and retention, and how the task ends.
    fn back_up(&self, id: i64, job_id: i64, spec: &JobSpec, cancel: &Cancel, retention: bool) -> Result<Ended> {
        let progress = TaskProgress::new(self.catalog.clone(), id);
        // Checked again: the server may have been restarted with another host list.
        spec.check(&self.settings.allowed())?;
        let at = crate::repos::Location::of_job(spec);
        let password = at.password()?;
        let repo = at.open()?;
        let lock = repo.lock(false, "backup job (director)", Duration::from_secs(300))?;
        repo.load_index()?;
        let hosts = if spec.hosts.is_empty() { self.settings.hosts.clone() } else { spec.hosts.clone() };
        let connect = |uri: &str| (self.settings.connect)(uri);
        let mut warnings = Vec::new();
        let vms: Vec<String> = if spec.vms.all || !spec.vms.tags.is_empty() {
            let (found, unreachable) =
                cairn_ops::vm_list::list_vms_on_hosts(&hosts, &connect, cairn_ops::vm_list::GuestDisks::DoNotAsk);
            for u in unreachable {
                let said = format!("host {} could not be listed: {:#}", u.host, u.error.error());
                progress.note(&said);
                warnings.push(said);
            }
            let tagged = |tags: &[String]| spec.vms.all || tags.iter().any(|t| spec.vms.tags.contains(t));
            found.into_iter().filter(|v| tagged(&v.vm.tags)).map(|v| v.vm.uuid).collect()
        } else {
            spec.vms.names.clone()
        };
        if vms.is_empty() {
            anyhow::bail!("no VM to back up: none found on {}", hosts.join(", "));
        }
        let req = self.request(spec, vms);
        let helpers = cairn_ops::ExeHelpers {
            exe: std::env::current_exe().context("locating the cairn executable for its helpers")?,
            repo: crate::repos::helper_location(&spec.repository)?,
            password,
        };
        let mut on_done = |o: &VmBackupOutcome| match &o.result {
            Ok(b) => {
                let chain = cairn_repo::vm_record::VmRecord::of(&b.point).map(|r| r.chain).unwrap_or_default();
                progress.note(&format!("VM {}: restore point {} ({chain} backup)", b.point.name, b.id.short()));
            }
            Err(e) => progress.note(&format!("VM {}: failed: {e:#}", o.vm)),
        };
        let remote = &self.settings.remote;
        let outcomes = backup_vms(&hosts, &connect, remote, &repo, &req, &helpers, &progress, cancel, &mut on_done);
        drop(lock);
        let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
        if outcomes.iter().any(|o| o.result.as_ref().is_ok_and(|b| b.unbootable())) {
            warnings.push("a restore point did not pass its boot check".to_string());
        }
        // A disk only the guest sees that a point lacks is never a silent success.
        for b in outcomes.iter().filter_map(|o| o.result.as_ref().ok()) {
            for m in cairn_repo::vm_record::VmRecord::of(&b.point).map(|r| r.not_captured).unwrap_or_default() {
                warnings.push(format!("VM {}: guest disk {} is not in its point: {}", b.point.name, m.disk, m.why));
            }
        }
        // By UUID (a name may be another VM's in the same repository), and only for the VMs
        // whose new point is good: failed boot checks must not push the bootable points out.
        let kept_by_retention: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().ok().filter(|b| !b.unbootable()))
            .filter_map(|b| cairn_repo::vm_record::VmRecord::of(&b.point).map(|r| r.uuid))
            .collect();
        let retention = match &spec.retention {
            Some(keep) if retention && !kept_by_retention.is_empty() && !cancel.is_cancelled() => {
                apply_retention(&repo, keep, kept_by_retention, &progress).unwrap_or_else(|w| {
                    warnings.push(w);
                    serde_json::Value::Null
                })
            }
            Some(_) if !retention => {
                progress.note("retention not applied: a backup token's runs keep every point");
                serde_json::Value::Null
            }
            _ => serde_json::Value::Null,
        };
        self.catalog_points(job_id, spec, &repo, &outcomes, &progress);
        let copies = self.copy_offsite(job_id, spec, &repo, &outcomes, cancel, &progress, &mut warnings);
        let failed = outcomes.len() - ok;
        let state = if cancel.is_cancelled() {
            TaskState::Cancelled
        } else if failed > 0 && ok == 0 {
            TaskState::Failed
        } else if failed > 0 || !warnings.is_empty() {
            TaskState::Warning
        } else {
            TaskState::Ok
        };
        if failed > 0 {
            warnings.insert(0, format!("{failed} of {} VM(s) failed", outcomes.len()));
        }
        let error = (!warnings.is_empty()).then(|| warnings.join("; "));
        let results: Vec<serde_json::Value> = outcomes.iter().map(outcome_json).collect();
        let screenshots = outcomes
            .iter()
            .filter_map(|o| {
                let boot = o.result.as_ref().ok()?.boot.as_ref()?.as_ref().ok()?;
                Some((format!("{}.png", o.vm), boot.screenshot.clone()?))
            })
            .collect();
        Ok(Ended {
            state,
            result: json!({"vms": results, "retention": retention, "copies": copies}),
            error,
            screenshots,
        })
    }

    /// Keeps the task's new points in the catalog (with their boot checks and screens), then
    /// makes the catalog's points of the repository match it (what the retention forgot goes).
    /// A failure here is a note, not the task's: the points are in the repository.
    fn catalog_points(
        &self,
        job_id: i64,
        spec: &JobSpec,
        repo: &Repository,
        outcomes: &[VmBackupOutcome],
        progress: &dyn Progress,
    ) {
        // The new points' rows and the listing's sync together: another task's sync of this
        // repository (as a copy target) between them would drop the rows just written.
        let _one_writer = crate::repos::catalog_sync();
        for o in outcomes {
            let Ok(b) = &o.result else { continue };
            let mut row = crate::repos::point_row(&spec.repository, Some(job_id), &b.id, &b.point);
            row.host = o.host.clone().or(row.host);
            let mut screenshot = None;
            match &b.boot {
                Some(Ok(boot)) => {
                    row.boot_verdict = Some(boot.check.verdict.clone());
                    row.boot_reason = Some(boot.check.reason.clone());
                    screenshot = boot.screenshot.as_deref();
                }
                Some(Err(e)) => {
                    row.boot_verdict = Some("error".into());
                    row.boot_reason = Some(format!("{e:#}"));
                }
                None => {}
            }
            if let Err(e) = self.catalog.record_point(&row, screenshot) {
                progress.note(&format!("the catalog did not take point {}: {e:#}", b.id.short()));
            }
        }
        if let Err(e) = crate::repos::refresh(&self.catalog, repo, &spec.repository, Some(job_id)) {
            progress.note(&format!("the catalog's list of the repository's points was not refreshed: {e:#}"));
        }
    }

    /// Copies the run's new points to each of the job's copy targets (only the blocks a target
    /// lacks travel), then mirrors the target's points in the catalog. What each copy did; a
    /// target that fails is a warning of the task, and the next targets are still tried.
    #[allow(clippy::too_many_arguments)] // the task, its job, its repository and outcomes, and how it reports
    fn copy_offsite(
        &self,
        job_id: i64,
        spec: &JobSpec,
        repo: &Arc<Repository>,
        outcomes: &[VmBackupOutcome],
        cancel: &Cancel,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> serde_json::Value {
        // By the VMs' point names, not the run's new points alone: a point an earlier copy
        // missed (a target down, a cancel) goes now; one already there costs a lookup.
        let mut points: Vec<String> =
            outcomes.iter().filter_map(|o| o.result.as_ref().ok()).map(|b| b.point.name.clone()).collect();
        points.dedup();
        if points.is_empty() || spec.copies.is_empty() {
            return serde_json::Value::Null;
        }
        let mut done = Vec::new();
        for target in &spec.copies {
            if cancel.is_cancelled() {
                break;
            }
            progress.note(&format!("copy to {}: the points of {}", target.repository, points.join(", ")));
            let at = crate::repos::Location {
                location: target.repository.clone(),
                password_file: target.password_file.clone(),
            };
            let copied = at.open().and_then(|dst| {
                let counters = cairn_repo::copy::CopyProgress::default();
                let report = cairn_ops::offsite::copy(repo, &dst, &points, 0, Duration::from_secs(300), &counters)?;
                let _one_writer = crate::repos::catalog_sync();
                if let Err(e) = crate::repos::refresh(&self.catalog, &dst, &target.repository, Some(job_id)) {
                    progress.note(&format!(
                        "the catalog's list of {}'s points was not refreshed: {e:#}",
                        target.repository
                    ));
                }
                Ok(report)
            });
            match copied {
                Ok(r) => {
                    let copied = r.points.iter().filter(|p| !p.already_there).count();
                    progress.note(&format!(
                        "copy to {}: {copied} point(s) copied, {} there already; {} blocks sent ({} bytes), {} blocks there already",
                        target.repository,
                        r.points.len() - copied,
                        r.blocks_sent,
                        r.raw_bytes_sent,
                        r.blocks_present
                    ));
                    done.push(json!({"repository": target.repository, "ok": true, "points": copied,
                                     "already_there": r.points.len() - copied,
                                     "blocks_sent": r.blocks_sent, "raw_bytes_sent": r.raw_bytes_sent,
                                     "blocks_present": r.blocks_present}));
                }
                Err(e) => {
                    let said = format!("copy to {} failed: {e:#}", target.repository);
                    progress.note(&said);
                    warnings.push(said);
                    done.push(json!({"repository": target.repository, "ok": false, "error": format!("{e:#}")}));
                }
            }
        }
        serde_json::Value::Array(done)
    }

    /// The backup request of a job's run over `vms`.
    fn request(&self, spec: &JobSpec, vms: Vec<String>) -> BackupVmsRequest {
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let options = cairn_vm::backup::VmBackupOptions {
            method: match spec.method {
                BackupMethod::Auto => cairn_vm::backup::Method::Auto,
                BackupMethod::AppConsistent => cairn_vm::backup::Method::AppConsistent,
                BackupMethod::SavedState => cairn_vm::backup::Method::SavedState,
                BackupMethod::CrashConsistent => cairn_vm::backup::Method::CrashConsistent,
            },
            full: false,
            skip_swap: true,
            pre_freeze: Vec::new(),
            post_thaw: Vec::new(),
            work_dir: self.settings.work_dir.clone(),
            compression_level: 3,
            workers,
            oracle_dir: None,
            hold_point: self.settings.debug_hold,
            run_token: String::new(),
            freeze_limit: Duration::from_secs(self.settings.freeze_limit_secs),
        };
        let boot_check = spec.verify_boot.then(|| cairn_ops::boot_check::BootCheckRequest {
            work_dir: self.settings.work_dir.clone(),
            timeout: Duration::from_secs(120),
            mail: None,
            workers,
        });
        BackupVmsRequest {
            vms,
            options,
            boot_check,
            per_host: spec.per_host as usize,
            host_limits: Some(self.host_limits.clone()),
        }
    }
}

/// How a task ends: its state, result (per VM), error, and the boot checks' screenshots (for
/// its report).
struct Ended {
    state: TaskState,
    result: serde_json::Value,
    error: Option<String>,
    screenshots: Vec<(String, Vec<u8>)>,
}

impl Ended {
    fn nothing(state: TaskState, error: &str) -> Ended {
        Ended { state, result: serde_json::Value::Null, error: Some(error.to_string()), screenshots: Vec::new() }
    }
}

/// Forgets what retention `keep` does not keep of the points of `vms`; what it did, or the
/// warning to give.
fn apply_retention(
    repo: &Repository,
    keep: &crate::jobs::Retention,
    vms: Vec<String>,
    progress: &dyn Progress,
) -> std::result::Result<serde_json::Value, String> {
    let forget = cairn_ops::maintenance::ForgetRequest {
        select: vms,
        policy: keep.policy(),
        dry_run: false,
        lock_wait: Duration::from_secs(300),
    };
    match cairn_ops::maintenance::forget(repo, &forget) {
        Ok(f) => {
            progress.note(&format!("retention: {} restore point(s) forgotten", f.removes));
            Ok(json!({"forgotten": f.removes}))
        }
        Err(e) => {
            progress.note(&format!("retention failed: {e:#}"));
            Err(format!("retention failed: {e:#}"))
        }
    }
}

/// One VM's outcome, as a task's result keeps it.
fn outcome_json(o: &VmBackupOutcome) -> serde_json::Value {
    match &o.result {
        Err(e) => json!({"vm": o.vm, "host": o.host, "ok": false, "error": format!("{e:#}")}),
        Ok(b) => {
            let record = cairn_repo::vm_record::VmRecord::of(&b.point);
            let mut v = json!({
                "vm": o.vm, "host": o.host, "ok": true, "point": b.id, "name": b.point.name, "time": b.point.time,
                "method": record.as_ref().map(|r| r.method.as_str()),
                "chain": record.as_ref().map(|r| r.chain.to_string()),
                "read_bytes": record.as_ref().map(|r| r.vm_read_bytes),
            });
            match &b.boot {
                None => {}
                Some(Ok(boot)) => {
                    v["boot"] =
                        json!({"verdict": boot.check.verdict, "reason": boot.check.reason, "record": boot.record_id})
                }
                Some(Err(e)) => v["boot"] = json!({"error": format!("{e:#}")}),
            }
            v
        }
    }
}

/// A task's progress, written to the catalog: each phase and note as a log line, the bytes done
/// at most once a second.
struct TaskProgress {
    catalog: Arc<Catalog>,
    task: i64,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    phase: String,
    done: u64,
    total: u64,
    written: Instant,
}

impl TaskProgress {
    fn new(catalog: Arc<Catalog>, task: i64) -> TaskProgress {
        let state = ProgressState { phase: String::new(), done: 0, total: 0, written: Instant::now() };
        TaskProgress { catalog, task, state: Mutex::new(state) }
    }

    fn write(&self, s: &mut ProgressState) {
        s.written = Instant::now();
        let _ = self.catalog.set_progress(self.task, &json!({"step": s.phase, "done": s.done, "total": s.total}));
    }
}

impl Progress for TaskProgress {
    fn start(&self, phase: &str, total: u64) {
        let mut s = self.state.lock().unwrap();
        *s = ProgressState { phase: phase.to_string(), done: 0, total, written: s.written };
        let _ = self.catalog.log(self.task, phase);
        self.write(&mut s);
    }
    fn advance(&self, n: u64) {
        let mut s = self.state.lock().unwrap();
        s.done += n;
        if s.written.elapsed() >= Duration::from_secs(1) {
            self.write(&mut s);
        }
    }
    fn finish(&self) {
        let mut s = self.state.lock().unwrap();
        s.done = s.total.max(s.done);
        self.write(&mut s);
    }
    fn note(&self, msg: &str) {
        let _ = self.catalog.log(self.task, msg);
    }
}
