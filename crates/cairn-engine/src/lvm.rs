//! LVM2 logical volumes found on a physical volume, read from the PV's own label and text
//! metadata (no device-mapper, no `lvm` tools): enough to browse the files of a Linux guest
//! whose root lives in a volume group, the default layout of many server installs.
//!
//! Supported: linear logical volumes (segments of type `striped` with one stripe), in one or
//! several segments, on the physical volume being read. Thin, RAID, mirrored and multi-stripe
//! volumes, and volumes with segments on another PV, are left out (named in `skipped`).

use crate::partitions::ReadFn;
use anyhow::{bail, Context, Result};

const SECTOR: u64 = 512;
const MDA_HEADER_SIZE: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";

/// A run of a logical volume: `len` bytes at `at` in the volume are at `pv_offset` in the PV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LvRun {
    pub at: u64,
    pub pv_offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalVolume {
    pub vg: String,
    pub name: String,
    pub size: u64,
    /// In volume order, without gaps.
    pub runs: Vec<LvRun>,
}

/// What a physical volume holds.
#[derive(Debug, Default)]
pub struct PhysicalVolume {
    pub volumes: Vec<LogicalVolume>,
    /// `vg/lv: why` for volumes that cannot be read from this PV alone.
    pub skipped: Vec<String>,
}

/// Reads the LVM label and current metadata of the PV at `offset` (`length` bytes) through
/// `read` (which reads the disk).
pub fn read_pv(read: &mut ReadFn, offset: u64, length: u64) -> Result<PhysicalVolume> {
    // The label sits in one of the first four sectors.
    let head = read(offset, 4 * SECTOR as usize)?;
    let label = (0..4)
        .map(|s| s * SECTOR as usize)
        .find(|&at| head.len() >= at + 32 && &head[at..at + 8] == b"LABELONE" && &head[at + 24..at + 32] == b"LVM2 001")
        .context("no LVM2 label")?;
    let pvh = label + le32(&head, label + 20) as usize;
    let uuid = head.get(pvh..pvh + 32).context("LVM2 label: truncated PV header")?.to_vec();
    // Data areas then metadata areas, each list ended by a zero entry.
    let mut at = pvh + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [vec![], vec![]];
    for list in &mut lists {
        loop {
            if at + 16 > head.len() {
                bail!("LVM2 label: truncated area list");
            }
            let (off, size) = (le64(&head, at), le64(&head, at + 8));
            at += 16;
            if off == 0 && size == 0 {
                break;
            }
            list.push((off, size));
        }
    }
    let (mda_offset, _) = *lists[1].first().context("this PV keeps no metadata copy")?;
    let text = read_metadata(read, offset + mda_offset)?;
    let config = parse(&text)?;
    let uuid = String::from_utf8_lossy(&uuid).into_owned();
    volumes_of(&config, &uuid, length)
}

