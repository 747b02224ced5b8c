//! # cairn-director: jobs on schedules, tasks, and the REST API (`cairn server`)
//!
//! The director runs cairn unattended: an operator (or a script, through the API) defines
//! *jobs* (which VMs, which hosts, which repository, when, what is kept), and each run of a job
//! is a *task* with an ID, a live progress, a log and a final state. It calls the same
//! operations as the CLI (`cairn-ops`); it never talks to a repository or a hypervisor by other
//! means.
//!
//! - [`catalog`]: jobs, tasks and their logs, API tokens, in one SQLite file;
//! - [`jobs`]: what a job is, checked before it is kept;
//! - [`notify`]: a task's report, mailed and posted to a webhook when it ends;
//! - [`runner`]: a task's run (backup, then retention), one at a time per repository;
//! - [`scheduler`]: jobs started when due; a due time missed while the server was down runs once;
//! - [`auth`]: API tokens; [`roles`]: what each role (admin, operator, viewer, backup) may do;
//! - [`repos`]: the jobs' repositories, opened with their job's password, their points mirrored
//!   in the catalog; [`inventory`]: the VMs of the host list, listed every minute;
//! - [`restores`]: a point recovered onto a host of the list, as a task;
//! - [`api`]: the REST API under `/api/`, its OpenAPI document at `/api/openapi.json`;
//!   [`console`]: the web console over it, at `/`.
//!
//! A server killed in the middle of a task leaves no guest frozen or paused: each VM's watchdog
//! is a process of its own that thaws or resumes the guest and ends the backup job when the
//! server's end of its pipe closes (as for the CLI). At the next start, the task is marked
//! `interrupted`, with the reason.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod console;
pub mod inventory;
pub mod jobs;
pub mod notify;
pub mod repos;
pub mod restores;
pub mod roles;
pub mod runner;
pub mod scheduler;
mod tls;

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Errors a caller of the director acts on (the API maps them to HTTP statuses).
#[derive(Debug, thiserror::Error)]
pub enum DirectorError {
    /// The request cannot be carried out as given (400).
    #[error("{0}")]
    Invalid(String),
    /// The thing named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// It collides with what exists or runs (409).
    #[error("{0}")]
    Conflict(String),
}

/// Opens a hypervisor connection from its URI: the interface picks the implementation.
pub type Connector = Arc<dyn Fn(&str) -> Result<Box<dyn cairn_hypervisor::Hypervisor>> + Send + Sync>;

/// How the server runs.
#[derive(Clone)]
pub struct Settings {
    /// Where the API listens: any address with TLS, a loopback address only without.
    pub listen: SocketAddr,
    /// The server's certificate chain and private key (PEM files): HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The catalog's SQLite file.
    pub catalog: PathBuf,
    /// The server's host list: the hosts jobs may name, and those of a job that names none.
    pub hosts: Vec<String>,
    /// The folder jobs' password files must be in.
    pub secrets_dir: PathBuf,
    /// How a host's hypervisor is reached.
    pub connect: Connector,
    /// The work folder of VM jobs (sockets, scratch files, sandboxes).
    pub work_dir: PathBuf,
    /// How cairn runs on other hosts.
    pub remote: cairn_ops::hosts::RemoteSettings,
    /// The SMTP server reports are mailed through (its `to` is each job's).
    pub mail: Option<cairn_ops::mail::MailSettings>,
    /// How often the scheduler looks at the jobs.
    pub tick: Duration,
    /// At most this many VM backups at once on one host, whatever the tasks (each job's
    /// `per_host` is within it).
    pub per_host_limit: usize,
    /// How often the hosts' VMs are listed again for the console.
    pub inventory_every: Duration,
    /// The folders of the hosts restores through the API may write to.
    pub restore_storage: Vec<PathBuf>,
    /// How long a guest may stay frozen (or paused) before its watchdog thaws it.
    pub freeze_limit_secs: u64,
    /// Testing aid: each VM stays frozen this long after its point is taken.
    pub debug_hold: Option<Duration>,
}

impl Settings {
    /// What jobs may name on this server.
    pub fn allowed(&self) -> jobs::Allowed<'_> {
        jobs::Allowed { hosts: &self.hosts, secrets_dir: &self.secrets_dir }
    }
}

/// What the catalog says of tasks a stopped server left unfinished.
pub const INTERRUPTED: &str = "the server stopped while this task was queued or running (killed, crashed or \
                               restarted); a guest it had frozen or paused was thawed by its watchdog";

