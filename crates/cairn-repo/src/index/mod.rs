//! The index: where every block lives, without scanning packs.
//!
//! An index file lists packs and, for each, the same frame/blob table its trailer holds:
//! ```text
//! index file = seal("CAIRNIX1" | u32 pack_count | (pack_name [32] | contents)*)
//! ```
//! Index files are immutable and named by the BLAKE3 hash of their bytes. A reader loads all
//! of them into an [`Index`]; a block may appear more than once (two writers stored it at
//! once) and any copy serves.

use crate::pack::{decode_contents_from, encode_contents_into, BlobKind, FrameEntry};
use crate::wire::{Reader, Writer};
use crate::{BlockId, Error, Result};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

mod disk;

const INDEX_MAGIC: &[u8; 8] = b"CAIRNIX1";

/// A pack's name as raw bytes (the hex name decoded).
pub type PackId = [u8; 32];

pub fn pack_id_from_name(name: &str) -> Option<PackId> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(id)
}

/// Everything needed to read one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub frame_offset: u32,
    pub frame_stored_len: u32,
    pub frame_raw_len: u32,
    pub raw_offset: u32,
    pub len: u32,
    pub kind: BlobKind,
}

impl BlobLocation {
    pub fn pack_name(&self) -> String {
        hex::encode(self.pack)
    }
}

/// An append-only array in fixed segments that clones share: every refresh builds on a copy
/// of the index, and a large one has millions of frames (tens of MiB copied, then doubled by
/// a growing `Vec`). A clone copies pointers; a push copies at most the last segment.
#[derive(Clone)]
struct Segmented<T> {
    segments: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for Segmented<T> {
    fn default() -> Self {
        Segmented { segments: Vec::new(), len: 0 }
    }
}

/// Entries per segment of a [`Segmented`] (1 MiB of frames).
const SEGMENT: usize = 1 << 16;

impl<T: Clone> Segmented<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, value: T) {
        if self.len.is_multiple_of(SEGMENT) {
            self.segments.push(Arc::new(Vec::with_capacity(SEGMENT)));
        }
        Arc::make_mut(self.segments.last_mut().expect("a segment was just made")).push(value);
        self.len += 1;
    }
}

impl<T> std::ops::Index<usize> for Segmented<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.segments[i / SEGMENT][i % SEGMENT]
    }
}

/// Compact in-memory entries: frames are shared by up to 16 blobs, packs by thousands.
#[derive(Clone, Copy)]
struct FrameSlot {
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
}

#[derive(Clone, Copy)]
struct BlobSlot {
    frame: u32,
    raw_offset: u32,
    len: u32,
    kind: BlobKind,
}

/// One copy of a block, where the index holds it.
#[derive(Clone, Copy, Debug)]
pub struct Copy {
    /// Its entry's number (see [`Index::entry`]): positions run from 0 to [`Index::len`].
    pub position: u32,
    pub location: BlobLocation,
    /// Whether its pack is marked for deletion by a prune.
    pub marked: bool,
}

/// All known blob locations. Packs and frames are in memory (16 bytes per frame of up to 16
/// blocks); the entries of blocks are in memory (48 bytes each) in a small repository, and in
/// a sorted file on local disk in a large one (see [`IndexBuilder`] and `disk.rs`).
/// Built with [`Index::add_pack`], then [`Index::seal`]ed before lookups.
#[derive(Clone, Default)]
pub struct Index {
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    frames: Segmented<FrameSlot>,
    /// Entries on disk, in the order they were added: the run [`IndexBuilder`] wrote, then
    /// one for each [`SpillConfig::memory_entries`]/4 added after (refreshes), the newest
    /// merged as they come (see `compact_runs`). Positions count through them, then `blobs`.
    runs: Vec<Arc<disk::Run>>,
    /// Set by [`IndexBuilder`]: where entries go once they outgrow memory.
    spill: Option<SpillConfig>,
    /// Sorted by ID once sealed, one entry per copy (the copy added first first). A sorted array costs
    /// 48 bytes per entry where a hash table costs 80-105 (measured: its growth leaves it
    /// 44-87% full); lookups are a binary search.
    blobs: Vec<(BlockId, BlobSlot)>,
    sealed: bool,
    /// How many entries of `blobs` were in order at the last seal: a refresh sorts only what
    /// came after and merges it in (a long-lived process adds a few packs per commit to an
    /// index of millions of entries).
    sorted_len: usize,
    /// Copies verify found damaged: not among a block's copies, so a backup stores the block
    /// again; kept apart (sorted like `blobs`) as a restore's last resort, still hash-checked.
    quarantine: std::collections::HashSet<(PackId, BlockId)>,
    quarantined_blobs: Vec<(BlockId, BlobSlot)>,
    /// Packs a prune marked for deletion (FORMAT.md §12): still read, but a new point must not
    /// rely on them, so their copies do not make a block [`Index::reusable`].
    marked: std::collections::HashSet<PackId>,
    /// By pack number: whether the pack is in `marked`.
    pack_marked: Vec<bool>,
    /// By pack number: deleted by a prune of this process ([`Index::drop_packs`]); its
    /// entries are skipped, positions of the others unchanged.
    pack_gone: Vec<bool>,
}

