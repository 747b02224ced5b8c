//! Block identifiers.

use std::fmt;

/// The identifier of a block or map page: BLAKE3 of its plaintext (keyed with the repository's
/// ID key when the repository is encrypted, so that IDs reveal nothing about content).
///
/// The all-zero ID is reserved: in an image map it means "this block is all zeros" and such a
/// block is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    pub const ZERO: BlockId = BlockId([0; 32]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn from_hex(s: &str) -> Option<BlockId> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(BlockId(b))
    }

    pub fn from_slice(s: &[u8]) -> BlockId {
        let mut b = [0u8; 32];
        b.copy_from_slice(s);
        BlockId(b)
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", self.short())
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Whether a buffer is all zero bytes; fast enough to run on every block read.
pub fn is_all_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 3];
        assert!(is_all_zero(&v[1..]));
        v[65536 + 2] = 1;
        assert!(!is_all_zero(&v[1..]));
        assert!(is_all_zero(&[]));
    }
    #[test]
    fn hex_round_trip() {
        let id = BlockId(*blake3::hash(b"x").as_bytes());
        assert_eq!(BlockId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(id.short().len(), 8);
        assert!(BlockId::from_hex("zz").is_none());
    }
}
