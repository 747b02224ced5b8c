//! Finds Linux swap areas on a disk so a backup can skip them: swap holds nothing a restored
//! machine needs (it starts with empty swap), and on a busy VM it is gigabytes of churn.
//!
//! A range is skipped only when both the partition table and the on-disk signature agree: an MBR
//! partition of type 0x82 (primary or logical) or a GPT partition of the Linux swap type, whose
//! first page ends with `SWAPSPACE2` (or the old `SWAP-SPACE`). A whole disk holding a swap
//! signature counts too. Anything unusual (a table that does not parse, a partition past the end)
//! means "no swap found": skipping too little is safe, skipping too much is not.

use crate::ranges::{normalize, Range};
use crate::source::Source;
use anyhow::Result;

/// GPT partition type GUID for Linux swap, 0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, as stored
/// on disk (the first three fields little-endian).
const GPT_SWAP: [u8; 16] =
    [0x6d, 0xfd, 0x57, 0x06, 0xab, 0xa4, 0xc4, 0x43, 0x84, 0xe5, 0x09, 0x33, 0xc8, 0x4b, 0x4f, 0x4f];
const PAGE: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapArea {
    pub range: Range,
    /// `gpt partition 1`, `mbr partition 5`, `whole disk`.
    pub location: String,
}

/// Reads `len` bytes at `offset` from a source with nothing else in flight.
pub fn read_at(src: &mut dyn Source, offset: u64, len: usize) -> Result<Vec<u8>> {
    src.submit(offset, len, Vec::with_capacity(len))?;
    src.next()
}

fn has_swap_signature(src: &mut dyn Source, start: u64, len: u64) -> Result<bool> {
    if len < 10 * PAGE || start + PAGE > src.size() {
        return Ok(false);
    }
    let page = read_at(src, start, PAGE as usize)?;
    let tail = &page[PAGE as usize - 10..];
    Ok(tail == b"SWAPSPACE2" || tail == b"SWAP-SPACE")
}

/// The swap areas of a disk, sorted.
pub fn find_swap(src: &mut dyn Source) -> Result<Vec<SwapArea>> {
    let size = src.size();
    if size < 64 * 1024 {
        return Ok(vec![]);
    }
    let mut candidates: Vec<(u64, u64, String)> = Vec::new();
    let mbr = read_at(src, 0, 512)?;
    if mbr[510] == 0x55 && mbr[511] == 0xaa {
        let entry = |i: usize| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (
                e[4],
                u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64,
                u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64,
            )
        };
        if (0..4).any(|i| entry(i).0 == 0xee) {
            gpt_candidates(src, &mut candidates)?;
        } else {
            for i in 0..4 {
                let (kind, lba, count) = entry(i);
                match kind {
                    0x82 => candidates.push((lba * 512, count * 512, format!("mbr partition {}", i + 1))),
                    0x05 | 0x0f | 0x85 => logical_candidates(src, lba, &mut candidates)?,
                    _ => {}
                }
            }
        }
    }
    if candidates.is_empty() && has_swap_signature(src, 0, size)? {
        return Ok(vec![SwapArea { range: Range { offset: 0, length: size }, location: "whole disk".into() }]);
    }
    let mut out = Vec::new();
    for (start, len, location) in candidates {
        if len == 0 || start.checked_add(len).is_none_or(|end| end > size) {
            continue;
        }
        if has_swap_signature(src, start, len)? {
            out.push(SwapArea { range: Range { offset: start, length: len }, location });
        }
    }
    out.sort_by_key(|a| a.range.offset);
    Ok(out)
}

fn gpt_candidates(src: &mut dyn Source, out: &mut Vec<(u64, u64, String)>) -> Result<()> {
    for sector in [512u64, 4096] {
        let hdr = read_at(src, sector, 512)?;
        if &hdr[..8] != b"EFI PART" {
            continue;
        }
        let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64;
        let (entries_lba, count, entry_size) = (le64(&hdr, 72), le32(&hdr, 80).min(1024), le32(&hdr, 84));
        if !(128..=4096).contains(&entry_size) {
            return Ok(());
        }
        let table = read_at(src, entries_lba * sector, (count * entry_size) as usize)?;
        for i in 0..count as usize {
            let e = &table[i * entry_size as usize..(i + 1) * entry_size as usize];
            if e[..16] == GPT_SWAP {
                let (first, last) = (le64(e, 32), le64(e, 40));
                if last >= first {
                    out.push((first * sector, (last - first + 1) * sector, format!("gpt partition {}", i + 1)));
                }
            }
        }
        return Ok(());
    }
    Ok(())
}

