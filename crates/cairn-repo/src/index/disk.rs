//! The index's entries on local disk, for repositories too large to hold them in memory
//! (FORMAT.md, "Known limits"): one file of fixed-size records sorted by block ID, and in
//! memory only the first ID of each 4 KiB page of it (32 bytes per 85 entries). A lookup is a
//! binary search over those, then one page read (the page cache serves the hot ones).
//!
//! The file is a private cache of what the index files say, never repository data: it is
//! created unlinked (nothing is left behind, even by a killed process), in a folder only its
//! owner can enter. A read error on it is a failure of the local disk: lookups panic with the
//! file's folder named rather than answer "not found", which a prune would take for "unused".

use super::BlobSlot;
use crate::pack::BlobKind;
use crate::BlockId;
use smallvec::SmallVec;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per record: ID, frame number, offset and length in the frame, kind, padding.
const RECORD: usize = 48;
/// Records per page: 4080 bytes, padded to 4096 so a page is one block of the file (and of
/// the page cache).
const PAGE: usize = 85;
const PAGE_BYTES: usize = 4096;

/// Where record `pos` starts in a run file.
fn offset_of(pos: u64) -> u64 {
    pos / PAGE as u64 * PAGE_BYTES as u64 + pos % PAGE as u64 * RECORD as u64
}
/// Entries are spread over this many files by their ID's first byte while being added, so
/// each is sorted alone (1/256 of the whole in memory at once).
const BUCKETS: usize = 256;

fn encode(id: &BlockId, s: &BlobSlot, out: &mut [u8]) {
    out[..32].copy_from_slice(&id.0);
    out[32..36].copy_from_slice(&s.frame.to_le_bytes());
    out[36..40].copy_from_slice(&s.raw_offset.to_le_bytes());
    out[40..44].copy_from_slice(&s.len.to_le_bytes());
    out[44] = s.kind as u8;
    out[45..48].fill(0);
}

fn decode(b: &[u8]) -> (BlockId, BlobSlot) {
    let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    // Only this module writes the file: any other kind byte is a local disk fault.
    let kind = if b[44] == BlobKind::Map as u8 { BlobKind::Map } else { BlobKind::Data };
    (BlockId(id), BlobSlot { frame: u(32), raw_offset: u(36), len: u(40), kind })
}

fn failed(dir: &Path, e: io::Error) -> ! {
    panic!("the index cache file in {} cannot be read ({e}): the local disk failed", dir.display())
}

/// Where the index's entries go while packs are added, then [`Spill::finish`]ed into a [`Run`].
pub(super) struct Spill {
    dir: PathBuf,
    buckets: Vec<BufWriter<File>>,
    count: u64,
}

impl Spill {
    pub fn new(dir: &Path) -> io::Result<Spill> {
        private_dir(dir)?;
        let buckets = (0..BUCKETS)
            .map(|_| Ok(BufWriter::with_capacity(64 << 10, tempfile::tempfile_in(dir)?)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Spill { dir: dir.to_path_buf(), buckets, count: 0 })
    }

    pub fn push(&mut self, id: &BlockId, slot: &BlobSlot) -> io::Result<()> {
        let mut rec = [0u8; RECORD];
        encode(id, slot, &mut rec);
        self.count += 1;
        self.buckets[id.0[0] as usize].write_all(&rec)
    }

    /// Sorts each bucket (by ID, then frame: the copy added first first) into one file.
    pub fn finish(self) -> io::Result<Run> {
        if self.count > u32::MAX as u64 {
            return Err(io::Error::other("more than 4 billion index entries"));
        }
        let mut out = RunWriter::new(&self.dir, self.count as usize)?;
        let mut bytes = Vec::new();
        for bucket in self.buckets {
            let mut f = bucket.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(0))?;
            bytes.clear();
            f.read_to_end(&mut bytes)?;
            drop(f);
            let mut entries: Vec<(BlockId, BlobSlot)> = bytes.chunks_exact(RECORD).map(decode).collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.frame.cmp(&b.1.frame)));
            for (id, slot) in &entries {
                out.push(id, slot)?;
            }
        }
        out.finish()
    }
}

