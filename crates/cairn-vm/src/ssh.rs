//! A hypervisor host reached over SSH: the [`HostAccess`] of a VM on another machine.
//!
//! libvirt's `qemu+ssh://[USER@]HOST[:PORT]/PATH` URIs already make an operator set up SSH from
//! the repository's machine to every host; cairn uses the same connection for the data. One
//! OpenSSH master connection per worker of a run (`ssh -M`, a control socket in a private folder)
//! carries everything:
//! - commands of `cairn host ...` run on the host (the same binary installed there): prepare the
//!   work folder, serve a file through qemu-nbd, stat or remove a file, and the VM's watchdog,
//!   which thus runs next to the guest and thaws it even if the network between the two
//!   machines goes away;
//! - NBD exports on the host (libvirt's backup job, or `cairn host serve-image`) forwarded to a
//!   Unix socket here (`ssh -O forward -L LOCAL:REMOTE`), read by the same NBD client as a local
//!   export. Only the blocks a backup reads cross the network, inside SSH's encryption.
//!
//! The repository is never opened on the host: no repository password or key goes there.
//! The URI's `keyfile=`, `known_hosts=` and `no_verify=1` parameters mean what they mean to
//! libvirt; SSH runs in batch mode (a host that asks for a password is an error, not a prompt).

use crate::host::{FileStat, HostAccess, HostLock, PathKind, SocketLink};
use anyhow::{anyhow, bail, Context, Result};
use cairn_engine::ranges::Range;
use cairn_engine::source::{dies_with_us, nbd_runtime, ImageFormat, NbdSource, Source};
use cairn_engine::target::{NbdImage, Target, TargetFormat};
use cairn_nbd::{NbdAddress, Transport};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where and how to reach a host over SSH, read from a libvirt URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// `HOST` or `USER@HOST`.
    pub destination: String,
    /// Options for `ssh`, before the destination.
    pub options: Vec<String>,
    /// The URI that reaches the same hypervisor from the host itself (`qemu:///system`).
    pub uri_on_host: String,
}

/// The URI names another machine, but not over SSH: cairn has no way to move its data.
#[derive(Debug, thiserror::Error)]
#[error(
    "{uri} reaches its host over {transport}: VM backups and restores on another host need a qemu+ssh:// URI \
     (their data travels over SSH, with cairn installed on the host)"
)]
pub struct NotSsh {
    pub uri: String,
    pub transport: String,
}

impl SshTarget {
    /// The SSH target of a libvirt URI: none for a URI of this machine (`qemu:///system`,
    /// `qemu+unix:///system`, `test:///...`); an error for another machine over TCP or TLS.
    pub fn from_uri(uri: &str) -> Result<Option<SshTarget>> {
        let parsed = url::Url::parse(uri).with_context(|| format!("{uri:?} is not a hypervisor URI"))?;
        let (driver, transport) = parsed.scheme().split_once('+').unwrap_or((parsed.scheme(), ""));
        let host = parsed.host_str().unwrap_or("");
        if host.is_empty() || transport == "unix" {
            return Ok(None);
        }
        if transport != "ssh" {
            let transport = if transport.is_empty() { "tls".to_string() } else { transport.to_string() };
            return Err(NotSsh { uri: uri.to_string(), transport }.into());
        }
        let mut options = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=15".into(),
            // A dead link is noticed in 15 s, not after TCP's minutes.
            "-o".into(),
            "ServerAliveInterval=5".into(),
            "-o".into(),
            "ServerAliveCountMax=3".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ];
        if let Some(port) = parsed.port() {
            options.extend(["-p".into(), port.to_string()]);
        }
        for (k, v) in parsed.query_pairs() {
            match &*k {
                "keyfile" => options.extend(["-i".into(), v.into_owned()]),
                "known_hosts" => options.extend(["-o".into(), format!("UserKnownHostsFile={v}")]),
                "no_verify" if v != "0" => options.extend(["-o".into(), "StrictHostKeyChecking=no".into()]),
                _ => {}
            }
        }
        // An IPv6 address comes bracketed in a URI, bare to ssh.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let user = parsed.username();
        if host.starts_with('-') || user.starts_with('-') {
            bail!("{uri:?}: a host or user name cannot start with '-'");
        }
        let destination = match user {
            "" => host.to_string(),
            user => format!("{user}@{host}"),
        };
        let uri_on_host = format!("{driver}://{}", parsed.path());
        Ok(Some(SshTarget { destination, options, uri_on_host }))
    }
}

