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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockInfo {
    pub hostname: String,
    pub pid: u32,
    /// Unix seconds of the last refresh.
    pub time: u64,
    pub exclusive: bool,
    pub purpose: String,
}

impl LockInfo {
    fn is_stale(&self, our_host: &str) -> bool {
        let age = now_secs().saturating_sub(self.time);
        if age > STALE_AFTER.as_secs() {
            return true;
        }
        // On our own host we can tell a dead holder at once (a kill -9'd backup).
        self.hostname == our_host && !pid_alive(self.pid)
    }

    fn describe(&self) -> String {
        format!(
            "{} lock for {} by pid {} on {}, refreshed {}s ago",
            if self.exclusive { "an exclusive" } else { "a shared" },
            self.purpose,
            self.pid,
            self.hostname,
            now_secs().saturating_sub(self.time)
        )
    }
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

/// Takes a lock. Shared locks coexist with each other; an exclusive lock excludes all others.
/// Waits up to `wait` for conflicting locks to go away; stale locks are removed.
pub fn acquire(
    backend: &Arc<dyn Backend>,
    hostname: &str,
    exclusive: bool,
    purpose: &str,
    wait: Duration,
) -> Result<Lock> {
    let deadline = std::time::Instant::now() + wait;
    let mut info = LockInfo {
        hostname: hostname.to_string(),
        pid: std::process::id(),
        time: now_secs(),
        exclusive,
        purpose: purpose.into(),
    };
    loop {
        let name = cairn_storage::random_name();
        backend.put(Kind::Lock, &name, &serde_json::to_vec(&info).unwrap())?;
        // Write first, then look: two racing exclusive lockers both see each other and both
        // back off, so at most one ever proceeds.
        match conflict(backend.as_ref(), hostname, &name, exclusive) {
            Ok(None) => {
                let (tx, rx) = mpsc::channel::<()>();
                let b = backend.clone();
                let n = name.clone();
                let refresher = std::thread::spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(REFRESH_EVERY) {
                        info.time = now_secs();
                        let _ = b.put(Kind::Lock, &n, &serde_json::to_vec(&info).unwrap());
                    }
                });
                return Ok(Lock { backend: backend.clone(), name, stop: Some(tx), refresher: Some(refresher) });
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

fn conflict(backend: &dyn Backend, hostname: &str, ours: &str, exclusive: bool) -> Result<Option<String>> {
    for l in backend.list(Kind::Lock)? {
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
        if info.is_stale(hostname) {
            let _ = backend.delete(Kind::Lock, &l.name);
            continue;
        }
        if exclusive || info.exclusive {
            return Ok(Some(info.describe()));
        }
    }
    Ok(None)
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
        let s1 = acquire(&b, "h", false, "backup", Duration::ZERO).unwrap();
        let s2 = acquire(&b, "h", false, "backup", Duration::ZERO).unwrap();
        let err = acquire(&b, "h", true, "gc", Duration::ZERO).err().unwrap();
        assert!(err.to_string().contains("shared lock for backup"), "{err}");
        drop((s1, s2));
        let x = acquire(&b, "h", true, "gc", Duration::ZERO).unwrap();
        assert!(acquire(&b, "h", false, "backup", Duration::ZERO).is_err());
        drop(x);
        assert!(b.list(Kind::Lock).unwrap().is_empty());
        // A lock left by a dead process on this host does not block.
        let dead = LockInfo {
            hostname: "h".into(),
            pid: 999_999_999,
            time: now_secs(),
            exclusive: true,
            purpose: "gc".into(),
        };
        b.put(Kind::Lock, "deadbeefdeadbeef", &serde_json::to_vec(&dead).unwrap()).unwrap();
        let _ok = acquire(&b, "h", false, "backup", Duration::ZERO).unwrap();
    }
}
