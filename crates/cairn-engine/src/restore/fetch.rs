//! Reading packs for a restore: frames are grouped into spans (neighbouring frames of one
//! pack, read with one large request that goes around the page cache), several spans are read
//! at once, and each frame job carries a handle to its span's bytes.
//!
//! Jobs must still reach the workers in disk order (see `restore_disk`), while the frames of
//! an incremental point alternate between old and new packs. So the planner collects a short
//! window of jobs, builds that window's spans per pack, starts their reads, and only then sends
//! the window's jobs in order.
//!
//! Deadlock freedom: span buffers come from a pool of `Depth::span_buffers`. A window never needs
//! more than `Depth::window_spans` <= `span_buffers` of them, and every buffer not held by the window
//! being started belongs to a span whose jobs have all been sent, so it comes back.

use anyhow::Result;
use cairn_repo::{BlobLocation, Repository};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Frames at most this far apart in a pack share a read (the gap is read and ignored).
const SPAN_GAP: u64 = 256 << 10;
/// Largest span read at once: large enough for full device speed, small enough that the
/// spans in flight stay a few tens of MiB.
const SPAN_MAX: u64 = 4 << 20;
/// How deep the read pipeline is: tuned to the storage's latency.
#[derive(Clone, Copy, Debug)]
pub(super) struct Depth {
    /// Frame jobs per window at most.
    window_jobs: usize,
    /// Spans per window at most.
    window_spans: usize,
    /// Span buffers: starting a window waits for buffers to come back when all are in use.
    span_buffers: usize,
    /// Span reads in flight: the device serves several at once faster than one.
    pub(super) fetchers: usize,
}

impl Depth {
    /// A local disk: 4 reads in flight keep it busy.
    pub(super) const LOCAL: Depth = Depth { window_jobs: 64, window_spans: 4, span_buffers: 10, fetchers: 4 };
    /// An object store: each read waits for a round trip, so more of them are in flight
    /// (measured on s3s-fs: 15.3 s -> 10.7 s for an 8 GiB restore; docs/BENCHMARKS.md).
    pub(super) const REMOTE: Depth = Depth { window_jobs: 96, window_spans: 6, span_buffers: 12, fetchers: 8 };

    /// The depth for a backend that serves `reads` requests in flight well.
    pub(super) fn for_reads(reads: usize) -> Depth {
        if reads > Depth::LOCAL.fetchers {
            Depth::REMOTE
        } else {
            Depth::LOCAL
        }
    }
}

// The deadlock-freedom argument above needs a window to fit in the pool.
const _: () = assert!(Depth::LOCAL.window_spans <= Depth::LOCAL.span_buffers);
const _: () = assert!(Depth::REMOTE.window_spans <= Depth::REMOTE.span_buffers);

/// A span's stored bytes; the buffer goes back to the pool when the last frame is decoded.
pub(super) struct SpanData {
    buf: Vec<u8>,
    /// Where the span's first byte sits in `buf`.
    at: usize,
    start: u64,
    pool: Sender<Vec<u8>>,
}

impl SpanData {
    /// The stored bytes of a frame of this span.
    pub(super) fn frame(&self, loc: &BlobLocation) -> &[u8] {
        let from = self.at + (loc.frame_offset as u64 - self.start) as usize;
        &self.buf[from..from + loc.frame_stored_len as usize]
    }
}

impl Drop for SpanData {
    fn drop(&mut self) {
        let _ = self.pool.send(std::mem::take(&mut self.buf));
    }
}

/// A span's bytes, or why they could not be read (reported by every frame of the span).
pub(super) type SpanResult = std::result::Result<Arc<SpanData>, Arc<anyhow::Error>>;

/// Where a span's read result appears; frame jobs wait on it.
#[derive(Default)]
pub(super) struct SpanSlot {
    result: Mutex<Option<SpanResult>>,
    ready: Condvar,
}

