//! The REST API, under `/api/`, described by the OpenAPI document at `/api/openapi.json`.
//!
//! Every request but the OpenAPI document needs a token (`Authorization: Bearer cairn.ID.SECRET`)
//! whose role allows it (see [`crate::auth::Role`]): 401 without a valid token, 403 when its role
//! does not allow the request. Errors are `{"error": "..."}` with 400 (a bad request), 404, 409 (a
//! name taken, a job already running) or 500. A job's run answers 202 with its task at once;
//! the task is followed at `/api/tasks/{id}` and `/api/tasks/{id}/log`.

use crate::auth::{self, Action, Caller, Role};
use crate::catalog::{Catalog, Job, LogLine, PointRow, Task, TokenInfo, UsageSample, VmRow};
use crate::jobs::JobSpec;
use crate::runner::Runner;
use crate::{DirectorError, Settings};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What the handlers share.
pub struct App {
    pub catalog: Arc<Catalog>,
    pub runner: Arc<Runner>,
    pub settings: Arc<Settings>,
    pub tz: jiff::tz::TimeZone,
}

type AppState = State<Arc<App>>;

/// An error as the API answers it.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// The body of an error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        let status = match e.downcast_ref::<DirectorError>() {
            Some(DirectorError::Invalid(_)) => StatusCode::BAD_REQUEST,
            Some(DirectorError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(DirectorError::Conflict(_)) => StatusCode::CONFLICT,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, format!("{e:#}"))
    }
}

impl From<cairn_ops::OpError> for ApiError {
    fn from(e: cairn_ops::OpError) -> ApiError {
        use cairn_ops::ErrorKind as K;
        let status = match e.kind() {
            K::InvalidRequest => StatusCode::BAD_REQUEST,
            K::NotFound => StatusCode::NOT_FOUND,
            K::Conflict => StatusCode::CONFLICT,
            K::Busy => StatusCode::SERVICE_UNAVAILABLE,
            K::Damaged | K::Unauthorized | K::Cancelled | K::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, format!("{:#}", e.error()))
    }
}

impl From<DirectorError> for ApiError {
    fn from(e: DirectorError) -> ApiError {
        anyhow::Error::from(e).into()
    }
}

/// A JSON request body; one that cannot be read is a 400 with `{"error": ...}`, as every error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiError::new(StatusCode::BAD_REQUEST, r.body_text())),
        }
    }
}

/// The caller of a request, from its token.
pub struct Authed(pub Caller);

impl Authed {
    fn may(&self, action: Action) -> Result<(), ApiError> {
        if self.0.role.may(action) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("token {} (role {}) may not do this", self.0.name, self.0.role.as_str()),
        ))
    }
}

impl FromRequestParts<Arc<App>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
            .map(|(_, token)| token);
        let unauthorized = || {
            ApiError::new(StatusCode::UNAUTHORIZED, "a valid token is needed: Authorization: Bearer cairn.ID.SECRET")
        };
        let Some(token) = token else { return Err(unauthorized()) };
        match auth::authenticate(&app.catalog, token)? {
            Some(caller) => Ok(Authed(caller)),
            None => Err(unauthorized()),
        }
    }
}

struct TokenSecurity;

impl Modify for TokenSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("cairn.ID.SECRET").build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "cairn director", description = "Jobs, tasks and tokens of a cairn server."),
    modifiers(&TokenSecurity),
    security(("token" = [])),
    tags(
        (name = "jobs", description = "Backup jobs: which VMs, where, when, what is kept"),
        (name = "tasks", description = "Runs of jobs: state, progress, log"),
        (name = "vms", description = "The VMs of the server's hosts"),
        (name = "points", description = "Restore points of the jobs' repositories: boot screens, files, restores"),
        (name = "tokens", description = "API tokens (admin only)"),
    )
)]
struct ApiDoc;

