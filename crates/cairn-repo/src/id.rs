//! Identifiers: of blocks and map pages ([`BlockId`]) and of restore points ([`PointId`]).

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

/// The identifier of a restore point: the BLAKE3 of its sealed document, as 64 lowercase hex
/// digits, which is also its object name in storage, so a name proves its content. Stored as
/// itself in documents that refer to a point (a point's parent, a copy's source, catalog
/// records); one that is not 64 hex digits is refused when read.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PointId(String);

impl PointId {
    /// The ID of a point whose sealed document is `sealed`.
    pub fn of_sealed(sealed: &[u8]) -> PointId {
        PointId(blake3::hash(sealed).to_hex().to_string())
    }

    /// `s` as a point ID, if it is one (64 lowercase hex digits).
    pub fn parse(s: &str) -> Option<PointId> {
        (s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| PointId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 8 hex digits: how people and messages name a point (`NAME@1a2b3c4d`).
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl TryFrom<String> for PointId {
    type Error = String;
    fn try_from(s: String) -> Result<PointId, String> {
        PointId::parse(&s).ok_or_else(|| format!("{s:?} is not a restore point ID (64 hex digits)"))
    }
}

impl From<PointId> for String {
    fn from(id: PointId) -> String {
        id.0
    }
}

impl AsRef<str> for PointId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for PointId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for PointId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for PointId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointId({})", self.0)
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
    #[test]
    fn point_ids_are_64_lowercase_hex_digits() {
        let id = PointId::of_sealed(b"a sealed point");
        assert_eq!(PointId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.short(), &id.as_str()[..8]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PointId>(&json).unwrap(), id);
        for bad in ["", "abc", &id.as_str().to_uppercase(), &format!("{}0", id), &format!("../{}", &id.as_str()[3..])] {
            assert!(PointId::parse(bad).is_none(), "{bad:?}");
            assert!(serde_json::from_str::<PointId>(&format!("\"{bad}\"")).is_err(), "{bad:?}");
        }
    }
}