/// Opens the catalog at `path` (its folder made 0700 if missing).
pub fn open_catalog(path: &std::path::Path) -> Result<catalog::Catalog> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    catalog::Catalog::open(path)
}

/// Runs the server until SIGTERM or SIGINT: the API, the scheduler and the tasks. Prints
/// `listening on http://ADDR` on standard output once it accepts requests.
pub fn serve(settings: Settings) -> Result<()> {
    if !settings.listen.ip().is_loopback() && settings.tls.is_none() {
        bail!(
            "{} is not a loopback address: plain HTTP is served on loopback only (tokens would cross the network \
             in clear); give a certificate and key (--tls-cert, --tls-key)",
            settings.listen
        );
    }
    let tls = match &settings.tls {
        Some((cert, key)) => Some(cairn_nbd::server::tls_config(cert, key, None).context("the TLS certificate")?),
        None => None,
    };
    let catalog = Arc::new(open_catalog(&settings.catalog)?);
    // What downloads a stopped server was sending (each already unlinked once opened; a
    // folder is only left by a copy cut short).
    let _ = std::fs::remove_dir_all(settings.work_dir.join("downloads"));
    for id in catalog.interrupt_unfinished(INTERRUPTED)? {
        eprintln!("task {id}: interrupted when the server stopped");
    }
    let settings = Arc::new(settings);
    let runner = runner::Runner::new(catalog.clone(), settings.clone());
    let tz = jiff::tz::TimeZone::system();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scheduler = {
        let (catalog, runner, settings, tz, stop) =
            (catalog.clone(), runner.clone(), settings.clone(), tz.clone(), stop.clone());
        std::thread::Builder::new().name("scheduler".into()).spawn(move || {
            let mut first = true;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = scheduler::tick(&catalog, &runner, &settings, jiff::Timestamp::now(), &tz, first) {
                    eprintln!("scheduler: {e:#}");
                }
                first = false;
                let t = std::time::Instant::now();
                while t.elapsed() < settings.tick && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?
    };
    let inventory = {
        let (catalog, settings, stop) = (catalog.clone(), settings.clone(), stop.clone());
        std::thread::Builder::new().name("inventory".into()).spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match inventory::refresh(&catalog, &settings) {
                    Ok(failed) => {
                        for (host, why) in failed {
                            eprintln!("inventory: host {host} could not be listed: {why}");
                        }
                    }
                    Err(e) => eprintln!("inventory: {e:#}"),
                }
                let t = std::time::Instant::now();
                while t.elapsed() < settings.inventory_every && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?
    };
    let app = Arc::new(api::App { catalog, runner: runner.clone(), settings: settings.clone(), tz });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listening on {}", settings.listen))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            writeln!(out, "listening on {scheme}://{}", listener.local_addr()?)?;
            out.flush()?;
        }
        let router = api::router(app);
        // At the signal, the tasks start stopping at once (not after the last request ends),
        // and open requests (a long download) get 10 s before they are cut.
        let signalled = Arc::new(tokio::sync::Notify::new());
        let shutdown = {
            let (runner, stop, signalled) = (runner.clone(), stop.clone(), signalled.clone());
            async move {
                stop_signal().await;
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || runner.stop_all(Duration::from_secs(120)));
                signalled.notify_one();
            }
        };
        let cut_after_signal = async {
            signalled.notified().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            eprintln!("requests still open 10 s after the stop signal: closed");
        };
        match tls {
            Some(config) => {
                let listener = tls::TlsListener::new(listener, config);
                let serve = axum::serve(listener, router).with_graceful_shutdown(shutdown);
                tokio::select! {
                    r = std::future::IntoFuture::into_future(serve) => r?,
                    _ = cut_after_signal => {}
                }
            }
            None => {
                let serve = axum::serve(listener, router).with_graceful_shutdown(shutdown);
                tokio::select! {
                    r = std::future::IntoFuture::into_future(serve) => r?,
                    _ = cut_after_signal => {}
                }
            }
        }
        anyhow::Ok(())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = scheduler.join();
    // The inventory thread is not waited for: a listing may hang on a host that went away.
    drop(inventory);
    // Running tasks stop between batches of blocks, their guests thawed; they end interrupted,
    // and the scheduled ones run again at the next start.
    runner.stop_all(Duration::from_secs(120));
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
