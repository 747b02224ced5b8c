//! The watchdog: a separate process that undoes what a backup did to a guest if the backup
//! process dies or hangs.
//!
//! The backup job tells it, before acting, what it is about to do ("frozen", "paused", "job") and
//! when it undid it ("thawed", "resumed", "job-ended"), one line each on the watchdog's stdin. The
//! watchdog thaws a guest frozen longer than its limit or resumes one paused longer than it,
//! even while the job runs. When its stdin closes without "done" (the job was killed, even with
//! SIGKILL), it thaws, resumes and ends the backup job at once.
//!
//! What it survives, and why:
//! - A thaw or resume that fails (the guest agent busy, libvirtd restarting, a resume refused
//!   while libvirt still writes a memory state) is retried with backoff for minutes, on a new
//!   libvirt connection each time: a guest must never stay frozen because one call failed.
//! - Signals aimed at the job: it runs in its own process group (the Ctrl-C that stops the job
//!   does not reach it) and ignores SIGTERM, SIGHUP and SIGINT, so a `kill` of the job's group,
//!   or of the whole service (systemd's stop sends SIGTERM to every process of the unit), leaves
//!   it to see its stdin close and undo. Where systemd runs, it is started in a scope of its own
//!   (`systemd-run --scope`, `--user` when not root), outside the job's cgroup: stopping or
//!   OOM-killing the job's service does not take it down with the job. Where `systemd-run` cannot
//!   make a scope (no D-Bus in a container, no user manager), it runs as a plain child.
//! - Its reader going away: SIGPIPE is ignored and nothing it logs can panic.
//! - An undo that failed: the job tells "thawed" or "resumed" only once the guest is thawed or
//!   running again, so the watchdog's mark stays and it goes on trying.
//! - Another run: it ends only the backup job whose NBD socket carries its run's token
//!   ([`crate::job_socket_name`]), never a job a later run started in the same folder.
//! - A job it can no longer hear: the job's side writes "alive" every [`HEARTBEAT`]; once it has,
//!   a silence of [`Retry::silence`] counts as the job gone. This is what ends the job of a run
//!   cut off by the network when the watchdog runs on another host (over SSH, whose server may
//!   not notice a silent client for hours), or of a job stopped (SIGSTOP) rather than killed.

use crate::Hypervisor;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the job is about to do or has undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Frozen,
    Thawed,
    Paused,
    /// The paused VM's memory is being saved: the limit stops counting until the next
    /// [`Guard::Paused`] (a save of a few GiB takes longer than the limit, and libvirt refuses a
    /// resume while it writes the state anyway). If the job goes away meanwhile, the VM is resumed.
    Saving,
    Resumed,
    Job,
    JobEnded,
}

impl Guard {
    fn word(self) -> &'static str {
        match self {
            Guard::Frozen => "frozen",
            Guard::Thawed => "thawed",
            Guard::Paused => "paused",
            Guard::Saving => "saving",
            Guard::Resumed => "resumed",
            Guard::Job => "job",
            Guard::JobEnded => "job-ended",
        }
    }
}

/// How often the job's side says "alive".
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Once "alive" was heard, this long without a line counts as the other end gone.
pub const SILENCE: Duration = Duration::from_secs(HEARTBEAT.as_secs() * 6);

type Line = std::sync::Arc<std::sync::Mutex<Box<dyn Write + Send>>>;

/// The job's side: a handle on the watchdog process.
pub struct Watchdog {
    child: Option<Child>,
    /// The only strong reference: dropping it closes the watchdog's stdin (the heartbeat thread
    /// holds a weak one).
    stdin: Option<Line>,
    mode: String,
}

/// Writes "alive" on `line` at once (the other end must know before anything happens that it
/// will hear from us: a cut right after a freeze must count), then every [`HEARTBEAT`], until
/// the last strong reference to `line` is gone. The watchdog's input, and the input of the host
/// commands that serve over SSH (`cairn_vm::ssh`), are kept alive so.
pub fn say_alive<W: Write + Send + 'static>(line: std::sync::Weak<std::sync::Mutex<W>>) {
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || loop {
        {
            let Some(l) = line.upgrade() else { return };
            let mut w = l.lock().unwrap_or_else(|e| e.into_inner());
            if writeln!(w, "alive").and_then(|_| w.flush()).is_err() {
                return;
            }
        }
        std::thread::sleep(HEARTBEAT);
    });
}