/// The API's routes, with the OpenAPI document at `/api/openapi.json`.
pub fn router(app: Arc<App>) -> axum::Router {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(version))
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(get_job, update_job, delete_job))
        .routes(routes!(run_job))
        .routes(routes!(list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(task_log))
        .routes(routes!(cancel_task))
        .routes(routes!(overview))
        .routes(routes!(list_vms))
        .routes(routes!(list_hosts))
        .routes(routes!(list_points))
        .routes(routes!(get_point))
        .routes(routes!(point_screenshot))
        .routes(routes!(point_volumes))
        .routes(routes!(point_files))
        .routes(routes!(point_download))
        .routes(routes!(create_restore))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .split_for_parts();
    let doc = Arc::new(doc);
    router
        .route("/api/openapi.json", axum::routing::get(move || async move { Json(doc.as_ref().clone()) }))
        .route("/metrics", axum::routing::get(metrics))
        .merge(crate::console::router())
        .with_state(app)
}

/// Prometheus metrics (text format, a viewer's token as `bearer_token`): tasks by state, and per
/// job its next run, its last good run and whether it is overdue.
async fn metrics(State(app): AppState, caller: Authed) -> Result<Response, ApiError> {
    use std::fmt::Write;
    caller.may(Action::Read)?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP cairn_tasks Tasks in the catalog, by state.\n# TYPE cairn_tasks gauge");
    for (state, n) in app.catalog.task_counts()? {
        let _ = writeln!(out, "cairn_tasks{{state=\"{}\"}} {n}", state.as_str());
    }
    let seconds =
        |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(|t| t.as_second());
    let _ = writeln!(out, "# HELP cairn_job_next_run_timestamp_seconds When a job's schedule is next due.");
    let _ = writeln!(out, "# TYPE cairn_job_next_run_timestamp_seconds gauge");
    let _ = writeln!(out, "# HELP cairn_job_last_good_timestamp_seconds When a job's last good run (ok) ended.");
    let _ = writeln!(out, "# TYPE cairn_job_last_good_timestamp_seconds gauge");
    let _ = writeln!(out, "# HELP cairn_job_last_ok Whether a job's newest ended task ended ok.");
    let _ = writeln!(out, "# TYPE cairn_job_last_ok gauge");
    for job in app.catalog.jobs()? {
        // Job names are letters, digits, - _ . (JobSpec::check): nothing to escape.
        let name = &job.spec.name;
        if let Some(t) = seconds(&job.next_run) {
            let _ = writeln!(out, "cairn_job_next_run_timestamp_seconds{{job=\"{name}\"}} {t}");
        }
        if let Some(t) = seconds(&job.last_good) {
            let _ = writeln!(out, "cairn_job_last_good_timestamp_seconds{{job=\"{name}\"}} {t}");
        }
        if let Some(task) = job.last_task.as_ref().filter(|t| t.state.is_finished()) {
            let ok = u8::from(task.state == crate::catalog::TaskState::Ok);
            let _ = writeln!(out, "cairn_job_last_ok{{job=\"{name}\"}} {ok}");
        }
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct Version {
    pub version: String,
}

/// The server's version.
#[utoipa::path(get, path = "/api/version", tag = "jobs", responses((status = 200, body = Version)))]
async fn version(caller: Authed) -> Result<Json<Version>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(Version { version: env!("CARGO_PKG_VERSION").into() }))
}

/// Every job, with its next run and its newest task.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs", responses((status = 200, body = [Job])))]
async fn list_jobs(State(app): AppState, caller: Authed) -> Result<Json<Vec<Job>>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(app.catalog.jobs()?))
}

fn job_or_404(app: &App, id: i64) -> Result<Job, ApiError> {
    app.catalog.job(id)?.ok_or_else(|| DirectorError::NotFound(format!("no job {id}")).into())
}

