//! A backend that wraps another and injects one fault at a chosen call: the "fail the Nth I/O"
//! loop of SQLite's test suite, for cairn's storage boundary. The fault-injection harness
//! (`crates/cairn-torture`) and unit tests use it; nothing else does.
//!
//! Calls are numbered from 1 in the order they reach the wrapper, per [`Op`] class, so a run
//! without a fault tells how many calls of each class an operation makes, and the harness then
//! injects a fault at every one of them.

use crate::{Backend, Kind, Listed, Result, StorageError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The classes of calls a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `put`, `put_new`, `create`.
    Write,
    /// `get`, `get_range`, `get_range_into`, `get_span`, `exists`.
    Read,
    List,
    Delete,
}

/// What happens at the chosen call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with this errno (e.g. `libc::ENOSPC`, `libc::EIO`) and does nothing.
    Errno(i32),
    /// A write stores only the first half of the object under its final name, then fails
    /// (what a non-atomic object store or a lying filesystem can do).
    Torn,
    /// A write reports success but nothing is stored (a lost rename, a lost acknowledgement).
    Lost,
    /// A read returns an object that ends early (`ShortRead` for ranges, a truncated `get`).
    Short,
    /// A read returns the object with one bit flipped in its middle.
    Flip,
    /// A read succeeds but returns only the first half of what was asked (a backend breaking
    /// its contract: readers must notice, never use the missing bytes as data).
    Truncate,
    /// The call waits this long, then proceeds normally.
    Stall(Duration),
}

impl Fault {
    /// The faults that make sense for a class of calls.
    pub fn for_op(op: Op) -> &'static [Fault] {
        const EIO: Fault = Fault::Errno(libc::EIO);
        const ENOSPC: Fault = Fault::Errno(libc::ENOSPC);
        match op {
            Op::Write => &[ENOSPC, EIO, Fault::Torn, Fault::Lost],
            Op::Read => &[EIO, Fault::Short, Fault::Flip, Fault::Truncate],
            Op::List | Op::Delete => &[EIO],
        }
    }

    pub fn name(&self) -> String {
        match self {
            Fault::Errno(e) if *e == libc::ENOSPC => "ENOSPC".into(),
            Fault::Errno(e) if *e == libc::EIO => "EIO".into(),
            Fault::Errno(e) => format!("errno {e}"),
            Fault::Torn => "torn write".into(),
            Fault::Lost => "lost write".into(),
            Fault::Short => "short read".into(),
            Fault::Flip => "flipped bit".into(),
            Fault::Truncate => "truncated read".into(),
            Fault::Stall(d) => format!("stall {} ms", d.as_millis()),
        }
    }
}

/// Where the one fault goes: the `at`-th call (from 1) of class `op`.
#[derive(Clone, Copy, Debug)]
pub struct FaultPlan {
    pub op: Op,
    pub at: u64,
    pub fault: Fault,
}

/// What the fault hit, once it fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    pub kind: Kind,
    pub name: String,
    pub call: &'static str,
    /// False when the fault has no meaning for the call it landed on (a flipped bit on
    /// `exists`): nothing was injected.
    pub applied: bool,
}

pub struct FaultyBackend<B> {
    inner: B,
    counts: [AtomicU64; 4],
    plan: Option<FaultPlan>,
    injected: Mutex<Option<Injected>>,
}

impl<B: Backend> FaultyBackend<B> {
    /// A pass-through wrapper that only counts calls.
    pub fn counting(inner: B) -> Self {
        Self::new(inner, None)
    }

    pub fn new(inner: B, plan: Option<FaultPlan>) -> Self {
        FaultyBackend { inner, counts: Default::default(), plan, injected: Mutex::new(None) }
    }

    /// How many calls of a class were made.
    pub fn calls(&self, op: Op) -> u64 {
        self.counts[op as usize].load(Ordering::SeqCst)
    }

    /// The object the fault hit, if it fired.
    pub fn injected(&self) -> Option<Injected> {
        self.injected.lock().unwrap().clone()
    }

    /// Counts a call and says whether the fault fires at it.
    fn fires(&self, op: Op, kind: Kind, name: &str, call: &'static str) -> Option<Fault> {
        let n = self.counts[op as usize].fetch_add(1, Ordering::SeqCst) + 1;
        let plan = self.plan?;
        if plan.op != op || plan.at != n {
            return None;
        }
        *self.injected.lock().unwrap() = Some(Injected { kind, name: name.to_string(), call, applied: true });
        Some(plan.fault)
    }

    /// The fault that fired has no effect on this call.
    fn not_applied(&self) {
        if let Some(i) = self.injected.lock().unwrap().as_mut() {
            i.applied = false;
        }
    }
}

fn errno(e: i32, kind: Kind, name: &str) -> StorageError {
    StorageError::Io { what: format!("injected fault on {kind} {name}"), source: std::io::Error::from_raw_os_error(e) }
}

fn flip(mut data: Vec<u8>) -> Vec<u8> {
    if !data.is_empty() {
        let mid = data.len() / 2;
        data[mid] ^= 0x10;
    }
    data
}

