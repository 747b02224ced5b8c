//! Repository locks: lock files under `locks/`, shared or exclusive, refreshed while held.

use crate::{Error, Result};
use cairn_storage::{Backend, Kind};
use serde::{Deserialize, Serialize};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A lock not refreshed for this long is stale, whoever holds it.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
const REFRESH_RETRY: Duration = Duration::from_secs(30);
/// A holder that could not refresh for this long counts its lock as lost: well before others
/// may judge it stale ([`STALE_AFTER`]).
const LOST_AFTER: Duration = Duration::from_secs(20 * 60);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockInfo {
    pub hostname: String,
    pub pid: u32,
    /// Unix seconds of the last refresh.
    pub time: u64,
    pub exclusive: bool,
    /// A maintenance lock (prune): excludes other maintenance and exclusive locks, never
    /// shared ones. Absent (false) in locks written before 2026-11-29.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// Unix seconds when the holder took the lock (its clock). Prune deletes what it marked
    /// only once every live lock was created after the mark: a holder that started before
    /// may have loaded an index without the mark. Absent in locks written before 2026-11-29:
    /// such a lock counts as older than any mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    pub purpose: String,
    /// Which machine, boot and PID namespace `pid` belongs to (`machine-id:boot-id:pidns`),
    /// so a PID is probed only where it means something (hosts and containers can share a
    /// hostname). Absent in locks written before 2026-11-29.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
}

impl LockInfo {
    /// Whether the lock may be deleted: not refreshed for [`STALE_AFTER`], or its holder is
    /// known gone (a dead PID on this very machine, boot and PID namespace, or an earlier boot).
    pub fn is_stale(&self, our_host: &str, our_id: Option<&str>) -> bool {
        let age = now_secs().saturating_sub(self.time);
        if age > STALE_AFTER.as_secs() {
            return true;
        }
        match (self.host_id.as_deref(), our_id) {
            (Some(theirs), Some(ours)) => {
                let (t, o): (Vec<&str>, Vec<&str>) = (theirs.split(':').collect(), ours.split(':').collect());
                if t.len() != 3 || o.len() != 3 || t[0] != o[0] {
                    return false; // another machine: only time tells
                }
                if t[1] != o[1] {
                    // This machine, another boot: its processes are gone if the lock was last
                    // refreshed before we booted. (Machines cloned from one image share a
                    // machine-id; their live locks were refreshed after our boot.)
                    return boot_time().is_some_and(|booted| self.time + BOOT_MARGIN_SECS < booted);
                }
                // Same boot: the PID is ours to probe only in the same PID namespace.
                t[2] == o[2] && !pid_alive(self.pid)
            }
            // A kill -9'd holder on our own host shows at once.
            _ => self.hostname == our_host && !pid_alive(self.pid),
        }
    }

    pub fn mode(&self) -> LockMode {
        if self.exclusive {
            LockMode::Exclusive
        } else if self.maintenance {
            LockMode::Maintenance
        } else {
            LockMode::Shared
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lock for {} by pid {} on {}, refreshed {}s ago",
            match self.mode() {
                LockMode::Exclusive => "an exclusive",
                LockMode::Maintenance => "a maintenance",
                LockMode::Shared => "a shared",
            },
            self.purpose,
            self.pid,
            self.hostname,
            now_secs().saturating_sub(self.time)
        )
    }
}

/// What a lock excludes (FORMAT.md §9, the lock table in this crate's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Backups, restores, verify, forget: coexist with each other and with maintenance.
    Shared,
    /// Prune: excludes other maintenance and exclusive locks, never a backup.
    Maintenance,
    /// Repair: excludes every other lock.
    Exclusive,
}

impl LockMode {
    fn conflicts_with(self, other: LockMode) -> bool {
        use LockMode::*;
        matches!((self, other), (Exclusive, _) | (_, Exclusive) | (Maintenance, Maintenance))
    }
}

/// Clock slack allowed when comparing a lock's refresh time with this machine's boot time.
const BOOT_MARGIN_SECS: u64 = 120;

