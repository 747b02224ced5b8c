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
//!   (`systemd-run --scope`), outside the job's cgroup: stopping or OOM-killing the job's service
//!   does not take it down with the job.
//! - Another run: it ends only the backup job whose NBD socket carries its run's token
//!   ([`crate::job_socket_name`]), never a job a later run started in the same folder.

use crate::Hypervisor;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the job is about to do or has undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Frozen,
    Thawed,
    Paused,
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
            Guard::Resumed => "resumed",
            Guard::Job => "job",
            Guard::JobEnded => "job-ended",
        }
    }
}

/// The job's side: a handle on the watchdog process.
pub struct Watchdog {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// The systemd tool that starts a process in a scope of its own, when systemd runs this host.
fn systemd_run() -> Option<std::path::PathBuf> {
    // sd_booted(): systemd is the init system iff this folder exists.
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join("systemd-run")).find(|p| p.is_file())
}

/// How the watchdog process is started: `program args` directly, or, where systemd runs, through
/// `systemd-run --scope` so that it lives in a cgroup of its own (a `systemctl stop`, a stop
/// timeout or an OOM kill of the job's service then spares it). `systemd-run --scope` executes the
/// program in place, so it stays our child with our pipes.
pub fn command(program: &Path, args: &[String], systemd_run: Option<&Path>) -> Command {
    let mut cmd = match systemd_run {
        Some(sr) => {
            let mut c = Command::new(sr);
            c.args(["--scope", "--quiet", "--collect", "--description=cairn watchdog"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args);
    // The repository password is none of its business (and would sit in /proc/PID/environ).
    cmd.env_remove("CAIRN_PASSWORD");
    cmd
}

/// [`command`] with systemd's scope when systemd runs this host.
pub fn host_command(program: &Path, args: &[String]) -> Command {
    command(program, args, systemd_run().as_deref())
}

impl Watchdog {
    /// Starts `cmd` (a program that calls [`run`]; see [`host_command`]) and waits until it is
    /// connected and ready.
    pub fn spawn(mut cmd: Command) -> Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().context("starting the watchdog process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("watchdog stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => Ok(Watchdog { child: Some(child), stdin }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the watchdog process did not start (it guards the guest while it is frozen or paused); the backup did not touch the VM")
            }
        }
    }

    /// A watchdog that guards nothing (for callers that do not freeze or pause, and tests).
    pub fn none() -> Watchdog {
        Watchdog { child: None, stdin: None }
    }

    pub fn tell(&mut self, g: Guard) -> Result<()> {
        if let Some(s) = self.stdin.as_mut() {
            writeln!(s, "{}", g.word()).and_then(|_| s.flush()).context("the watchdog process is gone")?;
        }
        Ok(())
    }

    /// The job is over and left nothing to undo: the watchdog exits without acting.
    pub fn done(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "done");
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
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            give_up: Duration::from_secs(15 * 60),
            job_search: Duration::from_secs(10),
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
    println!("ready");
    std::io::stdout().flush()?;
    let say = |m: &str| eprintln!("cairn watchdog ({uuid}): {m}");
    guard(connect, Some(first), uuid, limit, job_token, &rx, Retry::default(), &say);
    Ok(())
}

/// SIGTERM, SIGHUP and SIGINT sent to the job (or its whole group, or service) must not stop the
/// one process that undoes what the job did; it ends when its stdin closes and all is undone.
fn ignore_termination_signals() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
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
    let mut job = false;
    let mut thaw: Option<(Pending, String)> = None;
    let mut resume: Option<(Pending, String)> = None;
    let mut end_job: Option<Pending> = None;
    let mut gone = false;
    let our_socket = crate::job_socket_name(job_token);
    loop {
        if !gone {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(l)) => match l.trim() {
                    // A new mark replaces any undo still pending for the old one.
                    "frozen" => (frozen, thaw) = (Some(Instant::now()), None),
                    "thawed" => (frozen, thaw) = (None, None),
                    "paused" => (paused, resume) = (Some(Instant::now()), None),
                    "resumed" => (paused, resume) = (None, None),
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
        if paused.is_some_and(|t| t.elapsed() > limit) {
            // While libvirt writes a memory state it refuses a resume: keep trying, the save ends.
            paused = None;
            resume = Some((Pending::now(), format!("the VM stayed paused longer than {} s", limit.as_secs_f64())));
        }
        // The guest first, then the job.
        if let Some((p, why)) = thaw.as_mut() {
            match attempt(p, &retry, "thawing the guest", say, &mut || conn.call(|hv| hv.thaw(uuid)).map(|_| ())) {
                Outcome::Done => {
                    say(&format!("{why}: thawed it"));
                    thaw = None;
                }
                Outcome::GaveUp => thaw = None,
                Outcome::Again => {}
            }
        }
        if let Some((p, why)) = resume.as_mut() {
            match attempt(p, &retry, "resuming the VM", say, &mut || conn.call(|hv| hv.resume(uuid))) {
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
        let direct = command(Path::new("/usr/bin/cairn"), &args, None);
        assert_eq!(direct.get_program(), "/usr/bin/cairn");
        assert_eq!(direct.get_args().collect::<Vec<_>>(), ["watchdog", "--vm", "x"]);
        let scoped = command(Path::new("/usr/bin/cairn"), &args, Some(Path::new("/usr/bin/systemd-run")));
        assert_eq!(scoped.get_program(), "/usr/bin/systemd-run");
        let a: Vec<_> = scoped.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(a[0], "--scope");
        assert_eq!(&a[a.len() - 4..], ["/usr/bin/cairn", "watchdog", "--vm", "x"]);
        // This host has no systemd: the fallback (a direct child) is what runs here.
        if !Path::new("/run/systemd/system").is_dir() {
            assert!(systemd_run().is_none());
        }
        for c in [&direct, &scoped] {
            assert!(c.get_envs().any(|(k, v)| k == "CAIRN_PASSWORD" && v.is_none()), "password not removed");
        }
    }
}