/// Writes entries, given in order, as a [`Run`].
pub(super) struct RunWriter {
    out: BufWriter<File>,
    dir: PathBuf,
    fences: Vec<BlockId>,
    written: usize,
}

impl RunWriter {
    pub fn new(dir: &Path, expected: usize) -> io::Result<RunWriter> {
        private_dir(dir)?;
        let out = BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(dir)?);
        Ok(RunWriter { out, dir: dir.to_path_buf(), fences: Vec::with_capacity(expected.div_ceil(PAGE)), written: 0 })
    }

    pub fn push(&mut self, id: &BlockId, slot: &BlobSlot) -> io::Result<()> {
        if self.written >= u32::MAX as usize {
            return Err(io::Error::other("more than 4 billion index entries in one run"));
        }
        if self.written.is_multiple_of(PAGE) {
            if self.written > 0 {
                self.out.write_all(&[0u8; PAGE_BYTES - PAGE * RECORD])?;
            }
            self.fences.push(*id);
        }
        let mut rec = [0u8; RECORD];
        encode(id, slot, &mut rec);
        self.written += 1;
        self.out.write_all(&rec)
    }

    pub fn finish(self) -> io::Result<Run> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(Run { file, dir: self.dir, len: self.written as u32, fences: self.fences })
    }
}

/// Creates the cache folder, owner-only (the entries say which blocks the repository holds).
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let m = std::fs::metadata(dir)?;
    if m.uid() != unsafe { libc::geteuid() } || m.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} must belong to this user and be private (mode 0700) to hold the index cache",
            dir.display()
        )));
    }
    Ok(())
}

/// Sorted entries in an unlinked file.
pub(super) struct Run {
    file: File,
    dir: PathBuf,
    len: u32,
    /// The first ID of each page.
    fences: Vec<BlockId>,
}

impl Run {
    pub fn len(&self) -> u32 {
        self.len
    }

    fn read_page(&self, page: usize, buf: &mut [u8; RECORD * PAGE]) -> usize {
        let first = page * PAGE;
        let n = PAGE.min(self.len as usize - first);
        if let Err(e) = self.file.read_exact_at(&mut buf[..n * RECORD], offset_of(first as u64)) {
            failed(&self.dir, e)
        }
        n
    }

    /// Every entry of `id`, with its position (from `base`), the first added first.
    pub fn slots(&self, id: &BlockId, base: u32, out: &mut SmallVec<[(u32, BlobSlot); 2]>) {
        // Pages before `lo` start below `id`: its entries begin in page lo-1 at the earliest.
        let lo = self.fences.partition_point(|f| f < id);
        let mut page = lo.saturating_sub(1);
        let mut buf = [0u8; RECORD * PAGE];
        while page < self.fences.len() && self.fences[page] <= *id {
            let n = self.read_page(page, &mut buf);
            let recs = &buf[..n * RECORD];
            let start = partition(recs, |r| r[..32] < id.0[..]);
            for (i, r) in recs.chunks_exact(RECORD).enumerate().skip(start) {
                if r[..32] != id.0 {
                    return;
                }
                out.push((base + (page * PAGE + i) as u32, decode(r).1));
            }
            page += 1;
        }
    }

    pub fn entry(&self, position: u32) -> (BlockId, BlobSlot) {
        let mut rec = [0u8; RECORD];
        if let Err(e) = self.file.read_exact_at(&mut rec, offset_of(position as u64)) {
            failed(&self.dir, e)
        }
        decode(&rec)
    }

    /// Every entry in order, read sequentially.
    pub fn scan(&self, base: u32, mut f: impl FnMut(u32, &BlockId, &BlobSlot)) {
        for (i, (id, slot)) in self.reader().enumerate() {
            f(base + i as u32, &id, &slot);
        }
    }
}