/// Walks the chain of extended boot records (logical partitions are numbered from 5).
fn logical_candidates(src: &mut dyn Source, ext_lba: u64, out: &mut Vec<(u64, u64, String)>) -> Result<()> {
    let mut ebr_lba = ext_lba;
    for n in 5..64 {
        if (ebr_lba + 1) * 512 > src.size() {
            return Ok(());
        }
        let ebr = read_at(src, ebr_lba * 512, 512)?;
        if ebr[510] != 0x55 || ebr[511] != 0xaa {
            return Ok(());
        }
        let field = |i: usize, at: usize| {
            u32::from_le_bytes(ebr[446 + 16 * i + at..446 + 16 * i + at + 4].try_into().unwrap()) as u64
        };
        if ebr[446 + 4] == 0x82 {
            out.push(((ebr_lba + field(0, 8)) * 512, field(0, 12) * 512, format!("mbr partition {n}")));
        }
        let next = field(1, 8);
        if next == 0 {
            return Ok(());
        }
        ebr_lba = ext_lba + next;
    }
    Ok(())
}

/// What of a swap area is kept: its header (signature, UUID, label) in the first page, rounded
/// to a block, so the restored guest's `swapon` (by UUID or label, as fstab says) still finds a
/// valid, empty swap area instead of stalling its boot.
pub const KEEP_HEADER: u64 = 64 * 1024;

/// The part of a swap area that is skipped (everything after its header).
pub fn skipped_part(area: &SwapArea) -> Option<Range> {
    (area.range.length > KEEP_HEADER)
        .then(|| Range { offset: area.range.offset + KEEP_HEADER, length: area.range.length - KEEP_HEADER })
}

/// The ranges to skip, as the backup engine wants them.
pub fn skip_ranges(areas: &[SwapArea]) -> Vec<Range> {
    normalize(areas.iter().filter_map(skipped_part).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileSource;
    use std::process::Command;

    fn tool(cmd: &str) -> bool {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {cmd} || test -x /sbin/{cmd}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    #[test]
    fn finds_gpt_and_mbr_swap_partitions_with_signatures() {
        if !tool("sfdisk") || !tool("mkswap") {
            eprintln!("sfdisk/mkswap missing: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (label, table) in [
            ("gpt", "label: gpt\nstart=2048, size=16MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\nstart=34816, size=8MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n"),
            ("dos", "label: dos\nstart=2048, size=16MiB, type=82\nstart=34816, size=8MiB, type=82\n"),
        ] {
            let img = dir.path().join(format!("{label}.img"));
            std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
            let mut c = Command::new("sfdisk").arg("-q").arg(&img).stdin(std::process::Stdio::piped()).spawn().unwrap();
            use std::io::Write;
            c.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success());
            // Only the first partition gets a swap signature: the second must not be skipped.
            let part = dir.path().join("p1");
            std::fs::File::create(&part).unwrap().set_len(16 << 20).unwrap();
            assert!(Command::new("mkswap").arg("-q").arg(&part).status().unwrap().success());
            let sig = std::fs::read(&part).unwrap();
            let mut disk = std::fs::read(&img).unwrap();
            disk[1 << 20..(1 << 20) + 4096].copy_from_slice(&sig[..4096]);
            std::fs::write(&img, &disk).unwrap();
            let mut src = FileSource::open(&img).unwrap();
            let found = find_swap(&mut src).unwrap();
            assert_eq!(found.len(), 1, "{label}: {found:?}");
            assert_eq!(found[0].range, Range { offset: 1 << 20, length: 16 << 20 }, "{label}");
        }
        // A disk with no table and no signature has no swap.
        let blank = dir.path().join("blank.img");
        std::fs::File::create(&blank).unwrap().set_len(8 << 20).unwrap();
        assert!(find_swap(&mut FileSource::open(&blank).unwrap()).unwrap().is_empty());
    }
}
