//! Finds Linux swap areas on a disk so a backup can skip them: swap holds nothing a restored
//! machine needs (it starts with empty swap), and on a busy VM it is gigabytes of churn.
//!
//! A range is skipped only when both the partition table and the on-disk signature agree: an MBR
//! partition of type 0x82 (primary or logical) or a GPT partition of the Linux swap type, whose
//! first page ends with `SWAPSPACE2` (or the old `SWAP-SPACE`). A whole disk holding a swap
//! signature counts too, and so does an LVM logical volume (Debian's and Ubuntu's `vg/swap_1`)
//! that begins with the signature, when its volume group's metadata parses and the volume is
//! linear. Windows guests page to files: `pagefile.sys` and `swapfile.sys` in the root of a
//! cleanly closed NTFS volume, whose clusters are read from the MFT (their data runs).
//!
//! Everything here is read from the guest's disk, so the guest chooses it. Anything unusual (a
//! table that does not parse, a partition past the end, an MFT record we cannot follow, a page
//! file run outside its volume) means "nothing skipped there", with a warning: skipping too
//! little is safe, skipping too much is not, and a guest must never fail its own backup.

use crate::files::guarded;
use crate::partitions::{detect_filesystem, read_table, Table, GPT_LINUX_SWAP};
use anyhow::{bail, Result};
use cairn_engine::ranges::{normalize, Range};
use cairn_engine::source::Source;

const PAGE: u64 = 4096;

/// The most one probe reads from a disk (a GPT entry array is at most 4 MiB).
const MAX_READ: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapArea {
    pub range: Range,
    /// `gpt partition 1`, `mbr partition 5`, `whole disk`.
    pub location: String,
}

/// What swap detection found on one disk.
#[derive(Clone, Debug, Default)]
pub struct SwapScan {
    /// Sorted by offset; each inside its partition or volume, and inside the disk.
    pub areas: Vec<SwapArea>,
    /// Why something that looked like swap was not skipped (a structure that could not be read,
    /// a page file of an unclean volume), naming where: nothing is skipped there.
    pub warnings: Vec<String>,
}

/// Reads `len` bytes at `offset` from a source with nothing else in flight. A read that does not
/// lie inside the disk is refused before anything is allocated or asked of the source.
pub fn read_at(src: &mut dyn Source, offset: u64, len: usize) -> Result<Vec<u8>> {
    let size = src.size();
    if len > MAX_READ || offset.checked_add(len as u64).is_none_or(|end| end > size) {
        bail!("a read of {len} bytes at {offset} (past the end of the {size}-byte disk, or too long)");
    }
    src.submit(offset, len, Vec::with_capacity(len))?;
    src.next()
}

fn has_swap_signature(src: &mut dyn Source, start: u64, len: u64) -> Result<bool> {
    if len < 10 * PAGE || start.checked_add(PAGE).is_none_or(|end| end > src.size()) {
        return Ok(false);
    }
    let page = read_at(src, start, PAGE as usize)?;
    let tail = &page[PAGE as usize - 10..];
    Ok(tail == b"SWAPSPACE2" || tail == b"SWAP-SPACE")
}

/// The swap areas of a disk. Never fails: what cannot be read is reported in `warnings` and
/// nothing is skipped there.
pub fn find_swap(src: &mut dyn Source) -> SwapScan {
    let mut scan = SwapScan::default();
    let size = src.size();
    let table = match guarded(|| read_table(&mut |off, len| read_at(src, off, len), size)) {
        Ok(table) => table,
        Err(e) => {
            scan.warnings.push(format!("partition table: {e:#}; nothing skipped on this disk"));
            return scan;
        }
    };
    if table.is_empty() {
        scan_volume(src, 0, size, None, "whole disk", &mut scan);
    } else {
        for p in &table {
            scan_volume(src, p.offset, p.length, Some(p.table), &format!("partition {}", p.number), &mut scan);
        }
    }
    scan.areas.sort_by_key(|a| a.range.offset);
    scan
}

