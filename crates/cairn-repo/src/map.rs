//! Image maps: the ordered list of block IDs that makes a disk image.
//!
//! A map is cut into pages of [`PAGE_BLOCKS`] IDs (256 MiB of disk at 64 KiB blocks). Each page
//! is stored as a blob of kind `Map` in the same deduplicated store as data, so a restore
//! point whose disk changed in one place stores one new page, not a new map. A restore point
//! lists its pages' IDs: 128 bytes of point per GiB of disk.

use crate::BlockId;

pub const PAGE_BLOCKS: usize = 4096;

pub fn encode_page(ids: &[BlockId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

pub fn decode_page(raw: &[u8]) -> Option<Vec<BlockId>> {
    if !raw.len().is_multiple_of(32) || raw.len() / 32 > PAGE_BLOCKS {
        return None;
    }
    Some(raw.chunks_exact(32).map(BlockId::from_slice).collect())
}

/// How many map pages a disk of `blocks` blocks needs.
pub fn page_count(blocks: u64) -> u64 {
    blocks.div_ceil(PAGE_BLOCKS as u64)
}
