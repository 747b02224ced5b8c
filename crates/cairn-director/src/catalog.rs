//! The director's catalog: jobs, tasks with their logs, and API tokens, in one SQLite file.
//!
//! SQLite in WAL mode, one connection behind a mutex: the director's writes are small (a task's
//! state, a log line), and every reader is served from the same process. A task is a row from
//! the moment it is asked for (`queued`) to its end (`ok`, `warning`, `failed`, `cancelled`), or
//! `interrupted` when the server stopped under it: at start, [`Catalog::interrupt_unfinished`]
//! closes what the previous process left open, with the reason.
//!
//! It also keeps what the console shows without asking a repository or a host each time: the
//! restore points of the jobs' repositories (`points`, with the boot checks' screenshots), the
//! repositories' size over time (`usage`), and the VMs of the host list as last seen
//! (`inventory`). The repositories and the hosts stay the truth: `points` is made to match a
//! repository's listing after each of its tasks, and the inventory is listed again every minute.

use crate::roles::Role;
use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Mutex;
use utoipa::ToSchema;

/// The catalog's schema version; a catalog written by a newer version is refused.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  spec TEXT NOT NULL,
  created TEXT NOT NULL,
  updated TEXT NOT NULL,
  next_run TEXT,
  alerted TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id INTEGER,
  kind TEXT NOT NULL,
  trigger TEXT NOT NULL,
  requested_by TEXT NOT NULL,
  state TEXT NOT NULL,
  queued TEXT NOT NULL,
  started TEXT,
  ended TEXT,
  progress TEXT,
  result TEXT,
  error TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks (job_id, id);
CREATE TABLE IF NOT EXISTS task_log (
  task_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  at TEXT NOT NULL,
  line TEXT NOT NULL,
  PRIMARY KEY (task_id, seq)
);
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  role TEXT NOT NULL,
  hash TEXT NOT NULL,
  created TEXT NOT NULL,
  last_used TEXT
);
CREATE TABLE IF NOT EXISTS points (
  repository TEXT NOT NULL,
  id TEXT NOT NULL,
  job_id INTEGER,
  name TEXT NOT NULL,
  vm_uuid TEXT,
  host TEXT,
  time TEXT NOT NULL,
  chain TEXT,
  method TEXT,
  read_bytes INTEGER,
  boot_verdict TEXT,
  boot_reason TEXT,
  screenshot BLOB,
  PRIMARY KEY (repository, id)
);
CREATE INDEX IF NOT EXISTS points_by_id ON points (id);
CREATE INDEX IF NOT EXISTS points_by_vm ON points (vm_uuid, time);
CREATE INDEX IF NOT EXISTS points_by_time ON points (time);
CREATE TABLE IF NOT EXISTS usage (
  repository TEXT NOT NULL,
  at TEXT NOT NULL,
  stored_bytes INTEGER NOT NULL,
  points INTEGER NOT NULL,
  PRIMARY KEY (repository, at)
);
CREATE TABLE IF NOT EXISTS inventory (
  uuid TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  host TEXT NOT NULL,
  state TEXT NOT NULL,
  method TEXT NOT NULL,
  method_reason TEXT NOT NULL,
  tags TEXT NOT NULL,
  seen TEXT NOT NULL
);
";

/// A job as the catalog keeps it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Job {
    pub id: i64,
    pub spec: crate::jobs::JobSpec,
    pub created: String,
    pub updated: String,
    /// When its schedule is next due (RFC 3339, UTC); none without a schedule.
    pub next_run: Option<String>,
    /// Its newest task, if it ever ran.
    pub last_task: Option<Task>,
    /// When its last good run ended, if it ever had one (a task that ended `ok`).
    pub last_good: Option<String>,
    /// The good run (its end, or `never`) an overdue alert was last sent about: one alert per
    /// silence.
    pub alerted: Option<String>,
}

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Running,
    /// Everything it was asked to do was done.
    Ok,
    /// Done, with something to look at (a VM whose point did not boot, a retention that failed).
    Warning,
    Failed,
    Cancelled,
    /// The server stopped while it was queued or running (killed, crashed, restarted).
    Interrupted,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Ok => "ok",
            TaskState::Warning => "warning",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> TaskState {
        match s {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "ok" => TaskState::Ok,
            "warning" => TaskState::Warning,
            "cancelled" => TaskState::Cancelled,
            "interrupted" => TaskState::Interrupted,
            _ => TaskState::Failed,
        }
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }
}

