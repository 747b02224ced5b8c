//! Helper processes an operation starts: a detached NBD server of a restore point (instant
//! recovery, boot checks), which must outlive the operation; and the watchdog of a VM backup,
//! which must outlive a killed backup. [`Helpers`] is the boundary; [`ExeHelpers`] runs them by
//! starting a cairn binary again with its helper commands:
//!
//! - `EXE serve-nbd NAME@ID --socket PATH --repo LOCATION` listens on PATH once it serves;
//! - `EXE watchdog --connect URI --vm UUID --limit SECONDS --job-token TOKEN` runs
//!   [`cairn_hypervisor::watchdog::run`], on the VM's host: for a VM of another host, the cairn
//!   installed there, over SSH ([`HostAccess::command_on_host`]), so that it guards the guest
//!   even if the network between the two machines goes away.
//!
//! The repository's password goes to a helper on an inherited pipe ([`PASSWORD_FD_ENV`]),
//! never in its environment, where it would sit in /proc/PID/environ for the helper's life.

use anyhow::{bail, Context, Result};
use cairn_hypervisor::watchdog::Watchdog;
use cairn_vm::host::HostAccess;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Processes an operation starts and does not wait for.
pub trait Helpers: Send + Sync {
    /// Starts a detached NBD server of restore point `point` (`NAME@ID`) on unix socket `socket`;
    /// returns its PID once it listens. It outlives the caller (its own process group) and is
    /// stopped by whoever uses it.
    fn start_nbd_server(&self, point: &str, socket: &Path) -> Result<u32>;
    /// Starts the watchdog of VM `uuid` at hypervisor `uri` of `host`, on that host: it thaws or
    /// resumes the guest if it stays frozen or paused longer than `limit`, and ends the backup
    /// job named by `job_token` if the backup dies.
    fn start_watchdog(
        &self,
        host: &dyn HostAccess,
        uri: &str,
        uuid: &str,
        limit: Duration,
        job_token: &str,
    ) -> Result<Watchdog>;
}

/// The environment variable naming an inherited file descriptor the repository password can be
/// read from (once, to its end).
pub const PASSWORD_FD_ENV: &str = "CAIRN_PASSWORD_FD";

/// [`Helpers`] run as `exe`'s helper commands, on repository `repo` (a location a child can
/// open: an absolute path or a URL), with `password` if the repository needs one.
pub struct ExeHelpers {
    pub exe: PathBuf,
    pub repo: PathBuf,
    pub password: Option<String>,
}

impl Helpers for ExeHelpers {
    fn start_nbd_server(&self, point: &str, socket: &Path) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(socket.with_extension("log"))?;
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(["serve-nbd", point, "--socket"]).arg(socket).arg("--repo").arg(&self.repo);
        let pipe = match &self.password {
            Some(p) => Some(pass_password(&mut cmd, p)?),
            None => None,
        };
        cmd.process_group(0).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let spawned = cmd.spawn().context("starting the NBD server");
        drop(pipe); // the child has its copy
        let mut child = spawned?;
        let t = std::time::Instant::now();
        while !socket.exists() {
            if let Some(st) = child.try_wait()? {
                bail!("the NBD server exited ({st}); see {}", socket.with_extension("log").display());
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("the NBD server did not start listening in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.id())
    }

    fn start_watchdog(
        &self,
        host: &dyn HostAccess,
        uri: &str,
        uuid: &str,
        limit: Duration,
        job_token: &str,
    ) -> Result<Watchdog> {
        let args: Vec<String> = vec![
            "watchdog".into(),
            "--connect".into(),
            host.uri_on_host(uri),
            "--vm".into(),
            uuid.into(),
            "--limit".into(),
            limit.as_secs().max(1).to_string(),
            "--job-token".into(),
            job_token.into(),
        ];
        match host.command_on_host(&args) {
            Some((program, args)) => Watchdog::start(&program, &args).with_context(|| {
                format!("starting the watchdog on {} (it runs there, next to the guest)", host.name())
            }),
            None => Watchdog::start(&self.exe, &args),
        }
    }
}

/// The password passed through [`PASSWORD_FD_ENV`] to this process, if any (read once).
pub fn password_from_fd() -> Option<String> {
    static READ: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    READ.get_or_init(|| {
        use std::io::Read;
        use std::os::unix::io::FromRawFd;
        let fd: i32 = std::env::var(PASSWORD_FD_ENV).ok()?.parse().ok()?;
        // Never stdin/stdout/stderr, and only an open descriptor: File takes it over and closes it.
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        let mut p = String::new();
        // SAFETY: the descriptor is open (checked above) and handed to us alone by our parent.
        unsafe { std::fs::File::from_raw_fd(fd) }.read_to_string(&mut p).ok()?;
        Some(p)
    })
    .clone()
}

/// Gives `cmd` the password on descriptor 3 through a pipe ([`PASSWORD_FD_ENV`]); returns the
/// read end to close once the child started.
fn pass_password(cmd: &mut std::process::Command, password: &str) -> Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe for the password");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A pipe holds 64 KiB: the write completes before the child reads.
    std::fs::File::from(write).write_all(password.as_bytes()).context("writing the password to its pipe")?;
    let r = fds[0];
    cmd.env(PASSWORD_FD_ENV, "3");
    // SAFETY: the closure only calls async-signal-safe functions (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; if it already is 3, clear it by hand.
            if r == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(r, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    Ok(read)
}
