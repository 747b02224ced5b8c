//! Where the host's side of a VM backup happens: the folder where the hypervisor puts a backup
//! job's NBD socket, scratch files and memory state, the disk files of a shut-off VM, and the
//! files its configuration names.
//!
//! A VM job reaches them only through [`HostAccess`]: [`LocalHost`] when the hypervisor runs on
//! this machine, [`crate::ssh::SshHost`] when it runs on another host (reached over the SSH
//! connection that libvirt's `qemu+ssh://` URIs use; ARCHITECTURE.md, "Several hosts"). The
//! functions here are also what `cairn host ...` runs on the far side of that connection, so
//! both kinds of host run the same code on the machine the files are on.

use anyhow::{anyhow, bail, Context, Result};
use cairn_engine::source::{open_path, ImageFormat, Source};
use cairn_engine::target::{self, Target, TargetFormat};
use cairn_nbd::NbdAddress;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The host side of VM jobs, wherever the host is.
pub trait HostAccess: Send + Sync {
    /// The host, for messages: `this host`, `root@10.0.0.2`.
    fn name(&self) -> &str;
    /// Whether the host is the machine this runs on (its files are this machine's files).
    fn is_this_machine(&self) -> bool;
    /// The hypervisor URI that reaches this host's hypervisor from the host itself: what its
    /// watchdog connects to (`qemu+ssh://root@h/system` is `qemu:///system` there).
    fn uri_on_host(&self, uri: &str) -> String;
    /// The folder, on the host, for the hypervisor's sockets, scratch files and memory states.
    fn work_dir(&self) -> &Path;
    /// Makes `dir` (on the host) a folder only we (and, with `owner`, the unprivileged user the
    /// VM's emulator runs as) can write, and removes what a killed run left in it: scratch
    /// files, memory states, sockets (see [`prepare_dir`]).
    /// Returns the folder where the emulator is to create the backup job's socket.
    fn prepare_dir(&self, dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf>;
    /// The address from which this process reaches `addr`, an NBD export on the host.
    fn reach(&self, addr: &NbdAddress) -> Result<NbdAddress>;
    /// Opens a file of the host (a disk image, a memory state, a firmware file) as a source;
    /// with `bitmap`, its changed ranges come from that persistent dirty bitmap of the qcow2.
    fn open_image(&self, path: &str, format: Option<ImageFormat>, bitmap: Option<&str>) -> Result<Box<dyn Source>>;
    /// Size and modification time of a file of the host.
    fn stat(&self, path: &str) -> Result<FileStat>;
    /// Removes a file of the host, if it exists.
    fn remove_file(&self, path: &Path);
    /// Takes VM `uuid`'s lock on the host for as long as the returned guard lives, or fails if
    /// another cairn run holds it. On this machine, nothing: the backup's own locks are the
    /// host's (see `cairn_vm::backup::lock_vm_for_another_machine`).
    fn lock_vm(&self, uuid: &str, name: &str) -> Result<HostLock>;
    /// How to run `cairn ARGS` on the host (its watchdog): the program and its arguments, or none
    /// for this machine (the caller runs its own binary).
    fn command_on_host(&self, args: &[String]) -> Option<(PathBuf, Vec<String>)>;

    // Recovery onto the host.
    /// What is at `path` on the host.
    fn path_kind(&self, path: &Path) -> Result<PathKind>;
    /// Refuses when the host's folder `dir` has no room for `bytes`.
    fn check_space(&self, dir: &Path, bytes: u64) -> Result<()>;
    /// A new image file at `path` on the host, `size` bytes (`data_bytes` of them data) in
    /// `format`, written through the returned target: under a partial name until it finishes,
    /// removed if abandoned. `path` must not exist unless `force`.
    fn create_image(
        &self,
        path: &Path,
        size: u64,
        block_size: u64,
        data_bytes: u64,
        format: TargetFormat,
        force: bool,
    ) -> Result<Box<dyn Target>>;

    // Instant recovery onto the host: the VM runs there on overlays over an NBD server of the
    // point, which runs here (the repository is only opened here).
    /// Makes the NBD server listening on `local` (a socket of this machine) reachable on the host,
    /// for the emulator's user `owner` too, through a process of this machine that outlives this
    /// one: the recovered VM reads its disks through it until they have moved. On another host,
    /// its socket is in folder `dir` there (prepared for `owner`), and `log` (here) gets the
    /// link's messages.
    fn link_socket(&self, local: &Path, dir: &Path, owner: Option<(u32, u32)>, log: &Path) -> Result<SocketLink>;
    /// Ends a link of [`HostAccess::link_socket`] (if its process still is ours) and removes its
    /// folder on the host.
    fn unlink_socket(&self, link: &SocketLink);
    /// A qcow2 overlay at `overlay` on the host whose backing file is export `export` of the NBD
    /// server on socket `socket` there: reads come from the export until written, writes stay in
    /// the overlay.
    fn create_overlay(&self, overlay: &Path, socket: &Path, export: &str) -> Result<()>;
}

/// A socket of this machine made reachable on a host ([`HostAccess::link_socket`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketLink {
    /// The socket on the host (the socket of this machine itself when the host is this machine).
    pub socket: PathBuf,
    /// The socket of this machine it leads to.
    pub local: PathBuf,
    /// The link's folder on the host, none when the host is this machine.
    pub dir: Option<PathBuf>,
    /// The process of this machine that carries the link (0: none) and its start time.
    pub pid: u32,
    pub start: Option<u64>,
}