impl Index {
    /// The entries of `id` and their positions: every copy, the first added first (those on
    /// disk were all added before those in memory).
    fn slots(&self, id: &BlockId) -> SmallVec<[(u32, BlobSlot); 2]> {
        debug_assert!(self.sealed || self.blobs.is_empty(), "Index::seal must follow add_pack");
        let mut out = SmallVec::new();
        let mut base = 0;
        for run in &self.runs {
            run.slots(id, base, &mut out);
            base += run.len();
        }
        let start = self.blobs.partition_point(|(k, _)| k < id);
        let end = start + self.blobs[start..].partition_point(|(k, _)| k == id);
        out.extend((start..end).map(|i| (base + i as u32, self.blobs[i].1)));
        if !self.pack_gone.is_empty() {
            out.retain(|(_, b)| !self.slot_gone(b));
        }
        out
    }

    fn slot_gone(&self, b: &BlobSlot) -> bool {
        self.pack_gone.get(self.frames[b.frame as usize].pack as usize).copied().unwrap_or(false)
    }

    /// Forgets packs a prune deleted (cheaper than loading a large index again). A pack of
    /// the same name written later (names are content hashes) is added afresh.
    pub fn drop_packs(&mut self, packs: &std::collections::HashSet<PackId>) {
        for p in packs {
            if let Some(n) = self.pack_numbers.remove(p) {
                if self.pack_gone.len() <= n as usize {
                    self.pack_gone.resize(self.packs.len(), false);
                }
                self.pack_gone[n as usize] = true;
            }
        }
    }

    fn run_len(&self) -> u32 {
        self.runs.iter().map(|r| r.len()).sum()
    }

    /// Whether some readable copy of the block exists (quarantined copies aside). Not the
    /// question a writer asks: see [`Index::reusable`].
    pub fn contains(&self, id: &BlockId) -> bool {
        !self.slots(id).is_empty()
    }

    /// Whether a new restore point may reference the block without storing it: some copy
    /// lies in a pack no prune marked for deletion. A block only marked packs hold is stored
    /// again (a prune may delete those packs once every reader of an older index is gone).
    pub fn reusable(&self, id: &BlockId) -> bool {
        self.slots(id).iter().any(|(_, b)| !self.slot_marked(b))
    }

    /// Every copy of a block with its position and whether its pack is marked, the first
    /// added first (quarantined ones are not copies).
    pub fn located(&self, id: &BlockId) -> SmallVec<[Copy; 2]> {
        self.slots(id)
            .iter()
            .map(|(p, b)| Copy { position: *p, location: self.location(b), marked: self.slot_marked(b) })
            .collect()
    }

    fn slot_marked(&self, b: &BlobSlot) -> bool {
        self.pack_marked.get(self.frames[b.frame as usize].pack as usize).copied().unwrap_or(false)
    }

