//! `cairn-fleet`: builds a synthetic fleet repository through cairn's real write path (the
//! backup pipeline, sessions, packs, index files, points), to measure forget and prune at a
//! scale no test reaches. A benchmark tool, not a test: `bench/fleet.sh` drives it and times
//! the `cairn` commands run on what it builds.
//!
//! The fleet: `--vms` machines with one disk of `--blocks` 64 KiB blocks, backed up once a day
//! for `--days` days; each day a contiguous `--change` percent of each disk is rewritten (one
//! stretch, as a day of writes mostly is). Every block holds a small header and
//! `--random-bytes` of pseudo-random data, then zeros: unique per (machine, block, version),
//! cheap to store, so a repository of tens of millions of blocks fits on an ordinary disk.
//! Points are dated a day apart, ending an hour ago, so retention rules see a month of dailies.

use anyhow::{Context, Result};
use cairn_engine::backup::{backup_with, BackupOptions, DiskInput};
use cairn_engine::ranges::Range;
use cairn_engine::source::{Allocation, Extent, Source};
use cairn_engine::NoProgress;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_storage::{Backend, LocalBackend};
use clap::Parser;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const BLOCK: u64 = 65536;

#[derive(Parser)]
#[command(about = "Build a synthetic fleet repository through cairn's write path (a benchmark tool)")]
struct Args {
    /// The repository folder (created; must not exist)
    #[arg(long)]
    repo: PathBuf,
    #[arg(long, default_value_t = 100)]
    vms: u32,
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// 64 KiB blocks per machine disk
    #[arg(long, default_value_t = 32768)]
    blocks: u64,
    /// Percent of each disk rewritten per day (one contiguous stretch)
    #[arg(long, default_value_t = 1.0)]
    change: f64,
    /// Pseudo-random bytes per block (the rest is zeros): sets the stored size per block
    #[arg(long, default_value_t = 512)]
    random_bytes: usize,
    /// Encrypt the repository with this password
    #[arg(long)]
    password: Option<String>,
}

/// One machine's disk: each block's version decides its content.
struct Disk {
    vm: u32,
    versions: Vec<u32>,
    random_bytes: usize,
}

/// A [`Source`] over a [`Disk`]'s current contents.
struct Synthetic {
    disk: Arc<Disk>,
    queued: VecDeque<Vec<u8>>,
}

impl Source for Synthetic {
    fn describe(&self) -> String {
        format!("synthetic disk of vm-{:03}", self.disk.vm)
    }
    fn size(&self) -> u64 {
        self.disk.versions.len() as u64 * BLOCK
    }
    fn allocation(&mut self, offset: u64, len: u64) -> anyhow::Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length: len, kind: Allocation::Data }])
    }
    fn submit(&mut self, offset: u64, len: usize, mut buf: Vec<u8>) -> anyhow::Result<()> {
        buf.clear();
        buf.resize(len, 0);
        for (i, chunk) in buf.chunks_mut(BLOCK as usize).enumerate() {
            let b = offset / BLOCK + i as u64;
            fill_block(chunk, self.disk.vm, b, self.disk.versions[b as usize], self.disk.random_bytes);
        }
        self.queued.push_back(buf);
        Ok(())
    }
    fn next(&mut self) -> anyhow::Result<Vec<u8>> {
        self.queued.pop_front().context("no read queued")
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A block unique to (machine, block, version): a header, pseudo-random bytes, zeros.
fn fill_block(out: &mut [u8], vm: u32, block: u64, version: u32, random_bytes: usize) {
    out.fill(0);
    let mut x = (vm as u64) << 40 ^ block << 8 ^ version as u64 ^ 0x9E37_79B9_7F4A_7C15;
    let n = (16 + random_bytes).min(out.len());
    out[..4].copy_from_slice(&vm.to_le_bytes());
    out[4..12].copy_from_slice(&block.to_le_bytes());
    out[12..16].copy_from_slice(&version.to_le_bytes());
    for c in out[16..n].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&a.repo));
    let repo = Arc::new(Repository::init(backend, a.password.as_deref())?);
    let _lock = repo.lock(false, "fleet build", Duration::from_secs(10))?;
    repo.load_index()?;
    let started = Instant::now();
    // The newest points an hour ago (never in the future: retention keeps those whatever).
    let first_day = SystemTime::now() - Duration::from_secs(86_400 * a.days as u64 + 3600 + a.vms as u64);
    let stretch = ((a.blocks as f64 * a.change / 100.0).round() as u64).clamp(1, a.blocks);
    let mut disks: Vec<Arc<Disk>> = (0..a.vms)
        .map(|vm| Arc::new(Disk { vm, versions: vec![0; a.blocks as usize], random_bytes: a.random_bytes }))
        .collect();
    let mut parents: Vec<Option<(PointId, RestorePoint)>> = vec![None; a.vms as usize];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut logical = 0u64;
    for day in 0..a.days {
        let day_started = Instant::now();
        for vm in 0..a.vms as usize {
            let mut changed = None;
            if day > 0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let start = rng % (a.blocks - stretch + 1);
                let d = Arc::get_mut(&mut disks[vm]).context("disk still in use")?;
                for v in &mut d.versions[start as usize..(start + stretch) as usize] {
                    *v += 1;
                }
                changed = Some(vec![Range { offset: start * BLOCK, length: stretch * BLOCK }]);
            }
            let input = DiskInput {
                name: "vda".into(),
                source: Box::new(Synthetic { disk: disks[vm].clone(), queued: VecDeque::new() }),
                changed,
                skip: Vec::new(),
                role: None,
                path: None,
            };
            let opts = BackupOptions { name: format!("vm-{vm:03}"), parent: parents[vm].take(), ..Default::default() };
            let when = first_day + Duration::from_secs(86_400 * (day as u64 + 1)) + Duration::from_secs(vm as u64);
            let (id, point) = backup_with(&repo, vec![input], &opts, &NoProgress, |p| {
                p.time = humantime::format_rfc3339_millis(when).to_string();
                Ok(())
            })?;
            logical += a.blocks * BLOCK;
            parents[vm] = Some((id, point));
        }
        eprintln!(
            "day {}/{}: {} points in {:.1}s; {} blocks indexed, {:.0}s in all",
            day + 1,
            a.days,
            a.vms,
            day_started.elapsed().as_secs_f64(),
            repo.index().len(),
            started.elapsed().as_secs_f64()
        );
    }
    let packs = repo.stored_packs()?;
    let summary = serde_json::json!({
        "vms": a.vms, "days": a.days, "blocks_per_vm": a.blocks, "change_percent": a.change,
        "random_bytes": a.random_bytes, "points": a.vms * a.days,
        "indexed_blocks": repo.index().len(), "logical_bytes": logical,
        "packs": packs.len(), "pack_bytes": packs.iter().map(|(_, s)| s).sum::<u64>(),
        "build_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    println!("{summary}");
    Ok(())
}