/// A job's spec from a request body, checked against what the server allows; with its next
/// due time, from now.
fn checked(app: &App, spec: JobSpec) -> Result<(JobSpec, Option<String>), ApiError> {
    let schedule = spec.check(&app.settings.allowed())?;
    let next = match schedule {
        None => None,
        Some(s) => Some(crate::scheduler::next_run(&s, jiff::Timestamp::now(), &app.tz).ok_or_else(|| {
            DirectorError::Invalid(format!(
                "schedule {:?} never comes due (a date that does not exist or is past)",
                s.text()
            ))
        })?),
    };
    Ok((spec, next))
}

/// Adds a job (checked first: its name, VMs, hosts, schedule, retention).
#[utoipa::path(post, path = "/api/jobs", tag = "jobs", request_body = JobSpec,
    responses((status = 201, body = Job), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_job(
    State(app): AppState,
    caller: Authed,
    Body(spec): Body<JobSpec>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.may(Action::ChangeJobs)?;
    let (spec, next) = checked(&app, spec)?;
    let id = app.catalog.create_job(&spec, next)?;
    Ok((StatusCode::CREATED, Json(job_or_404(&app, id)?)))
}

/// One job.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn get_job(State(app): AppState, caller: Authed, Path(id): Path<i64>) -> Result<Json<Job>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(job_or_404(&app, id)?))
}

/// Replaces a job's definition (its next run is counted again from now).
#[utoipa::path(put, path = "/api/jobs/{id}", tag = "jobs", params(("id" = i64, Path)), request_body = JobSpec,
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_job(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<i64>,
    Body(spec): Body<JobSpec>,
) -> Result<Json<Job>, ApiError> {
    caller.may(Action::ChangeJobs)?;
    let (spec, next) = checked(&app, spec)?;
    if !app.catalog.update_job(id, &spec, next)? {
        return Err(DirectorError::NotFound(format!("no job {id}")).into());
    }
    Ok(Json(job_or_404(&app, id)?))
}

/// Removes a job (its tasks stay in the history).
#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_job(State(app): AppState, caller: Authed, Path(id): Path<i64>) -> Result<StatusCode, ApiError> {
    caller.may(Action::ChangeJobs)?;
    if app.catalog.job_is_active(id)? {
        return Err(DirectorError::Conflict(format!("job {id} is running: cancel its task first")).into());
    }
    if !app.catalog.delete_job(id)? {
        return Err(DirectorError::NotFound(format!("no job {id}")).into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a job now; answers at once with its task (queued or running).
#[utoipa::path(post, path = "/api/jobs/{id}/run", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 202, body = Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn run_job(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    caller.may(Action::RunJob)?;
    let job = job_or_404(&app, id)?;
    // A backup token's runs keep every point: run N times, a retention of N would otherwise
    // forget the whole history on its say-so.
    let retention = caller.0.role != Role::Backup;
    let task = app.runner.submit(id, job.spec, "api", &caller.0.name, retention)?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

#[derive(Deserialize, IntoParams)]
struct TaskQuery {
    /// Only this job's tasks.
    job: Option<i64>,
    /// At most this many (default 100, at most 1000), newest first.
    limit: Option<i64>,
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/api/tasks", tag = "tasks", params(TaskQuery), responses((status = 200, body = [Task])))]
async fn list_tasks(
    State(app): AppState,
    caller: Authed,
    Query(q): Query<TaskQuery>,
) -> Result<Json<Vec<Task>>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(app.catalog.tasks(q.job, q.limit.unwrap_or(100).clamp(1, 1000))?))
}

fn task_or_404(app: &App, id: i64) -> Result<Task, ApiError> {
    app.catalog.task(id)?.ok_or_else(|| DirectorError::NotFound(format!("no task {id}")).into())
}

/// One task: its state, live progress and, once ended, its result.
#[utoipa::path(get, path = "/api/tasks/{id}", tag = "tasks", params(("id" = i64, Path)),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody)))]
async fn get_task(State(app): AppState, caller: Authed, Path(id): Path<i64>) -> Result<Json<Task>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(task_or_404(&app, id)?))
}

