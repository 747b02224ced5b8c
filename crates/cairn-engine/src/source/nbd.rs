//! NBD exports as sources (through our client), and a private `qemu-nbd` that turns any image
//! format QEMU knows (qcow2, VHDX, VMDK, VHD, VDI) into an NBD export.

use super::{Allocation, Extent, ImageFormat, Source};
use crate::ranges::{normalize, Range};
use anyhow::{bail, Context, Result};
use cairn_nbd::proto::{dirty_bitmap_context, CONTEXT_BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};
use cairn_nbd::{NbdAddress, NbdClient, NbdError};
use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A runtime for the NBD client: one worker thread keeps replies flowing while the caller's
/// thread does other work.
pub fn nbd_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cairn-nbd")
        .enable_all()
        .build()
        .context("starting the NBD I/O thread")
}

pub struct NbdSource {
    rt: tokio::runtime::Runtime,
    client: Arc<NbdClient>,
    what: String,
    queue: VecDeque<tokio::task::JoinHandle<Result<Vec<u8>, cairn_nbd::NbdError>>>,
    has_allocation: bool,
    server: Option<QemuNbd>,
}

impl NbdSource {
    /// Connects to an export, negotiating `base:allocation` and, if asked, a dirty bitmap.
    /// `server` is the private qemu-nbd behind it, kept alive as long as the source.
    pub fn connect(addr: NbdAddress, bitmap: Option<&str>, server: Option<QemuNbd>) -> Result<NbdSource> {
        let rt = nbd_runtime()?;
        let mut contexts = vec![CONTEXT_BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(dirty_bitmap_context(b));
        }
        let what = match &server {
            Some(s) => format!("{} ({} through qemu-nbd)", s.image.display(), s.format.qemu_name()),
            None => addr.to_string(),
        };
        let attempt = || {
            rt.block_on(async {
                match NbdClient::connect(&addr, &contexts).await {
                    // Servers without block status still serve reads.
                    Err(cairn_nbd::NbdError::Unsupported(_)) if bitmap.is_none() => {
                        NbdClient::connect(&addr, &[]).await
                    }
                    r => r,
                }
            })
        };
        let mut server = server;
        let client = match &mut server {
            Some(s) => s.connect(attempt)?,
            None => attempt().with_context(|| format!("opening {what}"))?,
        };
        let has_allocation = client.has_context(CONTEXT_BASE_ALLOCATION);
        Ok(NbdSource { rt, client: Arc::new(client), what, queue: VecDeque::new(), has_allocation, server })
    }
}

impl Source for NbdSource {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.size() - offset);
        if !self.has_allocation || len == 0 {
            return Ok(vec![Extent { offset, length: len, kind: Allocation::Data }]);
        }
        let c = self.client.clone();
        let ext = self
            .rt
            .block_on(async move { c.extents(CONTEXT_BASE_ALLOCATION, offset, len).await })
            .with_context(|| format!("block status of {}", self.what))?;
        Ok(ext
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
                kind: if e.flags & STATE_ZERO != 0 { Allocation::Zero } else { Allocation::Data },
            })
            .collect())
    }

    fn dirty_ranges(&mut self, bitmap: &str) -> Result<Vec<Range>> {
        let ctx = dirty_bitmap_context(bitmap);
        let c = self.client.clone();
        let size = self.size();
        let ext = self
            .rt
            .block_on(async move { c.extents(&ctx, 0, size).await })
            .with_context(|| format!("reading dirty bitmap {bitmap:?} of {}", self.what))?;
        Ok(normalize(
            ext.into_iter()
                .filter(|e| e.flags & STATE_DIRTY != 0)
                .map(|e| Range { offset: e.offset, length: e.length })
                .collect(),
        ))
    }

    fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()> {
        if len > self.client.max_request() as usize {
            bail!("read of {len} bytes exceeds the server's limit of {}", self.client.max_request());
        }
        let c = self.client.clone();
        self.queue.push_back(self.rt.spawn(async move { c.read_into(offset, len as u32, buf).await }));
        Ok(())
    }

    fn next(&mut self) -> Result<Vec<u8>> {
        let h = self.queue.pop_front().expect("next() without submit()");
        let r = self.rt.block_on(h).context("NBD read task failed")?;
        r.with_context(|| format!("reading {}", self.what))
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(s) = &mut self.server {
            s.check_alive()?;
        }
        Ok(())
    }
}

