//! Changed-range lists from operators (text and JSON). Oracles: the result is sorted,
//! disjoint, non-empty ranges that never overflow; the cursor agrees with a naive scan.
#![no_main]
use cairn_engine::ranges::{parse_changed_ranges, RangeCursor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(ranges) = parse_changed_ranges(text) else { return };
    for w in ranges.windows(2) {
        assert!(w[0].end() < w[1].offset, "sorted, disjoint and not touching");
    }
    for r in &ranges {
        assert!(r.length > 0);
        assert!(r.offset.checked_add(r.length).is_some());
    }
    // Increasing queries: the cursor against a scan of every range.
    let mut c = RangeCursor::new(&ranges);
    let probes: Vec<u64> = ranges.iter().flat_map(|r| [r.offset.saturating_sub(1), r.offset, r.end()]).collect();
    let mut sorted = probes;
    sorted.sort();
    sorted.dedup();
    for w in sorted.windows(2) {
        let (s, e) = (w[0], w[1]);
        let naive = ranges.iter().any(|r| r.offset < e && r.end() > s);
        assert_eq!(c.intersects(s, e), naive, "[{s}, {e})");
    }
});
