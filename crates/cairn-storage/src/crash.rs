//! Crash points: named moments of the write ordering where the kill harness
//! (`crates/cairn-torture`) kills the process, to prove that a crash *there* leaves a valid
//! repository (docs/RELIABILITY.md).
//!
//! Only debug builds (the ones the tests run) honour them; in release builds
//! [`crash_point`] is empty and compiles away.
//! - `CAIRN_CRASH_AT=NAME:K` kills the process with SIGKILL the K-th time it reaches `NAME`
//!   (as `kill -9` would: no destructor, no flush, no unlock).
//! - `CAIRN_CRASH_TRACE=FILE` appends the name of every point reached to FILE, one per line,
//!   so the harness can count how often an operation passes each point.

/// Marks a crash point (see the module docs).
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    imp::reach(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod imp {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Plan {
        target: Option<(String, u64)>,
        trace: Option<Mutex<std::fs::File>>,
    }

    static PLAN: OnceLock<Plan> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn plan() -> &'static Plan {
        PLAN.get_or_init(|| {
            let target = std::env::var("CAIRN_CRASH_AT").ok().and_then(|v| {
                let (name, k) = v.rsplit_once(':')?;
                Some((name.to_string(), k.parse().ok()?))
            });
            let trace = std::env::var_os("CAIRN_CRASH_TRACE")
                .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok().map(Mutex::new));
            Plan { target, trace }
        })
    }

    pub fn reach(name: &str) {
        let plan = plan();
        if let Some(f) = &plan.trace {
            let _ = writeln!(f.lock().unwrap(), "{name}");
        }
        if let Some((target, k)) = &plan.target {
            if target == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k {
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
}
