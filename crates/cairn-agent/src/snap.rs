//! Point-in-time views of guest disks: device-mapper snapshots, set up the way LVM sets up its
//! own (the kernel's `device-mapper/snapshot.rst`):
//!
//! ```text
//! cairn-NAME-real : the disk's original table (linear over the LUN)
//! cairn-NAME-snap : snapshot cairn-NAME-real COW N 8      (the view the host reads)
//! cairn-NAME      : snapshot-origin cairn-NAME-real      (while the view lives)
//! ```
//!
//! `prepare` (guest running) makes the copy-on-write space (a zram device: RAM, compressed,
//! used only as the disk is written meanwhile) and the two new devices; `snapshot` (guest
//! frozen by the host) only suspends the disk, loads two tables and resumes: milliseconds;
//! `release` puts the original table back and removes everything. A view left by a killed agent
//! is released at the next start ([`cleanup`]): a disk left suspended would hang the guest's I/O.

use crate::disks::{Disk, REAL, SNAP};
use crate::dm::{Control, Target};
use cairn_agent_proto::{BlockHash, BLOCK};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the agent notes the zram devices it added, so that a restarted agent removes them.
const ZRAM_NOTE: &str = "/run/cairn-agent.zram";

pub struct View {
    origin: String,
    original: Vec<Target>,
    real: String,
    snap: String,
    zram: Option<u32>,
    size: u64,
    /// The snapshot device, open once the view is taken.
    file: Option<File>,
}

#[derive(Default)]
pub struct Views {
    views: BTreeMap<String, View>,
}