    /// Orders the blobs for lookups. Every copy of a block is kept (two sessions stored it at
    /// once; rare, so it costs little), the first added first: reads use it, and fall back to
    /// the others when it is damaged.
    pub fn seal(&mut self) {
        // Frame numbers grow in the order packs were added, so the first copy added sorts first.
        let key = |a: &(BlockId, BlobSlot), b: &(BlockId, BlobSlot)| a.0.cmp(&b.0).then(a.1.frame.cmp(&b.1.frame));
        if self.sorted_len == 0 || self.sorted_len * 2 < self.blobs.len() {
            // In place (a stable sort would borrow half the array again).
            self.blobs.sort_unstable_by(key);
            self.blobs.shrink_to_fit();
        } else if self.sorted_len < self.blobs.len() {
            // Sort the new entries alone, then merge them in from the back, each entry moved
            // once, into the room they leave: O(n + k log k) where a full sort is O(n log n).
            let mut tail = self.blobs.split_off(self.sorted_len);
            tail.sort_unstable_by(key);
            let (n, k) = (self.blobs.len(), tail.len());
            self.blobs.reserve_exact(k);
            let filler = tail[0];
            self.blobs.resize(n + k, filler);
            let (mut i, mut j, mut w) = (n, k, n + k);
            while j > 0 {
                w -= 1;
                if i > 0 && key(&self.blobs[i - 1], &tail[j - 1]).is_gt() {
                    self.blobs[w] = self.blobs[i - 1];
                    i -= 1;
                } else {
                    self.blobs[w] = tail[j - 1];
                    j -= 1;
                }
            }
        }
        self.sorted_len = self.blobs.len();
        // In memory up to the limit; once entries are on disk, later ones go in runs of a
        // quarter of it.
        let over = |c: &&SpillConfig| {
            self.blobs.len() > if self.runs.is_empty() { c.memory_entries } else { c.memory_entries / 4 }
        };
        if let Some(spill) = self.spill.as_ref().filter(over) {
            // Entries added since the last run outgrew their share of memory: one more run.
            let cache = |e: std::io::Error| Error::Cache(format!("{}: {e}", spill.dir.display()));
            let written = disk::RunWriter::new(&spill.dir, self.blobs.len()).map_err(cache).and_then(|mut w| {
                self.blobs.iter().try_for_each(|(id, slot)| w.push(id, slot)).map_err(cache)?;
                w.finish().map_err(cache)
            });
            // On failure they stay in memory: costlier, never wrong.
            if let Ok(run) = written {
                self.runs.push(Arc::new(run));
                self.blobs = Vec::new();
                self.sorted_len = 0;
                self.compact_runs();
            }
        }
        self.quarantined_blobs.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.frame.cmp(&b.1.frame)));
        self.sealed = true;
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    pub fn has_pack(&self, pack: &PackId) -> bool {
        self.pack_numbers.contains_key(pack)
    }

    /// Where a block is best read: its first copy outside packs marked for deletion, else its
    /// first copy.
    pub fn get(&self, id: &BlockId) -> Option<BlobLocation> {
        let slots = self.slots(id);
        slots.iter().find(|(_, b)| !self.slot_marked(b)).or(slots.first()).map(|(_, b)| self.location(b))
    }

    /// Every copy of a block, those in packs marked for deletion last, otherwise the first
    /// added first (quarantined ones are not copies).
    pub fn copies(&self, id: &BlockId) -> impl Iterator<Item = BlobLocation> + '_ {
        let slots = self.slots(id);
        let mut out: SmallVec<[BlobLocation; 2]> = SmallVec::new();
        out.extend(slots.iter().filter(|(_, b)| !self.slot_marked(b)).map(|(_, b)| self.location(b)));
        out.extend(slots.iter().filter(|(_, b)| self.slot_marked(b)).map(|(_, b)| self.location(b)));
        out.into_iter()
    }

    /// How many copies the index holds (positions run from 0 to this).
    pub fn len(&self) -> usize {
        self.run_len() as usize + self.blobs.len()
    }

    /// Whether the entries are on local disk (a large repository: see [`IndexBuilder`]).
    pub fn on_disk(&self) -> bool {
        !self.runs.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the packs marked for deletion (at load, or when a prune made new marks).
    pub fn set_marked(&mut self, marked: std::collections::HashSet<PackId>) {
        self.pack_marked = self.packs.iter().map(|p| marked.contains(p)).collect();
        self.marked = marked;
    }

    /// Whether a prune marked this pack for deletion.
    pub fn is_marked(&self, pack: &PackId) -> bool {
        self.marked.contains(pack)
    }

    /// Every pack the index lists.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// The quarantined copies of a block: what a reader tries when no other copy is sound
    /// (verify may have quarantined a sound copy after a misread; the hash check decides).
    pub fn quarantined_copies(&self, id: &BlockId) -> impl Iterator<Item = BlobLocation> + '_ {
        let start = self.quarantined_blobs.partition_point(|(k, _)| k < id);
        let end = start + self.quarantined_blobs[start..].partition_point(|(k, _)| k == id);
        self.quarantined_blobs[start..end].iter().filter(|(_, b)| !self.slot_gone(b)).map(|(_, b)| self.location(b))
    }

    fn location(&self, b: &BlobSlot) -> BlobLocation {
        let f = self.frames[b.frame as usize];
        BlobLocation {
            pack: self.packs[f.pack as usize],
            frame_offset: f.offset,
            frame_stored_len: f.stored_len,
            frame_raw_len: f.raw_len,
            raw_offset: b.raw_offset,
            len: b.len,
            kind: b.kind,
        }
    }

    /// Sets the damaged copies to leave out (before packs are added).
    pub fn set_quarantine(&mut self, q: std::collections::HashSet<(PackId, BlockId)>) {
        self.quarantine = q;
    }

    /// Whether this copy of a block is quarantined.
    pub fn is_quarantined(&self, pack: &PackId, id: &BlockId) -> bool {
        self.quarantine.contains(&(*pack, *id))
    }

    /// Whether some copy of this block is quarantined.
    pub fn has_quarantined_copy(&self, id: &BlockId) -> bool {
        self.quarantine.iter().any(|(_, b)| b == id)
    }

    /// Whether some copy in this pack is quarantined.
    pub fn has_quarantined_copies_in(&self, pack: &PackId) -> bool {
        self.quarantine.iter().any(|(p, _)| p == pack)
    }

    /// Packs holding quarantined copies.
    pub fn quarantined_packs(&self) -> std::collections::HashSet<PackId> {
        self.quarantine.iter().map(|(p, _)| *p).collect()
    }

    /// Adds a pack's contents. A pack already known is skipped (several index files may
    /// list it: a session's partial files and its final one). Lookups wait for [`Index::seal`].
    pub fn add_pack(&mut self, pack: PackId, frames: &[FrameEntry]) {
        self.sealed = false;
        if self.pack_numbers.contains_key(&pack) {
            return;
        }
        let pn = self.packs.len() as u32;
        // Exactly what this pack adds: doubling an array of millions of entries for a few
        // more would double the index's memory for nothing.
        self.blobs.reserve_exact(frames.iter().map(|f| f.blobs.len()).sum());
        self.packs.push(pack);
        self.pack_marked.push(self.marked.contains(&pack));
        self.pack_numbers.insert(pack, pn);
        for f in frames {
            let fn_ = self.frames.len() as u32;
            self.frames.push(FrameSlot { pack: pn, offset: f.offset, stored_len: f.stored_len, raw_len: f.raw_len });
            for b in &f.blobs {
                if !self.quarantine.is_empty() && self.quarantine.contains(&(pack, b.id)) {
                    let slot = BlobSlot { frame: fn_, raw_offset: b.raw_offset, len: b.len, kind: b.kind };
                    self.quarantined_blobs.push((b.id, slot));
                    continue;
                }
                self.blobs.push((b.id, BlobSlot { frame: fn_, raw_offset: b.raw_offset, len: b.len, kind: b.kind }));
            }
        }
    }

    /// Merges the newest runs while the last is at least half the size of the one before:
    /// a lookup reads one page per run, and this keeps their number logarithmic (a process
    /// that refreshes after every backup of a day adds hundreds). Positions change: a
    /// snapshot taken before (an `Arc<Index>`) keeps its own runs.
    fn compact_runs(&mut self) {
        while let [.., a, b] = self.runs.as_slice() {
            if (b.len() as u64) * 2 < a.len() as u64 {
                break;
            }
            match disk::merge(a, b) {
                Ok(merged) => {
                    self.runs.truncate(self.runs.len() - 2);
                    self.runs.push(Arc::new(merged));
                }
                Err(_) => break, // several runs: slower lookups, the same answers
            }
        }
    }

    /// Every pack and the positions of the copies the index places in it (for verify; read
    /// each with [`Index::entry`]). Positions, not copies: 4 bytes each instead of ~90.
    pub fn blobs_by_pack(&self) -> HashMap<PackId, Vec<u32>> {
        let mut out: HashMap<PackId, Vec<u32>> = HashMap::new();
        self.scan(|position, _, loc| out.entry(loc.pack).or_default().push(position));
        out
    }

    /// Every copy in position order (sequential reads when the entries are on disk).
    pub fn scan(&self, mut f: impl FnMut(u32, &BlockId, &BlobLocation)) {
        let mut base = 0;
        for run in &self.runs {
            run.scan(base, |p, id, b| {
                if !self.slot_gone(b) {
                    f(p, id, &self.location(b))
                }
            });
            base += run.len();
        }
        for (i, (id, b)) in self.blobs.iter().enumerate().filter(|(_, (_, b))| !self.slot_gone(b)) {
            f(base + i as u32, id, &self.location(b));
        }
    }

    /// The copy at a position [`Index::blobs_by_pack`] gave.
    pub fn entry(&self, position: u32) -> (BlockId, BlobLocation) {
        let mut base = 0;
        for run in &self.runs {
            if position < base + run.len() {
                let (id, b) = run.entry(position - base);
                return (id, self.location(&b));
            }
            base += run.len();
        }
        let (id, b) = &self.blobs[(position - base) as usize];
        (*id, self.location(b))
    }
}

