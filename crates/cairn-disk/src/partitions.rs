//! Partition tables (MBR with logical partitions, GPT) read through any byte reader: the swap
//! finder reads them from a backup source, file browsing from a restore point.

use anyhow::{bail, Result};

/// One partition as its table describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionEntry {
    /// 1-based; MBR logical partitions count from 5, as Linux names them.
    pub number: u32,
    pub offset: u64,
    pub length: u64,
    pub table: Table,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// MBR partition type byte (0x83 Linux, 0x82 swap, 0x07 NTFS/exFAT, 0x0c FAT32...).
    Mbr(u8),
    /// GPT partition type GUID as stored on disk.
    Gpt([u8; 16]),
}

/// GPT type of Linux swap, 0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, as stored (mixed endian).
pub const GPT_LINUX_SWAP: [u8; 16] =
    [0x6d, 0xfd, 0x57, 0x06, 0xab, 0xa4, 0xc4, 0x43, 0x84, 0xe5, 0x09, 0x33, 0xc8, 0x4b, 0x4f, 0x4f];

/// Reads `len` bytes at an offset. A reader may return fewer bytes at the end of what it reads
/// (the `files` probe clamps at its volume's end); parsers treat a short read as "not this
/// structure".
pub type ReadFn<'a> = dyn FnMut(u64, usize) -> Result<Vec<u8>> + 'a;

/// The most a GPT partition entry array may take (the usual one is 16 KiB: 128 entries of 128
/// bytes); a header asking for more is not believed.
pub const MAX_GPT_ENTRIES_BYTES: u64 = 4 << 20;

/// The partitions of a disk of `size` bytes; empty when it has no table we know, an error when
/// its GPT cannot be read. Every offset and length comes from the guest and is checked before
/// it is read or used: a GPT whose entries lie past the disk is an error (never a read past the
/// disk), an entry whose partition does not fit in the disk is left out.
pub fn read_table(read: &mut ReadFn, size: u64) -> Result<Vec<PartitionEntry>> {
    if size < 64 * 1024 {
        return Ok(vec![]);
    }
    let Some(mbr) = read_exact(read, size, 0, 512)? else { return Ok(vec![]) };
    let mut out = Vec::new();
    if mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Ok(out);
    }
    let entry = |i: usize| {
        let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
        (e[4], le32(e, 8), le32(e, 12))
    };
    if (0..4).any(|i| entry(i).0 == 0xee) {
        gpt(read, size, &mut out)?;
    } else {
        for i in 0..4 {
            let (kind, lba, count) = entry(i);
            match kind {
                0 => {}
                0x05 | 0x0f | 0x85 => logical(read, size, lba, &mut out)?,
                // 32-bit sector numbers times 512 fit in 64 bits.
                _ => out.push(PartitionEntry {
                    number: i as u32 + 1,
                    offset: lba * 512,
                    length: count * 512,
                    table: Table::Mbr(kind),
                }),
            }
        }
    }
    out.retain(|p| p.length > 0 && p.offset.checked_add(p.length).is_some_and(|end| end <= size));
    out.sort_by_key(|p| p.offset);
    Ok(out)
}

/// `len` bytes at `offset`, or None when they are not all inside the disk (or the reader
/// returned fewer): the structure supposed to be there is not.
fn read_exact(read: &mut ReadFn, size: u64, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Ok(None);
    }
    let b = read(offset, len)?;
    Ok((b.len() >= len).then_some(b))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn gpt(read: &mut ReadFn, size: u64, out: &mut Vec<PartitionEntry>) -> Result<()> {
    for sector in [512u64, 4096] {
        let Some(hdr) = read_exact(read, size, sector, 512)? else { continue };
        if &hdr[..8] != b"EFI PART" {
            continue;
        }
        let (entries_lba, count, entry_size) = (le64(&hdr, 72), le32(&hdr, 80), le32(&hdr, 84));
        // The UEFI specification: entries of 128 × 2^n bytes.
        if !(128..=4096).contains(&entry_size) || !entry_size.is_power_of_two() {
            bail!("the GPT header says its entries take {entry_size} bytes each");
        }
        let count = count.min(MAX_GPT_ENTRIES_BYTES / entry_size);
        // count * entry_size <= MAX_GPT_ENTRIES_BYTES: no overflow.
        let len = count * entry_size;
        let table = match entries_lba.checked_mul(sector) {
            Some(at) => read_exact(read, size, at, len as usize)?,
            None => None,
        };
        let Some(table) = table else {
            bail!("the GPT partition entries ({len} bytes at sector {entries_lba}) lie past the end of the {size}-byte disk");
        };
        for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
            let kind: [u8; 16] = e[..16].try_into().unwrap();
            let (first, last) = (le64(e, 32), le64(e, 40));
            if kind == [0; 16] || last < first {
                continue;
            }
            let offset = first.checked_mul(sector);
            let length = (last - first).checked_add(1).and_then(|n| n.checked_mul(sector));
            if let (Some(offset), Some(length)) = (offset, length) {
                out.push(PartitionEntry { number: i as u32 + 1, offset, length, table: Table::Gpt(kind) });
            }
        }
        return Ok(());
    }
    Ok(())
}

