//! Human-readable output and progress bars.

use cairn_engine::verify::VerifyReport;
use cairn_engine::Progress;
use cairn_repo::PointId;
use cairn_repo::RestorePoint;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicI32, Ordering};

pub fn bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The first SIGINT or SIGTERM after [`stop_on_interrupt`] (0: none yet); read by
/// [`Bar::cancelled`].
static INTERRUPTED_BY: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(signal: libc::c_int) {
    // Async-signal-safe only: an atomic swap, signal() and raise(). A second signal kills.
    if INTERRUPTED_BY.swap(signal, Ordering::SeqCst) != 0 {
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

/// From now on the first Ctrl-C (SIGINT) or SIGTERM asks the running operation to stop at its
/// next batch of blocks (the bar's `cancelled()`), so that it ends as a failed run ends, with
/// nothing half-written; a second one kills at once. Only for commands whose work asks. A
/// signal this process was started ignoring (a background job, `nohup`) stays ignored.
pub fn stop_on_interrupt() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                libc::sigaction(signal, &new, std::ptr::null_mut());
            }
        }
        // Says so at once, wherever the work is (a lock wait, an index load, the last writes).
        std::thread::spawn(|| {
            while INTERRUPTED_BY.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            eprintln!("interrupted: stopping at the next batch of blocks (interrupt again to kill at once)");
        });
    });
}

/// The signal that asked the command to stop, if one did (its exit status is then 128 + it).
pub fn interrupted_by() -> Option<i32> {
    Some(INTERRUPTED_BY.load(Ordering::SeqCst)).filter(|s| *s != 0)
}

/// A progress bar on stderr, or nothing when stderr is not a terminal.
pub struct Bar {
    pb: ProgressBar,
}