#[derive(Deserialize, IntoParams)]
struct LogQuery {
    /// Only the lines after this one (to follow a running task).
    after: Option<i64>,
}

/// A task's log.
#[utoipa::path(get, path = "/api/tasks/{id}/log", tag = "tasks", params(("id" = i64, Path), LogQuery),
    responses((status = 200, body = [LogLine]), (status = 404, body = ErrorBody)))]
async fn task_log(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
) -> Result<Json<Vec<LogLine>>, ApiError> {
    caller.may(Action::Read)?;
    task_or_404(&app, id)?;
    Ok(Json(app.catalog.log_lines(id, q.after.unwrap_or(0))?))
}

/// Asks a running or queued task to stop (between VMs, and between batches of blocks).
#[utoipa::path(post, path = "/api/tasks/{id}/cancel", tag = "tasks", params(("id" = i64, Path)),
    responses((status = 202, body = Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel_task(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    caller.may(Action::RunJob)?;
    let task = task_or_404(&app, id)?;
    if caller.0.role == Role::Backup && task.requested_by != caller.0.name {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("a backup token cancels only its own tasks; task {id} is not"),
        ));
    }
    if task.kind == "restore" && task.state == crate::catalog::TaskState::Running {
        return Err(DirectorError::Conflict(format!(
            "task {id} is a restore under way: it is not stopped half done (remove the VM it makes afterwards)"
        ))
        .into());
    }
    if task.state.is_finished() || !app.runner.cancel(id) {
        return Err(DirectorError::Conflict(format!("task {id} is {}", task.state.as_str())).into());
    }
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Runs blocking work (the catalog's SQLite, a repository, a host) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))?
}

/// The dashboard's numbers.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// How long the server took to gather it, in milliseconds.
    pub generated_ms: f64,
    pub jobs: JobCounts,
    pub vms: VmCounts,
    pub points: PointCounts,
    /// The newest tasks that did not end ok (last 7 days, at most 20).
    pub recent_problems: Vec<Task>,
    /// The newest tasks (at most 10).
    pub recent_tasks: Vec<Task>,
    /// The VMs whose newest point is older than `recent_hours`, or that have none (at most 50).
    pub stale_vms: Vec<StaleVm>,
    pub recent_hours: i64,
    /// Each repository's size over the last 90 days.
    pub usage: Vec<RepositoryUsage>,
}

#[derive(Serialize, ToSchema)]
pub struct JobCounts {
    pub total: usize,
    /// By the state of each job's newest ended task.
    pub ok: usize,
    pub warning: usize,
    pub failed: usize,
    pub never_run: usize,
    /// Jobs with no good run for longer than their schedule allows (an overdue alert is due).
    pub overdue: usize,
}

#[derive(Serialize, ToSchema)]
pub struct VmCounts {
    pub total: usize,
    pub hosts: usize,
    pub without_recent_point: usize,
}

#[derive(Serialize, ToSchema)]
pub struct PointCounts {
    pub total: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StaleVm {
    pub uuid: String,
    pub name: String,
    pub host: String,
    pub last_point: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RepositoryUsage {
    pub repository: String,
    pub samples: Vec<UsageSample>,
}

#[derive(Deserialize, IntoParams)]
struct OverviewQuery {
    /// A VM is "without a recent point" when its newest is older than this (default 26 h).
    hours: Option<i64>,
}

/// The dashboard: jobs by their last result, problems, VMs without a recent point, repository use.
#[utoipa::path(get, path = "/api/overview", tag = "jobs", params(OverviewQuery),
    responses((status = 200, body = Overview)))]
