//! Recycled byte buffers for the block pipelines: a fresh 1 MiB buffer per batch costs page
//! faults and kernel page zeroing (~6% of a backup's CPU, measured with perf).

use crossbeam_channel::{bounded, Receiver, Sender};

#[derive(Clone)]
pub struct Pool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl Pool {
    /// A pool keeping at most `keep` idle buffers.
    pub fn new(keep: usize) -> Pool {
        let (tx, rx) = bounded(keep);
        Pool { tx, rx }
    }

    /// A recycled buffer (contents unspecified) or a new empty one.
    pub fn get(&self) -> Vec<u8> {
        self.rx.try_recv().unwrap_or_default()
    }

    pub fn put(&self, v: Vec<u8>) {
        let _ = self.tx.try_send(v);
    }
}

/// Sets `buf` to exactly `len` bytes without zeroing what it already holds.
pub fn set_len(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    } else {
        buf.truncate(len);
    }
}
