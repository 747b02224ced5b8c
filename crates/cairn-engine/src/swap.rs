//! Finds Linux swap areas on a disk so a backup can skip them: swap holds nothing a restored
//! machine needs (it starts with empty swap), and on a busy VM it is gigabytes of churn.
//!
//! A range is skipped only when both the partition table and the on-disk signature agree: an MBR
//! partition of type 0x82 (primary or logical) or a GPT partition of the Linux swap type, whose
//! first page ends with `SWAPSPACE2` (or the old `SWAP-SPACE`). A whole disk holding a swap
//! signature counts too, and so does an LVM logical volume (Debian's and Ubuntu's `vg/swap_1`)
//! that begins with the signature, when its volume group's metadata parses and the volume is
//! linear. Windows guests page to files: `pagefile.sys` and `swapfile.sys` in the root of an
//! NTFS volume, whose clusters are read from the MFT (their data runs). Anything unusual (a
//! table that does not parse, a partition past the end, an MFT record we cannot follow) means
//! "no swap found": skipping too little is safe, skipping too much is not.

use crate::partitions::{read_table, Table, GPT_LINUX_SWAP};
use crate::ranges::{normalize, Range};
use crate::source::Source;
use anyhow::Result;

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
    let table = read_table(&mut |off, len| read_at(src, off, len), size)?;
    let candidates: Vec<(u64, u64, String)> = table
        .iter()
        .filter(|p| matches!(p.table, Table::Mbr(0x82)) || p.table == Table::Gpt(GPT_LINUX_SWAP))
        .map(|p| {
            let kind = if matches!(p.table, Table::Mbr(_)) { "mbr" } else { "gpt" };
            (p.offset, p.length, format!("{kind} partition {}", p.number))
        })
        .collect();
    if table.is_empty() && size >= 64 * 1024 && has_swap_signature(src, 0, size)? {
        return Ok(vec![SwapArea { range: Range { offset: 0, length: size }, location: "whole disk".into() }]);
    }
    let mut out = Vec::new();
    for (start, len, location) in candidates {
        if has_swap_signature(src, start, len)? {
            out.push(SwapArea { range: Range { offset: start, length: len }, location });
        }
    }
    // Each partition (or the whole disk): an LVM PV with swap volumes, or NTFS with page files.
    let volumes: Vec<(u64, u64, String)> = if table.is_empty() {
        vec![(0, size, "whole disk".to_string())]
    } else {
        table.iter().map(|p| (p.offset, p.length, format!("partition {}", p.number))).collect()
    };
    for (start, len, where_) in volumes {
        if let Ok(pv) = crate::lvm::read_pv(&mut |off, n| read_at(src, off, n), start, len) {
            for lv in pv.volumes {
                if has_swap_signature(src, start + lv.runs[0].pv_offset, lv.size)? {
                    for r in &lv.runs {
                        let range = Range { offset: start + r.pv_offset, length: r.len };
                        out.push(SwapArea { range, location: format!("lvm volume {}/{}", lv.vg, lv.name) });
                    }
                }
            }
            continue;
        }
        if len < 64 * 1024 || read_at(src, start, 512)?.get(3..11) != Some(b"NTFS    ".as_slice()) {
            continue;
        }
        let mut volume = SourceVolume { src: &mut *src, start, len, pos: 0 };
        for (name, runs) in ntfs_page_files(&mut volume).unwrap_or_default() {
            for (at, n) in runs {
                let range = Range { offset: start + at, length: n };
                out.push(SwapArea { range, location: format!("ntfs {where_}: {name}") });
            }
        }
    }
    out.sort_by_key(|a| a.range.offset);
    Ok(out)
}

/// Page files of Windows, by their names in the volume's root.
const PAGE_FILES: [&str; 2] = ["pagefile.sys", "swapfile.sys"];

/// A page file's name and its clusters: (offset in the volume, length) in file order.
type PageFile = (String, Vec<(u64, u64)>);

/// The page files of an NTFS volume. Only plain non-resident files (no attribute list):
/// anything else is left alone.
fn ntfs_page_files<T: std::io::Read + std::io::Seek>(fs: &mut T) -> Result<Vec<PageFile>> {
    use ntfs::attribute_value::NtfsAttributeValue;
    use ntfs::indexes::NtfsFileNameIndex;
    let mut ntfs = ntfs::Ntfs::new(fs)?;
    ntfs.read_upcase_table(fs)?;
    let root = ntfs.root_directory(fs)?;
    let index = root.directory_index(fs)?;
    let mut out = Vec::new();
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
        out.push((name.to_string(), runs));
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
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
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
        let found = find_swap(&mut FileSource::open(&pv).unwrap()).unwrap();
        let ranges: Vec<Range> = found.iter().map(|a| a.range).collect();
        assert_eq!(ranges, [Range { offset: 1 << 20, length: 12 << 20 }, Range { offset: 21 << 20, length: 4 << 20 }]);
        assert_eq!(found[0].location, "lvm volume cairnswap/swap_1");
        // Without the signature, nothing is skipped.
        disk[(1 << 20) + 4086..(1 << 20) + 4096].fill(0);
        std::fs::write(&pv, &disk).unwrap();
        assert!(find_swap(&mut FileSource::open(&pv).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn finds_the_clusters_of_windows_page_files_on_ntfs() {
        if !tool("mkntfs") || !tool("ntfs-3g") || !tool("sfdisk") {
            eprintln!("mkntfs/ntfs-3g/sfdisk missing: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("ntfs.img");
        std::fs::File::create(&part).unwrap().set_len(48 << 20).unwrap();
        let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&part)));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        if !ok(Command::new("ntfs-3g").arg(&part).arg(&mnt)) {
            eprintln!("cannot mount with ntfs-3g (no FUSE): skipped");
            return;
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
            std::fs::write(mnt.join("pagefile.sys"), &pagefile)
        })();
        assert!(ok(Command::new("umount").arg(&mnt)));
        written.unwrap();

        let img = dir.path().join("win.img");
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
        std::fs::write(&img, &disk).unwrap();

        let found = find_swap(&mut FileSource::open(&img).unwrap()).unwrap();
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
}