/// Where a large index keeps the entries of its blocks: a private folder on local disk, used
/// once there are more than `memory_entries` (48 bytes each in memory).
#[derive(Clone, Debug)]
pub struct SpillConfig {
    pub dir: PathBuf,
    pub memory_entries: usize,
}

impl SpillConfig {
    /// 1Mi entries: 48 MiB in memory, about 64 GiB of unique data in 64 KiB blocks. A
    /// repository below that keeps every entry in memory (no disk read per lookup).
    pub const DEFAULT_MEMORY_ENTRIES: usize = 1 << 20;

    /// `CAIRN_CACHE_DIR` (else /var/cache/cairn for root, else `$XDG_CACHE_HOME/cairn` or
    /// ~/.cache/cairn, else /var/tmp/cairn-UID) and `CAIRN_INDEX_MEMORY_ENTRIES`.
    pub fn from_env() -> SpillConfig {
        let base = cairn_storage::cache::cache_root();
        let memory_entries = std::env::var("CAIRN_INDEX_MEMORY_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(Self::DEFAULT_MEMORY_ENTRIES);
        SpillConfig { dir: base.join("index"), memory_entries }
    }
}

/// Loads an [`Index`], moving its entries to local disk once they outgrow memory (see
/// [`SpillConfig`]); without a config, everything stays in memory.
pub struct IndexBuilder {
    index: Index,
    config: Option<SpillConfig>,
    spill: Option<disk::Spill>,
}

impl IndexBuilder {
    pub fn new(config: Option<SpillConfig>) -> IndexBuilder {
        IndexBuilder { index: Index::default(), config, spill: None }
    }

