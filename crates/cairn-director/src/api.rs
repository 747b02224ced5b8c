//! The REST API, under `/api/`, described by the OpenAPI document at `/api/openapi.json`.
//!
//! Every request but the OpenAPI document needs a token (`Authorization: Bearer cairn.ID.SECRET`)
//! whose role allows it (see [`crate::auth::Role`]): 401 without a valid token, 403 when its role
//! does not allow the request. Errors are `{"error": "..."}` with 400 (a bad request), 404, 409 (a
//! name taken, a job already running) or 500. A job's run answers 202 with its task at once;
//! the task is followed at `/api/tasks/{id}` and `/api/tasks/{id}/log`.

use crate::auth::{self, Action, Caller, Role};
use crate::catalog::{Catalog, Job, LogLine, Task, TokenInfo};
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
        .routes(routes!(list_vms))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .split_for_parts();
    let doc = Arc::new(doc);
    router
        .route("/api/openapi.json", axum::routing::get(move || async move { Json(doc.as_ref().clone()) }))
        .route("/metrics", axum::routing::get(metrics))
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
    if task.state.is_finished() || !app.runner.cancel(id) {
        return Err(DirectorError::Conflict(format!("task {id} is {}", task.state.as_str())).into());
    }
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// A VM of the server's hosts.
#[derive(Serialize, ToSchema)]
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
}

/// The VMs of the server's host list (a host that cannot be reached is left out).
#[utoipa::path(get, path = "/api/vms", tag = "vms", responses((status = 200, body = [VmRow])))]
async fn list_vms(State(app): AppState, caller: Authed) -> Result<Json<Vec<VmRow>>, ApiError> {
    caller.may(Action::Read)?;
    let settings = app.settings.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let connect = |uri: &str| (settings.connect)(uri);
        let (vms, _unreachable) = cairn_ops::vm_list::list_vms_on_hosts(&settings.hosts, &connect);
        vms.into_iter()
            .map(|v| VmRow {
                name: v.vm.name.clone(),
                uuid: v.vm.uuid.clone(),
                host: v.host.clone(),
                state: format!("{:?}", v.vm.state).to_lowercase(),
                method: v.vm.method.to_string(),
                method_reason: v.vm.method_reason.clone(),
                tags: v.vm.tags.clone(),
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(rows))
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