async fn overview(
    State(app): AppState,
    caller: Authed,
    Query(q): Query<OverviewQuery>,
) -> Result<Json<Overview>, ApiError> {
    caller.may(Action::Read)?;
    blocking(move || {
        let started = std::time::Instant::now();
        let now = jiff::Timestamp::now();
        let hours = q.hours.unwrap_or(26).clamp(1, 24 * 366);
        let jobs = app.catalog.jobs()?;
        let ended = |j: &Job| j.last_task.as_ref().filter(|t| t.state.is_finished()).map(|t| t.state);
        use crate::catalog::TaskState as S;
        let overdue = jobs.iter().filter(|j| crate::scheduler::is_overdue(j, now, &app.tz)).count();
        let counts = JobCounts {
            total: jobs.len(),
            ok: jobs.iter().filter(|j| ended(j) == Some(S::Ok)).count(),
            warning: jobs.iter().filter(|j| ended(j) == Some(S::Warning)).count(),
            failed: jobs.iter().filter(|j| matches!(ended(j), Some(S::Failed | S::Interrupted | S::Cancelled))).count(),
            never_run: jobs.iter().filter(|j| j.last_task.is_none()).count(),
            overdue,
        };
        let vms = app.catalog.inventory()?;
        let cutoff = now - jiff::SignedDuration::from_hours(hours);
        let stale = |v: &&VmRow| {
            v.last_point.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).is_none_or(|t| t < cutoff)
        };
        let stale_vms: Vec<&VmRow> = vms.iter().filter(stale).collect();
        let hosts: std::collections::HashSet<&str> = vms.iter().map(|v| v.host.as_str()).collect();
        let week_ago = crate::catalog::time_text(now - jiff::SignedDuration::from_hours(24 * 7));
        let recent_tasks = app.catalog.tasks(None, 10)?;
        let recent_problems = app.catalog.problems_since(&week_ago, 20)?;
        let since = crate::catalog::time_text(now - jiff::SignedDuration::from_hours(24 * 90));
        let usage = app
            .catalog
            .usage_since(&since)?
            .into_iter()
            .map(|(repository, samples)| RepositoryUsage { repository, samples })
            .collect();
        Ok(Json(Overview {
            jobs: counts,
            vms: VmCounts { total: vms.len(), hosts: hosts.len(), without_recent_point: stale_vms.len() },
            points: PointCounts { total: app.catalog.point_count()? },
            recent_problems,
            recent_tasks,
            stale_vms: stale_vms
                .iter()
                .take(50)
                .map(|v| StaleVm {
                    uuid: v.uuid.clone(),
                    name: v.name.clone(),
                    host: v.host.clone(),
                    last_point: v.last_point.clone(),
                })
                .collect(),
            recent_hours: hours,
            usage,
            generated_ms: started.elapsed().as_secs_f64() * 1000.0,
        }))
    })
    .await
}

/// The VMs of the server's hosts as last listed (every minute), each with its newest point.
#[utoipa::path(get, path = "/api/vms", tag = "vms", responses((status = 200, body = [VmRow])))]
async fn list_vms(State(app): AppState, caller: Authed) -> Result<Json<Vec<VmRow>>, ApiError> {
    caller.may(Action::Read)?;
    blocking(move || {
        // Before the first listing has ended, this request lists the hosts itself.
        if app.catalog.inventory_time()?.is_none() {
            crate::inventory::refresh(&app.catalog, &app.settings)?;
        }
        Ok(Json(app.catalog.inventory()?))
    })
    .await
}

/// The hosts jobs and restores may name, and the folders restores may write to.
#[derive(Serialize, ToSchema)]
pub struct Hosts {
    pub hosts: Vec<String>,
    pub restore_storage: Vec<String>,
}

/// The server's host list and restore folders.
#[utoipa::path(get, path = "/api/hosts", tag = "vms", responses((status = 200, body = Hosts)))]
async fn list_hosts(State(app): AppState, caller: Authed) -> Result<Json<Hosts>, ApiError> {
    caller.may(Action::Read)?;
    Ok(Json(Hosts {
        hosts: app.settings.hosts.clone(),
        restore_storage: app.settings.restore_storage.iter().map(|p| p.display().to_string()).collect(),
    }))
}

