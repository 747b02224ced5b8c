//! Partition tables (MBR with logical partitions, GPT) read through any byte reader: the swap
//! finder reads them from a backup source, file browsing from a restore point.

use anyhow::Result;

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

/// Reads `len` bytes at an offset.
pub type ReadFn<'a> = dyn FnMut(u64, usize) -> Result<Vec<u8>> + 'a;

/// The partitions of a disk of `size` bytes; empty when it has no table we know. Entries that
/// reach past the end of the disk are left out.
pub fn read_table(read: &mut ReadFn, size: u64) -> Result<Vec<PartitionEntry>> {
    if size < 64 * 1024 {
        return Ok(vec![]);
    }
    let mbr = read(0, 512)?;
    let mut out = Vec::new();
    if mbr.len() < 512 || mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Ok(out);
    }
    let entry = |i: usize| {
        let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
        (e[4], le32(e, 8), le32(e, 12))
    };
    if (0..4).any(|i| entry(i).0 == 0xee) {
        gpt(read, &mut out)?;
    } else {
        for i in 0..4 {
            let (kind, lba, count) = entry(i);
            match kind {
                0 => {}
                0x05 | 0x0f | 0x85 => logical(read, size, lba, &mut out)?,
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

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn gpt(read: &mut ReadFn, out: &mut Vec<PartitionEntry>) -> Result<()> {
    for sector in [512u64, 4096] {
        let hdr = read(sector, 512)?;
        if hdr.len() < 92 || &hdr[..8] != b"EFI PART" {
            continue;
        }
        let (entries_lba, count, entry_size) = (le64(&hdr, 72), le32(&hdr, 80).min(1024), le32(&hdr, 84));
        if !(128..=4096).contains(&entry_size) {
            return Ok(());
        }
        let table = read(entries_lba * sector, (count * entry_size) as usize)?;
        for i in 0..count as usize {
            let e = &table[i * entry_size as usize..(i + 1) * entry_size as usize];
            let kind: [u8; 16] = e[..16].try_into().unwrap();
            let (first, last) = (le64(e, 32), le64(e, 40));
            if kind != [0; 16] && last >= first {
                out.push(PartitionEntry {
                    number: i as u32 + 1,
                    offset: first * sector,
                    length: (last - first + 1) * sector,
                    table: Table::Gpt(kind),
                });
            }
        }
        return Ok(());
    }
    Ok(())
}

/// Walks the chain of extended boot records.
fn logical(read: &mut ReadFn, size: u64, ext_lba: u64, out: &mut Vec<PartitionEntry>) -> Result<()> {
    let mut ebr_lba = ext_lba;
    for n in 5..64 {
        if (ebr_lba + 1) * 512 > size {
            return Ok(());
        }
        let ebr = read(ebr_lba * 512, 512)?;
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
/// `fat`, `xfs`, `btrfs`, `lvm`, or None.
pub fn detect_filesystem(read: &mut ReadFn, offset: u64, length: u64) -> Result<Option<&'static str>> {
    if length < 8192 {
        return Ok(None);
    }
    let head = read(offset, 4096)?;
    let page = if length >= 65536 + 4096 { read(offset + 65536, 4096)? } else { vec![] };
    Ok(if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xef {
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
