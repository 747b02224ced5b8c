//! An LVM2 physical volume (cairn_disk::lvm::read_pv: label, metadata area header, text) on
//! a fuzzed disk that may claim to be far larger than the input. Every read stays inside the
//! PV and is at most 1 MiB (the metadata text cap); what is allocated at once stays within a
//! few MiB plus a small multiple of the bytes the input sets, whatever lengths the disk
//! claims; volumes lie inside the PV.
#![no_main]
use cairn_disk::lvm::{read_pv, MAX_METADATA_TEXT};
use libfuzzer_sys::fuzz_target;

mod guest_disk;
use guest_disk::{counting, SparseDisk};

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

fuzz_target!(|data: &[u8]| {
    let disk = SparseDisk::parse(data, 1 << 40);
    let size = disk.size;
    let mut read = |at: u64, len: usize| -> anyhow::Result<Vec<u8>> {
        assert!(len as u64 <= MAX_METADATA_TEXT, "a read of {len} bytes");
        assert!(at.checked_add(len as u64).is_some_and(|end| end <= size), "a read past the PV");
        let mut b = vec![0; len];
        disk.read(at, &mut b);
        Ok(b)
    };
    let (pv, peak) = counting::peak(|| read_pv(&mut read, 0, size));
    let bound = (4 << 20) + 64 * disk.set_bytes();
    assert!(peak <= bound, "{peak} bytes allocated at once (bound {bound})");
    if let Ok(pv) = pv {
        for lv in &pv.volumes {
            assert!(!lv.runs.is_empty());
            assert!(lv.runs.iter().all(|r| r.pv_offset.checked_add(r.len).is_some_and(|end| end <= size)), "{lv:?}");
            assert_eq!(lv.runs.iter().map(|r| r.len).sum::<u64>(), lv.size);
        }
    }
});