#[derive(Deserialize, IntoParams)]
struct PointQuery {
    /// Only the points of this VM (its UUID or name).
    vm: Option<String>,
    /// At most this many (default 200, at most 5000), newest first.
    limit: Option<i64>,
}

/// Restore points of the jobs' repositories, newest first.
#[utoipa::path(get, path = "/api/points", tag = "points", params(PointQuery),
    responses((status = 200, body = [PointRow])))]
async fn list_points(
    State(app): AppState,
    caller: Authed,
    Query(q): Query<PointQuery>,
) -> Result<Json<Vec<PointRow>>, ApiError> {
    caller.may(Action::Read)?;
    blocking(move || Ok(Json(app.catalog.points(q.vm.as_deref(), q.limit.unwrap_or(200).clamp(1, 5000))?))).await
}

#[derive(Deserialize, IntoParams)]
struct WhichRepository {
    /// The repository holding the point, when more than one does.
    repository: Option<String>,
}

/// The point `id` of the catalog (of `repository` when given).
fn point_or_404(app: &App, id: &str, repository: Option<&str>) -> Result<PointRow, ApiError> {
    let mut rows = app.catalog.points_with_id(id)?;
    match repository {
        Some(r) => rows.retain(|p| p.repository == crate::repos::key(r)),
        // A point and its offsite copy may share an ID: unless told, the job's own repository's.
        None if rows.len() > 1 => {
            let own: Vec<String> = app.catalog.jobs()?.iter().map(|j| crate::repos::key(&j.spec.repository)).collect();
            if rows.iter().any(|p| own.contains(&p.repository)) {
                rows.retain(|p| own.contains(&p.repository));
            }
        }
        None => {}
    }
    match rows.len() {
        0 => Err(DirectorError::NotFound(format!("no restore point {id}")).into()),
        1 => Ok(rows.remove(0)),
        _ => Err(DirectorError::Conflict(format!(
            "restore point {id} is in {} repositories: say which (repository=...)",
            rows.len()
        ))
        .into()),
    }
}

/// One restore point.
#[utoipa::path(get, path = "/api/points/{id}", tag = "points", params(("id" = String, Path), WhichRepository),
    responses((status = 200, body = PointRow), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn get_point(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<String>,
    Query(q): Query<WhichRepository>,
) -> Result<Json<PointRow>, ApiError> {
    caller.may(Action::Read)?;
    blocking(move || Ok(Json(point_or_404(&app, &id, q.repository.as_deref())?))).await
}

/// The screen of a point's boot check (PNG).
#[utoipa::path(get, path = "/api/points/{id}/screenshot", tag = "points", params(("id" = String, Path), WhichRepository),
    responses((status = 200, content_type = "image/png"), (status = 404, body = ErrorBody)))]
async fn point_screenshot(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<String>,
    Query(q): Query<WhichRepository>,
) -> Result<Response, ApiError> {
    caller.may(Action::Read)?;
    blocking(move || {
        let p = point_or_404(&app, &id, q.repository.as_deref())?;
        let png = app
            .catalog
            .screenshot(&p.repository, &p.id)?
            .ok_or_else(|| DirectorError::NotFound(format!("restore point {id} has no boot screen here")))?;
        Ok(([(axum::http::header::CONTENT_TYPE, "image/png")], png).into_response())
    })
    .await
}

/// A point's repository, opened and indexed under its shared lock, with the point's `NAME@ID`.
struct OpenPoint {
    repo: Arc<cairn_repo::Repository>,
    _lock: cairn_repo::Lock,
    spec: String,
}