/// The current metadata text of the metadata area at `mda` (absolute).
fn read_metadata(read: &mut ReadFn, mda: u64) -> Result<String> {
    let h = read(mda, MDA_HEADER_SIZE as usize)?;
    if h.len() < 64 || &h[4..20] != MDA_MAGIC {
        bail!("LVM2 metadata area: bad magic");
    }
    let mda_size = le64(&h, 32);
    let (text_off, text_len) = (le64(&h, 40), le64(&h, 48));
    if text_len == 0 || text_off < MDA_HEADER_SIZE || text_off >= mda_size || text_len > mda_size {
        bail!("LVM2 metadata area: no current metadata");
    }
    // A circular buffer after the header: the text may wrap to its start.
    let first = text_len.min(mda_size - text_off);
    let mut bytes = read(mda + text_off, first as usize)?;
    if first < text_len {
        bytes.extend(read(mda + MDA_HEADER_SIZE, (text_len - first) as usize)?);
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

fn volumes_of(config: &[(String, Value)], pv_uuid: &str, pv_length: u64) -> Result<PhysicalVolume> {
    let (vg, body) = config
        .iter()
        .find_map(|(k, v)| if let Value::Section(s) = v { Some((k, s)) } else { None })
        .context("LVM2 metadata: no volume group")?;
    let extent = int(body, "extent_size").context("LVM2 metadata: no extent_size")? as u64 * SECTOR;
    // Which pvN of the metadata this PV is (uuids there carry dashes).
    let pvs = section(body, "physical_volumes").context("LVM2 metadata: no physical_volumes")?;
    let (pv_key, pe_start) = pvs
        .iter()
        .find_map(|(k, v)| {
            let Value::Section(pv) = v else { return None };
            let id = string(pv, "id")?.replace('-', "");
            (id == pv_uuid).then(|| (k.clone(), int(pv, "pe_start").unwrap_or(0) as u64 * SECTOR))
        })
        .context("LVM2 metadata does not describe this PV")?;
    let mut out = PhysicalVolume::default();
    for (name, lv) in section(body, "logical_volumes").unwrap_or(&[]) {
        let Value::Section(lv) = lv else { continue };
        let visible =
            list(lv, "status").is_some_and(|s| s.iter().any(|f| matches!(f, Value::Str(f) if f == "VISIBLE")));
        if !visible {
            continue; // internal volumes (thin pool data, mirror logs)
        }
        match lv_runs(lv, &pv_key, pe_start, extent, pv_length) {
            Ok(runs) => {
                let size = runs.iter().map(|r| r.len).sum();
                out.volumes.push(LogicalVolume { vg: vg.clone(), name: name.clone(), size, runs });
            }
            Err(why) => out.skipped.push(format!("{vg}/{name}: {why:#}")),
        }
    }
    Ok(out)
}

fn lv_runs(lv: &[(String, Value)], pv_key: &str, pe_start: u64, extent: u64, pv_length: u64) -> Result<Vec<LvRun>> {
    let mut runs = Vec::new();
    for (_, seg) in lv.iter().filter(|(k, _)| k.starts_with("segment")) {
        let Value::Section(seg) = seg else { continue };
        let kind = string(seg, "type").unwrap_or_default();
        if kind != "striped" || int(seg, "stripe_count") != Some(1) {
            bail!("{kind} volumes are not supported (linear only)");
        }
        let stripes = list(seg, "stripes").context("segment without stripes")?;
        let (Some(Value::Str(pv)), Some(Value::Int(first_pe))) = (stripes.first(), stripes.get(1)) else {
            bail!("unreadable segment");
        };
        if pv != pv_key {
            bail!("has extents on another physical volume");
        }
        let (start, count) =
            (int(seg, "start_extent").unwrap_or(0) as u64, int(seg, "extent_count").unwrap_or(0) as u64);
        let run = LvRun { at: start * extent, pv_offset: pe_start + *first_pe as u64 * extent, len: count * extent };
        if run.pv_offset + run.len > pv_length {
            bail!("extends past the end of its physical volume");
        }
        runs.push(run);
    }
    runs.sort_by_key(|r| r.at);
    let mut next = 0;
    for r in &runs {
        if r.at != next {
            bail!("segments leave a gap");
        }
        next += r.len;
    }
    if runs.is_empty() {
        bail!("no segments");
    }
    Ok(runs)
}

/// A value of LVM's text configuration format.
#[derive(Debug, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

fn get<'a>(s: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    s.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}
fn int(s: &[(String, Value)], key: &str) -> Option<i64> {
    if let Some(Value::Int(i)) = get(s, key) {
        Some(*i)
    } else {
        None
    }
}
fn string(s: &[(String, Value)], key: &str) -> Option<String> {
    if let Some(Value::Str(v)) = get(s, key) {
        Some(v.clone())
    } else {
        None
    }
}
fn list<'a>(s: &'a [(String, Value)], key: &str) -> Option<&'a [Value]> {
    if let Some(Value::List(v)) = get(s, key) {
        Some(v)
    } else {
        None
    }
}
fn section<'a>(s: &'a [(String, Value)], key: &str) -> Option<&'a [(String, Value)]> {
    if let Some(Value::Section(v)) = get(s, key) {
        Some(v)
    } else {
        None
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    /// A bare word: a key, a section name, or a number (names may be all digits).
    Word(String),
    Str(String),
    Punct(char),
}

fn tokens(text: &str) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            c if c.is_whitespace() => {
                chars.next();
            }
            '{' | '}' | '[' | ']' | '=' | ',' => {
                out.push(Token::Punct(c));
                chars.next();
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => s.push(chars.next().context("LVM2 metadata: unterminated string")?),
                        Some(c) => s.push(c),
                        None => bail!("LVM2 metadata: unterminated string"),
                    }
                }
                out.push(Token::Str(s));
            }
            _ => {
                let mut w = String::new();
                while let Some(c) = chars.next_if(|c| !c.is_whitespace() && !"{}[]=,\"#".contains(*c)) {
                    w.push(c);
                }
                if w.is_empty() {
                    bail!("LVM2 metadata: unexpected {c:?}");
                }
                out.push(Token::Word(w));
            }
        }
    }
    Ok(out)
}

