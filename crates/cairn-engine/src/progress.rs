//! Progress reporting from long work; the CLI draws bars, tests and scripts pass [`NoProgress`].

pub trait Progress: Sync {
    /// A new phase starts with `total` units (bytes) of work.
    fn start(&self, phase: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish(&self);
    /// A note for the user (a reason, a warning) that must not be lost in the bar.
    fn note(&self, msg: &str) {
        eprintln!("{msg}");
    }
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn note(&self, _: &str) {}
}
