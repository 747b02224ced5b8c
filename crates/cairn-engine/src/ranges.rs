//! Byte ranges: changed-range lists and the cursors the planner walks them with.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
}

impl Range {
    /// The first byte after the range (saturating: a range reaching past 2^64 ends there, and
    /// parsers refuse such ranges from outside).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    fn checked(self, what: &str) -> Result<Range> {
        if self.offset.checked_add(self.length).is_none() {
            bail!("{what}: range {}+{} ends beyond 2^64 bytes", self.offset, self.length);
        }
        Ok(self)
    }
}

/// Sorts and merges overlapping or touching ranges; drops empty ones.
pub fn normalize(mut v: Vec<Range>) -> Vec<Range> {
    v.retain(|r| r.length > 0);
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.offset <= l.end() => l.length = l.length.max(r.end() - l.offset),
            _ => out.push(r),
        }
    }
    out
}

/// Parses a changed-ranges file. Two forms are accepted:
/// - text: one `OFFSET LENGTH` pair per line (decimal or 0x-hex bytes); `#` starts a comment;
/// - JSON: an array of `{"offset": N, "length": N}` objects, such as `nbdinfo --map --json`
///   prints (entries whose `description` is present and not `dirty` are skipped).
pub fn parse_changed_ranges(text: &str) -> Result<Vec<Range>> {
    let t = text.trim_start();
    if t.starts_with('[') {
        #[derive(Deserialize)]
        struct J {
            offset: u64,
            length: u64,
            #[serde(default)]
            description: Option<String>,
        }
        let v: Vec<J> =
            serde_json::from_str(t).context("changed-ranges file is not a JSON array of {offset, length}")?;
        let ranges = v
            .into_iter()
            .filter(|j| j.description.as_deref().is_none_or(|d| d == "dirty"))
            .map(|j| Range { offset: j.offset, length: j.length }.checked("changed-ranges file"))
            .collect::<Result<Vec<_>>>()?;
        return Ok(normalize(ranges));
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty());
        let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
            bail!("changed-ranges line {}: expected `OFFSET LENGTH`, got {line:?}", n + 1);
        };
        let num = |s: &str| -> Result<u64> {
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.with_context(|| format!("changed-ranges line {}: {s:?} is not a number", n + 1))
        };
        out.push(Range { offset: num(a)?, length: num(b)? }.checked(&format!("changed-ranges line {}", n + 1))?);
    }
    Ok(normalize(out))
}

/// Answers "does [start, end) touch any range?" for monotonically increasing queries.
pub struct RangeCursor<'a> {
    ranges: &'a [Range],
    idx: usize,
}

impl<'a> RangeCursor<'a> {
    pub fn new(ranges: &'a [Range]) -> Self {
        RangeCursor { ranges, idx: 0 }
    }
    pub fn intersects(&mut self, start: u64, end: u64) -> bool {
        while self.idx < self.ranges.len() && self.ranges[self.idx].end() <= start {
            self.idx += 1;
        }
        self.idx < self.ranges.len() && self.ranges[self.idx].offset < end
    }
    /// Whether one range holds all of `[start, end)` (ranges must be normalized).
    pub fn covers(&mut self, start: u64, end: u64) -> bool {
        self.intersects(start, end) && self.ranges[self.idx].offset <= start && self.ranges[self.idx].end() >= end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_text_and_json() {
        let t = "# comment\n0 65536\n0x20000 0x10000 # trailing\n\n65536,1\n";
        assert_eq!(
            parse_changed_ranges(t).unwrap(),
            vec![Range { offset: 0, length: 65537 }, Range { offset: 0x20000, length: 0x10000 }]
        );
        let j = r#"[{"offset":0,"length":10,"type":1,"description":"dirty"},{"offset":10,"length":5,"type":0,"description":"clean"},{"offset":100,"length":1}]"#;
        assert_eq!(
            parse_changed_ranges(j).unwrap(),
            vec![Range { offset: 0, length: 10 }, Range { offset: 100, length: 1 }]
        );
        assert!(parse_changed_ranges("1 2 3").is_err());
        // A range whose end overflows is refused, not wrapped (in release) or panicked on.
        let e = parse_changed_ranges("18446744073709551615 2").unwrap_err().to_string();
        assert!(e.contains("beyond 2^64"), "{e}");
        assert!(parse_changed_ranges(r#"[{"offset":18446744073709551615,"length":2}]"#).is_err());
        assert!(parse_changed_ranges("abc 1").is_err());
    }

    #[test]
    fn cursor() {
        let r = normalize(vec![Range { offset: 100, length: 10 }, Range { offset: 300, length: 1 }]);
        let mut c = RangeCursor::new(&r);
        assert!(!c.intersects(0, 100));
        assert!(c.intersects(100, 200));
        assert!(!c.intersects(200, 300));
        assert!(c.intersects(300, 400));
        assert!(!c.intersects(400, 500));
        let mut c = RangeCursor::new(&r);
        assert!(c.covers(100, 110) && !c.covers(105, 111) && !c.covers(200, 300));
    }
}