fn open_point(app: &App, id: &str, repository: Option<&str>) -> Result<OpenPoint, ApiError> {
    let p = point_or_404(app, id, repository)?;
    let repo = crate::repos::find(&app.catalog, &p.repository)?.open()?;
    let lock = repo.lock(false, "files (director)", std::time::Duration::from_secs(30)).map_err(anyhow::Error::from)?;
    repo.load_index().map_err(anyhow::Error::from)?;
    Ok(OpenPoint { repo, _lock: lock, spec: format!("{}@{}", p.name, p.id) })
}

/// A volume of a point.
#[derive(Serialize, ToSchema)]
pub struct VolumeRow {
    pub name: String,
    pub filesystem: Option<String>,
    pub size: u64,
}

/// The volumes (partitions, logical volumes) of a point, with their filesystems.
#[utoipa::path(get, path = "/api/points/{id}/volumes", tag = "points", params(("id" = String, Path), WhichRepository),
    responses((status = 200, body = [VolumeRow]), (status = 404, body = ErrorBody)))]
async fn point_volumes(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<String>,
    Query(q): Query<WhichRepository>,
) -> Result<Json<Vec<VolumeRow>>, ApiError> {
    caller.may(Action::Restore)?;
    blocking(move || {
        let open = open_point(&app, &id, q.repository.as_deref())?;
        let (_, _, volumes) = cairn_ops::files::list_volumes(&open.repo, &open.spec)?;
        Ok(Json(
            volumes
                .into_iter()
                .map(|v| VolumeRow { name: v.name, filesystem: v.filesystem.map(str::to_string), size: v.length })
                .collect(),
        ))
    })
    .await
}

#[derive(Deserialize, IntoParams)]
struct FilesQuery {
    /// The volume (default: the point's one filesystem).
    volume: Option<String>,
    /// The folder (default `/`), or the file to download.
    path: Option<String>,
    repository: Option<String>,
}

/// A folder of a point's volume.
#[derive(Serialize, ToSchema)]
pub struct FolderListing {
    pub volume: String,
    pub path: String,
    pub entries: Vec<FileRow>,
}

#[derive(Serialize, ToSchema)]
pub struct FileRow {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    /// Unix seconds.
    pub modified: i64,
}