/// Makes the child of `cmd` get SIGTERM when this process dies (even by SIGKILL; more exactly,
/// when the thread that starts it ends), in a process group of its own (a Ctrl-C at the terminal
/// is ours to handle, not a signal that kills the helper under us).
pub fn dies_with_us(cmd: &mut Command) {
    let parent = std::process::id();
    cmd.process_group(0);
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("cairn ended before its helper started"));
            }
            Ok(())
        });
    }
}

/// A `qemu-nbd` process serving one image on a private Unix socket; killed when dropped.
pub struct QemuNbd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    image: PathBuf,
    format: ImageFormat,
}

impl QemuNbd {
    /// Serves `image`. Read-only unless `read_only` is false. With `bitmap`, the export
    /// carries that persistent dirty bitmap.
    pub fn serve(image: &Path, format: ImageFormat, read_only: bool, bitmap: Option<&str>) -> Result<QemuNbd> {
        let dir = private_dir()?;
        let socket = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--format={}", format.qemu_name()))
            .arg(format!("--socket={}", socket.display()))
            .arg("--shared=4");
        if read_only {
            cmd.arg("--read-only").arg("--cache=writeback");
        } else {
            // Restores write gigabytes once: O_DIRECT costs a tenth of the CPU of page-cache
            // writeback on these machines (BENCHMARKS.md), and nothing reads the data back soon.
            cmd.arg("--cache=none").arg("--aio=native");
        }
        if let Some(b) = bitmap {
            cmd.arg(format!("--bitmap={b}"));
        }
        cmd.arg(image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // Not its business; it would sit in /proc/PID/environ.
        cmd.env_remove("CAIRN_PASSWORD");
        // Its own process group: a Ctrl-C at the terminal is cairn's to handle (it stops the
        // pipeline cleanly, then drops this server), not a signal that kills the server under it.
        // It still dies with cairn (a kill -9, a second Ctrl-C): it holds the image's lock. (With
        // the thread that started it, in fact: the one that runs the whole backup or restore and
        // drops it at the end.)
        dies_with_us(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "qemu-nbd is needed to read {} images: install it (Debian: apt-get install qemu-utils)",
                    format.qemu_name()
                )
            } else {
                anyhow::Error::new(e).context("starting qemu-nbd")
            }
        })?;
        let mut s = QemuNbd { child, dir, socket, image: image.to_path_buf(), format };
        let t = Instant::now();
        while !s.socket.exists() {
            if let Some(st) = s.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = s.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu-nbd could not open {} ({st}): {}", image.display(), err.trim());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("qemu-nbd did not start within 30 s for {}", image.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }

    pub fn address(&self) -> NbdAddress {
        NbdAddress::unix(&self.socket, "")
    }

    /// Runs `attempt` (a connection to this server) until it succeeds. qemu-nbd creates its
    /// socket before it listens, so a refused connection is retried while the process lives;
    /// if qemu-nbd exits instead (a bad image or bitmap), its own message is the error.
    pub fn connect<T>(&mut self, mut attempt: impl FnMut() -> Result<T, NbdError>) -> Result<T> {
        let t = Instant::now();
        loop {
            let err = match attempt() {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            let starting = matches!(err, NbdError::Connect { .. }) && t.elapsed() < Duration::from_secs(10);
            if starting && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if let Some(msg) = self.exit_message(Duration::from_secs(2)) {
                bail!("qemu-nbd could not serve {}: {msg}", self.image.display());
            }
            return Err(err).with_context(|| format!("opening {} through qemu-nbd", self.image.display()));
        }
    }

    /// If qemu-nbd exits within `wait`, what it said on stderr.
    fn exit_message(&mut self, wait: Duration) -> Option<String> {
        let t = Instant::now();
        while t.elapsed() < wait {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Some(format!("{} ({st})", err.trim()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("qemu-nbd serving {} exited early ({st})", self.image.display());
        }
        Ok(())
    }

    /// Waits for qemu-nbd to exit by itself (after the last client disconnected) so that
    /// everything it wrote is on disk.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("qemu-nbd for {} failed ({st})", self.image.display());
                }
                return Ok(());
            }
            if t.elapsed() > timeout {
                bail!("qemu-nbd for {} did not exit", self.image.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn private_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    for _ in 0..100 {
        let d = base.join(format!("cairn-{}-{}", std::process::id(), cairn_storage::random_name()));
        match std::fs::create_dir(&d) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
                return Ok(d);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating a private folder in {}", base.display())),
        }
    }
    bail!("cannot create a private folder in {}", base.display())
}