/// One run of a job (or another long operation): its state, progress and outcome.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Task {
    pub id: i64,
    pub job_id: Option<i64>,
    /// `backup`.
    pub kind: String,
    /// What started it: `api` (run now), `schedule`, or `missed` (its schedule came due while
    /// the server was down).
    pub trigger: String,
    /// The token (its name) that asked for it, or `scheduler`.
    pub requested_by: String,
    pub state: TaskState,
    pub queued: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    /// Live progress: `{"step": ..., "done": bytes, "total": bytes}`.
    #[schema(value_type = Object)]
    pub progress: Option<serde_json::Value>,
    /// The outcome, per VM.
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// A line of a task's log.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LogLine {
    pub seq: i64,
    pub at: String,
    pub line: String,
}

/// An API token as listed (never its secret).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created: String,
    pub last_used: Option<String>,
}

/// A restore point of a job's repository, as the catalog keeps it.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct PointRow {
    /// The point's ID (64 hex digits).
    pub id: String,
    pub repository: String,
    /// The job whose task made it, or that names its repository.
    pub job_id: Option<i64>,
    /// The VM's name when it was backed up (the point's name).
    pub name: String,
    pub vm_uuid: Option<String>,
    /// The host it was backed up from.
    pub host: Option<String>,
    pub time: String,
    /// `full` or `incremental`.
    pub chain: Option<String>,
    pub method: Option<String>,
    pub read_bytes: Option<i64>,
    /// Its boot check: `passed`, `failed`, `inconclusive`; none if it had none here.
    pub boot_verdict: Option<String>,
    pub boot_reason: Option<String>,
    /// Whether `/api/points/{id}/screenshot` has its boot check's screen.
    pub screenshot: bool,
}

/// A repository's size at one time.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageSample {
    pub at: String,
    /// The bytes of its packs.
    pub stored_bytes: i64,
    pub points: i64,
}

/// A VM of the host list, as last seen there, with what the catalog knows of its points.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct VmRow {
    pub name: String,
    pub uuid: String,
    /// The host it runs on (or is defined on).
    pub host: String,
    pub state: String,
    /// The backup method it qualifies for, and why.
    pub method: String,
    pub method_reason: String,
    /// Its tags, that jobs select VMs by.
    pub tags: Vec<String>,
    /// When its newest point was taken.
    pub last_point: Option<String>,
    pub points: i64,
    /// Its newest point's boot check.
    pub last_boot: Option<String>,
}

/// A time as the catalog keeps it: RFC 3339 in UTC with nanoseconds always written, so that
/// SQLite's text comparisons order times (`…:00Z` would sort after `…:00.5Z`).
pub fn time_text(t: jiff::Timestamp) -> String {
    format!("{t:.9}")
}

pub fn now() -> String {
    time_text(jiff::Timestamp::now())
}

/// A job name's uniqueness, broken: a conflict the caller can act on.
fn name_taken(e: rusqlite::Error, name: &str) -> anyhow::Error {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            anyhow::Error::new(crate::DirectorError::Conflict(format!("a job named {name:?} exists")))
        }
        e => e.into(),
    }
}

pub struct Catalog {
    conn: Mutex<Connection>,
}

const TASK_COLUMNS: &str =
    "id, job_id, kind, trigger, requested_by, state, queued, started, ended, progress, result, error";

fn task_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Task> {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(Task {
        id: r.get(0)?,
        job_id: r.get(1)?,
        kind: r.get(2)?,
        trigger: r.get(3)?,
        requested_by: r.get(4)?,
        state: TaskState::parse(&r.get::<_, String>(5)?),
        queued: r.get(6)?,
        started: r.get(7)?,
        ended: r.get(8)?,
        progress: json(r.get(9)?),
        result: json(r.get(10)?),
        error: r.get(11)?,
    })
}

