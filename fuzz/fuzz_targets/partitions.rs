//! Partition tables and filesystem signatures (cairn_disk::partitions) as swap detection and
//! file browsing read them from a guest's disk: a reader that knows the disk (every read is
//! asserted inside it and at most 4 MiB: the parsers check before they ask), the `files`
//! probe's reader (short at the end), and a reader that fails its Nth read. Every partition
//! returned lies inside the disk.
#![no_main]
use cairn_disk::partitions::{detect_filesystem, read_table, MAX_GPT_ENTRIES_BYTES};
use libfuzzer_sys::fuzz_target;

mod guest_disk;
use guest_disk::SparseDisk;

fuzz_target!(|data: &[u8]| {
    let disk = SparseDisk::parse(data, 1 << 40);
    let size = disk.size;
    let mut inside = |at: u64, len: usize| -> anyhow::Result<Vec<u8>> {
        assert!(len as u64 <= MAX_GPT_ENTRIES_BYTES, "a read of {len} bytes");
        let end = at.checked_add(len as u64).expect("a read whose end overflows");
        assert!(end <= size, "a read of {len} bytes at {at}, past the end of the {size}-byte disk");
        let mut b = vec![0; len];
        disk.read(at, &mut b);
        Ok(b)
    };
    if let Ok(table) = read_table(&mut inside, size) {
        for p in &table {
            assert!(p.length > 0 && p.offset.checked_add(p.length).is_some_and(|end| end <= size), "{p:?}");
            let _ = detect_filesystem(&mut inside, p.offset, p.length);
        }
    }
    let _ = detect_filesystem(&mut inside, 0, size);

    // The files probe: short at the end of the disk, never an error.
    let mut clamping = |at: u64, len: usize| -> anyhow::Result<Vec<u8>> {
        let mut b = vec![0; (len as u64).min(size.saturating_sub(at)) as usize];
        disk.read(at.min(size), &mut b);
        Ok(b)
    };
    if let Ok(table) = read_table(&mut clamping, size) {
        for p in &table {
            let _ = detect_filesystem(&mut clamping, p.offset, p.length);
        }
    }

    // A source that fails: the Nth read errors (N from the input), whatever it asks.
    let fail_at = data.last().copied().unwrap_or(0) as usize % 8;
    let mut reads = 0;
    let mut failing = |at: u64, len: usize| -> anyhow::Result<Vec<u8>> {
        reads += 1;
        if reads > fail_at {
            anyhow::bail!("I/O error");
        }
        let mut b = vec![0; (len as u64).min(size.saturating_sub(at)) as usize];
        disk.read(at.min(size), &mut b);
        Ok(b)
    };
    if let Ok(table) = read_table(&mut failing, size) {
        for p in &table {
            let _ = detect_filesystem(&mut failing, p.offset, p.length);
        }
    }
});
