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
use std::collections::HashMap;

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

/// All known blob locations: ~49 bytes per block in memory (see FORMAT.md, "Known limits").
/// Built with [`Index::add_pack`], then [`Index::seal`]ed before lookups.
#[derive(Clone, Default)]
pub struct Index {
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    frames: Vec<FrameSlot>,
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
}

impl Index {
    /// The entries of `id`: every copy, the first added first.
    fn slots(&self, id: &BlockId) -> &[(BlockId, BlobSlot)] {
        debug_assert!(self.sealed || self.blobs.is_empty(), "Index::seal must follow add_pack");
        let start = self.blobs.partition_point(|(k, _)| k < id);
        let end = start + self.blobs[start..].partition_point(|(k, _)| k == id);
        &self.blobs[start..end]
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
        let live = slots.iter().filter(|(_, b)| !self.slot_marked(b));
        let marked = slots.iter().filter(|(_, b)| self.slot_marked(b));
        live.chain(marked).map(|(_, b)| self.location(b))
    }

    /// The positions of every copy of a block (see [`Index::entry`]).
    pub fn positions(&self, id: &BlockId) -> std::ops::Range<u32> {
        let start = self.blobs.partition_point(|(k, _)| k < id);
        let end = start + self.blobs[start..].partition_point(|(k, _)| k == id);
        start as u32..end as u32
    }

    /// How many copies the index holds (positions run from 0 to this).
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// The pack holding the copy at a position, and whether it is marked for deletion.
    pub fn pack_at(&self, position: u32) -> (PackId, bool) {
        let b = &self.blobs[position as usize].1;
        let pn = self.frames[b.frame as usize].pack as usize;
        (self.packs[pn], self.pack_marked.get(pn).copied().unwrap_or(false))
    }

    /// Sets the packs marked for deletion (before packs are added).
    pub fn set_marked(&mut self, marked: std::collections::HashSet<PackId>) {
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
        self.quarantined_blobs[start..end].iter().map(|(_, b)| self.location(b))
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

    /// Every pack and the positions of the copies the index places in it (for verify; read
    /// each with [`Index::entry`]). Positions, not copies: 4 bytes each instead of ~90.
    pub fn blobs_by_pack(&self) -> HashMap<PackId, Vec<u32>> {
        let mut out: HashMap<PackId, Vec<u32>> = HashMap::new();
        for (i, (_, b)) in self.blobs.iter().enumerate() {
            let pack = self.packs[self.frames[b.frame as usize].pack as usize];
            out.entry(pack).or_default().push(i as u32);
        }
        out
    }

    /// The copy at a position [`Index::blobs_by_pack`] gave.
    pub fn entry(&self, position: u32) -> (BlockId, BlobLocation) {
        let (id, b) = &self.blobs[position as usize];
        (*id, self.location(b))
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
}