/// Parses the text metadata into its top-level entries.
fn parse(text: &str) -> Result<Vec<(String, Value)>> {
    let toks = tokens(text)?;
    let mut pos = 0;
    let entries = entries(&toks, &mut pos)?;
    if pos != toks.len() {
        bail!("LVM2 metadata: unbalanced braces");
    }
    Ok(entries)
}

fn entries(t: &[Token], pos: &mut usize) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    while let Some(Token::Word(key)) = t.get(*pos) {
        *pos += 1;
        match t.get(*pos) {
            Some(Token::Punct('{')) => {
                *pos += 1;
                let body = entries(t, pos)?;
                if t.get(*pos) != Some(&Token::Punct('}')) {
                    bail!("LVM2 metadata: section {key} not closed");
                }
                *pos += 1;
                out.push((key.clone(), Value::Section(body)));
            }
            Some(Token::Punct('=')) => {
                *pos += 1;
                out.push((key.clone(), value(t, pos)?));
            }
            _ => bail!("LVM2 metadata: expected = or {{ after {key}"),
        }
    }
    Ok(out)
}

fn value(t: &[Token], pos: &mut usize) -> Result<Value> {
    let v = match t.get(*pos) {
        Some(Token::Str(s)) => Value::Str(s.clone()),
        Some(Token::Word(w)) => match w.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Str(w.clone()), // floats and bare words: kept as text
        },
        Some(Token::Punct('[')) => {
            *pos += 1;
            let mut items = Vec::new();
            while t.get(*pos) != Some(&Token::Punct(']')) {
                items.push(value(t, pos)?);
                if t.get(*pos) == Some(&Token::Punct(',')) {
                    *pos += 1;
                }
            }
            Value::List(items)
        }
        _ => bail!("LVM2 metadata: expected a value"),
    };
    *pos += 1;
    Ok(v)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"vg0 {
id = "abc"
seqno = 4
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192
physical_volumes {
pv0 {
id = "ABCDEF-ghij-klmn-opqr-stuv-wxyz-012345"
device = "/dev/vda2"
pe_start = 2048
pe_count = 100
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1 # linear
stripes = [
"pv0", 0
]
}
segment2 {
start_extent = 10
extent_count = 5
type = "striped"
stripe_count = 1
stripes = ["pv0", 20]
}
}
pool {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 4
type = "thin-pool"
}
}
pool_tdata {
status = ["READ", "WRITE"]
}
}
}
contents = "Text Format Volume Group"
version = 1
creation_time = 1764000000 # Tue Nov 25 2025
"#;

    #[test]
    fn linear_volumes_map_to_pv_offsets_and_others_are_named() {
        let config = parse(META).unwrap();
        let pv = volumes_of(&config, "ABCDEFghijklmnopqrstuvwxyz012345", 1 << 30).unwrap();
        let mib4 = 4 << 20;
        assert_eq!(
            pv.volumes,
            [LogicalVolume {
                vg: "vg0".into(),
                name: "root".into(),
                size: 15 * mib4,
                runs: vec![
                    LvRun { at: 0, pv_offset: 1 << 20, len: 10 * mib4 },
                    LvRun { at: 10 * mib4, pv_offset: (1 << 20) + 20 * mib4, len: 5 * mib4 },
                ],
            }]
        );
        assert_eq!(pv.skipped.len(), 1);
        assert!(pv.skipped[0].starts_with("vg0/pool: thin-pool"), "{:?}", pv.skipped);
        // Another PV's uuid, and a PV too short for its extents.
        assert!(volumes_of(&config, "x".repeat(32).as_str(), 1 << 30).is_err());
        assert!(volumes_of(&config, "ABCDEFghijklmnopqrstuvwxyz012345", 20 << 20).unwrap().volumes.is_empty());
    }

    #[test]
    fn names_may_be_all_digits() {
        let config = parse("007 {\nextent_size = 8\nphysical_volumes { 1 { id = \"x\" } }\n}").unwrap();
        assert_eq!(config[0].0, "007");
        let Value::Section(vg) = &config[0].1 else { panic!() };
        assert_eq!(int(vg, "extent_size"), Some(8));
        assert!(section(vg, "physical_volumes").is_some_and(|p| p[0].0 == "1"));
    }

    #[test]
    fn bad_metadata_is_an_error_not_a_panic() {
        for bad in ["vg0 {", "vg0 { a = }", "vg0 { a = \"x }", "a = [1, 2", "}"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
