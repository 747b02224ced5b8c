//! The watchdog: a separate process that undoes what a backup did to a guest if the backup
//! process dies or hangs.
//!
//! The backup job tells it, before acting, what it is about to do ("frozen", "paused", "job") and
//! when it undid it ("thawed", "resumed", "job-ended"), one line each on the watchdog's stdin. The
//! watchdog thaws a guest frozen longer than its limit or resumes one paused longer than it,
//! even while the job runs. When its stdin closes without "done" (the job was killed, even with
//! SIGKILL), it thaws, resumes and ends the backup job at once. It runs in its own process group,
//! so the Ctrl-C that stops the job does not stop it.

use crate::Hypervisor;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Ends the dead job's backup job. The job may have died while its request to start one was in
/// flight: the hypervisor can still complete it after we look, so keep looking for a while.
fn end_own_job(hv: &dyn Hypervisor, uuid: &str, job_dir: &Path, say: &dyn Fn(&str)) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        match hv.running_backup(uuid) {
            Ok(Some(socket)) if socket.starts_with(job_dir) => {
                match hv.end_backup(uuid) {
                    Ok(()) => say("ended the backup job the backup process left"),
                    Err(e) => say(&format!("ending the backup job: {e}")),
                }
                return;
            }
            Ok(Some(_)) => return, // someone else's job
            Ok(None) | Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

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

impl Watchdog {
    /// Starts `cmd` (a program that calls [`run`]) and waits until it is connected and ready.
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

/// The watchdog process's main loop: reads guards from stdin, acts on `uuid` through `hv`.
/// Prints "ready" on stdout first. Returns when the job says "done" or goes away. Backup jobs
/// whose NBD socket lies under `job_dir` are the job's own.
pub fn run(hv: &dyn Hypervisor, uuid: &str, limit: Duration, job_dir: &Path) -> Result<()> {
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
    let mut frozen: Option<Instant> = None;
    let mut paused: Option<Instant> = None;
    let mut job = false;
    let say = |m: &str| eprintln!("cairn watchdog ({uuid}): {m}");
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(l)) => match l.trim() {
                "frozen" => frozen = Some(Instant::now()),
                "thawed" => frozen = None,
                "paused" => paused = Some(Instant::now()),
                "resumed" => paused = None,
                "job" => job = true,
                "job-ended" => job = false,
                "done" => return Ok(()),
                other => say(&format!("unknown word {other:?} ignored")),
            },
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The job died: undo everything it had marked.
                if frozen.is_some() {
                    match hv.thaw(uuid) {
                        Ok(_) => say("the backup process went away while the guest was frozen: thawed it"),
                        Err(e) => say(&format!("thawing after the backup process went away: {e}")),
                    }
                }
                if paused.is_some() {
                    match hv.resume(uuid) {
                        Ok(_) => say("the backup process went away while the VM was paused: resumed it"),
                        Err(e) => say(&format!("resuming after the backup process went away: {e}")),
                    }
                }
                if job {
                    end_own_job(hv, uuid, job_dir, &say);
                }
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if frozen.is_some_and(|t| t.elapsed() > limit) {
            frozen = None;
            match hv.thaw(uuid) {
                Ok(_) => say(&format!("the guest stayed frozen longer than {} s: thawed it", limit.as_secs())),
                Err(e) => say(&format!("thawing after {} s: {e}", limit.as_secs())),
            }
        }
        if paused.is_some_and(|t| t.elapsed() > limit) {
            paused = None;
            match hv.resume(uuid) {
                Ok(_) => say(&format!("the VM stayed paused longer than {} s: resumed it", limit.as_secs())),
                Err(e) => say(&format!("resuming after {} s: {e}", limit.as_secs())),
            }
        }
    }
}
