//! `cairn copy` and `init --copy-from`: restore points copied to another repository (an
//! object store offsite, another disk). The work is `cairn_repo::copy`; this is the command.

use crate::output::bytes;
use crate::{backend_at, print_json, workers, Global};
use anyhow::{Context, Result};
use cairn_repo::copy::{CopyProgress, CopyReport};
use cairn_repo::Repository;
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// CAIRN_FROM_PASSWORD as this process was given it, taken out of its environment at startup.
pub(crate) static FROM_PASSWORD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

#[derive(Args)]
pub struct CopyArgs {
    /// The repository to copy from: a folder, s3://BUCKET/PREFIX or az://CONTAINER/PREFIX
    #[arg(long, value_name = "DIR|URL")]
    from: PathBuf,
    /// The repository to copy into (default: --repo / CAIRN_REPO)
    #[arg(long, value_name = "DIR|URL")]
    to: Option<PathBuf>,
    /// Read the source's password from this file (first line) instead of CAIRN_FROM_PASSWORD
    #[arg(long, value_name = "FILE")]
    from_password_file: Option<PathBuf>,
    /// What to copy: NAME (every point of it) or NAME@POINT (an ID prefix, a time prefix or
    /// `latest`); every point when none is given
    #[arg(value_name = "NAME[@POINT]")]
    points: Vec<String>,
}

fn source_password(file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        return Ok(Some(text.lines().next().unwrap_or_default().to_string()));
    }
    Ok(FROM_PASSWORD.get().cloned().flatten())
}

/// Opens the source of a copy (its password from CAIRN_FROM_PASSWORD).
pub fn open_source(location: &std::path::Path) -> Result<Repository> {
    open_with(location, None)
}

fn open_with(location: &std::path::Path, password_file: Option<&std::path::Path>) -> Result<Repository> {
    let password = source_password(password_file)?;
    let repo = Repository::open(backend_at(location)?, || password.clone())
        .with_context(|| format!("opening the source repository {}", location.display()))?;
    Ok(repo)
}

pub fn copy(g: &Global, a: &CopyArgs) -> Result<i32> {
    let src = Arc::new(open_with(&a.from, a.from_password_file.as_deref())?);
    let to = a.to.as_ref().or(g.repo.as_ref()).context("no target: pass --to REPO (or --repo, CAIRN_REPO)")?;
    let dst_global = Global { repo: Some(to.clone()), ..g.clone() };
    let dst = crate::open_repo(&dst_global)?;
    let quiet = g.json || g.quiet;
    let progress = CopyProgress::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let report: CopyReport = std::thread::scope(|scope| {
        if !quiet {
            // One line every 10 s on a long copy (a terminal or a log).
            let (progress, done) = (&progress, &done);
            scope.spawn(move || {
                let start = std::time::Instant::now();
                let mut last = start;
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    if last.elapsed() >= Duration::from_secs(10) {
                        last = std::time::Instant::now();
                        let sent = progress.raw_bytes_sent.load(Ordering::Relaxed);
                        eprintln!(
                            "copy: {} sent ({} blocks), {} blocks already there, {:.0} s",
                            bytes(sent),
                            progress.blocks_sent.load(Ordering::Relaxed),
                            progress.blocks_present.load(Ordering::Relaxed),
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
        let workers = g.threads.map_or(0, |_| workers(g));
        let r = cairn_ops::offsite::copy(&src, &dst, &a.points, workers, Duration::from_secs(g.lock_wait), &progress);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    if g.json {
        print_json(&report);
    } else {
        for p in &report.points {
            let what = if p.already_there { "already there" } else { "copied" };
            println!("{}@{}  {}  {what} (target {})", p.name, p.source_id.short(), p.time, p.target_id.short());
        }
        println!(
            "{} points; sent {} blocks ({} raw, {} stored in the target); {} blocks were there already",
            report.points.len(),
            report.blocks_sent,
            bytes(report.raw_bytes_sent),
            bytes(report.stored_bytes_sent),
            report.blocks_present
        );
    }
    Ok(0)
}

/// `cairn repair undelete`: brings back repository objects someone hid (delete markers in a
/// versioned S3 bucket) or replaced (an unlocked version over a locked one). Works on the
/// storage alone (a hidden config makes the repository unopenable, and no password is needed
/// to take a marker away).
pub fn undelete(g: &Global, dry_run: bool) -> Result<i32> {
    use cairn_storage::Restoration;
    let b = crate::backend(g)?;
    let found = cairn_ops::offsite::undelete(b.as_ref(), dry_run)?;
    let count = |how: Restoration| found.iter().filter(|r| r.how == how).count();
    let (hidden, overwritten) = (count(Restoration::Hidden), count(Restoration::Overwritten));
    let mut by_kind: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &found {
        *by_kind.entry(r.kind.to_string()).or_default() += 1;
    }
    if g.json {
        let objects: Vec<_> = found
            .iter()
            .map(|r| {
                let how = if r.how == Restoration::Hidden { "hidden" } else { "overwritten" };
                serde_json::json!({"kind": r.kind.to_string(), "name": r.name, "how": how})
            })
            .collect();
        print_json(&serde_json::json!({"dry_run": dry_run, "hidden": hidden, "overwritten": overwritten,
            "by_kind": by_kind, "objects": objects}));
    } else if found.is_empty() {
        println!("no object of {} is hidden or overwritten", b.location());
    } else {
        let list: Vec<String> = by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let what = format!("{hidden} hidden by delete markers, {overwritten} overwritten ({})", list.join(", "));
        if dry_run {
            println!("{what}; dry run: nothing changed");
        } else {
            println!("brought back: {what}");
        }
    }
    Ok(0)
}