/// When this machine booted (unix seconds), from `/proc/stat`.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// This process's `machine-id:boot-id:pidns`, when the system tells (see [`LockInfo::host_id`]).
pub fn host_id() -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let machine = read("/etc/machine-id")
        .or_else(|| read("/var/lib/dbus/machine-id"))
        .filter(|m| m != "uninitialized" && m.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let boot = read("/proc/sys/kernel/random/boot_id")?;
    let pidns = std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned();
    Some(format!("{machine}:{boot}:{}", pidns.replace(':', "")))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn pid_alive(pid: u32) -> bool {
    // kill(pid, 0) probes without signalling; EPERM still means the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A held lock; dropping it removes the lock file.
pub struct Lock {
    backend: Arc<dyn Backend>,
    name: String,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<JoinHandle<()>>,
    health: Arc<LockHealth>,
}

/// Whether a held lock is still ours: the refresher records here when it could not refresh
/// the lock in time, or found it deleted (another process judged it stale).
pub struct LockHealth {
    lost: std::sync::Mutex<Option<String>>,
    /// When the lock file was last written successfully.
    refreshed: std::sync::Mutex<std::time::Instant>,
}

impl Default for LockHealth {
    fn default() -> Self {
        LockHealth { lost: Default::default(), refreshed: std::sync::Mutex::new(std::time::Instant::now()) }
    }
}

impl LockHealth {
    fn lose(&self, why: String) {
        self.lost.lock().unwrap().get_or_insert(why);
    }

    /// `Err` once the lock is lost: a writer MUST NOT make a restore point visible then (a
    /// maintenance job may already be deleting what it references).
    pub fn check(&self) -> Result<()> {
        let since = self.refreshed.lock().unwrap().elapsed();
        if since >= LOST_AFTER {
            self.lose(format!("not refreshed for {} s", since.as_secs()));
        }
        match &*self.lost.lock().unwrap() {
            Some(why) => {
                Err(Error::Locked(format!("our lock on the repository was lost ({why}); nothing was committed")))
            }
            None => Ok(()),
        }
    }
}

/// Checks that the lock `name` is still held: not lost by its refresher, and its file still
/// there (someone may have judged it stale and removed it).
pub fn check_held(backend: &dyn Backend, name: &str, health: &LockHealth) -> Result<()> {
    health.check()?;
    if !backend.exists(Kind::Lock, name)? {
        health.lose("its lock file was removed by another process".into());
        return health.check();
    }
    Ok(())
}

impl Lock {
    pub fn health(&self) -> Arc<LockHealth> {
        self.health.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the lock is still held (see [`check_held`]).
    pub fn check(&self) -> Result<()> {
        check_held(self.backend.as_ref(), &self.name, &self.health)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.backend.delete(Kind::Lock, &self.name);
    }
}

/// Takes a lock: see [`LockMode`] for what excludes what. Waits up to `wait` for conflicting
/// locks to go away; stale locks are removed.
pub fn acquire(
    backend: &Arc<dyn Backend>,
    hostname: &str,
    mode: LockMode,
    purpose: &str,
    wait: Duration,
) -> Result<Lock> {
    let deadline = std::time::Instant::now() + wait;
    let our_id = host_id();
    let now = now_secs();
    let info = LockInfo {
        hostname: hostname.to_string(),
        pid: std::process::id(),
        time: now,
        exclusive: mode == LockMode::Exclusive,
        maintenance: mode == LockMode::Maintenance,
        created: Some(now),
        purpose: purpose.into(),
        host_id: our_id.clone(),
    };
    loop {
        let name = cairn_storage::random_name();
        backend.put(Kind::Lock, &name, &serde_json::to_vec(&info).unwrap())?;
        cairn_storage::crash_point("lock.written");
        // Write first, then look: two racing exclusive lockers both see each other and both
        // back off, so at most one ever proceeds.
        match conflict(backend.as_ref(), hostname, our_id.as_deref(), &name, mode) {
            Ok(None) => {
                let (tx, rx) = mpsc::channel::<()>();
                let health = Arc::new(LockHealth::default());
                let refresher = spawn_refresher(backend.clone(), name.clone(), info, rx, health.clone());
                return Ok(Lock { backend: backend.clone(), name, stop: Some(tx), refresher: Some(refresher), health });
            }
            Ok(Some(holder)) => {
                backend.delete(Kind::Lock, &name)?;
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Locked(format!(
                        "{holder}; wait for it to finish, or remove the lock file under {}/locks if that process is gone",
                        backend.location()
                    )));
                }
                std::thread::sleep(Duration::from_millis(200 + (std::process::id() % 300) as u64));
            }
            Err(e) => {
                let _ = backend.delete(Kind::Lock, &name);
                return Err(e);
            }
        }
    }
}

/// Refreshes the lock every [`REFRESH_EVERY`] (sooner after a failure) until told to stop. The
/// lock is lost when its file has vanished, or when no refresh succeeded for long enough that
/// others may judge it stale.
fn spawn_refresher(
    backend: Arc<dyn Backend>,
    name: String,
    mut info: LockInfo,
    stop: mpsc::Receiver<()>,
    health: Arc<LockHealth>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut every = REFRESH_EVERY;
        let mut last_ok = std::time::Instant::now();
        while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
            match backend.exists(Kind::Lock, &name) {
                Ok(false) => {
                    health.lose("its lock file was removed by another process".into());
                    return;
                }
                Ok(true) => {}
                Err(_) => {}
            }
            info.time = now_secs();
            match backend.put(Kind::Lock, &name, &serde_json::to_vec(&info).unwrap()) {
                Ok(()) => {
                    last_ok = std::time::Instant::now();
                    *health.refreshed.lock().unwrap() = last_ok;
                    every = REFRESH_EVERY;
                }
                Err(e) => {
                    if last_ok.elapsed() >= LOST_AFTER {
                        health.lose(format!("not refreshed for {} s: {e}", last_ok.elapsed().as_secs()));
                    }
                    every = REFRESH_RETRY;
                }
            }
        }
    })
}