/// One partition (or the whole disk): a swap partition, an LVM PV with swap volumes, or NTFS with
/// page files. A failure leaves this volume out with a warning.
fn scan_volume(src: &mut dyn Source, start: u64, len: u64, table: Option<Table>, where_: &str, scan: &mut SwapScan) {
    let mut notes = Vec::new();
    match guarded(|| volume_swap(src, start, len, table, where_, &mut notes)) {
        Ok(areas) => {
            debug_assert!(areas.iter().all(|a| a.range.offset >= start
                && a.range.offset.checked_add(a.range.length).is_some_and(|end| end <= start + len)));
            scan.areas.extend(areas);
        }
        Err(e) => notes.push(format!("{e:#}; nothing skipped there")),
    }
    scan.warnings.extend(notes.into_iter().map(|n| format!("{where_}: {n}")));
}

fn volume_swap(
    src: &mut dyn Source,
    start: u64,
    len: u64,
    table: Option<Table>,
    where_: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<SwapArea>> {
    let swap_type = match table {
        Some(Table::Mbr(kind)) => (kind == 0x82).then_some("mbr"),
        Some(Table::Gpt(kind)) => (kind == GPT_LINUX_SWAP).then_some("gpt"),
        None => Some("whole disk"),
    };
    let whole = Range { offset: start, length: len };
    if let Some(kind) = swap_type {
        if has_swap_signature(src, start, len)? {
            let location = if table.is_none() { kind.to_string() } else { format!("{kind} {where_}") };
            return Ok(vec![SwapArea { range: whole, location }]);
        }
    }
    let mut out = Vec::new();
    match detect_filesystem(&mut |off, n| read_at(src, off, n), start, len)? {
        Some("lvm") => {
            let pv = crate::lvm::read_pv(&mut |off, n| read_at(src, off, n), start, len)?;
            for lv in pv.volumes {
                // read_pv checked that every run lies inside the PV.
                if has_swap_signature(src, start + lv.runs[0].pv_offset, lv.size)? {
                    for r in &lv.runs {
                        let range = Range { offset: start + r.pv_offset, length: r.len };
                        out.push(SwapArea { range, location: format!("lvm volume {}/{}", lv.vg, lv.name) });
                    }
                }
            }
        }
        Some("ntfs") if len >= 64 * 1024 => {
            let mut volume = SourceVolume { src: &mut *src, start, len, pos: 0 };
            for (name, runs) in ntfs_page_files(&mut volume, len, notes)? {
                for (at, n) in runs {
                    let range = Range { offset: start + at, length: n };
                    out.push(SwapArea { range, location: format!("ntfs {where_}: {name}") });
                }
            }
        }
        _ => {}
    }
    Ok(out)
}

/// Page files of Windows, by their names in the volume's root.
const PAGE_FILES: [&str; 2] = ["pagefile.sys", "swapfile.sys"];

/// A page file's name and its clusters: (offset in the volume, length) in file order.
type PageFile = (String, Vec<(u64, u64)>);

/// Records 0-11 of the MFT are NTFS's own files ($MFT, $MFTMirr, $LogFile, ... $Extend).
const NTFS_METADATA_RECORDS: u64 = 12;

/// The page files of an NTFS volume of `len` bytes that may be skipped. Only plain
/// non-resident files (no attribute list), and only on a volume Windows closed cleanly: a
/// dirty or hibernated volume's MFT may not describe where the page file's live data is, and
/// a hibernated Windows resumes from memory that refers to it. Every run must lie inside the
/// volume and outside NTFS's own files, or the whole page file is kept. Why a page file is
/// kept goes to `notes`.
fn ntfs_page_files<T: std::io::Read + std::io::Seek>(
    fs: &mut T,
    len: u64,
    notes: &mut Vec<String>,
) -> Result<Vec<PageFile>> {
    use ntfs::attribute_value::NtfsAttributeValue;
    use ntfs::indexes::NtfsFileNameIndex;
    use ntfs::structured_values::NtfsVolumeFlags;
    let mut ntfs = ntfs::Ntfs::new(fs)?;
    ntfs.read_upcase_table(fs)?;
    let end = len.min(ntfs.size());
    let root = ntfs.root_directory(fs)?;
    let index = root.directory_index(fs)?;
    let mut found = Vec::new();
    for name in PAGE_FILES {
        let mut finder = index.finder();
        let Some(entry) = NtfsFileNameIndex::find(&mut finder, &ntfs, fs, name) else { continue };
        let file = entry?.to_file(&ntfs, fs)?;
        let Some(data) = file.data(fs, "") else { continue };
        let data = data?;
        let attribute = data.to_attribute()?;
        let NtfsAttributeValue::NonResident(value) = attribute.value(fs)? else { continue };
        let mut runs = Vec::new();
        for run in value.data_runs() {
            let run = run?;
            // Sparse runs have no position: nothing on disk to skip.
            if let Some(pos) = run.data_position().value() {
                runs.push((pos.get(), run.allocated_size()));
            }
        }
        found.push((name.to_string(), runs));
    }
    if found.is_empty() {
        return Ok(found);
    }
    if ntfs.volume_info(fs)?.flags().contains(NtfsVolumeFlags::IS_DIRTY) {
        notes.push("the NTFS volume is marked dirty (not closed cleanly): its page files are kept".into());
        return Ok(vec![]);
    }
    if hibernated(&ntfs, fs, &index)? {
        notes.push(
            "Windows is hibernated on this volume (hiberfil.sys, also fast startup): its page files are kept".into(),
        );
        return Ok(vec![]);
    }
    let metadata = ntfs_metadata_ranges(&ntfs, fs, end)?;
    found.retain(|(name, runs)| match runs.iter().find(|r| !run_is_skippable(**r, end, &metadata)) {
        None => true,
        Some((at, n)) => {
            notes.push(format!("{name} has {n} bytes at {at} outside the volume or over NTFS's own files: it is kept"));
            false
        }
    });
    Ok(found)
}

/// Whether a page file's run (offset, length in the volume) lies inside the volume's `end` and
/// outside every metadata range.
fn run_is_skippable((at, n): (u64, u64), end: u64, metadata: &[(u64, u64)]) -> bool {
    let Some(run_end) = at.checked_add(n) else { return false };
    n > 0 && run_end <= end && metadata.iter().all(|&(m, k)| run_end <= m || m.saturating_add(k) <= at)
}

/// Whether hiberfil.sys holds a hibernation image (its header starts `hibr`/`HIBR`, as ntfs-3g
/// checks; `wake` or zeros mean Windows resumed or shut down fully).
fn hibernated<T: std::io::Read + std::io::Seek>(
    ntfs: &ntfs::Ntfs,
    fs: &mut T,
    root: &ntfs::NtfsIndex<'_, '_, ntfs::indexes::NtfsFileNameIndex>,
) -> Result<bool> {
    use ntfs::indexes::NtfsFileNameIndex;
    use ntfs::NtfsReadSeek;
    let mut finder = root.finder();
    let Some(entry) = NtfsFileNameIndex::find(&mut finder, ntfs, fs, "hiberfil.sys") else { return Ok(false) };
    let file = entry?.to_file(ntfs, fs)?;
    let Some(data) = file.data(fs, "") else { return Ok(false) };
    let data = data?;
    let attribute = data.to_attribute()?;
    let mut value = attribute.value(fs)?;
    let mut magic = [0u8; 4];
    let n = value.read(fs, &mut magic)?;
    Ok(n == 4 && magic.eq_ignore_ascii_case(b"hibr"))
}

/// Where NTFS keeps its own files: the boot sector and its copy at the end, and every
/// non-resident attribute of records 0-11 ($MFT, $MFTMirr, $LogFile, $Bitmap, $UpCase...). A
/// metadata file spread by an attribute list cannot be mapped from its record alone: that is an
/// error (and nothing is skipped).
fn ntfs_metadata_ranges<T: std::io::Read + std::io::Seek>(
    ntfs: &ntfs::Ntfs,
    fs: &mut T,
    end: u64,
) -> Result<Vec<(u64, u64)>> {
    use ntfs::attribute_value::NtfsAttributeValue;
    use ntfs::NtfsAttributeType;
    let mut out = vec![(0, 8192.max(ntfs.cluster_size() as u64)), (end.saturating_sub(512), 512)];
    for record in 0..NTFS_METADATA_RECORDS {
        let file = ntfs.file(fs, record)?;
        for attribute in file.attributes_raw() {
            let attribute = attribute?;
            if attribute.ty()? == NtfsAttributeType::AttributeList {
                bail!("NTFS metadata file {record} is spread over several records (not followed)");
            }
            if attribute.is_resident() {
                continue;
            }
            let NtfsAttributeValue::NonResident(value) = attribute.value(fs)? else { continue };
            for run in value.data_runs() {
                let run = run?;
                if let Some(pos) = run.data_position().value() {
                    out.push((pos.get(), run.allocated_size()));
                }
            }
        }
    }
    Ok(out)
}

/// A volume of a backup source, for the NTFS reader.
struct SourceVolume<'a> {
    src: &'a mut dyn Source,
    start: u64,
    len: u64,
    pos: u64,
}