impl<B: Backend> FaultyBackend<B> {
    fn write(&self, kind: Kind, name: &str, data: &[u8], call: &'static str, new: bool) -> Result<()> {
        let put = |d: &[u8]| if new { self.inner.put_new(kind, name, d) } else { self.inner.put(kind, name, d) };
        match self.fires(Op::Write, kind, name, call) {
            None => put(data),
            Some(Fault::Errno(e)) => Err(errno(e, kind, name)),
            Some(Fault::Torn) => {
                put(&data[..data.len() / 2])?;
                Err(errno(libc::EIO, kind, name))
            }
            Some(Fault::Lost) => Ok(()),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                put(data)
            }
            Some(Fault::Short | Fault::Flip | Fault::Truncate) => {
                self.not_applied();
                put(data)
            }
        }
    }

    fn read(&self, kind: Kind, name: &str, call: &'static str, f: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
        match self.fires(Op::Read, kind, name, call) {
            None => f(),
            Some(Fault::Torn | Fault::Lost) => {
                self.not_applied();
                f()
            }
            Some(Fault::Errno(e)) => Err(errno(e, kind, name)),
            Some(Fault::Short) => {
                let data = f()?;
                Err(StorageError::ShortRead {
                    kind,
                    name: name.to_string(),
                    offset: 0,
                    end: data.len() as u64,
                    size: data.len() as u64 / 2,
                })
            }
            Some(Fault::Flip) => f().map(flip),
            Some(Fault::Truncate) => f().map(|mut d| {
                d.truncate(d.len() / 2);
                d
            }),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                f()
            }
        }
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn create(&self) -> Result<()> {
        match self.fires(Op::Write, Kind::Config, "", "create") {
            None => self.inner.create(),
            Some(Fault::Errno(e)) => Err(errno(e, Kind::Config, "")),
            Some(_) => {
                self.not_applied();
                self.inner.create()
            }
        }
    }

    fn exists(&self, kind: Kind, name: &str) -> Result<bool> {
        match self.fires(Op::Read, kind, name, "exists") {
            None => self.inner.exists(kind, name),
            Some(Fault::Errno(e)) => Err(errno(e, kind, name)),
            Some(_) => {
                self.not_applied();
                self.inner.exists(kind, name)
            }
        }
    }

    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.write(kind, name, data, "put", false)
    }

    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.write(kind, name, data, "put_new", true)
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.read(kind, name, "get", || self.inner.get(kind, name))
    }

    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read(kind, name, "get_range", || self.inner.get_range(kind, name, offset, len))
    }

    fn get_range_into(&self, kind: Kind, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get_range(kind, name, offset, len)?;
        Ok(())
    }

    fn get_span(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>> {
        self.get_range_into(kind, name, offset, len, buf)?;
        // What it holds, which a truncating fault makes shorter than asked.
        Ok(0..buf.len())
    }

    fn list(&self, kind: Kind) -> Result<Vec<Listed>> {
        match self.fires(Op::List, kind, "", "list") {
            None => self.inner.list(kind),
            Some(Fault::Errno(e)) => Err(errno(e, kind, "")),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                self.inner.list(kind)
            }
            Some(_) => {
                self.not_applied();
                self.inner.list(kind)
            }
        }
    }

    fn reads_in_flight(&self) -> usize {
        self.inner.reads_in_flight()
    }
    fn object_lock(&self) -> Option<&dyn crate::ObjectLock> {
        self.inner.object_lock()
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        match self.fires(Op::Delete, kind, name, "delete") {
            None => self.inner.delete(kind, name),
            Some(Fault::Errno(e)) => Err(errno(e, kind, name)),
            Some(Fault::Lost) => Ok(()),
            Some(_) => {
                self.not_applied();
                self.inner.delete(kind, name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalBackend;

    #[test]
    fn counts_calls_and_fires_once_at_the_planned_one() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan { op: Op::Write, at: 2, fault: Fault::Errno(libc::ENOSPC) };
        let b = FaultyBackend::new(LocalBackend::new(dir.path()), Some(plan));
        b.create().unwrap(); // write 1
        let name = "ab".repeat(32);
        let e = b.put(Kind::Index, &name, b"x").unwrap_err(); // write 2: fails
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(!b.exists(Kind::Index, &name).unwrap());
        b.put(Kind::Index, &name, b"x").unwrap(); // write 3: fine
        assert_eq!((b.calls(Op::Write), b.calls(Op::Read)), (3, 1));
        assert_eq!(b.injected().unwrap().name, name);
    }

    #[test]
    fn torn_writes_leave_half_and_lost_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let name = "cd".repeat(32);
        let torn = FaultyBackend::new(
            LocalBackend::new(dir.path()),
            Some(FaultPlan { op: Op::Write, at: 1, fault: Fault::Torn }),
        );
        assert!(torn.put(Kind::Point, &name, b"0123456789").is_err());
        assert_eq!(torn.get(Kind::Point, &name).unwrap(), b"01234");
        let lost = FaultyBackend::new(
            LocalBackend::new(dir.path()),
            Some(FaultPlan { op: Op::Write, at: 1, fault: Fault::Lost }),
        );
        lost.put(Kind::Point, &"ef".repeat(32), b"x").unwrap();
        assert!(!lost.exists(Kind::Point, &"ef".repeat(32)).unwrap());
    }
}