/// How long a short command on a host (`cairn host stat`, `prepare`, ...) may take.
pub const HOST_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Quotes `s` for the host's shell (OpenSSH hands the remote command to it as one string).
/// shlex refuses only a NUL byte: such an argument is kept as it is, and starting the command
/// then fails (no process argument can hold one), rather than being passed on altered.
fn quote(s: &str) -> String {
    shlex::try_quote(s).map(|q| q.into_owned()).unwrap_or_else(|_| s.to_string())
}

/// One host over one SSH master connection (a worker of a run holds one: see
/// `cairn_ops::vm_backup::backup_vms`).
pub struct SshHost {
    target: SshTarget,
    /// The cairn binary on the host.
    cairn: String,
    work_dir: PathBuf,
    /// Our private folder here: the control socket and the forwarded sockets.
    dir: tempfile::TempDir,
    master: Child,
    forwards: AtomicU64,
}

impl SshHost {
    /// Opens the master connection to `target` and checks that `cairn` runs on the host.
    /// `work_dir` is the folder on the host for the hypervisor's sockets and scratch files.
    pub fn connect(target: SshTarget, cairn: &str, work_dir: &Path) -> Result<SshHost> {
        let dir = tempfile::Builder::new().prefix("cairn-ssh-").tempdir().context("creating a folder for SSH")?;
        let control = dir.path().join("control");
        let mut cmd = Command::new("ssh");
        cmd.args(&target.options)
            .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
            .arg(&control)
            .arg("--")
            .arg(&target.destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        dies_with_us(&mut cmd);
        let mut master = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow!("ssh is needed to reach {}: install it (Debian: openssh-client)", target.destination)
            }
            _ => anyhow::Error::new(e).context("starting ssh"),
        })?;
        let t = Instant::now();
        loop {
            if let Some(st) = master.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = master.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("cannot reach {} over SSH ({st}): {}", target.destination, err.trim());
            }
            if control.exists() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = master.kill();
                bail!("no SSH connection to {} within 30 s", target.destination);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let host = SshHost {
            target,
            cairn: cairn.to_string(),
            work_dir: work_dir.to_path_buf(),
            dir,
            master,
            forwards: AtomicU64::new(0),
        };
        let version = host.cairn_output(&["--version".into()]).map_err(|e| {
            anyhow!(
                "cairn does not run on {} as {:?} ({e:#}): install the same cairn binary there, or name it in the \
                 host configuration ([hosts] remote_cairn = PATH); the host's side of a backup runs it",
                host.target.destination,
                host.cairn
            )
        })?;
        let ours = format!("cairn {}", env!("CARGO_PKG_VERSION"));
        if version.trim() != ours {
            bail!(
                "{} runs {} and this machine {ours}: install the same version on both",
                host.target.destination,
                version.trim()
            );
        }
        Ok(host)
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("control")
    }

    /// `ssh` over the master connection.
    fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(&self.target.options).arg("-S").arg(self.control());
        cmd
    }

    /// `ssh DEST -- CAIRN ARGS`, quoted for the host's shell.
    fn cairn_command(&self, args: &[String]) -> Command {
        let mut cmd = self.ssh();
        cmd.arg("--").arg(&self.target.destination).arg(self.remote_line(args));
        cmd
    }

    fn remote_line(&self, args: &[String]) -> String {
        std::iter::once(&self.cairn).chain(args).map(|a| quote(a)).collect::<Vec<_>>().join(" ")
    }

    /// Ends `cairn ARGS` on the host (its `ssh`), which did not answer within
    /// [`HOST_COMMAND_TIMEOUT`]; the error that says so.
    fn gave_up(&self, child: &mut Child, args: &[String]) -> anyhow::Error {
        let _ = child.kill();
        let _ = child.wait();
        anyhow!(
            "no answer from {} within {} s to `cairn {}`",
            self.target.destination,
            HOST_COMMAND_TIMEOUT.as_secs(),
            args.join(" ")
        )
    }

    /// Runs `cairn ARGS` on the host; its standard output, or its error message. A command that
    /// has not answered within [`HOST_COMMAND_TIMEOUT`] (a hung file system on the host, while
    /// the link itself is up) is ended, and that is its error.
    fn cairn_output(&self, args: &[String]) -> Result<String> {
        let mut cmd = self.cairn_command(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        dies_with_us(&mut cmd);
        let mut child = cmd.spawn().context("running ssh")?;
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t.elapsed() > HOST_COMMAND_TIMEOUT {
                return Err(self.gave_up(&mut child, args));
            }
            // Most commands answer within milliseconds; then no need to look often.
            std::thread::sleep(Duration::from_millis(if t.elapsed() < Duration::from_millis(200) { 2 } else { 50 }));
        };
        let out = std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!("{} ({})", err.trim(), out.status);
        }
        String::from_utf8(out.stdout).context("the host's answer is not text")
    }

    /// Forwards the Unix socket `remote` of the host to a new socket here, for as long as the
    /// returned [`Forward`] lives.
    fn forward_while(&self, remote: &Path) -> Result<Forward> {
        let local = self.forward(remote)?;
        let spec = format!("{}:{}", local.display(), remote.display());
        let mut cancel: Vec<String> = self.target.options.clone();
        cancel.extend(["-S".into(), self.control().display().to_string(), "-O".into(), "cancel".into()]);
        cancel.extend(["-L".into(), spec, "--".into(), self.target.destination.clone()]);
        Ok(Forward { local, cancel })
    }

    /// Forwards the Unix socket `remote` of the host to a new socket here, until the connection
    /// ends; returns its path.
    fn forward(&self, remote: &Path) -> Result<PathBuf> {
        let n = self.forwards.fetch_add(1, Ordering::Relaxed);
        let local = self.dir.path().join(format!("fwd-{n}.sock"));
        let spec = format!("{}:{}", local.display(), remote.display());
        let out = self
            .ssh()
            .args(["-O", "forward", "-L", &spec, "--"])
            .arg(&self.target.destination)
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            bail!(
                "cannot forward {} from {}: {}",
                remote.display(),
                self.target.destination,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(local)
    }
}