impl Bar {
    pub fn new(visible: bool) -> Bar {
        let pb = if visible { ProgressBar::new(0) } else { ProgressBar::hidden() };
        pb.set_style(
            ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        Bar { pb }
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        self.pb.reset();
        self.pb.set_length(total);
        self.pb.set_message(phase.to_string());
    }
    fn advance(&self, n: u64) {
        self.pb.inc(n);
    }
    fn finish(&self) {
        self.pb.finish_and_clear();
    }
    fn note(&self, msg: &str) {
        self.pb.suspend(|| eprintln!("{msg}"));
    }
    fn cancelled(&self) -> bool {
        interrupted_by().is_some()
    }
}

pub fn print_backup(id: &PointId, p: &RestorePoint) {
    let t = &p.stats.totals;
    let secs = p.stats.duration_ms as f64 / 1000.0;
    println!("restore point {} of {} ({}, {})", id.short(), p.name, p.stats.mode, p.time);
    for d in &p.disks {
        println!("  disk {:<8} {} from {}", d.name, bytes(d.size), d.source);
    }
    println!(
        "  read          {} ({} zero or unallocated, {} unchanged and not read)",
        bytes(t.read_bytes),
        bytes(t.zero_bytes),
        bytes(t.unchanged_bytes)
    );
    println!(
        "  new data      {} stored ({} before compression, {} blocks)",
        bytes(t.stored_bytes),
        bytes(t.new_bytes),
        t.new_blocks
    );
    println!("  deduplicated  {}", bytes(t.dedup_bytes));
    println!("  repository    +{}", bytes(p.stats.repository_growth_bytes));
    println!(
        "  time          {secs:.2} s ({}/s over the disk)",
        bytes((t.logical_bytes as f64 / secs.max(0.001)) as u64)
    );
}

pub fn print_points(pts: &[&(PointId, RestorePoint)], protected: &std::collections::HashSet<PointId>) {
    if pts.is_empty() {
        println!("no restore points");
        return;
    }
    println!(
        "{:<8}  {:<16}  {:<24}  {:<14}  {:<16}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}",
        "ID", "NAME", "TIME", "MODE", "METHOD", "WINDOW", "SIZE", "READ", "NEW", "DEDUP", "TOOK"
    );
    for (id, p) in pts {
        let t = &p.stats.totals;
        let vm = cairn_repo::vm_record::VmRecord::of(p);
        let (method, window, read, took) = match &vm {
            Some(r) => (
                r.method.as_str().to_string(),
                match (r.frozen_window_ms, r.offline_window_ms) {
                    (Some(f), _) => format!("{f} ms"),
                    (_, Some(o)) => format!("{o} ms off"),
                    _ => "-".into(),
                },
                r.vm_read_bytes,
                r.events.last().map(|e| e.t_ms).unwrap_or(p.stats.duration_ms),
            ),
            None => ("-".into(), "-".into(), t.read_bytes, p.stats.duration_ms),
        };
        println!(
            "{:<8}  {:<16}  {:<24}  {:<14}  {:<16}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}  {:>7.2}s",
            id.short(),
            p.name,
            p.time,
            p.stats.mode,
            method,
            window,
            bytes(t.logical_bytes),
            bytes(read),
            bytes(t.stored_bytes),
            bytes(t.dedup_bytes + t.unchanged_bytes),
            took as f64 / 1000.0
        );
        if protected.contains(id) {
            println!("{:<8}  protected (`cairn protect {}@{} --unprotect` to release)", "", p.name, id.short());
        }
    }
}

pub fn print_verify(r: &VerifyReport) {
    println!(
        "checked {} packs ({}), {} blocks, {} restore points in {:.1} s",
        r.packs_checked,
        bytes(r.pack_bytes_checked),
        r.blocks_checked,
        r.points_checked,
        r.duration_ms as f64 / 1000.0
    );
    if !r.reclaimed_packs.is_empty() {
        println!(
            "note: {} pack(s) a prune had marked were deleted while verify ran (not damage)",
            r.reclaimed_packs.len()
        );
    }
    if !r.unindexed_packs.is_empty() {
        println!("note: {} pack(s) left by interrupted backups are not referenced (harmless)", r.unindexed_packs.len());
    }
    for p in &r.damaged_packs {
        println!("DAMAGED pack {}: {}", &p.pack[..16.min(p.pack.len())], p.problem);
    }
    for p in &r.unreadable_packs {
        println!("UNREADABLE pack {}: {} (run verify again)", &p.pack[..16.min(p.pack.len())], p.problem);
    }
    if !r.released_copies.is_empty() {
        println!("{} quarantined block copies read back sound and were released", r.released_copies.len());
    }
    for f in &r.damaged_index_files {
        println!("DAMAGED index file {}: {}", &f.id[..16], f.problem);
    }
    for b in &r.damaged_blocks {
        println!("DAMAGED block {}: {}", &b.block[..16], b.problem);
    }
    for p in &r.damaged_points {
        println!("DAMAGED restore point document {}: {}", &p.id[..16], p.problem);
    }
    for a in &r.affected_points {
        println!("AFFECTED restore point {} ({} of {}):", a.id.short(), a.name, a.time);
        for d in &a.disks {
            if !d.damaged_map_pages.is_empty() {
                println!(
                    "  disk {}: map pages {:?} unreadable: the disk cannot be restored",
                    d.disk, d.damaged_map_pages
                );
            }
            if d.damaged_blocks > 0 {
                let offs: Vec<String> = d.offsets.iter().take(8).map(|o| o.to_string()).collect();
                println!(
                    "  disk {}: {} damaged block(s) at offsets {}{}",
                    d.disk,
                    d.damaged_blocks,
                    offs.join(", "),
                    if d.damaged_blocks > 8 { ", ..." } else { "" }
                );
            }
        }
    }
    if r.ok {
        println!("no damage found");
    } else if !r.unreadable_packs.is_empty()
        && r.damaged_blocks.is_empty()
        && r.damaged_packs.is_empty()
        && r.damaged_index_files.is_empty()
        && r.damaged_points.is_empty()
    {
        println!("verification INCOMPLETE: {} pack(s) could not be read", r.unreadable_packs.len());
    } else {
        println!(
            "repository is DAMAGED: {} block(s), {} restore point(s) affected",
            r.damaged_blocks.len(),
            r.affected_points.len()
        );
    }
}
