//! A qcow2 image written by us, in one pass, as fast as a raw file.
//!
//! A restore writes each cluster once, in increasing disk order, and knows nothing reads the
//! image before it is finished. So the image is laid out as an append-only stream: data clusters
//! in disk order, each L2 table appended as soon as its 512 MiB region of the disk is done, and at
//! the end the L1 table, the refcount blocks and table (every cluster of the file is used exactly
//! once, so every refcount is 1), and finally the header in cluster 0. All of it goes through the
//! raw target's O_DIRECT writer. Memory stays at one L2 table whatever the disk size.
//!
//! Format: qcow2 version 3, 64 KiB clusters, 16-bit refcounts, no backing file, no compression,
//! unallocated clusters read as zeros (docs: QEMU's `docs/interop/qcow2.txt`). `qemu-img check`
//! finds such an image clean; the tests hold us to that.

use super::{RawFile, Target};
use anyhow::{bail, Result};

pub const CLUSTER: u64 = 65536;
const CLUSTER_BITS: u32 = 16;
/// L2 entries per table (8 bytes each): one table maps 512 MiB of disk.
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcounts per refcount block (16 bits each).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// Entry flag: the cluster's refcount is exactly one (it may be written in place).
const COPIED: u64 = 1 << 63;

pub struct Qcow2Writer {
    raw: RawFile,
    virtual_size: u64,
    /// Next free cluster of the file; cluster 0 is the header, written last.
    next_host: u64,
    l1: Vec<u64>,
    l2: Vec<u64>,
    l2_region: Option<u64>,
    zeros: Vec<u8>,
}

impl Qcow2Writer {
    pub fn new(raw: RawFile, virtual_size: u64) -> Qcow2Writer {
        let l1_entries = virtual_size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES) as usize;
        Qcow2Writer {
            raw,
            virtual_size,
            next_host: CLUSTER,
            l1: vec![0; l1_entries],
            l2: vec![0; L2_ENTRIES as usize],
            l2_region: None,
            zeros: vec![0; CLUSTER as usize],
        }
    }

    fn append(&mut self, data: &[u8]) -> Result<u64> {
        let at = self.next_host;
        self.raw.write_at(at, data)?;
        let pad = (CLUSTER - data.len() as u64 % CLUSTER) % CLUSTER;
        if pad > 0 {
            let zeros = std::mem::take(&mut self.zeros);
            self.raw.write_at(at + data.len() as u64, &zeros[..pad as usize])?;
            self.zeros = zeros;
        }
        self.next_host += (data.len() as u64).div_ceil(CLUSTER) * CLUSTER;
        Ok(at)
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some(region) = self.l2_region.take() {
            let mut buf = Vec::with_capacity(CLUSTER as usize);
            for e in &self.l2 {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            let at = self.append(&buf)?;
            self.l1[region as usize] = at | COPIED;
            self.l2.fill(0);
        }
        Ok(())
    }

    fn header(&self, l1_offset: u64, rt_offset: u64, rt_clusters: u64) -> Vec<u8> {
        let mut h = vec![0u8; CLUSTER as usize];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes()); // version
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(self.l1.len() as u32).to_be_bytes());
        put(40, &l1_offset.to_be_bytes());
        put(48, &rt_offset.to_be_bytes());
        put(56, &(rt_clusters as u32).to_be_bytes());
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
        put(100, &104u32.to_be_bytes()); // header_length; the end-of-extensions marker follows (zeros)
        h
    }
}