/// The systemd tool that starts a process in a scope of its own, when systemd runs this host.
fn systemd_run() -> Option<PathBuf> {
    // sd_booted(): systemd is the init system iff this folder exists.
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    find_in_path(&std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()), "systemd-run")
}

/// The first executable file named `name` in the folders of `path` (a PATH value).
fn find_in_path(path: &std::ffi::OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// How the watchdog process is started: `program args` directly, or through `systemd-run --scope`
/// (`--user` too when we are not root: only root may talk to the system manager) so that it lives
/// in a cgroup of its own (a `systemctl stop`, a stop timeout or an OOM kill of the job's service
/// then spares it). `systemd-run --scope` executes the program in place, so it stays our child
/// with our pipes.
pub fn command(program: &Path, args: &[String], systemd_run: Option<&Path>, user: bool) -> Command {
    let mut cmd = match systemd_run {
        Some(sr) => {
            let mut c = Command::new(sr);
            if user {
                c.arg("--user");
            }
            c.args(["--scope", "--quiet", "--collect", "--description=cairn watchdog"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args);
    cmd
}

/// What came of starting one watchdog process.
enum Started {
    Ready(Watchdog),
    /// It exited (or closed its output) without saying "ready": why.
    Exited(String),
}

impl Watchdog {
    /// Starts `program args` (a program that calls [`run`]), in a systemd scope where systemd runs
    /// this host, and waits until it is connected and ready. If `systemd-run` cannot make the
    /// scope (no D-Bus in a container, no user manager for a non-root user) and exits before the
    /// watchdog is ready, the watchdog runs as a plain child instead: [`Watchdog::mode`] says which.
    pub fn start(program: &Path, args: &[String]) -> Result<Watchdog> {
        Self::start_with(program, args, systemd_run().as_deref())
    }

    /// [`Watchdog::start`] with `systemd-run` at this path (None: a plain child).
    pub fn start_with(program: &Path, args: &[String], systemd_run: Option<&Path>) -> Result<Watchdog> {
        let user = unsafe { libc::geteuid() } != 0;
        let mut why_direct = "systemd does not run this host".to_string();
        if let Some(sr) = systemd_run {
            match Self::spawn_ready(command(program, args, Some(sr), user))? {
                Started::Ready(mut w) => {
                    w.mode = if user { "in a systemd user scope" } else { "in a systemd scope" }.into();
                    return Ok(w);
                }
                Started::Exited(why) => why_direct = format!("{} could not start it in a scope: {why}", sr.display()),
            }
        }
        match Self::spawn_ready(command(program, args, None, user))? {
            Started::Ready(mut w) => {
                w.mode = format!("as a plain child process ({why_direct})");
                Ok(w)
            }
            Started::Exited(why) => bail!(
                "the watchdog process did not start ({why}; it guards the guest while it is frozen or paused); the backup did not touch the VM"
            ),
        }
    }

    /// Starts `cmd` and waits for its "ready".
    fn spawn_ready(mut cmd: Command) -> Result<Started> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("starting the watchdog process ({cmd:?})"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("watchdog stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => {
                let stdin =
                    stdin.map(|s| std::sync::Arc::new(std::sync::Mutex::new(Box::new(s) as Box<dyn Write + Send>)));
                if let Some(l) = &stdin {
                    say_alive(std::sync::Arc::downgrade(l));
                }
                Ok(Started::Ready(Watchdog { child: Some(child), stdin, mode: String::new() }))
            }
            Ok(l) => {
                drop(stdin);
                let _ = child.kill();
                let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                Ok(Started::Exited(if l.is_empty() {
                    format!("it exited ({status}) before it was ready")
                } else {
                    format!("it said {:?} instead of ready", l.trim())
                }))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the watchdog process was not ready after 30 s (it guards the guest while it is frozen or paused); the backup did not touch the VM")
            }
        }
    }

    /// A watchdog that guards nothing (for callers that do not freeze or pause, and tests).
    pub fn none() -> Watchdog {
        Watchdog { child: None, stdin: None, mode: "none".into() }
    }

    /// A watchdog reached through `w` (one line per guard, as the process gets them on its stdin);
    /// for tests that run [`guard`] in a thread. Dropping it drops `w`.
    pub fn to_writer(w: Box<dyn Write + Send>) -> Watchdog {
        Watchdog {
            child: None,
            stdin: Some(std::sync::Arc::new(std::sync::Mutex::new(w))),
            mode: "in this process".into(),
        }
    }

    /// How the watchdog runs: in a systemd scope, or as a plain child process and why.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    pub fn tell(&mut self, g: Guard) -> Result<()> {
        if let Some(s) = self.stdin.as_ref() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            writeln!(s, "{}", g.word()).and_then(|_| s.flush()).context("the watchdog process is gone")?;
        }
        Ok(())
    }

    /// The job is over and left nothing to undo: the watchdog exits without acting.
    pub fn done(mut self) {
        if let Some(s) = self.stdin.take() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(s, "done");
            let _ = s.flush();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing stdin without "done" makes the watchdog undo whatever is still marked.
        self.stdin.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// How hard the watchdog tries an undo that fails.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Wait after the first failure; doubled after each next one, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up an undo still failing this long after its first attempt.
    pub give_up: Duration,
    /// How long to look for the dead job's backup job (its request may still be in flight).
    pub job_search: Duration,
    /// Once the job has said "alive", this long without a line from it counts as the job gone.
    pub silence: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            give_up: Duration::from_secs(15 * 60),
            job_search: Duration::from_secs(10),
            silence: SILENCE,
        }
    }
}

