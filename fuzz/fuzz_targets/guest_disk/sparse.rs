//! A disk described by a fuzz input (format: see mod.rs, and fuzz/seeds/sparse.py). Plain Rust
//! with no crate of ours, so that cairn's unit tests can read regression inputs with it too.

pub struct SparseDisk {
    pub size: u64,
    /// (offset, bytes), in input order: later chunks win.
    chunks: Vec<(u64, Vec<u8>)>,
}

impl SparseDisk {
    pub fn parse(data: &[u8], max_size: u64) -> SparseDisk {
        let u64_at = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let size = u64_at(0).unwrap_or(0) % max_size;
        let mut chunks = Vec::new();
        let mut at = 8;
        while let (Some(offset), Some(len)) = (u64_at(at), data.get(at + 8..at + 10)) {
            let len = u16::from_le_bytes(len.try_into().unwrap()) as usize;
            let bytes = &data[(at + 10).min(data.len())..(at + 10 + len).min(data.len())];
            if size > 0 {
                let offset = offset % size;
                let keep = bytes.len().min((size - offset) as usize);
                chunks.push((offset, bytes[..keep].to_vec()));
            }
            at += 10 + len;
        }
        SparseDisk { size, chunks }
    }

    /// Fills `buf` from `offset` (inside the disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len() as u64).is_some_and(|end| end <= self.size), "read past the disk");
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (at, bytes) in &self.chunks {
            let (from, to) = ((*at).max(offset), (at + bytes.len() as u64).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
    }

    /// Bytes the input actually sets (what allocation may be proportional to).
    pub fn set_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.1.len()).sum()
    }
}