impl SpanSlot {
    pub(super) fn wait(&self) -> SpanResult {
        let mut r = self.result.lock().unwrap();
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            r = self.ready.wait(r).unwrap();
        }
    }

    fn fill(&self, r: SpanResult) {
        *self.result.lock().unwrap() = Some(r);
        self.ready.notify_all();
    }
}

struct Span {
    loc: BlobLocation,
    start: u64,
    end: u64,
}

/// A span read for a fetcher thread.
pub(super) type ReadRequest = (String, u64, u64, Vec<u8>, Arc<SpanSlot>);

/// The planner's side: collects jobs into windows and starts their reads.
pub(super) struct Windows<'a, J> {
    jobs: Vec<(J, usize)>,
    spans: Vec<Span>,
    read_tx: Sender<ReadRequest>,
    pool_tx: Sender<Vec<u8>>,
    pool_rx: Receiver<Vec<u8>>,
    stopped: &'a AtomicBool,
    depth: Depth,
}

impl<'a, J> Windows<'a, J> {
    /// A window planner, and the receiver the fetcher threads ([`fetch_spans`]) read from.
    pub(super) fn new(stopped: &'a AtomicBool, depth: Depth) -> (Self, Receiver<ReadRequest>) {
        let (read_tx, read_rx) = bounded(depth.fetchers);
        let (pool_tx, pool_rx) = bounded(depth.span_buffers);
        for _ in 0..depth.span_buffers {
            pool_tx.send(Vec::new()).unwrap();
        }
        let w = Windows { jobs: Vec::new(), spans: Vec::new(), read_tx, pool_tx, pool_rx, stopped, depth };
        (w, read_rx)
    }

    /// Adds the job of the frame at `loc`; when the window is full, first starts it and sends
    /// its jobs to `send` (which returns false once nobody listens: then so does this).
    pub(super) fn add(&mut self, job: J, loc: BlobLocation, send: &mut dyn FnMut(J, Arc<SpanSlot>) -> bool) -> bool {
        let (start, end) = (loc.frame_offset as u64, loc.frame_offset as u64 + loc.frame_stored_len as u64);
        // Backup workers finish frames slightly out of disk order, so a span grows on both sides.
        let joins = |sp: &Span| {
            sp.loc.pack == loc.pack
                && start <= sp.end + SPAN_GAP
                && end + SPAN_GAP >= sp.start
                && sp.end.max(end) - sp.start.min(start) <= SPAN_MAX
        };
        let span = match self.spans.iter().position(joins) {
            Some(i) => i,
            None => {
                if self.spans.len() == self.depth.window_spans && !self.flush(send) {
                    return false;
                }
                self.spans.push(Span { loc, start, end });
                self.spans.len() - 1
            }
        };
        let sp = &mut self.spans[span];
        (sp.start, sp.end) = (sp.start.min(start), sp.end.max(end));
        self.jobs.push((job, span));
        self.jobs.len() < self.depth.window_jobs || self.flush(send)
    }

    /// Starts the reads of the window's spans, then sends its jobs in order.
    pub(super) fn flush(&mut self, send: &mut dyn FnMut(J, Arc<SpanSlot>) -> bool) -> bool {
        let mut slots = Vec::with_capacity(self.spans.len());
        for sp in self.spans.drain(..) {
            // A failed restore stops the workers with buffers still held by queued jobs.
            let buf = loop {
                match self.pool_rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(b) => break b,
                    Err(_) if self.stopped.load(Ordering::Relaxed) => return false,
                    Err(_) => {}
                }
            };
            let slot = Arc::new(SpanSlot::default());
            if self.read_tx.send((sp.loc.pack_name(), sp.start, sp.end - sp.start, buf, slot.clone())).is_err() {
                return false;
            }
            slots.push(slot);
        }
        for (job, span) in self.jobs.drain(..) {
            if !send(job, slots[span].clone()) {
                return false;
            }
        }
        true
    }

    /// The pool's sender, for the fetcher threads.
    pub(super) fn pool(&self) -> Sender<Vec<u8>> {
        self.pool_tx.clone()
    }
}