impl Target for Qcow2Writer {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !offset.is_multiple_of(CLUSTER) {
            bail!("internal error: unaligned qcow2 write at {offset}");
        }
        for (i, chunk) in data.chunks(CLUSTER as usize).enumerate() {
            let guest = offset / CLUSTER + i as u64;
            if guest * CLUSTER >= self.virtual_size {
                bail!("internal error: qcow2 write past the end of the disk");
            }
            let region = guest / L2_ENTRIES;
            if self.l2_region != Some(region) {
                if self.l2_region.is_some_and(|r| r > region) {
                    bail!("internal error: qcow2 writes must come in disk order");
                }
                self.flush_l2()?;
                self.l2_region = Some(region);
            }
            let idx = (guest % L2_ENTRIES) as usize;
            if self.l2[idx] != 0 {
                bail!("internal error: cluster {guest} written twice");
            }
            let at = self.append(chunk)?;
            self.l2[idx] = at | COPIED;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_l2()?;
        let mut l1 = Vec::with_capacity(self.l1.len() * 8);
        for e in &self.l1 {
            l1.extend_from_slice(&e.to_be_bytes());
        }
        let l1_offset = if l1.is_empty() { 0 } else { self.append(&l1)? };
        // Refcount blocks and table cover every cluster, themselves included: find the fixed point.
        let used = self.next_host / CLUSTER;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = used + blocks + table;
            let (b, t) =
                (total.div_ceil(REFCOUNTS_PER_BLOCK), (total.div_ceil(REFCOUNTS_PER_BLOCK) * 8).div_ceil(CLUSTER));
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        let total = used + blocks + table;
        let mut block_offsets = Vec::new();
        for i in 0..blocks {
            let mut b = vec![0u8; CLUSTER as usize];
            let first = i * REFCOUNTS_PER_BLOCK;
            let n = total.saturating_sub(first).min(REFCOUNTS_PER_BLOCK) as usize;
            for e in 0..n {
                b[e * 2..e * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            block_offsets.push(self.append(&b)?);
        }
        let mut rt = Vec::with_capacity(block_offsets.len() * 8);
        for o in &block_offsets {
            rt.extend_from_slice(&o.to_be_bytes());
        }
        let rt_offset = self.append(&rt)?;
        debug_assert_eq!(self.next_host / CLUSTER, total);
        let header = self.header(l1_offset, rt_offset, table);
        self.raw.write_at(0, &header)?;
        self.raw.size = self.next_host;
        Box::new(self.raw).finish()
    }

    fn abandon(self: Box<Self>) {
        Box::new(self.raw).abandon()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img").args(args).output().expect("qemu-img (apt-get install qemu-utils)")
    }

    /// Writes `clusters` (index, fill byte) into a new image and checks it with QEMU's own tools.
    fn roundtrip(size: u64, clusters: &[(u64, u8)]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let partial = dir.path().join("t.qcow2.cairn-partial");
        let mut w: Box<dyn Target> = Box::new(Qcow2Writer::new(RawFile::create(&partial, &path, 0).unwrap(), size));
        let mut expected = vec![0u8; size as usize];
        for &(c, byte) in clusters {
            let start = c * CLUSTER;
            let len = CLUSTER.min(size - start) as usize;
            let data = vec![byte; len];
            w.write_at(start, &data).unwrap();
            expected[start as usize..start as usize + len].copy_from_slice(&data);
        }
        w.finish().unwrap();
        let check = qemu_img(&["check", path.to_str().unwrap()]);
        assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
        let raw = dir.path().join("t.raw");
        let conv = qemu_img(&["convert", "-f", "qcow2", "-O", "raw", path.to_str().unwrap(), raw.to_str().unwrap()]);
        assert!(conv.status.success(), "{}", String::from_utf8_lossy(&conv.stderr));
        assert!(std::fs::read(&raw).unwrap() == expected, "content differs for size {size}");
    }

    #[test]
    fn qemu_reads_what_we_write() {
        roundtrip(10 * CLUSTER, &[]); // nothing but zeros: no L2 table at all
        roundtrip(10 * CLUSTER + 4096, &[(0, 1), (3, 2), (10, 3)]); // a short last cluster
                                                                    // Several L2 regions (512 MiB each), some empty, on a sparse 1.5 GiB disk.
        let l2 = L2_ENTRIES;
        roundtrip(3 * l2 * CLUSTER, &[(1, 7), (l2 - 1, 8), (2 * l2, 9), (3 * l2 - 1, 10)]);
    }
}