impl std::io::Read for SourceVolume<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // At most 1 MiB a call (a reader may return less than asked).
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)).min(1 << 20) as usize;
        if n == 0 {
            return Ok(0);
        }
        // pos < len, and start + len lies inside the disk.
        let data = read_at(self.src, self.start + self.pos, n).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        buf[..n].copy_from_slice(&data);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for SourceVolume<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = crate::files::seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
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

/// The fuzz targets' allocation counter: what detection holds at its peak, in tests.
#[cfg(test)]
#[path = "../../../fuzz/fuzz_targets/guest_disk/counting.rs"]
mod counting;

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::source::FileSource;
    use std::path::Path;
    use std::process::Command;

    /// The areas of a scan that must have gone without a warning.
    fn clean(scan: SwapScan) -> Vec<SwapArea> {
        assert!(scan.warnings.is_empty(), "{:?}", scan.warnings);
        scan.areas
    }

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
            let found = clean(find_swap(&mut src));
            assert_eq!(found.len(), 1, "{label}: {found:?}");
            assert_eq!(found[0].range, Range { offset: 1 << 20, length: 16 << 20 }, "{label}");
        }
        // A disk with no table and no signature has no swap.
        let blank = dir.path().join("blank.img");
        std::fs::File::create(&blank).unwrap().set_len(8 << 20).unwrap();
        assert!(clean(find_swap(&mut FileSource::open(&blank).unwrap())).is_empty());
    }

    #[test]
    fn finds_swap_in_an_lvm_volume_in_every_segment() {
        if !tool("lvcreate") || !tool("mkswap") || !tool("losetup") {
            eprintln!("lvm2/mkswap/losetup missing: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pv = dir.path().join("pv.img");
        std::fs::File::create(&pv).unwrap().set_len(64 << 20).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&pv).output().unwrap();
        if !out.status.success() {
            eprintln!("no loop device: skipped");
            return;
        }
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let lvm = |args: &[&str]| {
            let ok = Command::new(args[0])
                .args(&args[1..])
                .args(["--driverloaded", "n", "--devices", &dev, "--config", "backup { backup = 0 archive = 0 }"])
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(ok, "{args:?}");
        };
        let made = std::panic::catch_unwind(|| {
            lvm(&["pvcreate", "-q", &dev]);
            lvm(&["vgcreate", "-q", "-s", "1M", "cairnswap", &dev]);
            lvm(&["lvcreate", "-q", "-an", "-Zn", "-L", "12M", "-n", "swap_1", "cairnswap"]);
            lvm(&["lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "root", "cairnswap"]);
            lvm(&["lvextend", "-q", "-L", "+4M", "cairnswap/swap_1"]);
        });
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        made.unwrap();
        // pe_start is 1 MiB: swap_1 is extents 0-11 and 20-23, root 12-19 (1 MiB extents).
        let part = dir.path().join("swap");
        std::fs::File::create(&part).unwrap().set_len(16 << 20).unwrap();
        assert!(Command::new("mkswap").arg("-q").arg(&part).status().unwrap().success());
        let mut disk = std::fs::read(&pv).unwrap();
        disk[1 << 20..(1 << 20) + 4096].copy_from_slice(&std::fs::read(&part).unwrap()[..4096]);
        std::fs::write(&pv, &disk).unwrap();
        let found = clean(find_swap(&mut FileSource::open(&pv).unwrap()));
        let ranges: Vec<Range> = found.iter().map(|a| a.range).collect();
        assert_eq!(ranges, [Range { offset: 1 << 20, length: 12 << 20 }, Range { offset: 21 << 20, length: 4 << 20 }]);
        assert_eq!(found[0].location, "lvm volume cairnswap/swap_1");
        // Without the signature, nothing is skipped.
        disk[(1 << 20) + 4086..(1 << 20) + 4096].fill(0);
        std::fs::write(&pv, &disk).unwrap();
        assert!(clean(find_swap(&mut FileSource::open(&pv).unwrap())).is_empty());
    }

    /// A 64 MiB GPT disk whose partition 1 (at 1 MiB, 48 MiB) is NTFS made by mkntfs and
    /// filled through ntfs-3g with `data.bin`, `pagefile.sys` (returned: random bytes) and, when
    /// given, `hiberfil.sys`. None when the tools or FUSE are missing.
    fn ntfs_disk(dir: &Path, hiberfil: Option<&[u8]>) -> Option<(Vec<u8>, Vec<u8>)> {
        if !tool("mkntfs") || !tool("ntfs-3g") || !tool("sfdisk") {
            eprintln!("mkntfs/ntfs-3g/sfdisk missing: skipped");
            return None;
        }
        let part = dir.join("ntfs.img");
        std::fs::File::create(&part).unwrap().set_len(48 << 20).unwrap();
        let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&part)));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        if !ok(Command::new("ntfs-3g").arg(&part).arg(&mnt)) {
            eprintln!("cannot mount with ntfs-3g (no FUSE): skipped");
            return None;
        }
        // Random contents, so where they land in the image can be checked byte for byte.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect()
        };
        let (pagefile, other) = (random(6 << 20), random(2 << 20));
        let written = (|| -> std::io::Result<()> {
            std::fs::write(mnt.join("data.bin"), &other)?;
            std::fs::write(mnt.join("pagefile.sys"), &pagefile)?;
            if let Some(h) = hiberfil {
                std::fs::write(mnt.join("hiberfil.sys"), h)?;
            }
            Ok(())
        })();
        assert!(ok(Command::new("umount").arg(&mnt)));
        written.unwrap();

        let img = dir.join("win.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let mut c = Command::new("sfdisk").arg("-q").arg(&img).stdin(std::process::Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(b"label: gpt\nstart=2048, size=48MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
            .unwrap();
        assert!(c.wait().unwrap().success());
        let mut disk = std::fs::read(&img).unwrap();
        disk[1 << 20..(1 << 20) + (48 << 20)].copy_from_slice(&std::fs::read(&part).unwrap());
        Some((disk, pagefile))
    }

    /// Where NTFS keeps things in a volume: (cluster size, MFT offset, record size).
    fn ntfs_geometry(vol: &[u8]) -> (usize, usize, usize) {
        let cluster = u16::from_le_bytes([vol[11], vol[12]]) as usize * vol[13] as usize;
        let mft = u64::from_le_bytes(vol[0x30..0x38].try_into().unwrap()) as usize * cluster;
        let r = vol[0x40] as i8;
        let record = if r < 0 { 1 << -r } else { r as usize * cluster };
        (cluster, mft, record)
    }

    /// The offset in `vol` of attribute `ty` of MFT record `n`.
    fn ntfs_attribute(vol: &[u8], n: usize, ty: u32) -> usize {
        let (_, mft, record) = ntfs_geometry(vol);
        let r = mft + n * record;
        assert_eq!(&vol[r..r + 4], b"FILE");
        let mut at = r + u16::from_le_bytes([vol[r + 0x14], vol[r + 0x15]]) as usize;
        loop {
            let t = u32::from_le_bytes(vol[at..at + 4].try_into().unwrap());
            assert_ne!(t, 0xffff_ffff, "record {n} has no attribute {ty:#x}");
            if t == ty {
                return at;
            }
            at += u32::from_le_bytes(vol[at + 4..at + 8].try_into().unwrap()) as usize;
        }
    }

    /// A byte of a record that the update sequence array does not overwrite on reading.
    fn patchable(vol: &[u8], at: usize) -> bool {
        let (_, mft, _) = ntfs_geometry(vol);
        (at - mft) % 512 < 510
    }

    fn page_file_areas(disk: &[u8]) -> SwapScan {
        find_swap(&mut MemorySource::new(disk.to_vec()))
    }

    #[test]
    fn finds_the_clusters_of_windows_page_files_on_ntfs() {
        let dir = tempfile::tempdir().unwrap();
        let Some((disk, pagefile)) = ntfs_disk(dir.path(), None) else { return };
        let img = dir.path().join("win.img");
        std::fs::write(&img, &disk).unwrap();
        let found = clean(find_swap(&mut FileSource::open(&img).unwrap()));
        assert!(!found.is_empty());
        assert!(found.iter().all(|a| a.location == "ntfs partition 1: pagefile.sys"), "{found:?}");
        // The areas (in disk order) are the page file's pieces: each one's bytes are found in
        // the file, and together they tile it exactly.
        let mut pieces: Vec<(usize, &[u8])> = found
            .iter()
            .map(|a| {
                let bytes = &disk[a.range.offset as usize..(a.range.offset + a.range.length) as usize];
                let at =
                    pagefile.windows(4096).position(|w| w == &bytes[..4096]).expect("not a piece of the page file");
                (at, bytes)
            })
            .collect();
        pieces.sort_by_key(|p| p.0);
        let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.1.iter().copied()).collect();
        assert_eq!(pieces[0].0, 0);
        assert!(bytes == pagefile, "the skipped clusters are not the page file's");
    }

    #[test]
    fn page_files_are_kept_on_dirty_or_hibernated_volumes_and_when_their_runs_are_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let Some((disk, _)) = ntfs_disk(dir.path(), None) else { return };
        assert!(!page_file_areas(&disk).areas.is_empty(), "a clean volume's page file is skipped");
        let vol = 1 << 20;

        // Dirty: the $VOLUME_INFORMATION flags of $Volume (record 3), a resident value.
        let mut dirty = disk.clone();
        let attr = vol + ntfs_attribute(&disk[vol..], 3, 0x70);
        let flags = attr + u16::from_le_bytes([disk[attr + 0x14], disk[attr + 0x15]]) as usize + 0x0a;
        assert!(patchable(&disk[vol..], flags - vol) && patchable(&disk[vol..], flags + 1 - vol));
        dirty[flags] |= 0x01;
        let scan = page_file_areas(&dirty);
        assert!(scan.areas.is_empty(), "{scan:?}");
        assert!(scan.warnings.iter().any(|w| w.contains("dirty") && w.contains("partition 1")), "{scan:?}");

        // A run of the page file moved onto the MFT: the whole page file is kept.
        let mut moved = disk.clone();
        let (cluster, mft, record) = ntfs_geometry(&disk[vol..]);
        let _ = cluster;
        let name: Vec<u8> = "pagefile.sys".encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
        let hit = disk[vol + mft..].windows(name.len()).position(|w| w == name.as_slice()).unwrap();
        let n = hit / record;
        let data = vol + ntfs_attribute(&disk[vol..], n, 0x80);
        assert_eq!(disk[data + 8], 1, "pagefile.sys $DATA is non-resident");
        // Its mapping pairs: (header, length, LCN delta) per run. The last run is pointed at the
        // MFT's first cluster by changing its delta alone.
        let mut at = data + u16::from_le_bytes([disk[data + 0x20], disk[data + 0x21]]) as usize;
        let (mut lcn, mut last) = (0i64, None);
        while disk[at] != 0 {
            let (len_size, off_size) = ((disk[at] & 0xf) as usize, (disk[at] >> 4) as usize);
            let off_at = at + 1 + len_size;
            let mut delta = [0u8; 8];
            delta[..off_size].copy_from_slice(&disk[off_at..off_at + off_size]);
            let shift = 64 - 8 * off_size as u32;
            let previous = lcn;
            lcn += (i64::from_le_bytes(delta) << shift) >> shift;
            last = Some((off_at, off_size, previous));
            at = off_at + off_size;
        }
        let (off_at, off_size, previous) = last.unwrap();
        let delta = (mft / cluster) as i64 - previous;
        let shift = 64 - 8 * off_size as u32;
        assert_eq!((delta << shift) >> shift, delta, "the new delta does not fit the run's field");
        for i in 0..off_size {
            assert!(patchable(&disk[vol..], off_at + i - vol));
            moved[off_at + i] = (delta >> (8 * i)) as u8;
        }
        let scan = page_file_areas(&moved);
        assert!(scan.areas.is_empty(), "{scan:?}");
        assert!(scan.warnings.iter().any(|w| w.contains("pagefile.sys") && w.contains("NTFS's own files")), "{scan:?}");

        // Hibernated Windows (hiberfil.sys starting "HIBR"); "wake" means it resumed.
        for (magic, skipped) in [(b"HIBR", false), (b"hibr", false), (b"wake", true)] {
            let dir = tempfile::tempdir().unwrap();
            let mut hiberfil = vec![0u8; 64 << 10];
            hiberfil[..4].copy_from_slice(magic);
            let (disk, _) = ntfs_disk(dir.path(), Some(&hiberfil)).unwrap();
            let scan = page_file_areas(&disk);
            assert_eq!(!scan.areas.is_empty(), skipped, "{scan:?}");
            assert_eq!(scan.warnings.iter().any(|w| w.contains("hibernated")), !skipped, "{scan:?}");
        }
    }

    #[test]
    fn page_file_runs_must_lie_inside_the_volume_and_outside_its_metadata() {
        let meta = [(0, 8192), (1 << 20, 1 << 20)];
        assert!(run_is_skippable((8192, 4096), 64 << 20, &meta));
        assert!(run_is_skippable((2 << 20, 4096), 64 << 20, &meta));
        assert!(!run_is_skippable((4096, 8192), 64 << 20, &meta), "over the boot sector");
        assert!(!run_is_skippable(((1 << 20) - 4096, 8192), 64 << 20, &meta), "into the MFT");
        assert!(!run_is_skippable((63 << 20, 2 << 20), 64 << 20, &meta), "past the volume");
        assert!(!run_is_skippable((u64::MAX - 10, 4096), u64::MAX, &meta), "overflowing");
        assert!(!run_is_skippable((8192, 0), 64 << 20, &meta), "empty");
    }

    /// A disk image in memory as a backup source; reads past its end fail as an NBD export's do.
    pub(crate) struct MemorySource {
        bytes: Vec<u8>,
        queue: std::collections::VecDeque<(u64, usize)>,
    }

    impl MemorySource {
        pub(crate) fn new(bytes: Vec<u8>) -> MemorySource {
            MemorySource { bytes, queue: Default::default() }
        }
    }

    impl Source for MemorySource {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<cairn_engine::source::Extent>> {
            Ok(vec![cairn_engine::source::Extent { offset, length: len, kind: cairn_engine::source::Allocation::Data }])
        }
        fn submit(&mut self, offset: u64, len: usize, _: Vec<u8>) -> Result<()> {
            self.queue.push_back((offset, len));
            Ok(())
        }
        fn next(&mut self) -> Result<Vec<u8>> {
            let (offset, len) = self.queue.pop_front().unwrap();
            let end = offset.checked_add(len as u64).filter(|&e| e <= self.bytes.len() as u64);
            let end = end.ok_or_else(|| anyhow::anyhow!("read past the end of the export"))?;
            Ok(self.bytes[offset as usize..end as usize].to_vec())
        }
        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    use super::counting;

    #[global_allocator]
    static ALLOCATOR: counting::Counting = counting::Counting;

    /// An MBR disk whose partitions (type 0x8e, LVM) hold these PV images, one after another
    /// from 1 MiB.
    fn mbr_disk(pvs: &[Vec<u8>]) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        for (i, pv) in pvs.iter().enumerate() {
            let e = 446 + 16 * i;
            d[e + 4] = 0x8e;
            let start = (d.len() / 512) as u32;
            d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&((pv.len() / 512) as u32).to_le_bytes());
            d.extend_from_slice(pv);
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    /// A swap signature at `at`.
    fn mkswap(d: &mut [u8], at: usize) {
        d[at + 4086..at + 4096].copy_from_slice(b"SWAPSPACE2");
    }

    #[test]
    fn a_guest_cannot_fail_crash_or_balloon_swap_detection() {
        use crate::lvm::tests::{pv_image, swap_vg_text};
        let text = swap_vg_text();
        let area = (1u64 << 20) - 4096;
        let mut good = pv_image(8 << 20, text.as_bytes(), area, text.len() as u64);
        mkswap(&mut good, 1 << 20);
        // The control: a PV whose swap volume is found.
        let scan = find_swap(&mut MemorySource::new(mbr_disk(&[good.clone()])));
        assert!(scan.warnings.is_empty(), "{scan:?}");
        let swap = Range { offset: 2 << 20, length: 4 << 20 };
        assert_eq!(scan.areas, [SwapArea { range: swap, location: "lvm volume vg0/swap_1".into() }]);

        // The audit's cases (§10.4 #2): metadata nested 100k deep, a text of 2^40 bytes (with a
        // metadata area to match, in its header and its label), a GPT whose entries lie past
        // the end, and more. Each disk also holds the good PV: what can be read still is.
        let nested = format!("vg0 {}", "{ a ".repeat(100_000));
        let mut bad_pvs = vec![
            ("nested", pv_image(8 << 20, nested.as_bytes(), area, nested.len() as u64)),
            ("2^40", pv_image(8 << 20, text.as_bytes(), 1 << 41, 1 << 40)),
            ("2^40 in the header", pv_image(8 << 20, text.as_bytes(), area, 1 << 40)),
        ];
        let mut header_only = pv_image(8 << 20, text.as_bytes(), area, 1 << 40);
        header_only[4096 + 32..4096 + 40].copy_from_slice(&(1u64 << 41).to_le_bytes());
        bad_pvs.push(("2^41 area in the header", header_only));
        for (what, mut pv) in bad_pvs {
            mkswap(&mut pv, 1 << 20);
            let disk = mbr_disk(&[pv, good.clone()]);
            let t = std::time::Instant::now();
            let (scan, peak) = counting::peak(|| find_swap(&mut MemorySource::new(disk)));
            assert!(t.elapsed().as_secs() < 5, "{what}: {:?}", t.elapsed());
            assert!(peak < 8 << 20, "{what}: {peak} bytes allocated at once");
            assert_eq!(scan.areas.len(), 1, "{what}: {scan:?}");
            assert_eq!(scan.areas[0].range.offset, swap.offset + (8 << 20), "{what}: only the good PV's swap");
            assert_eq!(scan.warnings.len(), 1, "{what}: {scan:?}");
            assert!(scan.warnings[0].starts_with("partition 1: LVM2"), "{what}: {scan:?}");
        }

        let gpt = crate::partitions::tests::gpt_disk(16 << 20, 1 << 40, 128, 128);
        let (scan, peak) = counting::peak(|| find_swap(&mut MemorySource::new(gpt)));
        assert!(scan.areas.is_empty() && peak < 1 << 20, "{scan:?} {peak}");
        assert!(scan.warnings[0].contains("past the end") && scan.warnings[0].contains("nothing skipped"), "{scan:?}");
    }

    #[test]
    fn a_panic_while_reading_a_volume_is_a_warning() {
        // A source that panics on one read stands for a parser crate tripping on a guest's bytes.
        struct Panicky(MemorySource, u64);
        impl Source for Panicky {
            fn describe(&self) -> String {
                "panicky".into()
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn allocation(&mut self, o: u64, l: u64) -> Result<Vec<cairn_engine::source::Extent>> {
                self.0.allocation(o, l)
            }
            fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()> {
                assert!(offset != self.1, "a parser bug");
                self.0.submit(offset, len, buf)
            }
            fn next(&mut self) -> Result<Vec<u8>> {
                self.0.next()
            }
            fn finish(&mut self) -> Result<()> {
                Ok(())
            }
        }
        let text = crate::lvm::tests::swap_vg_text();
        let pv = crate::lvm::tests::pv_image(8 << 20, text.as_bytes(), (1 << 20) - 4096, text.len() as u64);
        // The metadata area header of the PV in partition 1.
        let scan = find_swap(&mut Panicky(MemorySource::new(mbr_disk(&[pv])), (1 << 20) + 4096));
        assert!(scan.areas.is_empty());
        assert!(scan.warnings[0].contains("partition 1: internal error") && scan.warnings[0].contains("a parser bug"));
    }
}