/// Merges two runs, `a` added before `b`, into one (by ID, then frame: frames are numbered in
/// the order packs were added, so every copy keeps its place). Reads both sequentially.
pub(super) fn merge(a: &Run, b: &Run) -> io::Result<Run> {
    let mut out = RunWriter::new(&a.dir, a.len as usize + b.len as usize)?;
    let (mut ra, mut rb) = (a.reader(), b.reader());
    let (mut x, mut y) = (ra.next(), rb.next());
    loop {
        let take_a = match (&x, &y) {
            (Some(p), Some(q)) => (p.0, p.1.frame) <= (q.0, q.1.frame),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_a {
            let (id, slot) = x.take().unwrap();
            out.push(&id, &slot)?;
            x = ra.next();
        } else {
            let (id, slot) = y.take().unwrap();
            out.push(&id, &slot)?;
            y = rb.next();
        }
    }
    out.finish()
}

/// Reads a run's entries in order, 192 pages (768 KiB) at a time.
struct RunReader<'a> {
    run: &'a Run,
    buf: Vec<u8>,
    /// The next record, and the records of the pages in `buf`: `start..start + filled`.
    at: u32,
    start: u32,
    filled: u32,
}

const READ_PAGES: usize = 192;

impl Run {
    fn reader(&self) -> RunReader<'_> {
        RunReader { run: self, buf: vec![0u8; READ_PAGES * PAGE_BYTES], at: 0, filled: 0, start: 0 }
    }
}

impl Iterator for RunReader<'_> {
    type Item = (BlockId, BlobSlot);
    fn next(&mut self) -> Option<(BlockId, BlobSlot)> {
        if self.at == self.start + self.filled {
            if self.at >= self.run.len {
                return None;
            }
            // `at` is a page's first record here: the buffer always holds whole pages.
            let n = (self.run.len - self.at).min((READ_PAGES * PAGE) as u32);
            let bytes = offset_of(self.at as u64 + n as u64 - 1) + RECORD as u64 - offset_of(self.at as u64);
            if let Err(e) = self.run.file.read_exact_at(&mut self.buf[..bytes as usize], offset_of(self.at as u64)) {
                failed(&self.run.dir, e)
            }
            (self.start, self.filled) = (self.at, n);
        }
        let i = offset_of((self.at - self.start) as u64) as usize;
        self.at += 1;
        Some(decode(&self.buf[i..i + RECORD]))
    }
}

/// The number of leading records of `recs` for which `below` holds (they are sorted).
fn partition(recs: &[u8], below: impl Fn(&[u8]) -> bool) -> usize {
    let (mut lo, mut hi) = (0, recs.len() / RECORD);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if below(&recs[mid * RECORD..(mid + 1) * RECORD]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run larger than one read of the sequential reader, with duplicates across page
    /// boundaries: every entry found by lookup, by position and in order.
    #[test]
    fn a_run_reads_back_by_lookup_by_position_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * READ_PAGES * PAGE + 77;
        let id = |i: usize| {
            let mut b = [0u8; 32];
            // Runs of 1 to 3 equal IDs, in increasing order.
            b[..8].copy_from_slice(&((i / 3 * 2 + i % 3 / 2) as u64).to_be_bytes());
            BlockId(b)
        };
        let slot = |i: usize| BlobSlot { frame: i as u32, raw_offset: 7, len: i as u32 % 1000, kind: BlobKind::Data };
        let mut w = RunWriter::new(&dir.path().join("c"), n).unwrap();
        for i in 0..n {
            w.push(&id(i), &slot(i)).unwrap();
        }
        let run = w.finish().unwrap();
        assert_eq!(run.len() as usize, n);
        let mut seen = 0;
        run.scan(10, |p, b, s| {
            assert_eq!((p as usize - 10, *b, s.frame), (seen, id(seen), seen as u32));
            seen += 1;
        });
        assert_eq!(seen, n);
        for i in (0..n).step_by(37).chain([PAGE - 1, PAGE, 2 * PAGE - 1, n - 1]) {
            assert_eq!(run.entry(i as u32).1.frame, i as u32);
            let mut out = SmallVec::new();
            run.slots(&id(i), 0, &mut out);
            let want: Vec<u32> = (0..n).filter(|&j| id(j) == id(i)).map(|j| j as u32).collect();
            assert_eq!(out.iter().map(|(p, _)| *p).collect::<Vec<_>>(), want, "entry {i}");
        }
        let mut none = SmallVec::new();
        run.slots(&BlockId([0xff; 32]), 0, &mut none);
        assert!(none.is_empty());
    }
}