    /// See [`Index::set_quarantine`] and [`Index::set_marked`] (before packs are added).
    pub fn set_quarantine(&mut self, q: std::collections::HashSet<(PackId, BlockId)>) {
        self.index.set_quarantine(q);
    }
    pub fn set_marked(&mut self, marked: std::collections::HashSet<PackId>) {
        self.index.set_marked(marked);
    }

    pub fn add_pack(&mut self, pack: PackId, frames: &[FrameEntry]) -> Result<()> {
        self.index.add_pack(pack, frames);
        let Some(config) = &self.config else { return Ok(()) };
        if self.spill.is_none() && self.index.blobs.len() <= config.memory_entries {
            return Ok(());
        }
        let cache = |e: std::io::Error| Error::Cache(format!("{}: {e}", config.dir.display()));
        let first = self.spill.is_none();
        if first {
            self.spill = Some(disk::Spill::new(&config.dir).map_err(cache)?);
        }
        let spill = self.spill.as_mut().unwrap();
        for (id, slot) in self.index.blobs.drain(..) {
            spill.push(&id, &slot).map_err(cache)?;
        }
        if first {
            self.index.blobs.shrink_to_fit();
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Index> {
        if let Some(spill) = self.spill.take() {
            let dir = self.config.as_ref().map(|c| c.dir.display().to_string()).unwrap_or_default();
            let run = spill.finish().map_err(|e| Error::Cache(format!("{dir}: {e}")))?;
            self.index.runs.push(Arc::new(run));
            self.index.sorted_len = 0;
        }
        // Where entries added later go once they outgrow memory.
        self.index.spill = self.config.take();
        self.index.seal();
        Ok(self.index)
    }
}

/// Encodes the raw (unsealed) content of an index file.
pub fn encode_index(packs: &[(PackId, Vec<FrameEntry>)]) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.bytes(INDEX_MAGIC);
    w.u32(packs.len() as u32);
    for (id, frames) in packs {
        w.bytes(id);
        encode_contents_into(&mut w, frames);
    }
    w.0
}

pub fn decode_index(raw: &[u8]) -> Result<Vec<(PackId, Vec<FrameEntry>)>> {
    let mut r = Reader::new(raw, "index file");
    if r.take(8)? != INDEX_MAGIC {
        return Err(Error::Format("not a cairn index file".into()));
    }
    let n = r.count(36)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut id = [0u8; 32];
        id.copy_from_slice(r.take(32)?);
        out.push((id, decode_contents_from(&mut r)?));
    }
    if r.remaining() != 0 {
        return Err(Error::Format("index file has trailing bytes".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::BlobEntry;

    #[test]
    fn segmented_clones_share_full_segments_and_diverge_on_push() {
        let mut a: Segmented<u32> = Segmented::default();
        for i in 0..(SEGMENT as u32 * 2 + 5) {
            a.push(i);
        }
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.segments[0], &b.segments[0]), "full segments are shared, not copied");
        b.push(7);
        a.push(9);
        assert_eq!((a.len(), b.len()), (SEGMENT * 2 + 6, SEGMENT * 2 + 6));
        assert_eq!((a[SEGMENT * 2 + 5], b[SEGMENT * 2 + 5]), (9, 7));
        assert_eq!((a[SEGMENT], b[SEGMENT * 2 + 4]), (SEGMENT as u32, SEGMENT as u32 * 2 + 4));
    }

    #[test]
    fn encode_decode_and_lookup() {
        let id = BlockId([5; 32]);
        let frames = vec![FrameEntry {
            offset: 0,
            stored_len: 10,
            raw_len: 100,
            blobs: vec![BlobEntry { kind: BlobKind::Data, id, raw_offset: 4, len: 96 }],
        }];
        let raw = encode_index(&[([9; 32], frames.clone())]);
        let decoded = decode_index(&raw).unwrap();
        assert_eq!(decoded, vec![([9; 32], frames)]);
        let mut idx = Index::default();
        idx.add_pack(decoded[0].0, &decoded[0].1);
        idx.add_pack(decoded[0].0, &decoded[0].1);
        idx.seal();
        assert_eq!(idx.pack_count(), 1);
        let loc = idx.get(&id).unwrap();
        assert_eq!((loc.pack, loc.raw_offset, loc.len, loc.frame_raw_len), ([9; 32], 4, 96, 100));
        assert!(decode_index(&raw[..raw.len() - 1]).is_err());
    }

    #[test]
    fn the_first_copy_of_a_block_comes_first_and_every_copy_is_kept() {
        let frame = |ids: &[u8], raw_offset: u32| FrameEntry {
            offset: raw_offset,
            stored_len: 10,
            raw_len: 100,
            blobs: ids
                .iter()
                .map(|&i| BlobEntry { kind: BlobKind::Data, id: BlockId([i; 32]), raw_offset, len: 1 })
                .collect(),
        };
        let mut idx = Index::default();
        idx.add_pack([1; 32], &[frame(&[9, 3, 7], 0)]);
        idx.add_pack([2; 32], &[frame(&[3, 200, 9], 50)]);
        idx.seal();
        for (id, pack) in [(9u8, [1u8; 32]), (3, [1; 32]), (7, [1; 32]), (200, [2; 32])] {
            assert_eq!(idx.get(&BlockId([id; 32])).unwrap().pack, pack, "block {id}");
        }
        assert!(!idx.contains(&BlockId([4; 32])));
        // Both copies of 3 and 9 are kept, the first added first.
        let packs = |id: u8| idx.copies(&BlockId([id; 32])).map(|l| l.pack[0]).collect::<Vec<_>>();
        assert_eq!((packs(3), packs(9), packs(7)), (vec![1, 2], vec![1, 2], vec![1]));
        let by_pack = idx.blobs_by_pack();
        assert_eq!(by_pack.values().map(|v| v.len()).sum::<usize>(), 6);
        assert!(by_pack[&[2; 32]].iter().all(|&p| idx.entry(p).1.pack == [2; 32]));
    }

    #[test]
    fn sealing_after_a_refresh_merges_new_entries_like_a_full_sort() {
        use crate::pack::{BlobEntry, BlobKind, FrameEntry};
        let id = |n: u64| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            BlockId(b)
        };
        let pack = |p: u8, ids: &[u64]| {
            let blobs = ids
                .iter()
                .enumerate()
                .map(|(i, &n)| BlobEntry { kind: BlobKind::Data, id: id(n), raw_offset: i as u32, len: 1 })
                .collect();
            ([p; 32], vec![FrameEntry { offset: 0, stored_len: 1, raw_len: ids.len() as u32, blobs }])
        };
        let rounds: Vec<Vec<u64>> =
            vec![(0..500).collect(), (400..450).collect(), vec![3, 7, 1000, 2000], (600..900).collect()];
        let mut merged = Index::default();
        let mut full = Index::default();
        for (r, ids) in rounds.iter().enumerate() {
            let (p, f) = pack(r as u8 + 1, ids);
            merged.add_pack(p, &f);
            merged.seal(); // sealed after every pack: merges from the second on
            full.add_pack(p, &f);
        }
        full.seal();
        let keys = |x: &Index| x.blobs.iter().map(|(b, s)| (*b, s.frame)).collect::<Vec<_>>();
        assert_eq!(keys(&merged), keys(&full));
        // Copies stay in the order their packs were added.
        let firsts: Vec<_> = merged.copies(&id(420)).map(|l| l.pack[0]).collect();
        assert_eq!(firsts, [1, 2]);
        assert!(merged.contains(&id(2000)) && !merged.contains(&id(5000)));
    }