const POINT_COLUMNS: &str = "id, repository, job_id, name, vm_uuid, host, time, chain, method, read_bytes, \
                             boot_verdict, boot_reason, screenshot IS NOT NULL";

fn point_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<PointRow> {
    Ok(PointRow {
        id: r.get(0)?,
        repository: r.get(1)?,
        job_id: r.get(2)?,
        name: r.get(3)?,
        vm_uuid: r.get(4)?,
        host: r.get(5)?,
        time: r.get(6)?,
        chain: r.get(7)?,
        method: r.get(8)?,
        read_bytes: r.get(9)?,
        boot_verdict: r.get(10)?,
        boot_reason: r.get(11)?,
        screenshot: r.get(12)?,
    })
}

impl Catalog {
    /// Opens (or creates) the catalog at `path`; its folder must exist.
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path).with_context(|| format!("opening the catalog {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        let version: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).optional()?;
        match version.map(|v| v.parse::<i64>()) {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?1)", [SCHEMA_VERSION.to_string()])?;
            }
            // Version 1 lacked the points, usage and inventory tables, made above.
            Some(Ok(v)) if v < SCHEMA_VERSION => {
                conn.execute("UPDATE meta SET value = ?1 WHERE key = 'schema'", [SCHEMA_VERSION.to_string()])?;
            }
            Some(Ok(v)) if v == SCHEMA_VERSION => {}
            Some(v) => bail!(
                "the catalog {} was written by a newer cairn (schema {v:?}, this one knows {SCHEMA_VERSION})",
                path.display()
            ),
        }
        Ok(Catalog { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    // Jobs.

    /// Adds a job; its name must be free.
    pub fn create_job(&self, spec: &crate::jobs::JobSpec, next_run: Option<String>) -> Result<i64> {
        let c = self.conn();
        let t = now();
        c.execute(
            "INSERT INTO jobs (name, spec, created, updated, next_run) VALUES (?1, ?2, ?3, ?3, ?4)",
            params![spec.name, serde_json::to_string(spec)?, t, next_run],
        )
        .map_err(|e| name_taken(e, &spec.name))?;
        Ok(c.last_insert_rowid())
    }

    /// Replaces a job's spec (and its next run, the schedule having changed).
    pub fn update_job(&self, id: i64, spec: &crate::jobs::JobSpec, next_run: Option<String>) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET name = ?2, spec = ?3, updated = ?4, next_run = ?5 WHERE id = ?1",
                params![id, spec.name, serde_json::to_string(spec)?, now(), next_run],
            )
            .map_err(|e| name_taken(e, &spec.name))?;
        Ok(n == 1)
    }

    pub fn delete_job(&self, id: i64) -> Result<bool> {
        Ok(self.conn().execute("DELETE FROM jobs WHERE id = ?1", [id])? == 1)
    }

    pub fn set_alerted(&self, id: i64, about: &str) -> Result<()> {
        self.conn().execute("UPDATE jobs SET alerted = ?2 WHERE id = ?1", params![id, about])?;
        Ok(())
    }

    /// How many tasks are in each state.
    pub fn task_counts(&self) -> Result<Vec<(TaskState, i64)>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state ORDER BY state")?;
        let rows = st.query_map([], |r| Ok((TaskState::parse(&r.get::<_, String>(0)?), r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_next_run(&self, id: i64, next_run: Option<String>) -> Result<()> {
        self.conn().execute("UPDATE jobs SET next_run = ?2 WHERE id = ?1", params![id, next_run])?;
        Ok(())
    }

    pub fn job(&self, id: i64) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = ?1", [id])?.pop())
    }

    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.jobs_where("", [])
    }

    fn jobs_where<P: rusqlite::Params>(&self, filter: &str, p: P) -> Result<Vec<Job>> {
        type Row = (i64, String, String, String, Option<String>, Option<String>);
        let rows: Vec<Row> = {
            let c = self.conn();
            let mut st = c.prepare(&format!(
                "SELECT id, spec, created, updated, next_run, alerted FROM jobs {filter} ORDER BY id"
            ))?;
            let rows = st.query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::new();
        for (id, spec, created, updated, next_run, alerted) in rows {
            let spec = serde_json::from_str(&spec).with_context(|| format!("job {id} in the catalog"))?;
            let last_task = self.tasks(Some(id), 1)?.pop();
            let last_good = self.conn().query_row(
                "SELECT MAX(ended) FROM tasks WHERE job_id = ?1 AND state = 'ok'",
                [id],
                |r| r.get(0),
            )?;
            out.push(Job { id, spec, created, updated, next_run, last_task, last_good, alerted });
        }
        Ok(out)
    }

    // Tasks.

    /// A new task, queued.
    pub fn enqueue(&self, job_id: Option<i64>, kind: &str, trigger: &str, requested_by: &str) -> Result<Task> {
        let id = {
            let c = self.conn();
            c.execute(
                "INSERT INTO tasks (job_id, kind, trigger, requested_by, state, queued) VALUES (?1, ?2, ?3, ?4, 'queued', ?5)",
                params![job_id, kind, trigger, requested_by, now()],
            )?;
            c.last_insert_rowid()
        };
        self.task(id)?.context("the task just queued is gone")
    }

    pub fn start_task(&self, id: i64) -> Result<()> {
        self.conn().execute("UPDATE tasks SET state = 'running', started = ?2 WHERE id = ?1", params![id, now()])?;
        Ok(())
    }

    pub fn set_progress(&self, id: i64, progress: &serde_json::Value) -> Result<()> {
        self.conn().execute("UPDATE tasks SET progress = ?2 WHERE id = ?1", params![id, progress.to_string()])?;
        Ok(())
    }

    /// Ends a task (only one not ended yet: an interrupted task stays interrupted).
    pub fn finish_task(
        &self,
        id: i64,
        state: TaskState,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE tasks SET state = ?2, ended = ?3, result = ?4, error = ?5 WHERE id = ?1 AND state IN ('queued', 'running')",
            params![id, state.as_str(), now(), result.map(|r| r.to_string()), error],
        )?;
        Ok(())
    }

    /// Marks every task still queued or running as interrupted, with `reason`; returns them.
    pub fn interrupt_unfinished(&self, reason: &str) -> Result<Vec<i64>> {
        let ids: Vec<i64> = {
            let c = self.conn();
            let mut st = c.prepare("SELECT id FROM tasks WHERE state IN ('queued', 'running')")?;
            let ids = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            ids
        };
        for id in &ids {
            self.finish_task(*id, TaskState::Interrupted, None, Some(reason))?;
            self.log(*id, &format!("interrupted: {reason}"))?;
        }
        Ok(ids)
    }

    pub fn task(&self, id: i64) -> Result<Option<Task>> {
        let c = self.conn();
        Ok(c.query_row(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"), [id], task_of).optional()?)
    }

    /// The newest `limit` tasks (of one job, or all), newest first.
    pub fn tasks(&self, job_id: Option<i64>, limit: i64) -> Result<Vec<Task>> {
        let c = self.conn();
        let (filter, p) = match job_id {
            Some(j) => ("WHERE job_id = ?1", j),
            None => ("WHERE ?1 = ?1", 0),
        };
        let mut st = c.prepare(&format!("SELECT {TASK_COLUMNS} FROM tasks {filter} ORDER BY id DESC LIMIT ?2"))?;
        let rows = st.query_map(params![p, limit], task_of)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest `limit` tasks ended since `since` (RFC 3339) in another state than `ok`.
    pub fn problems_since(&self, since: &str, limit: i64) -> Result<Vec<Task>> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE ended >= ?1 AND state NOT IN ('ok', 'queued', 'running') \
             ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![since, limit], task_of)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether a task of job `job_id` is queued or running.
    pub fn job_is_active(&self, job_id: i64) -> Result<bool> {
        let c = self.conn();
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND state IN ('queued', 'running')",
            [job_id],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Appends a line to a task's log.
    pub fn log(&self, task_id: i64, line: &str) -> Result<()> {
        let c = self.conn();
        c.execute(
            "INSERT INTO task_log (task_id, seq, at, line) VALUES (?1, \
             (SELECT COALESCE(MAX(seq), 0) + 1 FROM task_log WHERE task_id = ?1), ?2, ?3)",
            params![task_id, now(), line],
        )?;
        Ok(())
    }

    /// A task's log lines after `after` (0: from the start).
    pub fn log_lines(&self, task_id: i64, after: i64) -> Result<Vec<LogLine>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT seq, at, line FROM task_log WHERE task_id = ?1 AND seq > ?2 ORDER BY seq")?;
        let rows =
            st.query_map(params![task_id, after], |r| Ok(LogLine { seq: r.get(0)?, at: r.get(1)?, line: r.get(2)? }))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // Restore points.

    /// Adds a point, or updates the one kept: what `p` leaves out (no host, no boot check, no
    /// `screenshot`) keeps its stored value.
    pub fn record_point(&self, p: &PointRow, screenshot: Option<&[u8]>) -> Result<()> {
        self.conn().execute(
            "INSERT INTO points (repository, id, job_id, name, vm_uuid, host, time, chain, method, read_bytes, \
             boot_verdict, boot_reason, screenshot) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (repository, id) DO UPDATE SET job_id = COALESCE(excluded.job_id, job_id), \
             name = excluded.name, vm_uuid = excluded.vm_uuid, host = COALESCE(excluded.host, host), \
             time = excluded.time, chain = COALESCE(excluded.chain, chain), method = COALESCE(excluded.method, method), \
             read_bytes = COALESCE(excluded.read_bytes, read_bytes), \
             boot_verdict = COALESCE(excluded.boot_verdict, boot_verdict), \
             boot_reason = COALESCE(excluded.boot_reason, boot_reason), \
             screenshot = COALESCE(excluded.screenshot, screenshot)",
            params![
                p.repository,
                p.id,
                p.job_id,
                p.name,
                p.vm_uuid,
                p.host,
                p.time,
                p.chain,
                p.method,
                p.read_bytes,
                p.boot_verdict,
                p.boot_reason,
                screenshot
            ],
        )?;
        Ok(())
    }

    /// Makes the catalog's points of `repository` those of `listed`, its listing: the rows of
    /// points it no longer has go, and the points the catalog lacks are added (what the catalog
    /// knows of the others is kept). Returns how many were added and removed.
    pub fn sync_points(&self, repository: &str, listed: &[PointRow]) -> Result<(usize, usize)> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let known: std::collections::HashSet<String> = {
            let mut st = tx.prepare("SELECT id FROM points WHERE repository = ?1")?;
            let ids = st.query_map([repository], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            ids
        };
        let present: std::collections::HashSet<&str> = listed.iter().map(|p| p.id.as_str()).collect();
        let mut removed = 0;
        for id in known.iter().filter(|id| !present.contains(id.as_str())) {
            removed += tx.execute("DELETE FROM points WHERE repository = ?1 AND id = ?2", params![repository, id])?;
        }
        let mut added = 0;
        for p in listed.iter().filter(|p| !known.contains(&p.id)) {
            added += tx.execute(
                "INSERT INTO points (repository, id, job_id, name, vm_uuid, host, time, chain, method, read_bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![repository, p.id, p.job_id, p.name, p.vm_uuid, p.host, p.time, p.chain, p.method, p.read_bytes],
            )?;
        }
        tx.commit()?;
        Ok((added, removed))
    }

    /// The newest `limit` points (of the VM whose UUID or name is `vm`, or all), newest first.
    pub fn points(&self, vm: Option<&str>, limit: i64) -> Result<Vec<PointRow>> {
        let c = self.conn();
        let (filter, p) = match vm {
            Some(vm) => ("WHERE vm_uuid = ?1 OR name = ?1", vm),
            None => ("WHERE ?1 = ?1", ""),
        };
        let mut st = c.prepare(&format!("SELECT {POINT_COLUMNS} FROM points {filter} ORDER BY time DESC LIMIT ?2"))?;
        let rows = st.query_map(params![p, limit], point_of)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The points with ID `id` (one per repository holding it: a copy keeps its ID).
    pub fn points_with_id(&self, id: &str) -> Result<Vec<PointRow>> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {POINT_COLUMNS} FROM points WHERE id = ?1 ORDER BY repository"))?;
        let rows = st.query_map([id], point_of)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The screen of a point's boot check, as a PNG.
    pub fn screenshot(&self, repository: &str, id: &str) -> Result<Option<Vec<u8>>> {
        let c = self.conn();
        let png: Option<Option<Vec<u8>>> = c
            .query_row("SELECT screenshot FROM points WHERE repository = ?1 AND id = ?2", [repository, id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(png.flatten())
    }

    pub fn point_count(&self) -> Result<i64> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM points", [], |r| r.get(0))?)
    }

    // Repositories' size.

    pub fn record_usage(&self, repository: &str, stored_bytes: u64, points: usize) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO usage (repository, at, stored_bytes, points) VALUES (?1, ?2, ?3, ?4)",
            params![repository, now(), stored_bytes as i64, points as i64],
        )?;
        Ok(())
    }

    /// Each repository's size samples since `since` (RFC 3339), oldest first.
    pub fn usage_since(&self, since: &str) -> Result<Vec<(String, Vec<UsageSample>)>> {
        let c = self.conn();
        let mut st =
            c.prepare("SELECT repository, at, stored_bytes, points FROM usage WHERE at >= ?1 ORDER BY repository, at")?;
        let rows = st.query_map([since], |r| {
            Ok((r.get::<_, String>(0)?, UsageSample { at: r.get(1)?, stored_bytes: r.get(2)?, points: r.get(3)? }))
        })?;
        let mut out: Vec<(String, Vec<UsageSample>)> = Vec::new();
        for row in rows {
            let (repo, sample) = row?;
            match out.last_mut() {
                Some((r, samples)) if *r == repo => samples.push(sample),
                _ => out.push((repo, vec![sample])),
            }
        }
        Ok(out)
    }

    // The VMs of the host list.

    /// Replaces what the inventory says of hosts `listed` (those that answered) by `vms`; a VM
    /// seen now on one host is no longer on another.
    pub fn set_inventory(&self, listed: &[String], vms: &[VmRow]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        for host in listed {
            tx.execute("DELETE FROM inventory WHERE host = ?1", [host])?;
        }
        let t = now();
        for v in vms {
            tx.execute(
                "INSERT OR REPLACE INTO inventory (uuid, name, host, state, method, method_reason, tags, seen) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![v.uuid, v.name, v.host, v.state, v.method, v.method_reason, serde_json::to_string(&v.tags)?, t],
            )?;
        }
        tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('inventory', ?1)", [&t])?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets the VMs of hosts no longer in the server's list.
    pub fn keep_inventory_of(&self, hosts: &[String]) -> Result<()> {
        let c = self.conn();
        let known: Vec<String> = {
            let mut st = c.prepare("SELECT DISTINCT host FROM inventory")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        for host in known.iter().filter(|h| !hosts.contains(h)) {
            c.execute("DELETE FROM inventory WHERE host = ?1", [host])?;
        }
        Ok(())
    }

    /// When the inventory was last listed, if ever.
    pub fn inventory_time(&self) -> Result<Option<String>> {
        let c = self.conn();
        Ok(c.query_row("SELECT value FROM meta WHERE key = 'inventory'", [], |r| r.get(0)).optional()?)
    }

    /// The VMs as last seen, by name, each with its newest point.
    pub fn inventory(&self) -> Result<Vec<VmRow>> {
        let c = self.conn();
        // Each sub-select is a lookup in points_by_vm (vm_uuid, time).
        let mut st = c.prepare(
            "SELECT i.uuid, i.name, i.host, i.state, i.method, i.method_reason, i.tags, \
             (SELECT MAX(time) FROM points p WHERE p.vm_uuid = i.uuid), \
             (SELECT COUNT(*) FROM points p WHERE p.vm_uuid = i.uuid), \
             (SELECT boot_verdict FROM points p WHERE p.vm_uuid = i.uuid ORDER BY time DESC LIMIT 1) \
             FROM inventory i ORDER BY i.name, i.uuid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(VmRow {
                uuid: r.get(0)?,
                name: r.get(1)?,
                host: r.get(2)?,
                state: r.get(3)?,
                method: r.get(4)?,
                method_reason: r.get(5)?,
                tags: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                last_point: r.get(7)?,
                points: r.get(8)?,
                last_boot: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // Tokens.

    pub fn add_token(&self, id: &str, name: &str, role: Role, hash: &str) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO tokens (id, name, role, hash, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, name, role.as_str(), hash, now()],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    anyhow::Error::new(crate::DirectorError::Conflict(format!("a token named {name:?} exists")))
                }
                e => e.into(),
            })?;
        Ok(())
    }

    /// The stored hash, name and role of token `id`.
    pub fn token(&self, id: &str) -> Result<Option<(String, String, Role)>> {
        let c = self.conn();
        let row: Option<(String, String, String)> = c
            .query_row("SELECT hash, name, role FROM tokens WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        Ok(row.and_then(|(h, n, r)| Role::parse(&r).map(|r| (h, n, r))))
    }

    /// Notes that token `id` was used; at most once a minute (a dashboard polling every few
    /// seconds must not make every request a write).
    pub fn touch_token(&self, id: &str) -> Result<()> {
        let t = jiff::Timestamp::now();
        let minute_ago = time_text(t - jiff::SignedDuration::from_mins(1));
        self.conn().execute(
            "UPDATE tokens SET last_used = ?2 WHERE id = ?1 AND (last_used IS NULL OR last_used < ?3)",
            params![id, time_text(t), minute_ago],
        )?;
        Ok(())
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id, name, role, created, last_used FROM tokens ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, role, created, last_used) = row?;
            if let Some(role) = Role::parse(&role) {
                out.push(TokenInfo { id, name, role, created, last_used });
            }
        }
        Ok(out)
    }

    pub fn revoke_token(&self, name: &str) -> Result<bool> {
        Ok(self.conn().execute("DELETE FROM tokens WHERE name = ?1", [name])? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_left_running_by_a_dead_server_is_marked_interrupted_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let cat = Catalog::open(&path).unwrap();
        let t = cat.enqueue(None, "backup", "api", "admin").unwrap();
        cat.start_task(t.id).unwrap();
        let done = cat.enqueue(None, "backup", "api", "admin").unwrap();
        cat.finish_task(done.id, TaskState::Ok, None, None).unwrap();
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.interrupt_unfinished("the server stopped").unwrap(), vec![t.id]);
        let t = cat.task(t.id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Interrupted);
        assert_eq!(t.error.as_deref(), Some("the server stopped"));
        assert_eq!(cat.task(done.id).unwrap().unwrap().state, TaskState::Ok);
        // An interrupted task stays so, whatever a late writer says.
        cat.finish_task(t.id, TaskState::Ok, None, None).unwrap();
        assert_eq!(cat.task(t.id).unwrap().unwrap().state, TaskState::Interrupted);
        let log = cat.log_lines(t.id, 0).unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].line.contains("interrupted"));
    }

    #[test]
    fn times_are_kept_with_every_fractional_digit_so_text_order_is_time_order() {
        let whole: jiff::Timestamp = "2026-11-30T17:00:00Z".parse().unwrap();
        let half: jiff::Timestamp = "2026-11-30T17:00:00.5Z".parse().unwrap();
        assert_eq!(time_text(whole), "2026-11-30T17:00:00.000000000Z");
        assert!(time_text(whole) < time_text(half));
        assert_eq!(time_text(half).parse::<jiff::Timestamp>().unwrap(), half);
    }

    #[test]
    fn a_newer_catalog_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        drop(Catalog::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema'", []).unwrap();
        drop(c);
        let e = Catalog::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