impl Views {
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// Makes ready the views of `disks` (by name, from `known`); all or none.
    pub fn prepare(&mut self, names: &[String], known: &[Disk]) -> io::Result<()> {
        let ctl = Control::open()?;
        let mut made = Vec::new();
        for name in names {
            let result = known.iter().find(|d| &d.info.name == name).ok_or_else(|| not_found(name)).and_then(|d| {
                let dm = d
                    .dm_name
                    .clone()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: {}", d.info.reason)))?;
                if self.views.contains_key(name) {
                    return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{name} is already prepared")));
                }
                prepare_one(&ctl, &dm, d.info.size)
            });
            match result {
                Ok(view) => {
                    self.views.insert(name.clone(), view);
                    made.push(name.clone());
                }
                Err(e) => {
                    for n in made {
                        if let Some(v) = self.views.remove(&n) {
                            release_one(&ctl, v);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes the prepared views of `names` (the guest is frozen); all or none.
    pub fn snapshot(&mut self, names: &[String]) -> io::Result<()> {
        let ctl = Control::open()?;
        for name in names {
            let Some(view) = self.views.get_mut(name) else {
                self.release();
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} was not prepared")));
            };
            if let Err(e) = take(&ctl, view) {
                self.release();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Hashes of `count` blocks of a taken view from block `first`.
    pub fn hashes(&self, name: &str, first: u64, count: u32) -> io::Result<Vec<BlockHash>> {
        let (file, size) = self.taken(name)?;
        hash_blocks(file, size, name, first, count)
    }

    /// `len` bytes at `offset` of a taken view.
    pub fn read(&self, name: &str, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let (file, size) = self.taken(name)?;
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} are past the end of {name}"),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn taken(&self, name: &str) -> io::Result<(&File, u64)> {
        let v = self.views.get(name).ok_or_else(|| not_found(name))?;
        let f = v
            .file
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no view of {name} was taken")))?;
        Ok((f, v.size))
    }

    /// Drops every view: the disks get their own tables back.
    pub fn release(&mut self) {
        if self.views.is_empty() {
            return;
        }
        match Control::open() {
            Ok(ctl) => {
                for (_, v) in std::mem::take(&mut self.views) {
                    release_one(&ctl, v);
                }
            }
            Err(e) => eprintln!("cairn-agent: cannot release the views: {e}"),
        }
    }
}

/// Hashes of `count` 64 KiB blocks of `file` (`size` bytes) from block `first`: zeros, or BLAKE3
/// (the last block may be shorter).
pub fn hash_blocks(file: &File, size: u64, name: &str, first: u64, count: u32) -> io::Result<Vec<BlockHash>> {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut out = Vec::with_capacity(count as usize);
    let past = |b: u64| io::Error::new(io::ErrorKind::InvalidInput, format!("block {b} is past the end of {name}"));
    let end = first.checked_add(count as u64).ok_or_else(|| past(first))?;
    for b in first..end {
        let off = b.checked_mul(BLOCK).ok_or_else(|| past(b))?;
        if off >= size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("block {b} is past the end of {name}")));
        }
        let len = (size - off).min(BLOCK) as usize;
        file.read_exact_at(&mut buf[..len], off)?;
        let block = &buf[..len];
        out.push(if block.iter().all(|&x| x == 0) {
            BlockHash::Zero
        } else {
            BlockHash::Blake3(*blake3::hash(block).as_bytes())
        });
    }
    Ok(out)
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no disk named {name}"))
}

fn prepare_one(ctl: &Control, origin: &str, size: u64) -> io::Result<View> {
    // What an earlier view of this disk left (a remove that found the device busy).
    let names = ctl.list().unwrap_or_default();
    if names.iter().any(|n| n == &format!("{origin}{REAL}") || n == &format!("{origin}{SNAP}")) {
        release_leftover(ctl, &format!("{origin}{REAL}"));
    }
    let original = ctl.table(origin)?;
    if original.is_empty() || original.iter().any(|t| t.kind.starts_with("snapshot")) {
        return Err(io::Error::other(format!("{origin} has a table cairn-agent cannot snapshot: {original:?}")));
    }
    let mut view = View {
        origin: origin.to_string(),
        original: original.clone(),
        real: format!("{origin}{REAL}"),
        snap: format!("{origin}{SNAP}"),
        zram: None,
        size,
        file: None,
    };
    let steps = || -> io::Result<()> {
        ctl.create(&view.real)?;
        ctl.load(&view.real, &original)?;
        ctl.resume(&view.real)?;
        ctl.create(&view.snap)?;
        Ok(())
    };
    let r = steps().and_then(|()| {
        // Room for every chunk of the disk and the snapshot's own records.
        view.zram = Some(add_zram(size + size / 16 + (4 << 20))?);
        Ok(())
    });
    match r {
        Ok(()) => Ok(view),
        Err(e) => {
            release_one(ctl, view);
            Err(e)
        }
    }
}

/// Suspends the disk (not its filesystem: the guest's freeze holds it), makes the snapshot over
/// its real device, and makes the disk the snapshot's origin.
fn take(ctl: &Control, v: &mut View) -> io::Result<()> {
    let sectors = v.size / 512;
    let real = dev_text(ctl.status(&v.real)?.dev);
    let cow = dev_text(zram_dev(v.zram.expect("a prepared view has its zram"))?);
    ctl.suspend(&v.origin, false)?;
    let switched = (|| {
        ctl.load(&v.snap, &[target(sectors, "snapshot", format!("{real} {cow} N 8"))])?;
        ctl.resume(&v.snap)?;
        ctl.load(&v.origin, &[target(sectors, "snapshot-origin", real.clone())])?;
        Ok::<(), io::Error>(())
    })();
    // Resumed whatever happened: with the new table if it loaded, else with its own (once more
    // if the first resume failed: a disk left suspended hangs the guest's I/O on it).
    let resumed = ctl.resume(&v.origin).or_else(|_| ctl.resume(&v.origin));
    switched?;
    resumed?;
    let snap = ctl.status(&v.snap)?.dev;
    v.file = Some(File::open(node_of(snap)?)?);
    Ok(())
}

fn release_one(ctl: &Control, mut v: View) {
    v.file = None;
    if ctl.status(&v.origin).is_ok_and(|s| s.suspended) {
        let _ = ctl.resume(&v.origin);
    }
    let restore = || -> io::Result<()> {
        if ctl.table(&v.origin)?.iter().any(|t| t.kind == "snapshot-origin") {
            ctl.suspend(&v.origin, false)?;
            let loaded = ctl.load(&v.origin, &v.original);
            ctl.resume(&v.origin)?;
            loaded?;
        }
        Ok(())
    };
    if let Err(e) = restore() {
        eprintln!("cairn-agent: cannot give {} its table back: {e}", v.origin);
        return; // the real and snapshot devices are still in use: leave them to the next start
    }
    // The snapshot holds the real device and the zram: removed in that order.
    let removed = remove_busy(ctl, &v.snap).and_then(|()| remove_busy(ctl, &v.real));
    if let Err(e) = removed {
        eprintln!("cairn-agent: {e} (removed at the next prepare or start)");
        return;
    }
    if let Some(id) = v.zram {
        remove_zram(id);
    }
}

/// Removes a device, retrying a while when it is busy (a udev or blkid scan of a new device
/// holds it open for a moment); a device that is not there is removed already.
fn remove_busy(ctl: &Control, name: &str) -> io::Result<()> {
    for _ in 0..40 {
        match ctl.remove(name) {
            Ok(()) => return Ok(()),
            Err(e) if crate::dm::errno(&e) == Some(libc::ENXIO) => return Ok(()),
            Err(e) if crate::dm::errno(&e) == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    }
    ctl.remove(name)
}

/// Releases what an earlier agent left: each `cairn-*` disk resumed and given back the table
/// of its `-real` device, then the `-snap` and `-real` devices and the noted zram devices removed.
pub fn cleanup() {
    let Ok(ctl) = Control::open() else { return };
    let names = ctl.list().unwrap_or_default();
    for real in names.iter().filter(|n| n.starts_with(crate::disks::PREFIX) && n.ends_with(REAL)) {
        eprintln!("cairn-agent: releasing the view of {} an earlier agent left", real.trim_end_matches(REAL));
        release_leftover(&ctl, real);
    }
    for snap in names.iter().filter(|n| n.starts_with(crate::disks::PREFIX) && n.ends_with(SNAP)) {
        let _ = remove_busy(&ctl, snap);
    }
    if let Ok(text) = std::fs::read_to_string(ZRAM_NOTE) {
        for id in text.split_whitespace().filter_map(|s| s.parse().ok()) {
            remove_zram(id);
        }
        let _ = std::fs::remove_file(ZRAM_NOTE);
    }
}

/// Gives a disk back the table of its leftover `-real` device, and removes the leftovers.
fn release_leftover(ctl: &Control, real: &str) {
    let origin = real.trim_end_matches(REAL).to_string();
    let Ok(original) = ctl.table(real) else {
        let _ = remove_busy(ctl, &format!("{origin}{SNAP}"));
        let _ = remove_busy(ctl, real);
        return;
    };
    let v = View {
        origin: origin.clone(),
        original,
        real: real.to_string(),
        snap: format!("{origin}{SNAP}"),
        zram: None,
        size: 0,
        file: None,
    };
    release_one(ctl, v);
}

fn target(sectors: u64, kind: &str, params: String) -> Target {
    Target { start: 0, length: sectors, kind: kind.into(), params }
}

fn dev_text((major, minor): (u32, u32)) -> String {
    format!("{major}:{minor}")
}

/// `/dev/NAME` of a block device, from `/sys/dev/block/M:m` (no udev in a minimal guest).
fn node_of((major, minor): (u32, u32)) -> io::Result<std::path::PathBuf> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))?;
    let name = link.file_name().ok_or_else(|| io::Error::other("a block device without a name"))?;
    Ok(Path::new("/dev").join(name))
}

fn add_zram(bytes: u64) -> io::Result<u32> {
    let id: u32 = std::fs::read_to_string("/sys/class/zram-control/hot_add")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot add a zram device (is the zram module loaded?): {e}")))?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("zram hot_add said no number"))?;
    let mut note = std::fs::read_to_string(ZRAM_NOTE).unwrap_or_default();
    note.push_str(&format!("{id}\n"));
    let _ = std::fs::write(ZRAM_NOTE, note);
    // A quarter of the guest's memory at most: past it, writes to the copy-on-write space fail,
    // the snapshot becomes invalid (the host's reads of it fail) and the disk goes on unharmed,
    // rather than the guest running out of memory.
    let limit = mem_total().map(|m| m / 4).unwrap_or(64 << 20);
    let _ = std::fs::write(format!("/sys/block/zram{id}/mem_limit"), limit.to_string());
    if let Err(e) = std::fs::write(format!("/sys/block/zram{id}/disksize"), bytes.to_string()) {
        remove_zram(id);
        return Err(io::Error::new(e.kind(), format!("zram{id}: cannot size it to {bytes} bytes: {e}")));
    }
    Ok(id)
}

fn zram_dev(id: u32) -> io::Result<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/sys/block/zram{id}/dev"))?;
    let (major, minor) = text.trim().split_once(':').ok_or_else(|| io::Error::other("zram dev"))?;
    Ok((
        major.parse().map_err(|_| io::Error::other("zram major"))?,
        minor.parse().map_err(|_| io::Error::other("zram minor"))?,
    ))
}

/// The guest's memory in bytes (`MemTotal` of /proc/meminfo).
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib * 1024)
}

fn remove_zram(id: u32) {
    let _ = std::fs::write(format!("/sys/block/zram{id}/reset"), "1");
    if std::fs::write("/sys/class/zram-control/hot_remove", id.to_string()).is_err() {
        return; // still in use: the note keeps it for the next start
    }
    if let Ok(note) = std::fs::read_to_string(ZRAM_NOTE) {
        let rest: String = note.lines().filter(|l| l.trim() != id.to_string()).map(|l| format!("{l}\n")).collect();
        let _ = std::fs::write(ZRAM_NOTE, rest);
    }
}
