//! Pack files: many sealed frames followed by a sealed trailer that lists them.
//!
//! ```text
//! pack    = frame* | trailer | trailer_len u32 | "CAIRNPK1"
//! frame   = seal(concatenated raw blobs)        (see crypto.rs)
//! trailer = seal(Contents)                     (binary, see `encode_contents`)
//! ```
//! A pack's name is the BLAKE3 hash of its bytes, so any change to a pack is detectable and
//! two writers can never produce different packs under one name.

use crate::crypto::{self, Crypto};
use crate::wire::{Reader, Writer};
use crate::{BlockId, Error, Result};

pub const PACK_MAGIC: &[u8; 8] = b"CAIRNPK1";
const FOOTER_LEN: usize = 12;
use crate::config::MAX_FRAME_RAW;
/// Packs are closed once they reach this size (16 MiB: few files per terabyte, and a size
/// object stores upload efficiently).
pub const PACK_TARGET: usize = 16 << 20;
/// Sealing adds at most this much to a frame (envelope header, nonce, tag).
const MAX_SEAL_OVERHEAD: usize = 64;
/// A pack buffer's usual capacity: a session closes a pack once it reaches its target, so it
/// holds the target, one more frame of default-size blocks and the trailer. Larger frames
/// grow it exactly.
const PACK_CAPACITY: usize = PACK_TARGET + 16 * crate::config::DEFAULT_BLOCK_SIZE as usize + (256 << 10);

/// What a stored blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// A block of disk data (at most the block size).
    Data = 0,
    /// A page of an image map (a list of block IDs).
    Map = 1,
}

impl BlobKind {
    fn from_u8(v: u8) -> Result<BlobKind> {
        match v {
            0 => Ok(BlobKind::Data),
            1 => Ok(BlobKind::Map),
            _ => Err(Error::Format(format!("unknown blob kind {v}"))),
        }
    }
}

/// One blob inside a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    pub kind: BlobKind,
    pub id: BlockId,
    /// Offset of the blob in the frame's raw (decompressed) bytes.
    pub raw_offset: u32,
    pub len: u32,
}

/// One frame inside a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameEntry {
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub blobs: Vec<BlobEntry>,
}

/// A frame ready to go into a pack: sealed bytes plus what they hold.
pub struct SealedFrame {
    pub stored: Vec<u8>,
    pub raw_len: u32,
    pub blobs: Vec<BlobEntry>,
}

impl SealedFrame {
    /// Compresses and seals a run of blobs as one frame.
    pub fn build(crypto: &Crypto, c: &mut crypto::Compressor, raw: &[u8], blobs: Vec<BlobEntry>) -> SealedFrame {
        Self::build_into(crypto, c, raw, blobs, Vec::new())
    }

    /// Like [`SealedFrame::build`], sealing into a recycled buffer.
    pub fn build_into(
        crypto: &Crypto,
        c: &mut crypto::Compressor,
        raw: &[u8],
        blobs: Vec<BlobEntry>,
        mut buf: Vec<u8>,
    ) -> SealedFrame {
        crypto.seal_into(raw, c, &mut buf);
        SealedFrame { stored: buf, raw_len: raw.len() as u32, blobs }
    }
}

/// The name a pack with these bytes has (its BLAKE3 hash, hex).
pub fn name_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Decodes a frame's stored bytes to its raw bytes.
pub fn open_frame(crypto: &Crypto, stored: &[u8], raw_len: u32, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    crypto::open_frame_into(crypto, stored, raw_len, what, &mut out)?;
    Ok(out)
}

/// Like [`open_frame`], into a reused buffer.
pub fn open_frame_into(crypto: &Crypto, stored: &[u8], raw_len: u32, what: &str, out: &mut Vec<u8>) -> Result<()> {
    crypto::open_frame_into(crypto, stored, raw_len, what, out)
}

/// Accumulates frames into one pack.
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    frames: Vec<FrameEntry>,
}

/// A finished pack, ready to store.
pub struct FinishedPack {
    pub name: String,
    pub bytes: Vec<u8>,
    pub frames: Vec<FrameEntry>,
}

impl PackBuilder {
    /// A builder writing into a recycled buffer (its capacity is kept).
    pub fn with_buffer(mut buf: Vec<u8>) -> PackBuilder {
        buf.clear();
        PackBuilder { buf, frames: Vec::new() }
    }