fn conflict(
    backend: &dyn Backend,
    hostname: &str,
    our_id: Option<&str>,
    ours: &str,
    mode: LockMode,
) -> Result<Option<String>> {
    let listed = backend.list(Kind::Lock)?;
    // Our own lock must show: a store that lost it would let a conflicting locker in.
    if !listed.iter().any(|l| l.name == ours) {
        return Err(Error::Locked(format!(
            "our lock file does not show in {}/locks after writing it; refusing to go on",
            backend.location()
        )));
    }
    for l in listed {
        if l.name == ours {
            continue;
        }
        let info: LockInfo = match backend.get(Kind::Lock, &l.name) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(i) => i,
                Err(_) => continue, // unreadable lock files are ignored, never trusted
            },
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        if info.is_stale(hostname, our_id) {
            let _ = backend.delete(Kind::Lock, &l.name);
            continue;
        }
        if mode.conflicts_with(info.mode()) {
            return Ok(Some(info.describe()));
        }
    }
    Ok(None)
}

/// The live locks other than `ours` (stale ones are left alone here: see [`acquire`]).
/// Unreadable lock files are returned as `None`: a caller deciding what may be deleted must
/// count them as old.
pub fn live_locks(backend: &dyn Backend, hostname: &str, ours: &str) -> Result<Vec<(String, Option<LockInfo>)>> {
    let our_id = host_id();
    let mut out = Vec::new();
    for l in backend.list(Kind::Lock)? {
        if l.name == ours {
            continue;
        }
        let info = match backend.get(Kind::Lock, &l.name) {
            Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        if info.as_ref().is_some_and(|i| i.is_stale(hostname, our_id.as_deref())) {
            continue;
        }
        out.push((l.name, info));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_storage::LocalBackend;

    #[test]
    fn shared_coexist_exclusive_excludes_and_dead_holders_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()));
        b.create().unwrap();
        use LockMode::*;
        let s1 = acquire(&b, "h", Shared, "backup", Duration::ZERO).unwrap();
        let s2 = acquire(&b, "h", Shared, "backup", Duration::ZERO).unwrap();
        let err = acquire(&b, "h", Exclusive, "repair", Duration::ZERO).err().unwrap();
        assert!(err.to_string().contains("shared lock for backup"), "{err}");
        // Maintenance (prune) runs alongside backups, but not alongside another prune.
        let m = acquire(&b, "h", Maintenance, "prune", Duration::ZERO).unwrap();
        let err = acquire(&b, "h", Maintenance, "prune", Duration::ZERO).err().unwrap();
        assert!(err.to_string().contains("maintenance lock for prune"), "{err}");
        let s3 = acquire(&b, "h", Shared, "backup", Duration::ZERO).unwrap();
        let live = live_locks(b.as_ref(), "h", m.name()).unwrap();
        assert_eq!(live.len(), 3);
        assert!(live.iter().all(|(_, i)| i.as_ref().unwrap().created.is_some()));
        drop((s1, s2, s3, m));
        let x = acquire(&b, "h", Exclusive, "repair", Duration::ZERO).unwrap();
        assert!(acquire(&b, "h", Shared, "backup", Duration::ZERO).is_err());
        assert!(acquire(&b, "h", Maintenance, "prune", Duration::ZERO).is_err());
        drop(x);
        assert!(b.list(Kind::Lock).unwrap().is_empty());
        // A lock left by a dead process on this host does not block.
        let dead = LockInfo {
            hostname: "h".into(),
            pid: 999_999_999,
            time: now_secs(),
            exclusive: true,
            maintenance: false,
            created: None,
            purpose: "gc".into(),
            host_id: None,
        };
        b.put(Kind::Lock, "deadbeefdeadbeef", &serde_json::to_vec(&dead).unwrap()).unwrap();
        let _ok = acquire(&b, "h", LockMode::Shared, "backup", Duration::ZERO).unwrap();
    }
}
