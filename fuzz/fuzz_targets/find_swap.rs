//! Swap detection (cairn_disk::swap::find_swap: MBR/GPT, swap signatures, LVM swap volumes,
//! NTFS page files) over a fuzzed disk as a backup source. It never fails and never reads past
//! the disk (the source asserts it); every area it returns lies inside the disk and inside one
//! of its partitions (or the whole disk when there is no table); what it allocates at once
//! stays bounded by the input, not by lengths the disk claims. Panics of the `ntfs` crate are
//! cairn's to catch (see `tolerate_parser_crate_panics`); any other panic is a crash.
#![no_main]
use cairn_disk::partitions::read_table;
use cairn_disk::swap::find_swap;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

mod guest_disk;
use guest_disk::{counting, Source, SparseDisk};

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

fuzz_target!(|data: &[u8]| {
    guest_disk::tolerate_parser_crate_panics();
    let disk = Arc::new(SparseDisk::parse(data, 1 << 40));
    let size = disk.size;
    let mut src = Source::new(disk.clone());
    let (scan, peak) = counting::peak(|| find_swap(&mut src));
    let bound = (16 << 20) + 64 * disk.set_bytes();
    assert!(peak <= bound, "{peak} bytes allocated at once (bound {bound})");
    let table = read_table(
        &mut |at, len| {
            let mut b = vec![0; len];
            disk.read(at, &mut b);
            Ok(b)
        },
        size,
    )
    .unwrap_or_default();
    for a in &scan.areas {
        let end = a.range.offset.checked_add(a.range.length).expect("an area whose end overflows");
        assert!(a.range.length > 0 && end <= size, "{a:?} outside the {size}-byte disk");
        assert!(
            table.is_empty() || table.iter().any(|p| a.range.offset >= p.offset && end <= p.offset + p.length),
            "{a:?} is in no partition of {table:?}"
        );
    }
});