    /// Grows the buffer to exactly what is needed, at least [`PACK_CAPACITY`]: a doubling
    /// `Vec` would leave a recycled pack buffer at twice the pack size, and a session keeps
    /// four of them.
    fn reserve(&mut self, additional: usize) {
        if self.buf.capacity() - self.buf.len() < additional {
            let want = (self.buf.len() + additional).max(PACK_CAPACITY);
            self.buf.reserve_exact(want - self.buf.len());
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Appends a frame; returns its emptied buffer for reuse.
    pub fn add(&mut self, frame: SealedFrame) -> Vec<u8> {
        self.frames.push(FrameEntry {
            offset: self.buf.len() as u32,
            stored_len: frame.stored.len() as u32,
            raw_len: frame.raw_len,
            blobs: frame.blobs,
        });
        self.reserve(frame.stored.len());
        self.buf.extend_from_slice(&frame.stored);
        let mut b = frame.stored;
        b.clear();
        b
    }

    pub fn finish(mut self, crypto: &Crypto) -> FinishedPack {
        let trailer = crypto.seal(&encode_contents(&self.frames), 3);
        self.reserve(trailer.len() + 4 + PACK_MAGIC.len());
        self.buf.extend_from_slice(&trailer);
        self.buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(PACK_MAGIC);
        let name = name_of(&self.buf);
        FinishedPack { name, bytes: self.buf, frames: self.frames }
    }
}

/// Encodes a frame list (used by pack trailers and index files alike).
pub(crate) fn encode_contents_into(w: &mut Writer, frames: &[FrameEntry]) {
    w.u32(frames.len() as u32);
    for f in frames {
        w.u32(f.offset);
        w.u32(f.stored_len);
        w.u32(f.raw_len);
        w.u32(f.blobs.len() as u32);
        for b in &f.blobs {
            w.u8(b.kind as u8);
            w.bytes(&b.id.0);
            w.u32(b.raw_offset);
            w.u32(b.len);
        }
    }
}

fn encode_contents(frames: &[FrameEntry]) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    encode_contents_into(&mut w, frames);
    w.0
}

pub(crate) fn decode_contents_from(r: &mut Reader) -> Result<Vec<FrameEntry>> {
    let n = r.count(16)?;
    let mut frames = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = r.u32()?;
        let stored_len = r.u32()?;
        let raw_len = r.u32()?;
        if raw_len as usize > MAX_FRAME_RAW || stored_len as usize > MAX_FRAME_RAW + MAX_SEAL_OVERHEAD {
            return Err(Error::Format(format!("a frame claims {raw_len} raw / {stored_len} stored bytes")));
        }
        let nb = r.count(41)?;
        let mut blobs = Vec::with_capacity(nb);
        for _ in 0..nb {
            let kind = BlobKind::from_u8(r.u8()?)?;
            let id = BlockId::from_slice(r.take(32)?);
            let raw_offset = r.u32()?;
            let len = r.u32()?;
            if raw_offset as u64 + len as u64 > raw_len as u64 {
                return Err(Error::Format("blob lies outside its frame".into()));
            }
            blobs.push(BlobEntry { kind, id, raw_offset, len });
        }
        frames.push(FrameEntry { offset, stored_len, raw_len, blobs });
    }
    Ok(frames)
}

/// Where the trailer of a pack of `pack_len` bytes lies, from its last 12 bytes.
pub fn trailer_range(footer: &[u8], pack_len: u64) -> Result<(u64, u64)> {
    if footer.len() != FOOTER_LEN || &footer[4..] != PACK_MAGIC {
        return Err(Error::Corrupt("pack footer is missing or damaged".into()));
    }
    let tlen = u32::from_le_bytes(footer[..4].try_into().unwrap()) as u64;
    if tlen + FOOTER_LEN as u64 > pack_len {
        return Err(Error::Corrupt("pack footer claims a trailer larger than the pack".into()));
    }
    Ok((pack_len - FOOTER_LEN as u64 - tlen, tlen))
}

pub const FOOTER_SIZE: u64 = FOOTER_LEN as u64;

/// Parses a whole pack's trailer and checks that its frames tile the pack body.
pub fn parse_pack(crypto: &Crypto, bytes: &[u8], what: &str) -> Result<Vec<FrameEntry>> {
    if bytes.len() < FOOTER_LEN {
        return Err(Error::Corrupt(format!("{what}: too short to be a pack")));
    }
    let (start, len) = trailer_range(&bytes[bytes.len() - FOOTER_LEN..], bytes.len() as u64)
        .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    let frames = parse_trailer(crypto, &bytes[start as usize..(start + len) as usize], what)?;
    check_tiling(&frames, start).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    Ok(frames)
}

/// Checks that frames tile a pack body of `body_len` bytes exactly, in order (FORMAT.md §5).
pub fn check_tiling(frames: &[FrameEntry], body_len: u64) -> std::result::Result<(), &'static str> {
    let mut expect = 0u64;
    for f in frames {
        if f.offset as u64 != expect {
            return Err("frames do not tile the pack");
        }
        expect += f.stored_len as u64;
    }
    if expect != body_len {
        return Err("trailer does not cover the pack body");
    }
    Ok(())
}

pub fn parse_trailer(crypto: &Crypto, sealed: &[u8], what: &str) -> Result<Vec<FrameEntry>> {
    let raw = crypto.open(sealed, &format!("{what} trailer"))?;
    let mut r = Reader::new(&raw, "pack trailer");
    let frames = decode_contents_from(&mut r).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip() {
        let crypto = Crypto::Plain;
        let mut c = crypto::Compressor::new(3);
        let mut pb = PackBuilder::default();
        let a = vec![7u8; 1000];
        let b = b"some other block".to_vec();
        let mut raw = a.clone();
        raw.extend_from_slice(&b);
        let blobs = vec![
            BlobEntry { kind: BlobKind::Data, id: crypto.block_id(&a), raw_offset: 0, len: 1000 },
            BlobEntry { kind: BlobKind::Data, id: crypto.block_id(&b), raw_offset: 1000, len: b.len() as u32 },
        ];
        pb.add(SealedFrame::build(&crypto, &mut c, &raw, blobs.clone()));
        pb.add(SealedFrame::build(&crypto, &mut c, &b, vec![BlobEntry { raw_offset: 0, ..blobs[1].clone() }]));
        let p = pb.finish(&crypto);
        assert_eq!(p.name, blake3::hash(&p.bytes).to_hex().to_string());
        let frames = parse_pack(&crypto, &p.bytes, "p").unwrap();
        assert_eq!(frames, p.frames);
        let f = &frames[0];
        let stored = &p.bytes[f.offset as usize..(f.offset + f.stored_len) as usize];
        assert_eq!(open_frame(&crypto, stored, f.raw_len, "f").unwrap(), raw);
        // Truncation and a damaged footer are reported, not panicked on.
        assert!(parse_pack(&crypto, &p.bytes[..p.bytes.len() - 3], "p").is_err());
        assert!(parse_pack(&crypto, &p.bytes[..5], "p").is_err());
    }
}