/// Opens a connection to the hypervisor (again, after one broke).
pub type Connect<'a> = &'a dyn Fn() -> Result<Box<dyn Hypervisor>>;

/// The watchdog process's main loop: reads guards from stdin, acts on `uuid`. Prints "ready" on
/// stdout once connected. Returns when the job says "done", or goes away and everything it had
/// marked is undone (or given up after [`Retry::give_up`]). The backup job whose NBD socket is
/// named with `job_token` is the job's own.
pub fn run(connect: Connect, uuid: &str, limit: Duration, job_token: &str) -> Result<()> {
    ignore_termination_signals();
    let first = connect()?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|_| out.flush()).context("telling the job the watchdog is ready")?;
    drop(out);
    // Never eprintln!: it panics when stderr is gone (`cairn ... | tee log` stopped by Ctrl-C), and
    // the watchdog must outlive its reader. What cannot be said is lost, the undo is not.
    let say = |m: &str| {
        let _ = writeln!(std::io::stderr(), "cairn watchdog ({uuid}): {m}");
    };
    guard(connect, Some(first), uuid, limit, job_token, &rx, Retry::default(), &say);
    Ok(())
}

/// SIGTERM, SIGHUP and SIGINT sent to the job (or its whole group, or service) must not stop the
/// one process that undoes what the job did; it ends when its stdin closes and all is undone.
/// SIGPIPE neither: a watchdog whose stderr reader went away must go on (set here, whatever
/// the process that started it did with the signal).
fn ignore_termination_signals() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGPIPE] {
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// One hypervisor connection, made again after any failed call (libvirtd restarted, the socket
/// broke): a retry never reuses a connection that just failed.
struct Conn<'a> {
    connect: Connect<'a>,
    hv: Option<Box<dyn Hypervisor>>,
}

impl Conn<'_> {
    fn call<T>(&mut self, f: impl FnOnce(&dyn Hypervisor) -> Result<T>) -> Result<T> {
        if self.hv.is_none() {
            self.hv = Some((self.connect)().context("connecting to the hypervisor again")?);
        }
        let r = f(self.hv.as_deref().unwrap());
        if r.is_err() {
            self.hv = None;
        }
        r
    }
}

/// An undo to do, and when to try it next.
struct Pending {
    since: Instant,
    next: Instant,
    delay: Duration,
    failures: u32,
}