/// A forwarded socket, cancelled when dropped (a connection may serve many VMs in a run; each
/// forward is a listener of its master process).
struct Forward {
    local: PathBuf,
    /// `ssh` arguments that cancel it.
    cancel: Vec<String>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = Command::new("ssh")
            .args(&self.cancel)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.local);
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        let _ = self
            .ssh()
            .args(["-O", "exit", "--"])
            .arg(&self.target.destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.master.try_wait().ok().flatten().is_none() {
            let _ = self.master.kill();
        }
        let _ = self.master.wait();
    }
}

impl HostAccess for SshHost {
    fn name(&self) -> &str {
        &self.target.destination
    }

    fn is_this_machine(&self) -> bool {
        false
    }

    fn uri_on_host(&self, _uri: &str) -> String {
        self.target.uri_on_host.clone()
    }

    fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    fn prepare_dir(&self, dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf> {
        let mut args = vec!["host".into(), "prepare".into(), path_arg(dir)?];
        if let Some((uid, gid)) = owner {
            args.extend(["--owner".into(), format!("{uid}:{gid}")]);
        }
        self.cairn_output(&args).with_context(|| format!("preparing {} on {}", dir.display(), self.name()))?;
        // Where `cairn host prepare` put it (crate::host::prepare_dir).
        Ok(if owner.is_some() { dir.join("sock") } else { dir.to_path_buf() })
    }

    fn reach(&self, addr: &NbdAddress) -> Result<NbdAddress> {
        match &addr.transport {
            Transport::Unix { socket } => Ok(NbdAddress::unix(self.forward(socket)?, addr.export.clone())),
            Transport::Tcp { .. } => bail!("internal error: a TCP export {addr} on {}", self.name()),
        }
    }

    fn open_image(&self, path: &str, format: Option<ImageFormat>, bitmap: Option<&str>) -> Result<Box<dyn Source>> {
        let mut args = vec!["host".to_string(), "serve-image".into(), path.to_string()];
        if let Some(f) = format {
            args.extend(["--format".into(), f.qemu_name().into()]);
        }
        if let Some(b) = bitmap {
            args.extend(["--bitmap".into(), b.into()]);
        }
        let (mut server, socket) =
            self.serve(&args).with_context(|| format!("cannot open {path} on {}", self.name()))?;
        let forward = self.forward_while(&socket)?;
        let local = NbdAddress::unix(&forward.local, "");
        let source = server
            .connect(|| NbdSource::connect(local.clone(), bitmap, None))
            .with_context(|| format!("reading {path} on {}", self.name()))?;
        Ok(Box::new(Held { source, what: format!("{path} on {}", self.name()), _forward: forward, _server: server }))
    }

    fn stat(&self, path: &str) -> Result<FileStat> {
        let out = self.cairn_output(&["host".into(), "stat".into(), path.into()])?;
        serde_json::from_str(out.trim()).with_context(|| format!("the host's answer about {path}: {out:?}"))
    }

    fn remove_file(&self, path: &Path) {
        if let Ok(p) = path_arg(path) {
            let _ = self.cairn_output(&["host".into(), "remove".into(), p]);
        }
    }

    fn path_kind(&self, path: &Path) -> Result<PathKind> {
        let out = self.cairn_output(&["host".into(), "path-kind".into(), path_arg(path)?])?;
        serde_json::from_str(out.trim()).with_context(|| format!("the host's answer about {}: {out:?}", path.display()))
    }

    fn check_space(&self, dir: &Path, bytes: u64) -> Result<()> {
        self.cairn_output(&["host".into(), "check-space".into(), path_arg(dir)?, bytes.to_string()])
            .with_context(|| format!("on {}", self.name()))?;
        Ok(())
    }

    fn create_image(
        &self,
        path: &Path,
        size: u64,
        _block_size: u64,
        data_bytes: u64,
        format: TargetFormat,
        force: bool,
    ) -> Result<Box<dyn Target>> {
        let format = format.name();
        let mut args = vec!["host".to_string(), "create-image".into(), path_arg(path)?];
        args.extend(["--size".into(), size.to_string(), "--format".into(), format.into()]);
        args.extend(["--data-bytes".into(), data_bytes.to_string()]);
        if force {
            args.push("--force".into());
        }
        let what = format!("{} on {}", path.display(), self.name());
        let (mut server, socket) = self.serve(&args).with_context(|| format!("cannot create {what}"))?;
        let forward = self.forward_while(&socket)?;
        let local = NbdAddress::unix(&forward.local, "");
        let rt = nbd_runtime()?;
        let client = server
            .connect(|| Ok(rt.block_on(cairn_nbd::NbdClient::connect(&local, &[]))?))
            .with_context(|| format!("writing {what}"))?;
        // Once written, flushed and disconnected: the host makes the image durable and names it.
        let commit = Box::new(move || {
            let done = server.commit().with_context(|| format!("finishing {what}"));
            drop(forward);
            done
        });
        Ok(Box::new(NbdImage::new(rt, client, commit)))
    }

    fn link_socket(&self, local: &Path, dir: &Path, owner: Option<(u32, u32)>, log: &Path) -> Result<SocketLink> {
        use std::os::unix::process::CommandExt;
        // The far end goes into `dir` itself, root's (0711 with an owner, else 0700), not into
        // the emulator's `sock/`: nobody else can put a socket of theirs, or a link, in its place.
        self.prepare_dir(dir, owner)?;
        let mut link = SocketLink {
            socket: dir.join("nbd.sock"),
            local: local.to_path_buf(),
            dir: Some(dir.to_path_buf()),
            pid: 0,
            start: None,
        };
        let started =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display())).and_then(|out| {
                // A connection of its own (not the run's master, which ends with this process). ssh
                // keeps the first value it is given for an option, so these come before the URI's:
                // the link waits a minute for a silent host before it gives up.
                let mut cmd = Command::new("ssh");
                cmd.args(["-N", "-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes"])
                    .args(["-o", "ServerAliveCountMax=12"])
                    .args(&self.target.options)
                    .arg("-R")
                    .arg(link.spec())
                    .arg("--")
                    .arg(&self.target.destination)
                    .process_group(0)
                    .stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out);
                cmd.spawn().context("starting ssh")
            });
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                self.unlink_socket(&link);
                return Err(e);
            }
        };
        link.pid = child.id();
        link.start = crate::process::start_time(link.pid);
        let t = Instant::now();
        let up = loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    let said = std::fs::read_to_string(log).unwrap_or_default();
                    break Err(anyhow!("the link ended ({st}): {}", said.trim()));
                }
                Ok(None) => {}
                Err(e) => break Err(e.into()),
            }
            match self.path_kind(&link.socket) {
                Ok(PathKind::Other) => break Ok(()),
                Ok(_) if t.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => break Err(anyhow!("{} did not appear within 30 s", link.socket.display())),
                Err(e) => break Err(e),
            }
        };
        let handed = up.and_then(|()| match owner {
            Some((uid, gid)) => {
                let args = [
                    "host".into(),
                    "hand-over".into(),
                    path_arg(&link.socket)?,
                    "--owner".into(),
                    format!("{uid}:{gid}"),
                ];
                self.cairn_output(&args).map(|_| ())
            }
            None => Ok(()),
        });
        if let Err(e) = handed {
            let _ = child.kill();
            let _ = child.wait();
            self.unlink_socket(&link);
            return Err(e.context(format!("linking the NBD server of the point to {}", self.name())));
        }
        // Not waited for: it outlives this process, and a rerun stops it by PID (SocketLink::stop,
        // which also reaps it while this process is its parent).
        drop(child);
        Ok(link)
    }

    fn unlink_socket(&self, link: &SocketLink) {
        link.stop();
        if let Some(dir) = link.dir.as_deref().and_then(|d| path_arg(d).ok()) {
            let _ = self.cairn_output(&["host".into(), "remove".into(), "--folder".into(), dir]);
        }
    }

    fn create_overlay(&self, overlay: &Path, socket: &Path, export: &str) -> Result<()> {
        let args = [
            "host".into(),
            "create-overlay".into(),
            path_arg(overlay)?,
            "--socket".into(),
            path_arg(socket)?,
            "--export".into(),
            export.into(),
        ];
        self.cairn_output(&args).with_context(|| format!("on {}", self.name()))?;
        Ok(())
    }

    fn lock_vm(&self, uuid: &str, name: &str) -> Result<HostLock> {
        let args = ["host".into(), "lock".into(), path_arg(&self.work_dir)?, uuid.into(), "--name".into(), name.into()];
        let held = self.hold(&args, "locked").with_context(|| format!("locking VM {name} on {}", self.name()))?;
        Ok(HostLock(Some(Box::new(held))))
    }

    fn command_on_host(&self, args: &[String]) -> Option<(PathBuf, Vec<String>)> {
        let mut argv: Vec<String> = self.target.options.clone();
        argv.extend(["-S".into(), self.control().display().to_string(), "--".into(), self.target.destination.clone()]);
        argv.push(self.remote_line(args));
        Some((PathBuf::from("ssh"), argv))
    }
}

