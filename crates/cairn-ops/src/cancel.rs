//! Cancellation: a caller (a server's "cancel task", a signal handler) asks; an operation stops
//! at the next boundary between its units of work (between VMs, before a boot check), and the
//! unit under way stops at its next batch of blocks, through the `Progress` it was given
//! ([`Cancel::watching`]; `cairn_engine::progress`). Either way the operation fails with
//! [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled), and what was under way ends as after
//! any failure: its guest is never left frozen or paused, and an unfinished restore point
//! never becomes visible (FORMAT.md §8).
//!
//! Any operation that takes a `&dyn Progress` can be cancelled the same way: the caller's
//! `Progress` answers `cancelled()`; a `Cancel` is one ready-made answer.

use crate::error::{ErrorKind, OpError, OpResult};
use cairn_engine::Progress;
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
    /// `progress`, answering `cancelled()` from this flag: work given it stops mid-way.
    pub fn watching<'a>(&'a self, progress: &'a dyn Progress) -> Watching<'a> {
        Watching { cancel: self, progress }
    }
    /// Fails once cancellation was asked for; `before` names what was not started.
    pub fn check(&self, before: &str) -> OpResult<()> {
        if self.is_cancelled() {
            return Err(OpError::new(ErrorKind::Cancelled, anyhow::anyhow!("cancelled before {before}")));
        }
        Ok(())
    }
}

/// A `Progress` that passes events on and answers `cancelled()` from a [`Cancel`].
pub struct Watching<'a> {
    cancel: &'a Cancel,
    progress: &'a dyn Progress,
}

impl Progress for Watching<'_> {
    fn start(&self, phase: &str, total: u64) {
        self.progress.start(phase, total)
    }
    fn advance(&self, n: u64) {
        self.progress.advance(n)
    }
    fn finish(&self) {
        self.progress.finish()
    }
    fn note(&self, msg: &str) {
        self.progress.note(msg)
    }
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.progress.cancelled()
    }
}
