//! What a long piece of work tells its caller, and how the caller stops it: progress events go
//! out through [`Progress`]; the caller's answer to [`Progress::cancelled`] comes back in. A
//! terminal draws a bar from the events; a server's task records them and answers `cancelled`
//! from its "cancel" button. Work that sees `cancelled` stops at its next batch of blocks and
//! fails with [`Cancelled`]: what it wrote is left as a failed run leaves it (no restore point,
//! unreferenced packs for prune), never a visible partial result.

/// Receives a task's progress; answers whether it should stop.
pub trait Progress: Sync {
    /// A new phase starts with `total` units (bytes) of work.
    fn start(&self, phase: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish(&self);
    /// A note for the user (a reason, a warning) that must not be lost in the bar.
    fn note(&self, msg: &str) {
        eprintln!("{msg}");
    }
    /// Whether the caller asked the work to stop. Asked between batches of blocks, so it must
    /// be cheap (an atomic load).
    fn cancelled(&self) -> bool {
        false
    }
}

/// The work stopped because its caller asked it to ([`Progress::cancelled`]).
#[derive(Debug, thiserror::Error)]
#[error("cancelled while {0}")]
pub struct Cancelled(pub String);

/// Fails with [`Cancelled`] once the caller asked to stop; `during` says what was under way.
pub fn check_cancelled(progress: &dyn Progress, during: impl FnOnce() -> String) -> Result<(), Cancelled> {
    if progress.cancelled() {
        return Err(Cancelled(during()));
    }
    Ok(())
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn note(&self, _: &str) {}
}