impl SocketLink {
    /// What the command line of the link's process holds: `-R HOST_SOCKET:LOCAL_SOCKET`.
    pub fn spec(&self) -> String {
        format!("{}:{}", self.socket.display(), self.local.display())
    }

    fn carried_by(&self) -> impl Fn(&crate::process::Args) -> bool + '_ {
        let spec = self.spec();
        move |args| crate::process::has_option(args, "-R", spec.as_bytes())
    }

    /// Whether the link still carries: no process is needed, or its process is still ours.
    pub fn is_up(&self) -> bool {
        self.pid == 0 || crate::process::is_ours(self.pid, self.start, &self.carried_by())
    }

    /// Stops the link's process, if it still is ours; reaps it when this process started it.
    pub fn stop(&self) {
        if crate::process::stop(self.pid, self.start, &self.carried_by()) {
            crate::process::reap(self.pid);
        }
    }
}

/// A qcow2 overlay over an NBD export ([`HostAccess::create_overlay`]), on the machine the
/// overlay is on.
pub fn create_overlay(overlay: &Path, socket: &Path, export: &str) -> Result<()> {
    let backing = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
        .arg(overlay)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!("creating the overlay of {export}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Gives socket `path` (made by root: SSH's server creates the far end of a link 0600) to the
/// emulator's user. Only a socket of ours is handed over: it is pinned (`O_PATH`, no link
/// followed) before it is checked, and changed through that handle, so nothing put in its
/// place in between is.
pub fn hand_over(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let pinned = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = pinned.metadata()?;
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_socket() || meta.uid() != me {
        bail!("refusing to hand over {}: it is not a socket of ours", path.display());
    }
    // SAFETY: a valid descriptor and an empty, NUL-terminated path (AT_EMPTY_PATH: the descriptor itself).
    let r = unsafe { libc::fchownat(pinned.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("giving {} to user {uid}", path.display()));
    }
    Ok(())
}

/// Removes a folder [`prepare_dir`] made, with the run files in it (its sockets); whatever else
/// is there stays, and the folder with it.
pub fn remove_prepared(dir: &Path) {
    for d in [dir.join("sock"), dir.to_path_buf()] {
        if remove_run_files(&d).is_ok() {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// Takes the exclusive lock of file `path` (created 0600 if missing, never through a symbolic
/// link) without waiting: the open file holds it until closed; none if another holds it.
pub fn try_lock(path: &Path) -> Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    Ok(Some(f))
}

/// A lock held on a host ([`HostAccess::lock_vm`]) until dropped.
pub struct HostLock(pub Option<Box<dyn Send + Sync>>);

/// What is at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Missing,
    Folder,
    /// A file, a device, a socket: anything but a folder.
    Other,
}

/// [`HostAccess::path_kind`] on the machine the path is on (symbolic links followed).
pub fn path_kind(path: &Path) -> Result<PathKind> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(PathKind::Folder),
        Ok(_) => Ok(PathKind::Other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PathKind::Missing),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// How long a `cairn host` command that serves waits without a line on its input (its caller
/// says "alive" every `cairn_hypervisor::watchdog::HEARTBEAT`) before it takes the caller for
/// gone: a network cut that the host's sshd may not notice for hours would otherwise keep a
/// qemu-nbd holding a VM's disk open.
pub use cairn_hypervisor::watchdog::SILENCE;

/// On the host: the next line of `input` that is not "alive"; none at its end, or after a
/// silence of `silence` once "alive" was heard (the caller is gone).
pub fn next_word(input: &std::sync::mpsc::Receiver<String>, silence: std::time::Duration) -> Option<String> {
    let mut beating = false;
    loop {
        let line = if beating { input.recv_timeout(silence).ok() } else { input.recv().ok() };
        match line?.trim() {
            "alive" => beating = true,
            word => return Some(word.to_string()),
        }
    }
}

/// This process's standard input, line by line (each line at most 4 KiB), on a channel.
pub fn stdin_lines() -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut input = std::io::stdin().lock();
        loop {
            let mut line = String::new();
            match std::io::Read::take(&mut input, 4096).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// What [`HostAccess::stat`] tells of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: u128,
}

/// The hypervisor runs on this machine.
pub struct LocalHost {
    pub work_dir: PathBuf,
}

impl HostAccess for LocalHost {
    fn name(&self) -> &str {
        "this host"
    }
    fn is_this_machine(&self) -> bool {
        true
    }
    fn uri_on_host(&self, uri: &str) -> String {
        uri.to_string()
    }
    fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    fn prepare_dir(&self, dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf> {
        prepare_dir(dir, owner)
    }
    fn reach(&self, addr: &NbdAddress) -> Result<NbdAddress> {
        Ok(addr.clone())
    }
    fn open_image(&self, path: &str, format: Option<ImageFormat>, bitmap: Option<&str>) -> Result<Box<dyn Source>> {
        open_path(path, format, bitmap)
    }
    fn stat(&self, path: &str) -> Result<FileStat> {
        stat(Path::new(path))
    }
    fn remove_file(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }
    fn command_on_host(&self, _args: &[String]) -> Option<(PathBuf, Vec<String>)> {
        None
    }
    fn lock_vm(&self, _uuid: &str, _name: &str) -> Result<HostLock> {
        Ok(HostLock(None))
    }
    fn path_kind(&self, path: &Path) -> Result<PathKind> {
        path_kind(path)
    }
    fn check_space(&self, dir: &Path, bytes: u64) -> Result<()> {
        target::check_space(dir, bytes)
    }
    fn create_image(
        &self,
        path: &Path,
        size: u64,
        block_size: u64,
        data_bytes: u64,
        format: TargetFormat,
        force: bool,
    ) -> Result<Box<dyn Target>> {
        target::create(path, size, block_size, data_bytes, format, force)
    }
    fn link_socket(&self, local: &Path, _dir: &Path, owner: Option<(u32, u32)>, _log: &Path) -> Result<SocketLink> {
        // The emulator opens the server's socket where it is. An unprivileged one (a stock host)
        // is let through the socket's private folder (0711: it can neither list nor write it) and
        // given the socket, as on another host (libvirt does not relabel an NBD backing file's
        // socket).
        if let Some(owner) = owner {
            use std::os::unix::fs::PermissionsExt;
            let folder = local.parent().context("a socket is in a folder")?;
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("letting QEMU's user through {}", folder.display()))?;
            hand_over(local, owner)?;
        }
        Ok(SocketLink { socket: local.to_path_buf(), local: local.to_path_buf(), dir: None, pid: 0, start: None })
    }
    fn unlink_socket(&self, _link: &SocketLink) {}
    fn create_overlay(&self, overlay: &Path, socket: &Path, export: &str) -> Result<()> {
        create_overlay(overlay, socket, export)
    }
}

/// [`HostAccess::prepare_dir`] on the machine the folder is on; returns the folder where the
/// emulator is to create the job's socket.
///
/// Without `owner` (QEMU runs as root), `dir` is a [`private_dir`] and the socket goes there.
/// With `owner` (the uid and gid of an unprivileged QEMU, as on a stock host), QEMU must open the
/// scratch files libvirt makes in `dir` and create the job's socket: `dir` stays root's, mode
/// 0711 (QEMU passes through, cannot list or write it), and the socket goes into `dir/sock`,
/// which belongs to QEMU's user, mode 0700. So the files cairn reads as root (the memory state,
/// scratch files) sit in a folder QEMU cannot write, and cannot be swapped for a link to another
/// file. The work folder above `dir` is made 0711 too, and every folder above it must let QEMU's
/// user through, else the error names the one that does not.
pub fn prepare_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    let what = || format!("the work folder {}", dir.display());
    let Some((uid, gid)) = owner else {
        private_dir(dir).with_context(what)?;
        remove_run_files(dir)?;
        return Ok(dir.to_path_buf());
    };
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let parent = dir.parent().context("a work folder has a parent")?;
    private_dir(parent).with_context(what)?;
    private_dir(dir).with_context(what)?;
    for d in [parent, dir] {
        let mode = std::fs::metadata(d)?.mode() & 0o7777;
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))?;
        }
    }
    let real = std::fs::canonicalize(parent)?;
    for a in real.ancestors().skip(1) {
        let m = std::fs::metadata(a)?;
        let through = (m.uid() == uid && m.mode() & 0o100 != 0)
            || (m.gid() == gid && m.mode() & 0o010 != 0)
            || m.mode() & 0o001 != 0;
        if !through {
            bail!(
                "QEMU runs as user {uid} on this host and cannot reach {}: {} (mode {:04o}, user {}) does not let it \
                 through; give others search permission there (chmod o+x {}), or use a work folder it can reach",
                dir.display(),
                a.display(),
                m.mode() & 0o7777,
                m.uid(),
                a.display()
            );
        }
    }
    let sock = dir.join("sock");
    match std::fs::symlink_metadata(&sock) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&sock)
            .with_context(|| format!("cannot create {}", sock.display()))?,
        Err(e) => return Err(e).with_context(what),
        Ok(m) => {
            let me = unsafe { libc::geteuid() };
            if m.file_type().is_symlink() || !m.is_dir() {
                bail!("refusing to use {}: it is not a folder; remove it", sock.display());
            }
            if m.uid() != me && m.uid() != uid {
                bail!("refusing to use folder {}: it belongs to user {}; remove it", sock.display(), m.uid());
            }
        }
    }
    let c = std::ffi::CString::new(sock.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path; lchown does not follow a link (and `dir`, root's, cannot
    // have had one put there by anyone else).
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("giving {} to user {uid}", sock.display()));
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700))?;
    remove_run_files(dir)?;
    remove_run_files(&sock)?;
    Ok(sock)
}