impl SshHost {
    /// Starts `cairn ARGS` on the host, a command that serves an NBD export until its standard
    /// input closes and first prints `socket PATH` (or fails); returns it and that socket.
    fn serve(&self, args: &[String]) -> Result<(RemoteServer, PathBuf)> {
        let (server, line) = self.start_holding(args)?;
        match line.strip_prefix("socket ") {
            Some(socket) => Ok((server, PathBuf::from(socket))),
            None => bail!("the host answered {line:?}"),
        }
    }

    /// Starts `cairn ARGS` on the host, a command that holds something (a lock) until its
    /// standard input closes and first prints `said` (or fails).
    fn hold(&self, args: &[String], said: &str) -> Result<RemoteServer> {
        let (server, line) = self.start_holding(args)?;
        if line != said {
            bail!("the host answered {line:?}");
        }
        Ok(server)
    }

    /// Starts `cairn ARGS` on the host, which keeps running while its standard input stays open
    /// (and hears our heartbeat); returns it with the first line it printed. If it printed
    /// none, its error.
    fn start_holding(&self, args: &[String]) -> Result<(RemoteServer, String)> {
        let mut cmd = self.cairn_command(args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        dies_with_us(&mut cmd);
        let mut child = cmd.spawn().context("running ssh")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        // One short line, within the time a host command has: a host that sends more is not
        // listened to, and one that hangs is given up on.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = stdout;
            let mut line = String::new();
            let read = std::io::Read::take(&mut stdout, 4096).read_line(&mut line);
            let _ = tx.send((read.ok().filter(|n| *n > 0).map(|_| line), stdout));
        });
        let (line, stdout) = match rx.recv_timeout(HOST_COMMAND_TIMEOUT) {
            Ok((Some(line), stdout)) => (line, stdout),
            Ok((None, _)) => {
                let out = child.wait_with_output()?;
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Err(_) => return Err(self.gave_up(&mut child, args)),
        };
        let stdin = child.stdin.take().map(|s| std::sync::Arc::new(std::sync::Mutex::new(s)));
        if let Some(s) = &stdin {
            // The command takes a silence for our end (a cut the host's sshd may not notice).
            cairn_hypervisor::watchdog::say_alive(std::sync::Arc::downgrade(s));
        }
        Ok((RemoteServer { stdin, stdout: Some(stdout), child }, line.trim_end().to_string()))
    }
}

