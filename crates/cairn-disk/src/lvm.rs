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

/// The most metadata text read from a PV. LVM's default metadata area is 1 MiB and holds two
/// copies of the text, so real metadata is far smaller; a header claiming more is not believed.
pub const MAX_METADATA_TEXT: u64 = 1 << 20;

/// How deeply sections and lists may nest in the metadata text (LVM's own nest 4 deep).
pub const MAX_NESTING: usize = 64;

/// Reads the LVM label and current metadata of the PV at `offset` (`length` bytes) through
/// `read` (which reads the disk). Every offset and length in the label and metadata comes from
/// the guest: each is checked against the PV before it is read or used.
pub fn read_pv(read: &mut ReadFn, offset: u64, length: u64) -> Result<PhysicalVolume> {
    // The label sits in one of the first four sectors.
    if length < 4 * SECTOR || offset.checked_add(length).is_none() {
        bail!("too small for an LVM2 label");
    }
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
    let (mda_offset, mda_size) = *lists[1].first().context("this PV keeps no metadata copy")?;
    if mda_offset.checked_add(mda_size).is_none_or(|end| end > length) || mda_size < MDA_HEADER_SIZE {
        bail!("LVM2 label: the metadata area lies outside the PV");
    }
    let text = read_metadata(read, offset + mda_offset, mda_size)?;
    let config = parse(&text)?;
    let uuid = String::from_utf8_lossy(&uuid).into_owned();
    volumes_of(&config, &uuid, length)
}