impl Pending {
    fn now() -> Pending {
        let now = Instant::now();
        Pending { since: now, next: now, delay: Duration::ZERO, failures: 0 }
    }
}

/// What an attempt at an undo came to.
enum Outcome {
    Done,
    Again,
    GaveUp,
}

/// Tries `pending` if due: on failure, schedules the next try (or gives up).
fn attempt(
    p: &mut Pending,
    retry: &Retry,
    what: &str,
    say: &dyn Fn(&str),
    f: &mut dyn FnMut() -> Result<()>,
) -> Outcome {
    if Instant::now() < p.next {
        return Outcome::Again;
    }
    match f() {
        Ok(()) => Outcome::Done,
        Err(e) => {
            p.failures += 1;
            if p.since.elapsed() >= retry.give_up {
                say(&format!(
                    "{what} failed {} times over {} s, giving up: {e:#}",
                    p.failures,
                    p.since.elapsed().as_secs()
                ));
                return Outcome::GaveUp;
            }
            p.delay = if p.delay.is_zero() { retry.first_delay } else { (p.delay * 2).min(retry.max_delay) };
            p.next = Instant::now() + p.delay;
            if p.failures <= 3 || p.failures.is_power_of_two() {
                say(&format!(
                    "{what} failed (attempt {}), trying again in {:.1} s: {e:#}",
                    p.failures,
                    p.delay.as_secs_f64()
                ));
            }
            Outcome::Again
        }
    }
}