/// A fetcher thread: reads spans until the planner is done.
pub(super) fn fetch_spans(repo: &Repository, requests: Receiver<ReadRequest>, pool: Sender<Vec<u8>>) {
    for (pack, start, len, mut buf, slot) in requests {
        let r: Result<_> = repo.read_pack_span(&pack, start, len, &mut buf).map_err(Into::into);
        slot.fill(match r {
            Ok(range) => Ok(Arc::new(SpanData { buf, at: range.start, start, pool: pool.clone() })),
            Err(e) => {
                let _ = pool.send(buf);
                Err(Arc::new(e))
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pack: u8, offset: u32, len: u32) -> BlobLocation {
        BlobLocation {
            pack: [pack; 32],
            frame_offset: offset,
            frame_stored_len: len,
            frame_raw_len: len,
            raw_offset: 0,
            len,
            kind: cairn_repo::pack::BlobKind::Data,
        }
    }

    #[test]
    fn spans_group_shuffled_and_interleaved_frames_and_jobs_keep_their_order() {
        let stopped = AtomicBool::new(false);
        let (mut w, requests) = Windows::<u32>::new(&stopped, Depth::LOCAL);
        // An incremental point: pack 1 in disk order but locally shuffled, a frame of pack 2
        // every few frames, and a far frame of pack 1 that needs its own span.
        let frames =
            [(1, 300_000), (1, 0), (2, 50_000), (1, 600_000), (1, 900_000), (2, 0), (1, 1_200_000), (1, 90_000_000)];
        let sent = std::cell::RefCell::new(Vec::new());
        let mut send = |j: u32, slot: Arc<SpanSlot>| {
            sent.borrow_mut().push((j, slot));
            true
        };
        for (i, (pack, off)) in frames.iter().enumerate() {
            assert!(w.add(i as u32, loc(*pack, *off, 50_000), &mut send));
        }
        assert!(sent.borrow().is_empty(), "the window is not full yet");
        // Reads are started first; consume them as a fetcher would (the pool has room).
        let reader = std::thread::spawn(move || requests.iter().map(|(p, s, l, _, _)| (p, s, l)).collect::<Vec<_>>());
        assert!(w.flush(&mut send));
        drop(w);
        let reads = reader.join().unwrap();
        let sent = sent.into_inner();
        let name = |p: u8| hex::encode([p; 32]);
        assert_eq!(reads, [(name(1), 0, 1_250_000), (name(2), 0, 100_000), (name(1), 90_000_000, 50_000)]);
        assert_eq!(sent.iter().map(|(j, _)| *j).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6, 7]);
        // Frames of one span share its slot.
        assert!(Arc::ptr_eq(&sent[0].1, &sent[6].1) && Arc::ptr_eq(&sent[2].1, &sent[5].1));
        assert!(!Arc::ptr_eq(&sent[0].1, &sent[7].1));
    }

    #[test]
    fn a_window_with_too_many_spans_is_started_before_the_next_one_opens() {
        let stopped = AtomicBool::new(false);
        let (mut w, requests) = Windows::<u32>::new(&stopped, Depth::LOCAL);
        let reader = std::thread::spawn(move || requests.iter().count());
        let sent = std::cell::RefCell::new(Vec::new());
        let mut send = |j: u32, _slot: Arc<SpanSlot>| {
            sent.borrow_mut().push(j);
            true
        };
        let spans = Depth::LOCAL.window_spans;
        for p in 0..=spans as u8 {
            assert!(w.add(p as u32, loc(p, 0, 1000), &mut send));
        }
        assert_eq!(*sent.borrow(), (0..spans as u32).collect::<Vec<_>>());
        assert!(w.flush(&mut send));
        drop(w);
        assert_eq!(reader.join().unwrap(), spans + 1);
    }
}