/// The entries of a folder of a point's volume, read from the repository.
#[utoipa::path(get, path = "/api/points/{id}/files", tag = "points", params(("id" = String, Path), FilesQuery),
    responses((status = 200, body = FolderListing), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn point_files(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> Result<Json<FolderListing>, ApiError> {
    caller.may(Action::Restore)?;
    blocking(move || {
        let open = open_point(&app, &id, q.repository.as_deref())?;
        let path = q.path.unwrap_or_else(|| "/".into());
        let listing = cairn_ops::files::list_files(&open.repo, &open.spec, q.volume.as_deref(), &path)?;
        Ok(Json(FolderListing {
            volume: listing.volume,
            path,
            entries: listing
                .entries
                .into_iter()
                .map(|e| FileRow { name: e.name, kind: e.kind.to_string(), size: e.size, modified: e.modified })
                .collect(),
        }))
    })
    .await
}

/// A file of a point's volume: its bytes, each checked against its hash as it is read.
#[utoipa::path(get, path = "/api/points/{id}/download", tag = "points", params(("id" = String, Path), FilesQuery),
    responses((status = 200, content_type = "application/octet-stream"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn point_download(
    State(app): AppState,
    caller: Authed,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> Result<Response, ApiError> {
    caller.may(Action::Restore)?;
    let (file, name) = blocking(move || {
        let open = open_point(&app, &id, q.repository.as_deref())?;
        let path = q.path.clone().unwrap_or_default();
        let (folder, name) = path.trim_end_matches('/').rsplit_once('/').unwrap_or(("", &path));
        let folder = if folder.is_empty() { "/" } else { folder };
        let bad = |why: String| ApiError::new(StatusCode::BAD_REQUEST, why);
        let listing = cairn_ops::files::list_files(&open.repo, &open.spec, q.volume.as_deref(), folder)?;
        let size = match listing.entries.iter().find(|e| e.name == name) {
            Some(e) if e.kind == "file" => e.size,
            Some(e) => return Err(bad(format!("{path} is a {}: only files are downloaded", e.kind))),
            None => return Err(DirectorError::NotFound(format!("no file {path} in volume {}", listing.volume)).into()),
        };
        // Copied out (every block checked against its hash) to a private scratch folder, then
        // opened and removed: the open file is what is sent. The work folder also holds the
        // running backups' sockets and scratch files: a copy that would leave it less than
        // 1 GiB free is refused (`cairn files get` on the server's console copies it anywhere).
        let scratch = app.settings.work_dir.join("downloads");
        std::fs::create_dir_all(&scratch).map_err(anyhow::Error::from)?;
        let fs = rustix::fs::statvfs(&scratch).map_err(|e| anyhow::anyhow!("statvfs {}: {e}", scratch.display()))?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        if size.saturating_add(1 << 30) > free {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "{path} is {size} bytes and the server's work folder has {free} free: use `cairn files get` there"
                ),
            ));
        }
        let dir = tempfile_dir(&scratch)?;
        let dest = dir.join("file");
        let copied = cairn_ops::files::get_files(&open.repo, &open.spec, &listing.volume, &path, &dest);
        let opened = copied.map_err(anyhow::Error::from).and_then(|_| Ok(std::fs::File::open(&dest)?));
        let _ = std::fs::remove_dir_all(&dir);
        Ok((opened?, name.to_string()))
    })
    .await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        name.replace(|c: char| !c.is_ascii_graphic() || c == '"' || c == '\\', "_")
    );
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// A new folder of its own under `parent` (0700).
fn tempfile_dir(parent: &std::path::Path) -> Result<std::path::PathBuf, ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no random bytes"))?;
    let dir = parent.join(hex::encode(bytes));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(anyhow::Error::from)?;
    Ok(dir)
}

/// Restores a point onto a host of the server's list, into one of its restore folders: the
/// whole VM, or an instant recovery. Answers at once with the task.
#[utoipa::path(post, path = "/api/restores", tag = "points", request_body = crate::restores::RestoreRequest,
    responses((status = 202, body = Task), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_restore(
    State(app): AppState,
    caller: Authed,
    Body(req): Body<crate::restores::RestoreRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    caller.may(Action::Restore)?;
    req.check(&app.settings)?;
    let task = blocking(move || {
        let point = point_or_404(&app, &req.point, req.repository.as_deref())?;
        let location = crate::repos::find(&app.catalog, &point.repository)?;
        Ok(app.runner.submit_restore(req, point, location, &caller.0.name)?)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Every API token (never their secrets).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens", responses((status = 200, body = [TokenInfo])))]
async fn list_tokens(State(app): AppState, caller: Authed) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    caller.may(Action::ManageTokens)?;
    Ok(Json(app.catalog.tokens()?))
}

#[derive(Deserialize, ToSchema)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
}

/// A token just made: its secret is shown this once.
#[derive(Serialize, ToSchema)]
pub struct MadeToken {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// Makes a token.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = MadeToken), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_token(
    State(app): AppState,
    caller: Authed,
    Body(t): Body<NewToken>,
) -> Result<(StatusCode, Json<MadeToken>), ApiError> {
    caller.may(Action::ManageTokens)?;
    let token = auth::create_token(&app.catalog, &t.name, t.role)?;
    Ok((StatusCode::CREATED, Json(MadeToken { name: t.name, role: t.role, token })))
}

/// Revokes a token.
#[utoipa::path(delete, path = "/api/tokens/{name}", tag = "tokens", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn revoke_token(State(app): AppState, caller: Authed, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    caller.may(Action::ManageTokens)?;
    if !app.catalog.revoke_token(&name)? {
        return Err(DirectorError::NotFound(format!("no token {name:?}")).into());
    }
    Ok(StatusCode::NO_CONTENT)
}
