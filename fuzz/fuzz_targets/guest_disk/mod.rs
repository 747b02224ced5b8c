//! What the guest-bytes fuzz targets share: a disk described by the input (sparse, so that a
//! small input stands for a large disk), readers over it, and an allocation counter.
//!
//! Input format (fuzz/seeds/sparse.py writes it from real images): the disk's size (u64 LE,
//! reduced below `max_size`), then chunks: offset (u64 LE, reduced below the size), length
//! (u16 LE), bytes. Everything no chunk sets reads as zeros.
#![allow(dead_code)]

use std::sync::Arc;

mod sparse;
pub use sparse::SparseDisk;

pub mod counting;

/// The disk as `cairn_disk::files` reads restore points.
pub struct Disk(pub Arc<SparseDisk>);

impl cairn_disk::files::DiskRead for Disk {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.0.size) {
            anyhow::bail!("read past the end of the disk");
        }
        self.0.read(offset, buf);
        Ok(())
    }
}

/// The disk as a backup source: reads are asserted inside it (detection must check first).
pub struct Source {
    pub disk: Arc<SparseDisk>,
    queue: std::collections::VecDeque<(u64, usize)>,
}

impl Source {
    pub fn new(disk: Arc<SparseDisk>) -> Source {
        Source { disk, queue: Default::default() }
    }
}

impl cairn_engine::source::Source for Source {
    fn describe(&self) -> String {
        "fuzz".into()
    }
    fn size(&self) -> u64 {
        self.disk.size
    }
    fn allocation(&mut self, offset: u64, length: u64) -> anyhow::Result<Vec<cairn_engine::source::Extent>> {
        Ok(vec![cairn_engine::source::Extent { offset, length, kind: cairn_engine::source::Allocation::Data }])
    }
    fn submit(&mut self, offset: u64, len: usize, _: Vec<u8>) -> anyhow::Result<()> {
        assert!(len <= 4 << 20, "a read of {len} bytes");
        self.queue.push_back((offset, len));
        Ok(())
    }
    fn next(&mut self) -> anyhow::Result<Vec<u8>> {
        let (offset, len) = self.queue.pop_front().expect("next without submit");
        let mut b = vec![0; len];
        self.disk.read(offset, &mut b);
        Ok(b)
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// libFuzzer's panic hook aborts on every panic. The filesystem crates cairn reads guests with
/// (`ntfs`, `fatfs`, `ext4-view`) may panic on crafted input (ntfs 0.4 does, upstream issue
/// #20), and cairn catches those panics where it calls them (`files::guarded`), turning them
/// into errors; so they are let through to that guard. Any other panic still aborts: cairn's
/// own code must not panic, and a crate panic that escapes cairn's guard reaches libFuzzer's
/// own `catch_unwind` and aborts there.
pub fn tolerate_parser_crate_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let libfuzzer = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if ["/ntfs-0.", "/fatfs-0.", "/ext4-view-"].iter().any(|c| file.contains(c)) {
                return;
            }
            libfuzzer(info)
        }));
    });
}