/// Removes from `dir` the files a backup run makes there (scratch files, memory states, NBD
/// sockets); a run that was killed leaves them. Its lock file stays.
pub fn remove_run_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        if is_run_file(&e.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

fn is_run_file(name: &str) -> bool {
    name.ends_with(".scratch.qcow2")
        || (name.starts_with("memory") && name.ends_with(".state"))
        || (name.starts_with("nbd") && name.ends_with(".sock"))
}

/// [`HostAccess::stat`] on the machine the file is on.
pub fn stat(path: &Path) -> Result<FileStat> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mtime_ns = meta.modified()?.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok(FileStat { size: meta.len(), mtime_ns })
}

/// Makes `path` a folder only we can write, or checks that it is one: created with mode 0700
/// (and any missing parent too); an existing one must be a real folder (not a symbolic link),
/// owned by our effective user, and writable by nobody else. Its parents must be owned by root or
/// us and be writable by nobody else unless sticky (like /tmp), and no symbolic link on the way
/// may belong to another user: otherwise someone could swap the folder, or what we put in it (NBD
/// sockets the backup reads, scratch files, memory states, lock files), for their own.
pub fn private_dir(path: &Path) -> Result<()> {
    let path = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    // What exists now is what check_parents vouches for; everything below it is created by us.
    let existing = path.ancestors().find(|p| std::fs::symlink_metadata(p).is_ok()).unwrap_or(Path::new("/"));
    let existing = existing.to_path_buf();
    check_parents(&path)?;
    create_private(&path, &existing)?;
    check_private(&path)
}