    /// The same packs loaded in memory and through the disk run (a tiny memory limit, so it
    /// spills from the third pack on; later packs added as a refresh does) answer every
    /// question alike: copies and their order, positions, marks, quarantine, scans.
    #[test]
    fn entries_on_disk_answer_like_entries_in_memory() {
        let id = |n: u64| {
            let mut b = [0u8; 32];
            let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for c in b.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            BlockId(b)
        };
        // 40 packs of 3 frames (36 entries); block numbers overlap between packs (copies).
        let pack = |p: u64| {
            let frames = (0..3u32)
                .map(|f| FrameEntry {
                    offset: f * 100,
                    stored_len: 100,
                    raw_len: 1000,
                    blobs: (0..12u64)
                        .map(|i| BlobEntry {
                            kind: if i == 0 { BlobKind::Map } else { BlobKind::Data },
                            id: id((p * 37 + f as u64 * 12 + i) % 700),
                            raw_offset: i as u32 * 10,
                            len: 10,
                        })
                        .collect(),
                })
                .collect::<Vec<_>>();
            let mut name = [0u8; 32];
            name[..8].copy_from_slice(&p.to_le_bytes());
            (name, frames)
        };
        let packs: Vec<_> = (0..40).map(pack).collect();
        let marked: std::collections::HashSet<PackId> = [packs[3].0, packs[17].0].into();
        let quarantine: std::collections::HashSet<(PackId, BlockId)> = [(packs[5].0, packs[5].1[1].blobs[4].id)].into();
        let dir = tempfile::tempdir().unwrap();
        let config = SpillConfig { dir: dir.path().join("cache"), memory_entries: 150 };
        let (mut mem, mut disk) = (IndexBuilder::new(None), IndexBuilder::new(Some(config)));
        for b in [&mut mem, &mut disk] {
            b.set_marked(marked.clone());
            b.set_quarantine(quarantine.clone());
            for (p, f) in &packs[..30] {
                b.add_pack(*p, f).unwrap();
            }
        }
        let (mut mem, mut disk) = (mem.finish().unwrap(), disk.finish().unwrap());
        assert!(disk.on_disk() && !mem.on_disk());
        // Refreshes: the first batch stays in memory (under a quarter of the limit), the
        // second makes a second run.
        for x in [&mut mem, &mut disk] {
            for batch in [&packs[30..31], &packs[31..]] {
                for (p, f) in batch {
                    x.add_pack(*p, f);
                }
                x.seal();
            }
        }
        assert_eq!((disk.runs.len(), disk.blobs.len()), (2, 0));
        // Many small refreshes are merged as they come: few runs, the same answers.
        let extra: Vec<_> = (40..72).map(pack).collect();
        let mut most = 0;
        for two in extra.chunks(2) {
            for x in [&mut mem, &mut disk] {
                for (p, f) in two {
                    x.add_pack(*p, f);
                }
                x.seal();
            }
            most = most.max(disk.runs.len());
        }
        assert!((2..=5).contains(&most), "{most} runs");
        // An index loaded small grows past the limit by refreshes (a long-lived process, or
        // a fleet built in one): its entries go to disk then.
        let config = SpillConfig { dir: dir.path().join("cache"), memory_entries: 150 };
        let (mut b, mut whole) = (IndexBuilder::new(Some(config)), IndexBuilder::new(None));
        for x in [&mut b, &mut whole] {
            x.set_marked(marked.clone());
            x.set_quarantine(quarantine.clone());
            x.add_pack(packs[0].0, &packs[0].1).unwrap();
        }
        let mut grown = b.finish().unwrap();
        assert!(!grown.on_disk());
        for (p, f) in &packs[1..] {
            grown.add_pack(*p, f);
            grown.seal();
            whole.add_pack(*p, f).unwrap();
        }
        let whole = whole.finish().unwrap();
        assert!(grown.on_disk() && grown.blobs.len() <= 150 / 4 + 36, "{} in memory", grown.blobs.len());
        for n in 0..700 {
            let b = id(n);
            assert_eq!(grown.copies(&b).collect::<Vec<_>>(), whole.copies(&b).collect::<Vec<_>>(), "block {n}");
        }
        assert_eq!(mem.len(), disk.len());
        for n in 0..800 {
            let b = id(n);
            // Positions differ (memory merges later entries in, disk keeps them apart).
            let locs = |x: &Index| x.located(&b).iter().map(|c| (c.location, c.marked)).collect::<Vec<_>>();
            assert_eq!(locs(&mem), locs(&disk), "block {n}");
            assert_eq!(mem.get(&b), disk.get(&b));
            assert_eq!(mem.copies(&b).collect::<Vec<_>>(), disk.copies(&b).collect::<Vec<_>>());
            assert_eq!(mem.reusable(&b), disk.reusable(&b));
            assert_eq!(mem.contains(&b), n < 700 && !locs(&mem).is_empty());
            for x in [&mem, &disk] {
                for c in x.located(&b) {
                    assert_eq!(x.entry(c.position), (b, c.location));
                }
            }
        }
        let all = |x: &Index| {
            let mut v = Vec::new();
            x.scan(|p, id, l| {
                assert_eq!(x.entry(p), (*id, *l));
                v.push((*id, l.pack, l.frame_offset, l.raw_offset));
            });
            v
        };
        let (mut m, mut d) = (all(&mem), all(&disk));
        assert_eq!(m.len(), 72 * 36 - 1);
        assert!(d[..30 * 36 - 1].windows(2).all(|w| w[0].0 <= w[1].0), "the run is sorted");
        m.sort();
        d.sort();
        assert_eq!(m, d);
        let by_pack = |x: &Index| {
            let mut v: Vec<(PackId, Vec<BlockId>)> = x
                .blobs_by_pack()
                .into_iter()
                .map(|(p, pos)| (p, pos.iter().map(|&i| x.entry(i).0).collect::<Vec<_>>()))
                .collect();
            v.iter_mut().for_each(|(_, ids)| ids.sort());
            v.sort();
            v
        };
        assert_eq!(by_pack(&mem), by_pack(&disk));
        // The cache folder is private and holds no file: every one was unlinked at creation.
        use std::os::unix::fs::PermissionsExt;
        let cache = dir.path().join("cache");
        assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    }

    /// A pack a prune deleted is gone from lookups; written again later (same content, same
    /// name), it is found again.
    #[test]
    fn a_dropped_pack_is_forgotten_and_a_new_one_of_its_name_is_added() {
        let id = BlockId([7; 32]);
        let frames = vec![FrameEntry {
            offset: 0,
            stored_len: 10,
            raw_len: 100,
            blobs: vec![BlobEntry { kind: BlobKind::Data, id, raw_offset: 0, len: 100 }],
        }];
        let mut idx = Index::default();
        idx.add_pack([1; 32], &frames);
        idx.seal();
        idx.drop_packs(&[[1u8; 32]].into());
        assert!(!idx.contains(&id) && idx.get(&id).is_none());
        let mut n = 0;
        idx.scan(|_, _, _| n += 1);
        assert_eq!(n, 0);
        idx.add_pack([1; 32], &frames);
        idx.seal();
        assert_eq!(idx.copies(&id).count(), 1);
    }
}