/// Walks the chain of extended boot records (at most 59 logical partitions: a chain that
/// loops ends there).
fn logical(read: &mut ReadFn, size: u64, ext_lba: u64, out: &mut Vec<PartitionEntry>) -> Result<()> {
    let mut ebr_lba = ext_lba;
    for n in 5..64 {
        // Sector numbers are 32-bit sums: no overflow in 64 bits.
        let Some(ebr) = read_exact(read, size, ebr_lba * 512, 512)? else { return Ok(()) };
        if ebr[510] != 0x55 || ebr[511] != 0xaa {
            return Ok(());
        }
        let field = |i: usize, at: usize| le32(&ebr, 446 + 16 * i + at);
        let kind = ebr[446 + 4];
        if kind != 0 {
            out.push(PartitionEntry {
                number: n,
                offset: (ebr_lba + field(0, 8)) * 512,
                length: field(0, 12) * 512,
                table: Table::Mbr(kind),
            });
        }
        let next = field(1, 8);
        if next == 0 {
            return Ok(());
        }
        ebr_lba = ext_lba + next;
    }
    Ok(())
}

/// What a partition or disk holds, from its signatures: `ext4` (ext2/3/4), `swap`, `ntfs`,
/// `fat`, `xfs`, `btrfs`, `lvm`, or None. `read` must reach `offset + length`; a short read is
/// "nothing recognised".
pub fn detect_filesystem(read: &mut ReadFn, offset: u64, length: u64) -> Result<Option<&'static str>> {
    if length < 8192 || offset.checked_add(length).is_none() {
        return Ok(None);
    }
    let head = read(offset, 4096)?;
    if head.len() < 4096 {
        return Ok(None);
    }
    let page = if length >= 65536 + 4096 { read(offset + 65536, 4096)? } else { vec![] };
    Ok(if head[1080] == 0x53 && head[1081] == 0xef {
        Some("ext4")
    } else if &head[4086..4096] == b"SWAPSPACE2" || &head[4086..4096] == b"SWAP-SPACE" {
        Some("swap")
    } else if &head[3..11] == b"NTFS    " {
        Some("ntfs")
    } else if &head[82..87] == b"FAT32" || &head[54..59] == b"FAT12" || &head[54..59] == b"FAT16" {
        Some("fat")
    } else if &head[..4] == b"XFSB" {
        Some("xfs")
    } else if &head[512 + 24..512 + 32] == b"LVM2 001" || &head[512..520] == b"LABELONE" {
        Some("lvm")
    } else if page.len() >= 72 && &page[64..72] == b"_BHRfS_M" {
        Some("btrfs")
    } else {
        None
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A disk in memory read by a parser that knows its size: asking for bytes past the end
    /// is a bug of the parser (a backup source would fail the backup there).
    pub(crate) fn strict(disk: &[u8]) -> impl FnMut(u64, usize) -> Result<Vec<u8>> + '_ {
        move |at, len| {
            let end = at.checked_add(len as u64).filter(|&e| e <= disk.len() as u64);
            let end = end.unwrap_or_else(|| panic!("asked for {len} bytes at {at}, past the end of the disk"));
            Ok(disk[at as usize..end as usize].to_vec())
        }
    }

    /// A disk in memory read as the `files` probe reads it: short at the end.
    fn clamping(disk: &[u8]) -> impl FnMut(u64, usize) -> Result<Vec<u8>> + '_ {
        move |at, len| {
            let at = (at.min(disk.len() as u64)) as usize;
            Ok(disk[at..(at + len).min(disk.len())].to_vec())
        }
    }

    /// A protective MBR and a GPT header at LBA 1 whose entries are at `entries_lba`.
    pub(crate) fn gpt_disk(size: usize, entries_lba: u64, count: u32, entry_size: u32) -> Vec<u8> {
        let mut d = vec![0u8; size];
        d[446 + 4] = 0xee;
        d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&entries_lba.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&count.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&entry_size.to_le_bytes());
        d
    }

    fn set_entry(d: &mut [u8], at: usize, kind: [u8; 16], first: u64, last: u64) {
        d[at..at + 16].copy_from_slice(&kind);
        d[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
        d[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
    }

    #[test]
    fn a_gpt_whose_entries_lie_past_the_disk_is_an_error_not_a_read_past_it() {
        for lba in [1 << 40, u64::MAX / 512 + 1, u64::MAX, 2047] {
            let d = gpt_disk(1 << 20, lba, 128, 128);
            let err = read_table(&mut strict(&d), d.len() as u64).unwrap_err();
            assert!(format!("{err:#}").contains("lie past the end of the 1048576-byte disk"), "{lba}: {err:#}");
            // The files probe clamps instead of failing: the same answer, and no panic.
            assert!(read_table(&mut clamping(&d), d.len() as u64).is_err());
        }
    }

    #[test]
    fn gpt_entry_arrays_are_read_at_most_4_mib_and_entries_that_overflow_are_left_out() {
        let mut d = gpt_disk(8 << 20, 2, u32::MAX, 4096);
        set_entry(&mut d, 1024, GPT_LINUX_SWAP, 34, 100);
        set_entry(&mut d, 1024 + 4096, GPT_LINUX_SWAP, 1 << 60, u64::MAX);
        set_entry(&mut d, 1024 + 8192, GPT_LINUX_SWAP, 200, 100); // ends before it starts
        let mut longest = 0;
        let mut read = strict(&d);
        let table = read_table(
            &mut |at, len| {
                longest = longest.max(len);
                read(at, len)
            },
            d.len() as u64,
        )
        .unwrap();
        assert_eq!(longest, MAX_GPT_ENTRIES_BYTES as usize);
        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!((table[0].offset, table[0].length), (34 * 512, 67 * 512));
        // Entry sizes the specification does not allow are refused.
        for size in [0, 100, 129, 8192] {
            assert!(read_table(&mut strict(&gpt_disk(1 << 20, 2, 4, size)), 1 << 20).is_err(), "{size}");
        }
    }

    #[test]
    fn short_reads_are_no_structure_not_a_panic() {
        // A GPT whose entry array reaches exactly the end, read by a probe that is short there.
        let mut d = gpt_disk(1 << 20, (1 << 20) / 512 - 32, 128, 128);
        set_entry(&mut d, (1 << 20) - 128 * 128, GPT_LINUX_SWAP, 34, 99);
        assert_eq!(read_table(&mut clamping(&d), d.len() as u64).unwrap().len(), 1);
        let t = d.len() as u64;
        assert!(read_table(&mut clamping(&d[..600]), t).is_ok_and(|t| t.is_empty()));
        // Filesystem probes at the very end of what the reader holds.
        let disk = vec![0u8; 64 << 10];
        for at in [0, (64 << 10) - 100, 64 << 10, u64::MAX - 10] {
            assert_eq!(detect_filesystem(&mut clamping(&disk), at, 1 << 20).unwrap(), None, "{at}");
        }
    }

    #[test]
    fn a_chain_of_logical_partitions_that_loops_ends() {
        let mut d = vec![0u8; 1 << 20];
        let mut boot_record = |lba: usize, kind: u8, start: u32, count: u32, next: u32| {
            let b = lba * 512;
            d[b + 446 + 4] = kind;
            d[b + 446 + 8..b + 446 + 12].copy_from_slice(&start.to_le_bytes());
            d[b + 446 + 12..b + 446 + 16].copy_from_slice(&count.to_le_bytes());
            d[b + 462 + 8..b + 462 + 12].copy_from_slice(&next.to_le_bytes());
            d[b + 510] = 0x55;
            d[b + 511] = 0xaa;
        };
        boot_record(0, 0x05, 8, 1000, 0); // the MBR: an extended partition at LBA 8
        boot_record(8, 0x83, 1, 4, 8); // its first EBR, pointing to LBA 8 + 8
        boot_record(16, 0x83, 1, 4, 8); // which points to itself
        let table = read_table(&mut strict(&d), d.len() as u64).unwrap();
        assert_eq!(table.len(), 59, "{table:?}");
        assert!(table.iter().all(|p| p.offset + p.length <= d.len() as u64));
    }
}