/// The watchdog's state machine, fed by `rx` (a line, or None when the job went away).
#[allow(clippy::too_many_arguments)]
pub fn guard(
    connect: Connect,
    first: Option<Box<dyn Hypervisor>>,
    uuid: &str,
    limit: Duration,
    job_token: &str,
    rx: &mpsc::Receiver<Option<String>>,
    retry: Retry,
    say: &dyn Fn(&str),
) {
    let mut conn = Conn { connect, hv: first };
    let mut frozen: Option<Instant> = None;
    let mut paused: Option<Instant> = None;
    // The memory is being saved: the VM is paused, but the limit waits for the save to end.
    let mut saving = false;
    let mut job = false;
    let mut thaw: Option<(Pending, String)> = None;
    let mut resume: Option<(Pending, String)> = None;
    let mut end_job: Option<Pending> = None;
    let mut gone = false;
    // When the job was last heard, and whether it says "alive" (then silence means it is gone).
    let (mut heard, mut beating) = (Instant::now(), false);
    let our_socket = crate::job_socket_name(job_token);
    loop {
        if !gone {
            let line = match rx.recv_timeout(Duration::from_millis(50)) {
                Err(mpsc::RecvTimeoutError::Timeout) if beating && heard.elapsed() > retry.silence => {
                    say(&format!("nothing heard from the backup process for {} s", retry.silence.as_secs()));
                    Ok(None)
                }
                other => other,
            };
            if let Ok(Some(_)) = &line {
                heard = Instant::now();
            }
            match line {
                Ok(Some(l)) => match l.trim() {
                    "alive" => beating = true,
                    // A new mark replaces any undo still pending for the old one.
                    "frozen" => (frozen, thaw) = (Some(Instant::now()), None),
                    "thawed" => (frozen, thaw) = (None, None),
                    "paused" => (paused, saving, resume) = (Some(Instant::now()), false, None),
                    "saving" => (paused, saving, resume) = (Some(Instant::now()), true, None),
                    "resumed" => (paused, saving, resume) = (None, false, None),
                    "job" => job = true,
                    "job-ended" => job = false,
                    "done" => return,
                    other => say(&format!("unknown word {other:?} ignored")),
                },
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The job died: undo everything it had marked.
                    gone = true;
                    if frozen.take().is_some() && thaw.is_none() {
                        thaw = Some((Pending::now(), "the backup process went away while the guest was frozen".into()));
                    }
                    if paused.take().is_some() && resume.is_none() {
                        resume = Some((Pending::now(), "the backup process went away while the VM was paused".into()));
                    }
                    if job {
                        end_job = Some(Pending::now());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        if frozen.is_some_and(|t| t.elapsed() > limit) {
            frozen = None;
            thaw = Some((Pending::now(), format!("the guest stayed frozen longer than {} s", limit.as_secs_f64())));
        }
        if !saving && paused.is_some_and(|t| t.elapsed() > limit) {
            // While libvirt writes a memory state it refuses a resume: keep trying, the save ends.
            paused = None;
            resume = Some((Pending::now(), format!("the VM stayed paused longer than {} s", limit.as_secs_f64())));
        }
        // The guest first, then the job.
        if let Some((p, why)) = thaw.as_mut() {
            match attempt(p, &retry, "thawing the guest", say, &mut || conn.call(|hv| thaw_confirmed(hv, uuid))) {
                Outcome::Done => {
                    say(&format!("{why}: thawed it"));
                    thaw = None;
                }
                Outcome::GaveUp => thaw = None,
                Outcome::Again => {}
            }
        }
        if let Some((p, why)) = resume.as_mut() {
            match attempt(p, &retry, "resuming the VM", say, &mut || conn.call(|hv| resume_confirmed(hv, uuid))) {
                Outcome::Done => {
                    say(&format!("{why}: resumed it"));
                    resume = None;
                }
                Outcome::GaveUp => resume = None,
                Outcome::Again => {}
            }
        }
        if let Some(p) = end_job.as_mut() {
            match end_own_job(&mut conn, uuid, &our_socket, p, &retry, say) {
                Outcome::Again => {}
                Outcome::Done | Outcome::GaveUp => end_job = None,
            }
        }
        if gone && thaw.is_none() && resume.is_none() && end_job.is_none() {
            return;
        }
    }
}

/// Thaws the guest. A thaw that failed may still have left it thawed (someone else thawed it, the
/// reply was lost): then the guest's own freeze status says so, and that is success. A guest that
/// no longer runs has nothing frozen.
pub fn thaw_confirmed(hv: &dyn Hypervisor, uuid: &str) -> Result<()> {
    let Err(e) = hv.thaw(uuid) else { return Ok(()) };
    if hv.freeze_status(uuid).is_ok_and(|s| s == "thawed") || not_running(hv, uuid) {
        return Ok(());
    }
    Err(e)
}

/// Resumes the VM. A resume that failed may still find it running (resumed by someone else, or
/// the reply was lost): then it is done. A VM that was shut off or crashed has nothing to resume.
pub fn resume_confirmed(hv: &dyn Hypervisor, uuid: &str) -> Result<()> {
    let Err(e) = hv.resume(uuid) else { return Ok(()) };
    if hv.state(uuid).is_ok_and(|s| s == crate::VmState::Running) || not_running(hv, uuid) {
        return Ok(());
    }
    Err(e)
}

/// Shut off, crashed, or no longer defined at all (undefined while we guarded it): nothing of it
/// is frozen, paused or backed up.
fn not_running(hv: &dyn Hypervisor, uuid: &str) -> bool {
    match hv.state(uuid) {
        Ok(s) => matches!(s, crate::VmState::ShutOff | crate::VmState::Crashed),
        Err(e) => e.is::<crate::NoSuchVm>(),
    }
}

/// Ends the dead job's backup job, recognised by its socket's name. The job may have died while
/// its request to start one was in flight: the hypervisor can still complete it after we look, so
/// keep looking for a while.
fn end_own_job(
    conn: &mut Conn,
    uuid: &str,
    our_socket: &str,
    p: &mut Pending,
    retry: &Retry,
    say: &dyn Fn(&str),
) -> Outcome {
    if Instant::now() < p.next {
        return Outcome::Again;
    }
    match conn.call(|hv| hv.running_backup(uuid)) {
        Ok(Some(socket)) if socket.file_name().is_some_and(|n| n == our_socket) => {
            let mut end = || conn.call(|hv| hv.end_backup(uuid));
            match attempt(p, retry, "ending the backup job", say, &mut end) {
                Outcome::Done => {
                    say("ended the backup job the backup process left");
                    Outcome::Done
                }
                other => other,
            }
        }
        Ok(Some(_)) => Outcome::Done, // someone else's job (another run's)
        Ok(None) if p.since.elapsed() < retry.job_search => {
            p.next = Instant::now() + Duration::from_millis(200);
            Outcome::Again
        }
        Ok(None) => Outcome::Done,
        // Undefined: its job went with it.
        Err(e) if e.is::<crate::NoSuchVm>() => {
            say("the VM is no longer defined: no backup job left to end");
            Outcome::Done
        }
        Err(e) => {
            let mut fail = || Err(anyhow::anyhow!("{e:#}"));
            attempt(p, retry, "looking for the backup job", say, &mut fail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Fake, Handle};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    fn fast() -> Retry {
        Retry {
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(50),
            give_up: Duration::from_secs(5),
            job_search: Duration::from_millis(300),
            silence: Duration::from_millis(400),
        }
    }

    /// Runs the watchdog on a thread over `fake`; returns the sender of its lines and its thread.
    fn start(
        fake: &Arc<Fake>,
        limit: Duration,
        token: &str,
        connects: Arc<Mutex<u32>>,
    ) -> (mpsc::Sender<Option<String>>, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let (fake, token) = (fake.clone(), token.to_string());
        let t = std::thread::spawn(move || {
            let connect = move || -> Result<Box<dyn Hypervisor>> {
                *connects.lock().unwrap() += 1;
                Ok(Box::new(Handle(fake.clone())))
            };
            guard(&connect, None, "vm", limit, &token, &rx, fast(), &|m| eprintln!("watchdog: {m}"));
        });
        (tx, t)
    }

    fn send(tx: &mpsc::Sender<Option<String>>, w: &str) {
        tx.send(Some(w.to_string())).unwrap();
    }

    #[test]
    fn a_thaw_that_fails_is_retried_on_a_new_connection_until_it_works() {
        let fake = Arc::new(Fake::default());
        *fake.thaw_failures.lock().unwrap() = 2;
        *fake.frozen.lock().unwrap() = true;
        let connects = Arc::new(Mutex::new(0));
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", connects.clone());
        send(&tx, "frozen");
        drop(tx); // the job dies while the guest is frozen
        t.join().unwrap();
        assert_eq!(fake.count("thaw"), 3, "two failures, then the thaw that worked");
        assert!(!*fake.frozen.lock().unwrap(), "still frozen");
        // One connection for the first try, a new one after each failure.
        assert_eq!(*connects.lock().unwrap(), 3);
    }

    #[test]
    fn a_vm_undefined_under_its_watchdog_ends_the_watch_at_once() {
        // The job died with the guest frozen and its backup job running, and the VM was
        // undefined meanwhile: nothing is left to thaw or end. Before, the watchdog retried
        // until it gave up (15 minutes in production).
        let fake = Arc::new(Fake::default());
        *fake.frozen.lock().unwrap() = true;
        *fake.job_socket.lock().unwrap() = Some(PathBuf::from(format!("/w/{}", crate::job_socket_name("tok"))));
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        for w in ["job", "frozen"] {
            send(&tx, w);
        }
        *fake.gone.lock().unwrap() = true;
        let t0 = Instant::now();
        drop(tx);
        t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "the watchdog of a VM gone took {:?}", t0.elapsed());
    }

    #[test]
    fn a_job_that_said_alive_and_falls_silent_is_gone() {
        // Cut off (its input open, nothing on it): thawed and its backup job ended, long before
        // the limit. A job that never said "alive" (an older writer) is not timed out.
        let fake = Arc::new(Fake::default());
        *fake.frozen.lock().unwrap() = true;
        *fake.job_socket.lock().unwrap() = Some(PathBuf::from(format!("/w/{}", crate::job_socket_name("tok"))));
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        for w in ["alive", "job", "frozen"] {
            send(&tx, w);
        }
        let t0 = Instant::now();
        t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        assert!(!*fake.frozen.lock().unwrap(), "still frozen");
        assert!(fake.job_socket.lock().unwrap().is_none(), "the backup job still runs");
        drop(tx);

        let fake = Arc::new(Fake::default());
        *fake.frozen.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "frozen");
        std::thread::sleep(Duration::from_millis(1000));
        assert!(*fake.frozen.lock().unwrap(), "thawed by silence without a heartbeat");
        drop(tx);
        t.join().unwrap();
    }

    #[test]
    fn the_limit_thaws_while_the_job_still_runs_and_retries() {
        let fake = Arc::new(Fake::default());
        *fake.thaw_failures.lock().unwrap() = 2;
        *fake.frozen.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_millis(200), "tok", Arc::new(Mutex::new(0)));
        let t0 = Instant::now();
        send(&tx, "frozen");
        while *fake.frozen.lock().unwrap() {
            assert!(t0.elapsed() < Duration::from_secs(3), "not thawed 3 s after a 0.2 s limit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(t0.elapsed() >= Duration::from_millis(200), "thawed before the limit");
        assert_eq!(fake.count("thaw"), 3);
        // The job thaws too, then is done: nothing more happens.
        send(&tx, "thawed");
        send(&tx, "done");
        t.join().unwrap();
        assert_eq!(fake.count("thaw"), 3);
    }

    #[test]
    fn a_resume_refused_during_a_memory_save_is_retried_not_given_up() {
        let fake = Arc::new(Fake::default());
        // libvirt refuses while it writes the memory state: say, for 10 attempts.
        *fake.resume_failures.lock().unwrap() = 10;
        *fake.paused.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_millis(100), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "paused");
        let t0 = Instant::now();
        while fake.count("resume") < 11 {
            assert!(t0.elapsed() < Duration::from_secs(4), "resume attempts stopped at {}", fake.count("resume"));
            std::thread::sleep(Duration::from_millis(10));
        }
        send(&tx, "resumed");
        send(&tx, "done");
        t.join().unwrap();
        assert_eq!(fake.count("resume"), 11);
    }

    #[test]
    fn only_the_job_with_this_runs_token_is_ended() {
        // Another run's job (a later run in the same folder): left alone.
        let fake = Arc::new(Fake::default());
        *fake.job_socket.lock().unwrap() = Some(PathBuf::from("/w/vm/").join(crate::job_socket_name("other")));
        let (tx, t) = start(&fake, Duration::from_secs(60), "mine", Arc::new(Mutex::new(0)));
        send(&tx, "job");
        drop(tx);
        t.join().unwrap();
        assert_eq!(fake.count("end_backup"), 0);
        // Our own job, which appears a moment after the job died (its request was in flight).
        let fake = Arc::new(Fake::default());
        let (tx, t) = start(&fake, Duration::from_secs(60), "mine", Arc::new(Mutex::new(0)));
        send(&tx, "job");
        drop(tx);
        std::thread::sleep(Duration::from_millis(100));
        *fake.job_socket.lock().unwrap() = Some(PathBuf::from("/w/vm/").join(crate::job_socket_name("mine")));
        t.join().unwrap();
        assert_eq!(fake.count("end_backup"), 1);
    }

    #[test]
    fn the_command_runs_in_a_systemd_scope_where_systemd_runs() {
        let args = vec!["watchdog".to_string(), "--vm".into(), "x".into()];
        let direct = command(Path::new("/usr/bin/cairn"), &args, None, false);
        assert_eq!(direct.get_program(), "/usr/bin/cairn");
        assert_eq!(direct.get_args().collect::<Vec<_>>(), ["watchdog", "--vm", "x"]);
        let scoped = command(Path::new("/usr/bin/cairn"), &args, Some(Path::new("/usr/bin/systemd-run")), false);
        assert_eq!(scoped.get_program(), "/usr/bin/systemd-run");
        let a: Vec<_> = scoped.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(a[0], "--scope");
        assert_eq!(&a[a.len() - 4..], ["/usr/bin/cairn", "watchdog", "--vm", "x"]);
        // Not root: the user's own manager (the system one refuses a scope to other users).
        let user = command(Path::new("/usr/bin/cairn"), &args, Some(Path::new("/usr/bin/systemd-run")), true);
        let a: Vec<_> = user.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&a[..2], ["--user", "--scope"]);
        // This host has no systemd: the fallback (a direct child) is what runs here.
        if !Path::new("/run/systemd/system").is_dir() {
            assert!(systemd_run().is_none());
        }
    }

    /// A folder with an executable script `name` in it.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn a_systemd_run_that_cannot_make_a_scope_falls_back_to_a_plain_child() {
        let t = tempfile::tempdir().unwrap();
        // The watchdog: says ready, then records each line it gets until "done".
        let log = t.path().join("lines");
        let dog = script(
            t.path(),
            "dog",
            &format!(
                "echo ready; while read l; do echo \"$l\" >> {}; [ \"$l\" = done ] && exit 0; done",
                log.display()
            ),
        );
        // A systemd-run as in a container without D-Bus: it fails before running anything.
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        script(&bin, "systemd-run", "echo 'Failed to connect to bus: No such file or directory' >&2; exit 1");
        let found = find_in_path(&std::env::join_paths([&bin, Path::new("/usr/bin")]).unwrap(), "systemd-run");
        let sr = found.expect("the fake systemd-run on PATH is found");
        let mut w = Watchdog::start_with(&dog, &[], Some(&sr)).unwrap();
        assert!(w.mode().starts_with("as a plain child process"), "{}", w.mode());
        assert!(w.mode().contains("exited"), "{}", w.mode());
        w.tell(Guard::Frozen).unwrap();
        w.done();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "frozen\ndone\n");
        // One that works (runs the program in place): the watchdog runs in its scope.
        script(&bin, "systemd-run", "while [ \"${1#--}\" != \"$1\" ]; do shift; done; exec \"$@\"");
        std::fs::remove_file(&log).unwrap();
        let w = Watchdog::start_with(&dog, &[], Some(&sr)).unwrap();
        assert!(w.mode().contains("systemd") && w.mode().contains("scope"), "{}", w.mode());
        w.done();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "done\n");
        // A watchdog that cannot start at all is an error, not a backup without a guard.
        let dead = script(t.path(), "dead", "exit 3");
        let e = Watchdog::start_with(&dead, &[], Some(&sr)).err().unwrap().to_string();
        assert!(e.contains("did not start"), "{e}");
    }

    #[test]
    fn a_failed_undo_that_still_happened_counts_as_done() {
        // The thaw call fails, but the guest is thawed (its reply was lost): no retries for 5 s.
        let fake = Arc::new(Fake::default());
        *fake.frozen.lock().unwrap() = true;
        *fake.thaw_failures.lock().unwrap() = 1;
        *fake.thaw_fails_after_thawing.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "frozen");
        drop(tx);
        t.join().unwrap();
        assert_eq!(fake.count("thaw"), 1, "a thaw that happened was retried");
        assert!(!*fake.frozen.lock().unwrap());
        // A resume refused because the VM already runs: done, not retried for 15 minutes.
        let fake = Arc::new(Fake::default());
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "paused");
        drop(tx);
        t.join().unwrap();
        assert_eq!(fake.count("resume"), 1);
    }

    #[test]
    fn the_limit_does_not_count_while_the_memory_is_saved() {
        let fake = Arc::new(Fake::default());
        *fake.paused.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_millis(200), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "paused");
        send(&tx, "saving");
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(fake.count("resume"), 0, "resumed during the save");
        // The save is over: the limit counts again, from now.
        send(&tx, "paused");
        let t0 = Instant::now();
        while fake.count("resume") == 0 {
            assert!(t0.elapsed() < Duration::from_secs(3), "not resumed after the limit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(t0.elapsed() >= Duration::from_millis(150), "resumed before the limit");
        send(&tx, "done");
        t.join().unwrap();
        // The job dies during the save: the VM is resumed (retried until the save is over).
        let fake = Arc::new(Fake::default());
        *fake.paused.lock().unwrap() = true;
        let (tx, t) = start(&fake, Duration::from_secs(60), "tok", Arc::new(Mutex::new(0)));
        send(&tx, "saving");
        drop(tx);
        t.join().unwrap();
        assert!(!*fake.paused.lock().unwrap());
    }
}