/// The current metadata text of the metadata area at `mda` (absolute) of `area` bytes (as the
/// label says; already checked to lie inside the PV).
fn read_metadata(read: &mut ReadFn, mda: u64, area: u64) -> Result<String> {
    let h = read(mda, MDA_HEADER_SIZE as usize)?;
    if h.len() < 64 || &h[4..20] != MDA_MAGIC {
        bail!("LVM2 metadata area: bad magic");
    }
    let mda_size = le64(&h, 32);
    let (text_off, text_len) = (le64(&h, 40), le64(&h, 48));
    if mda_size > area || mda_size <= MDA_HEADER_SIZE {
        bail!("LVM2 metadata area: its header says {mda_size} bytes, its label {area}");
    }
    if text_len == 0 || text_off < MDA_HEADER_SIZE || text_off >= mda_size || text_len > mda_size - MDA_HEADER_SIZE {
        bail!("LVM2 metadata area: no current metadata");
    }
    if text_len > MAX_METADATA_TEXT {
        bail!("LVM2 metadata area: {text_len} bytes of text (more than the {MAX_METADATA_TEXT} read)");
    }
    // A circular buffer after the header: the text may wrap to its start. All sums stay below
    // mda + mda_size, inside the PV.
    let first = text_len.min(mda_size - text_off);
    let mut bytes = read(mda + text_off, first as usize)?;
    if first < text_len {
        bytes.extend(read(mda + MDA_HEADER_SIZE, (text_len - first) as usize)?);
    }
    if bytes.len() as u64 != text_len {
        bail!("LVM2 metadata area: truncated text");
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// LVM's rule for VG and LV names (lvm(8), "VALID NAMES"): what it never writes is not a name.
fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
}

/// A non-negative number of `unit`-byte units as bytes, when it fits.
fn bytes_of(n: i64, unit: u64) -> Option<u64> {
    u64::try_from(n).ok()?.checked_mul(unit)
}

fn volumes_of(config: &[(String, Value)], pv_uuid: &str, pv_length: u64) -> Result<PhysicalVolume> {
    let (vg, body) = config
        .iter()
        .find_map(|(k, v)| if let Value::Section(s) = v { Some((k, s)) } else { None })
        .context("LVM2 metadata: no volume group")?;
    if !valid_name(vg) {
        bail!("LVM2 metadata: {vg:?} is not a volume group name");
    }
    let extent = int(body, "extent_size")
        .and_then(|e| bytes_of(e, SECTOR))
        .filter(|&e| e > 0)
        .context("LVM2 metadata: no valid extent_size")?;
    // Which pvN of the metadata this PV is (uuids there carry dashes).
    let pvs = section(body, "physical_volumes").context("LVM2 metadata: no physical_volumes")?;
    let (pv_key, pe_start) = pvs
        .iter()
        .find_map(|(k, v)| {
            let Value::Section(pv) = v else { return None };
            let id = string(pv, "id")?.replace('-', "");
            (id == pv_uuid).then(|| (k.clone(), bytes_of(int(pv, "pe_start").unwrap_or(0), SECTOR)))
        })
        .context("LVM2 metadata does not describe this PV")?;
    let pe_start = pe_start.context("LVM2 metadata: invalid pe_start")?;
    let mut out = PhysicalVolume::default();
    for (name, lv) in section(body, "logical_volumes").unwrap_or(&[]) {
        let Value::Section(lv) = lv else { continue };
        let visible =
            list(lv, "status").is_some_and(|s| s.iter().any(|f| matches!(f, Value::Str(f) if f == "VISIBLE")));
        if !visible {
            continue; // internal volumes (thin pool data, mirror logs)
        }
        if !valid_name(name) {
            out.skipped.push(format!("{vg}/{name:?}: not a logical volume name"));
            continue;
        }
        match lv_runs(lv, &pv_key, pe_start, extent, pv_length) {
            Ok(runs) => {
                // The runs tile [0, size) without gaps (checked), so the sum cannot overflow.
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
        let extents = |n: Option<i64>| bytes_of(n.unwrap_or(0), extent);
        let at = extents(int(seg, "start_extent"));
        let len = extents(int(seg, "extent_count")).filter(|&n| n > 0);
        let pv_offset = extents(Some(*first_pe)).and_then(|o| o.checked_add(pe_start));
        let (Some(at), Some(len), Some(pv_offset)) = (at, len, pv_offset) else {
            bail!("a segment's extents are out of range");
        };
        if pv_offset.checked_add(len).is_none_or(|end| end > pv_length) {
            bail!("extends past the end of its physical volume");
        }
        runs.push(LvRun { at, pv_offset, len });
    }
    runs.sort_by_key(|r| r.at);
    let mut next = 0u64;
    for r in &runs {
        if r.at != next {
            bail!("segments leave a gap");
        }
        next = next.checked_add(r.len).context("segments overflow")?;
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

/// The tokens of the text, one at a time (no token list: the text may be 1 MiB of `{`).
struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    peeked: Option<Token>,
}

impl Lexer<'_> {
    fn peek(&mut self) -> Result<Option<&Token>> {
        if self.peeked.is_none() {
            self.peeked = self.lex()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn next(&mut self) -> Result<Option<Token>> {
        self.peek()?;
        Ok(self.peeked.take())
    }

    fn lex(&mut self) -> Result<Option<Token>> {
        let chars = &mut self.chars;
        while let Some(&c) = chars.peek() {
            match c {
                '#' => while chars.next_if(|&c| c != '\n').is_some() {},
                c if c.is_whitespace() => {
                    chars.next();
                }
                '{' | '}' | '[' | ']' | '=' | ',' => {
                    chars.next();
                    return Ok(Some(Token::Punct(c)));
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
                    return Ok(Some(Token::Str(s)));
                }
                _ => {
                    let mut w = String::new();
                    while let Some(c) = chars.next_if(|c| !c.is_whitespace() && !"{}[]=,\"#".contains(*c)) {
                        w.push(c);
                    }
                    if w.is_empty() {
                        bail!("LVM2 metadata: unexpected {c:?}");
                    }
                    return Ok(Some(Token::Word(w)));
                }
            }
        }
        Ok(None)
    }
}

/// The logical volumes LVM2 text metadata (the text of a PV's metadata area, or an
/// `/etc/lvm/backup` file) places on the PV with UUID `pv_uuid` (without dashes), `pv_length`
/// bytes long. [`read_pv`] reads the text from the disk; public for fuzzing.
pub fn volumes_in_text(text: &str, pv_uuid: &str, pv_length: u64) -> Result<PhysicalVolume> {
    volumes_of(&parse(text)?, pv_uuid, pv_length)
}

/// Parses the text metadata into its top-level entries.
fn parse(text: &str) -> Result<Vec<(String, Value)>> {
    let mut lex = Lexer { chars: text.chars().peekable(), peeked: None };
    let entries = entries(&mut lex, 0)?;
    if lex.peek()?.is_some() {
        bail!("LVM2 metadata: unbalanced braces");
    }
    Ok(entries)
}

fn nested(depth: usize) -> Result<usize> {
    if depth >= MAX_NESTING {
        bail!("LVM2 metadata: nested more than {MAX_NESTING} deep");
    }
    Ok(depth + 1)
}

fn entries(lex: &mut Lexer, depth: usize) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    while let Some(Token::Word(_)) = lex.peek()? {
        let Some(Token::Word(key)) = lex.next()? else { unreachable!() };
        match lex.next()? {
            Some(Token::Punct('{')) => {
                let body = entries(lex, nested(depth)?)?;
                if lex.next()? != Some(Token::Punct('}')) {
                    bail!("LVM2 metadata: section {key} not closed");
                }
                out.push((key, Value::Section(body)));
            }
            Some(Token::Punct('=')) => {
                let v = value(lex, depth)?;
                out.push((key, v));
            }
            _ => bail!("LVM2 metadata: expected = or {{ after {key}"),
        }
    }
    Ok(out)
}

fn value(lex: &mut Lexer, depth: usize) -> Result<Value> {
    Ok(match lex.next()? {
        Some(Token::Str(s)) => Value::Str(s),
        Some(Token::Word(w)) => match w.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Str(w), // floats and bare words: kept as text
        },
        Some(Token::Punct('[')) => {
            let depth = nested(depth)?;
            let mut items = Vec::new();
            loop {
                if lex.peek()? == Some(&Token::Punct(']')) {
                    lex.next()?;
                    break;
                }
                items.push(value(lex, depth)?);
                if lex.peek()? == Some(&Token::Punct(',')) {
                    lex.next()?;
                }
            }
            Value::List(items)
        }
        _ => bail!("LVM2 metadata: expected a value"),
    })
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The UUID of the PVs [`pv_image`] makes, as their label holds it (metadata adds dashes).
    pub(crate) const PV_UUID: &str = "ABCDEFghijklmnopqrstuvwxyz012345";

    /// Metadata text of VG `vg0` on PV [`PV_UUID`] (1 MiB extents, data from 1 MiB): `swap_1`
    /// linear over extents 0-3.
    pub(crate) fn swap_vg_text() -> String {
        "vg0 {\nextent_size = 2048\nphysical_volumes {\npv0 {\nid = \"ABCDEF-ghij-klmn-opqr-stuv-wxyz-012345\"\n\
         pe_start = 2048\n}\n}\nlogical_volumes {\nswap_1 {\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\
         segment1 {\nstart_extent = 0\nextent_count = 4\ntype = \"striped\"\nstripe_count = 1\n\
         stripes = [\"pv0\", 0]\n}\n}\n}\n}\n"
            .into()
    }

    /// A PV of `size` bytes laid out as pvcreate does: the label in sector 1, one metadata area
    /// at 4 KiB of `mda_size` bytes whose header says the text at 512 in it is `text_len`
    /// bytes long (the text itself is written up to the area's end).
    pub(crate) fn pv_image(size: usize, text: &[u8], mda_size: u64, text_len: u64) -> Vec<u8> {
        let mut d = vec![0u8; size];
        let label = 512;
        d[label..label + 8].copy_from_slice(b"LABELONE");
        d[label + 8..label + 16].copy_from_slice(&1u64.to_le_bytes());
        d[label + 20..label + 24].copy_from_slice(&32u32.to_le_bytes());
        d[label + 24..label + 32].copy_from_slice(b"LVM2 001");
        let pvh = label + 32;
        d[pvh..pvh + 32].copy_from_slice(PV_UUID.as_bytes());
        d[pvh + 32..pvh + 40].copy_from_slice(&(size as u64).to_le_bytes());
        // Data areas: one at 1 MiB, then the end; metadata areas: one at 4 KiB, then the end.
        d[pvh + 40..pvh + 48].copy_from_slice(&(1u64 << 20).to_le_bytes());
        d[pvh + 72..pvh + 80].copy_from_slice(&4096u64.to_le_bytes());
        d[pvh + 80..pvh + 88].copy_from_slice(&mda_size.to_le_bytes());
        let mda = 4096;
        d[mda + 4..mda + 20].copy_from_slice(MDA_MAGIC);
        d[mda + 20..mda + 24].copy_from_slice(&1u32.to_le_bytes());
        d[mda + 24..mda + 32].copy_from_slice(&4096u64.to_le_bytes());
        d[mda + 32..mda + 40].copy_from_slice(&mda_size.to_le_bytes());
        d[mda + 40..mda + 48].copy_from_slice(&512u64.to_le_bytes());
        d[mda + 48..mda + 56].copy_from_slice(&text_len.to_le_bytes());
        let room = (1 << 20) - mda - 512;
        d[mda + 512..mda + 512 + text.len().min(room)].copy_from_slice(&text[..text.len().min(room)]);
        d
    }

    fn read_mem(d: &[u8]) -> impl FnMut(u64, usize) -> Result<Vec<u8>> + '_ {
        crate::partitions::tests::strict(d)
    }

    #[test]
    fn a_pv_in_memory_reads_back() {
        let text = swap_vg_text();
        let d = pv_image(8 << 20, text.as_bytes(), (1 << 20) - 4096, text.len() as u64);
        let pv = read_pv(&mut read_mem(&d), 0, d.len() as u64).unwrap();
        assert_eq!(pv.volumes.len(), 1);
        assert_eq!(pv.volumes[0].runs, [LvRun { at: 0, pv_offset: 1 << 20, len: 4 << 20 }]);
    }

    #[test]
    fn metadata_lengths_from_the_disk_are_bounded_before_anything_is_read() {
        let text = swap_vg_text();
        let ok = (1u64 << 20) - 4096;
        let cases: [(u64, u64, &str); 5] = [
            // (metadata area size in the label and its header, text length, why)
            (1 << 41, 1 << 40, "outside the PV"),
            (ok, 1 << 40, "no current metadata"),
            (u64::MAX, u64::MAX - 512, "outside the PV"),
            (ok, 0, "no current metadata"),
            (100, 10, "outside the PV"),
        ];
        for (mda_size, text_len, why) in cases {
            let d = pv_image(8 << 20, text.as_bytes(), mda_size, text_len);
            let mut longest = 0;
            let mut read = read_mem(&d);
            let err = read_pv(
                &mut |at, len| {
                    longest = longest.max(len);
                    read(at, len)
                },
                0,
                d.len() as u64,
            )
            .unwrap_err();
            assert!(format!("{err:#}").contains(why), "{mda_size} {text_len}: {err:#}");
            assert!(longest <= 2048, "read {longest} bytes");
        }
        // An area large enough for 2 MiB of text: more than is ever read.
        let big = pv_image(64 << 20, text.as_bytes(), 32 << 20, 2 << 20);
        let err = read_pv(&mut read_mem(&big), 0, 64 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("more than the 1048576 read"), "{err:#}");
    }

    #[test]
    fn nesting_is_bounded_and_deep_metadata_is_an_error_not_a_stack_overflow() {
        for deep in ["a {".repeat(100_000), format!("a = {}", "[".repeat(100_000)), "{".repeat(1 << 20)] {
            let err = parse(&deep).unwrap_err();
            assert!(format!("{err:#}").contains("nested") || format!("{err:#}").contains("unbalanced"), "{err:#}");
        }
        let ok = format!("{}{}", "a {".repeat(MAX_NESTING), "}".repeat(MAX_NESTING));
        parse(&ok).unwrap();
        let too_deep = format!("{}{}", "a {".repeat(MAX_NESTING + 1), "}".repeat(MAX_NESTING + 1));
        assert!(parse(&too_deep).is_err());
    }

    #[test]
    fn numbers_out_of_range_leave_a_volume_out_instead_of_overflowing() {
        let text = swap_vg_text();
        for (from, to) in [
            ("extent_count = 4", "extent_count = -4"),
            ("extent_count = 4", "extent_count = 9223372036854775807"),
            ("extent_count = 4", "extent_count = 0"),
            ("start_extent = 0", "start_extent = 9223372036854775807"),
            ("\"pv0\", 0]", "\"pv0\", 9007199254740993]"),
            ("\"pv0\", 0]", "\"pv0\", -1]"),
            ("swap_1 {", "../../x {"),
        ] {
            let bad = text.replace(from, to);
            assert_ne!(bad, text);
            let pv = volumes_in_text(&bad, PV_UUID, 8 << 20).unwrap();
            assert!(pv.volumes.is_empty() && pv.skipped.len() == 1, "{to}: {pv:?}");
        }
        for (from, to) in [("extent_size = 2048", "extent_size = -2048"), ("pe_start = 2048", "pe_start = -1")] {
            assert!(volumes_in_text(&text.replace(from, to), PV_UUID, 8 << 20).is_err(), "{to}");
        }
        // Segments whose sizes overflow when added up.
        let two = text.replace(
            "segment1 {",
            "segment2 {\nstart_extent = 4\nextent_count = 9007199254740000\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pv0\", 0]\n}\nsegment1 {",
        );
        assert!(volumes_in_text(&two, PV_UUID, u64::MAX).unwrap().volumes.is_empty());
    }

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
