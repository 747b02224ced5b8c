//! What the guest-bytes fuzz targets share: a disk described by the input (sparse, so that a
//! small input stands for a large disk), readers over it, and an allocation counter.
//!
//! Input format (fuzz/seeds/sparse.py writes it from real images): the disk's size (u64 LE,
//! reduced below `max_size`), then chunks: offset (u64 LE, reduced below the size), length
//! (u16 LE), bytes. Everything no chunk sets reads as zeros.
#![allow(dead_code)]

use std::sync::Arc;

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

/// The disk as `cairn_engine::files` reads restore points.
pub struct Disk(pub Arc<SparseDisk>);

impl cairn_engine::files::DiskRead for Disk {
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

/// Counts live heap bytes (per thread) to bound what a parser holds at its peak.
pub mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(n: isize) {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + n);
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            add(new as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new) }
        }
    }

    /// What `f` returns, and the most it had allocated at once beyond what was live before.
    pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let start = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(start));
        let out = f();
        (out, (PEAK.with(|p| p.get()) - start).max(0) as usize)
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