fn path_arg(p: &Path) -> Result<String> {
    p.to_str().map(String::from).with_context(|| format!("{} is not UTF-8", p.display()))
}

/// `cairn host serve-image`, `create-image` or `lock` on the host: it serves (or holds) while
/// its standard input stays open.
struct RemoteServer {
    child: Child,
    /// The only strong reference: dropping it closes the command's input (the heartbeat thread
    /// holds a weak one).
    stdin: Option<std::sync::Arc<std::sync::Mutex<ChildStdin>>>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl RemoteServer {
    /// Runs `attempt` (a connection through the forwarded socket) until it works, for up to 10 s
    /// while the server runs: a connection forwarded before the host's server listens is closed
    /// at once.
    fn connect<T>(&mut self, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        loop {
            match attempt() {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        let mut err = String::new();
                        if let Some(mut s) = self.child.stderr.take() {
                            use std::io::Read;
                            let _ = s.read_to_string(&mut err);
                        }
                        return Err(e.context(format!("the host's server exited ({st}): {}", err.trim())));
                    }
                    if t.elapsed() > Duration::from_secs(10) {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// `create-image`: asks the host to make the image final, and waits for its "done".
    fn commit(mut self) -> Result<()> {
        use std::io::Write;
        {
            let stdin = self.stdin.as_ref().context("the host's server is gone")?;
            let mut stdin = stdin.lock().unwrap_or_else(|e| e.into_inner());
            stdin.write_all(b"commit\n").and_then(|()| stdin.flush()).context("asking the host to finish")?;
        }
        let mut line = String::new();
        let _ = std::io::Read::take(self.stdout.as_mut().context("no stdout")?, 4096).read_line(&mut line);
        if line.trim() == "done" {
            return Ok(());
        }
        drop(self.stdin.take());
        let mut err = String::new();
        if let Some(mut s) = self.child.stderr.take() {
            use std::io::Read;
            let _ = s.read_to_string(&mut err);
        }
        bail!("{}", if err.trim().is_empty() { "the host did not confirm".to_string() } else { err.trim().to_string() })
    }
}

impl Drop for RemoteServer {
    fn drop(&mut self) {
        // Its end of file makes it stop qemu-nbd and exit.
        drop(self.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source read from the host, with the server behind it kept as long as it is.
/// Fields drop in this order: the client, then the forward, then the host's server.
struct Held {
    source: NbdSource,
    what: String,
    _forward: Forward,
    _server: RemoteServer,
}

impl Source for Held {
    fn describe(&self) -> String {
        self.what.clone()
    }
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<cairn_engine::source::Extent>> {
        self.source.allocation(offset, len)
    }
    fn dirty_ranges(&mut self, bitmap: &str) -> Result<Vec<Range>> {
        self.source.dirty_ranges(bitmap)
    }
    fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()> {
        self.source.submit(offset, len, buf)
    }
    fn next(&mut self) -> Result<Vec<u8>> {
        self.source.next()
    }
    fn finish(&mut self) -> Result<()> {
        self.source.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_uris_give_their_target_and_local_uris_none() {
        let t = SshTarget::from_uri("qemu+ssh://root@10.0.0.2:2222/system?keyfile=/k/id&no_verify=1&known_hosts=/k/kh")
            .unwrap()
            .unwrap();
        assert_eq!(t.destination, "root@10.0.0.2");
        assert_eq!(t.uri_on_host, "qemu:///system");
        let o = t.options.join(" ");
        for want in ["-p 2222", "-i /k/id", "UserKnownHostsFile=/k/kh", "StrictHostKeyChecking=no", "BatchMode=yes"] {
            assert!(o.contains(want), "{want} missing from {o}");
        }
        let plain = SshTarget::from_uri("qemu+ssh://h.example/session").unwrap().unwrap();
        assert_eq!(plain.destination, "h.example");
        assert_eq!(plain.uri_on_host, "qemu:///session");
        assert!(!plain.options.join(" ").contains("StrictHostKeyChecking"), "host keys are checked by default");
        for local in ["qemu:///system", "qemu+unix:///system", "test:///default"] {
            assert!(SshTarget::from_uri(local).unwrap().is_none(), "{local}");
        }
        let v6 = SshTarget::from_uri("qemu+ssh://root@[fd00::2]/system").unwrap().unwrap();
        assert_eq!(v6.destination, "root@fd00::2");
        // Never an option for ssh.
        assert!(SshTarget::from_uri("qemu+ssh://-oProxyCommand=x/system").is_err());
        let e = SshTarget::from_uri("qemu+tcp://10.0.0.2/system").unwrap_err();
        assert!(e.downcast_ref::<NotSsh>().is_some(), "{e}");
        assert!(e.to_string().contains("qemu+ssh://"), "{e}");
    }

    #[test]
    fn remote_arguments_are_quoted_for_the_shell() {
        for arg in ["plain", "/a b/it's", "$(touch /tmp/x)", "a;b|c&d", "back\\slash \"q\"", ""] {
            let out = Command::new("sh").arg("-c").arg(format!("printf %s {}", quote(arg))).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), arg, "{}", quote(arg));
        }
    }
}
