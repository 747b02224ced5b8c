//! The data the harnesses back up: deterministic disk images of mixed content (random,
//! zeros, compressible text), kept as oracles every restore is compared with.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1 << 20;
pub const BLOCK: u64 = 64 * 1024;
/// Images are this large: two packs of new data, a second of work to back up.
pub const IMAGE_SIZE: u64 = 32 * MIB;

/// splitmix64: small, deterministic, good enough to make incompressible bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Through the mixer once, so that nearby seeds give unrelated streams.
        let mut r = Rng(seed);
        Rng(r.next())
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes `len` bytes of one content kind at `offset`.
pub fn write_region(f: &File, offset: u64, len: u64, kind: Content, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB) as usize;
        match kind {
            Content::Random => rng.fill(&mut buf[..n]),
            Content::Text => {
                for (i, line) in buf[..n].chunks_mut(64).enumerate() {
                    let s = format!(
                        "line {:>10} of seed {seed:>6}: the quick brown fox jumps over the dog\n",
                        done / 64 + i as u64
                    );
                    line.copy_from_slice(&s.as_bytes()[..line.len()]);
                }
            }
        }
        f.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[derive(Clone, Copy)]
pub enum Content {
    Random,
    Text,
}

/// A fresh image of [`IMAGE_SIZE`]: random, a hole, text, random, each region from `seed`.
pub fn make_image(path: &Path, seed: u64) -> Result<()> {
    make_image_sized(path, IMAGE_SIZE, seed)
}

/// A fresh image of `size` bytes (a multiple of 8 MiB keeps its regions whole): random for
/// its first 3/8, a hole to the half, text to 3/4, random to the end.
pub fn make_image_sized(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    write_region(&f, 0, size / 8 * 3, Content::Random, seed)?;
    write_region(&f, size / 2, size / 4, Content::Text, seed)?;
    write_region(&f, size / 4 * 3, size / 4, Content::Random, seed + 1_000_000)?;
    f.sync_all()?;
    Ok(())
}

/// Copies `from` to `to` and overwrites `blocks` scattered 64 KiB blocks of it with new random
/// bytes; returns the changed ranges (what a dirty bitmap would say), as `OFFSET LENGTH` lines.
pub fn mutate(from: &Path, to: &Path, blocks: u64, seed: u64) -> Result<String> {
    mutate_sized(from, to, IMAGE_SIZE, blocks, seed)
}

/// [`mutate`] for an image of `size` bytes.
pub fn mutate_sized(from: &Path, to: &Path, size: u64, blocks: u64, seed: u64) -> Result<String> {
    std::fs::copy(from, to)?;
    let f = OpenOptions::new().write(true).open(to)?;
    let mut rng = Rng::new(seed);
    let mut ranges = String::new();
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < blocks.min(size / BLOCK) {
        chosen.insert(rng.below(size / BLOCK));
    }
    for b in chosen {
        write_region(&f, b * BLOCK, BLOCK, Content::Random, seed * 7919 + b)?;
        ranges.push_str(&format!("{} {}\n", b * BLOCK, BLOCK));
    }
    f.sync_all()?;
    Ok(ranges)
}

/// Whether two files hold the same bytes (the restored image against its oracle).
pub fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Copies a folder tree (a repository template) into a new folder.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

/// Files under `dir` whose names start with `.tmp-` (writes a crash interrupted), with their
/// total size.
pub fn temporaries(dir: &Path) -> (u64, u64) {
    let mut out = (0, 0);
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.0 += 1;
                out.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    out
}
