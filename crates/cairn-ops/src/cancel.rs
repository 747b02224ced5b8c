//! Cancellation: a caller (a server's "cancel task", a signal handler) asks; an operation stops
//! at the next boundary between its units of work (between VMs, before a boot check) and fails
//! with [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled). A unit already running (one VM's
//! backup) finishes or fails on its own terms: its guest is never left frozen or paused, and an
//! unfinished restore point never becomes visible (FORMAT.md §8).

use crate::error::{ErrorKind, OpError, OpResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared flag: clones see the same request.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// Fails once cancellation was asked for; `before` names what was not started.
    pub fn check(&self, before: &str) -> OpResult<()> {
        if self.is_cancelled() {
            return Err(OpError::new(ErrorKind::Cancelled, anyhow::anyhow!("cancelled before {before}")));
        }
        Ok(())
    }
}