/// Creates the folders of `path` below `existing` (its deepest folder that existed when the
/// parents were checked) one at a time, top down, each 0700, and checks each right after: under a
/// sticky folder such as /tmp another user may create a missing one between our check of the
/// parents and our mkdir, and we must not go on inside theirs. (Once one is ours, nobody else can
/// create or swap anything beneath it.)
fn create_private(path: &Path, existing: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = path.ancestors().take_while(|p| *p != existing).collect();
    for p in missing.into_iter().rev() {
        // A folder above ours lets others through (0711: no listing, no writing), so that an
        // unprivileged QEMU can reach the one folder of ours it is given (see [`prepare_dir`]).
        let mode = if p == path { 0o700 } else { 0o711 };
        match std::fs::DirBuilder::new().mode(mode).create(p) {
            Ok(()) => {}
            // Made by someone else meanwhile: only good if it is ours (a cairn run of ours).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create folder {}", p.display())),
        }
        check_private(p)?;
    }
    Ok(())
}

/// Owned by us, a folder not a symlink, writable only by us.
fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| -> anyhow::Error {
        anyhow!("refusing to use folder {}: {why}; remove it (or use another folder)", path.display())
    };
    let m = std::fs::symlink_metadata(path).with_context(|| format!("cannot read folder {}", path.display()))?;
    if m.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".into()));
    }
    if !m.is_dir() {
        return Err(refuse("it is not a folder".into()));
    }
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(refuse(format!("it belongs to user {}, not to us (user {me})", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(refuse(format!("other users can write in it (mode {:04o})", m.mode() & 0o7777)));
    }
    Ok(())
}

/// The folders above `path`: see [`private_dir`].
fn check_parents(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = unsafe { libc::geteuid() };
    let trusted = |uid: u32| uid == 0 || uid == me;
    // Symbolic links on the way: their owner could point them elsewhere after our checks.
    for p in path.ancestors().skip(1) {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.file_type().is_symlink() && !trusted(m.uid()) {
                bail!(
                    "refusing to use folder {}: {} is a symbolic link that belongs to user {}",
                    path.display(),
                    p.display(),
                    m.uid()
                );
            }
        }
    }
    // The real folders above it (the deepest one that exists, resolved, and every parent).
    let Some(existing) = path.ancestors().skip(1).find(|p| p.exists()) else { return Ok(()) };
    let real = std::fs::canonicalize(existing).with_context(|| format!("resolving {}", existing.display()))?;
    for p in real.ancestors() {
        let m = std::fs::symlink_metadata(p).with_context(|| format!("cannot read folder {}", p.display()))?;
        let open = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if !trusted(m.uid()) || open {
            bail!(
                "refusing to use folder {}: {} {}",
                path.display(),
                p.display(),
                if open {
                    format!("can be written by other users (mode {:04o}, not sticky)", m.mode() & 0o7777)
                } else {
                    format!("belongs to user {}", m.uid())
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    pub(crate) const NOBODY: u32 = 65534;

    pub(crate) fn chown(p: &Path, uid: u32) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), uid, uid) }, 0, "chown {}", p.display());
    }

    #[test]
    fn private_folders_are_made_0700_and_foreign_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        // Created 0700 and ours, with its missing parents ours and 0711 (others may pass, not
        // list or write).
        let new = t.path().join("a/b/work");
        private_dir(&new).unwrap();
        for (p, mode) in [(t.path().join("a"), 0o711), (t.path().join("a/b"), 0o711), (new.clone(), 0o700)] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o777, mode, "{}", p.display());
            assert_eq!(m.uid(), unsafe { libc::geteuid() });
        }
        private_dir(&new).unwrap(); // and accepted again
                                    // A symbolic link to a good folder.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        let e = private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // Writable by others.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&open).unwrap_err().to_string();
        assert!(e.contains("other users can write"), "{e}");
        // Another user's (tests run as root, who can give it away).
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            chown(&theirs, NOBODY);
            let e = private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to user 65534"), "{e}");
            // Under another user's folder, even one we would create: they could swap it.
            let e = private_dir(&theirs.join("work")).unwrap_err().to_string();
            assert!(e.contains("belongs to user 65534"), "{e}");
            assert!(!theirs.join("work").exists());
            // Through another user's symbolic link.
            let their_link = t.path().join("their-link");
            std::os::unix::fs::symlink(t.path().join("a"), &their_link).unwrap();
            chown(&their_link, NOBODY);
            let e = private_dir(&their_link.join("b/work")).unwrap_err().to_string();
            assert!(e.contains("symbolic link that belongs to user 65534"), "{e}");
        }
        // Under a world-writable folder without the sticky bit: anyone could rename ours away.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&open.join("work")).unwrap_err().to_string();
        assert!(e.contains("not sticky"), "{e}");
        // A sticky one (like /tmp) is fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&open.join("work")).unwrap();
    }

    #[test]
    fn a_missing_folder_someone_else_made_meanwhile_is_not_entered() {
        // Between our check of the parents and our mkdir, another user creates a missing middle
        // folder (under a sticky folder anyone may create in): we must not create ours in it.
        if unsafe { libc::geteuid() } != 0 {
            return; // giving a folder away needs root
        }
        let t = tempfile::tempdir().unwrap();
        let theirs = t.path().join("a");
        std::fs::create_dir(&theirs).unwrap();
        chown(&theirs, NOBODY);
        let e = create_private(&theirs.join("b/work"), t.path()).unwrap_err().to_string();
        assert!(e.contains("belongs to user 65534"), "{e}");
        assert!(!theirs.join("b").exists(), "created inside another user's folder");
        // Our own, made by another run of ours meanwhile: fine.
        create_private(&t.path().join("ours/b/work"), t.path()).unwrap();
        create_private(&t.path().join("ours/b/work"), t.path()).unwrap();
        assert!(t.path().join("ours/b/work").is_dir());
    }

    #[test]
    fn a_folder_for_an_unprivileged_qemu_is_its_users_and_reachable() {
        if unsafe { libc::geteuid() } != 0 {
            return; // giving a folder away needs root
        }
        let t = tempfile::tempdir().unwrap();
        // The tempdir (under /tmp, 1777) lets everyone through; our work folder is made 0711.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let vm = t.path().join("work/u-1");
        let sock = prepare_dir(&vm, Some((NOBODY, NOBODY))).unwrap();
        assert_eq!(sock, vm.join("sock"));
        let m = std::fs::metadata(&sock).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (NOBODY, NOBODY, 0o700));
        // What cairn reads as root stays in folders QEMU's user cannot write.
        for d in [t.path().join("work"), vm.clone()] {
            let m = std::fs::metadata(&d).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o711), "{}", d.display());
        }
        prepare_dir(&vm, Some((NOBODY, NOBODY))).unwrap(); // and again
                                                           // A folder above that does not let it through is named.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = prepare_dir(&vm, Some((NOBODY, NOBODY))).unwrap_err().to_string();
        assert!(e.contains(&t.path().display().to_string()) && e.contains("chmod o+x"), "{e}");
        // A folder of a third user is not taken.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        chown(&sock, 12345);
        let e = prepare_dir(&vm, Some((NOBODY, NOBODY))).unwrap_err().to_string();
        assert!(e.contains("belongs to user 12345"), "{e}");
    }

    #[test]
    fn a_caller_that_said_alive_and_falls_silent_is_gone() {
        let (tx, rx) = std::sync::mpsc::channel();
        let short = std::time::Duration::from_millis(200);
        tx.send("alive\n".to_string()).unwrap();
        tx.send("commit\n".to_string()).unwrap();
        assert_eq!(next_word(&rx, short).as_deref(), Some("commit"));
        tx.send("alive\n".to_string()).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(next_word(&rx, short), None, "silence after alive");
        assert!(t.elapsed() >= short);
        drop(tx);
        assert_eq!(next_word(&rx, short), None, "end of input");
    }

    #[test]
    fn only_the_files_of_a_run_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("vm");
        for n in ["vda-abc.scratch.qcow2", "memory-abc.state", "nbd-abc.sock", "lock", "notes.txt"] {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(n), b"x").unwrap();
        }
        prepare_dir(&d, None).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["lock", "notes.txt"]);
    }
}
