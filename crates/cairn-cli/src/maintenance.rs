//! The repository's life: `forget` (retention), `protect`, `prune` and `stats`.

use crate::output::bytes;
use crate::{open_repo, print_json, Global};
use anyhow::{bail, Context, Result};
use cairn_engine::{NoProgress, Progress};
use cairn_ops::maintenance::{ForgetOutcome, ForgetRequest};
use cairn_repo::forget::GroupPlan;
use cairn_repo::prune::{self, PruneOptions, PruneReport};
use cairn_repo::retention::Policy;
use clap::Args;
use std::time::Duration;

#[derive(Args)]
pub struct ForgetArgs {
    /// VMs (by name at any time, or UUID) and image names to apply the policy to (default: all);
    /// or NAME@POINT to remove exactly those points (no --keep-* then)
    #[arg(value_name = "NAME|UUID|NAME@POINT")]
    pub select: Vec<String>,
    /// Keep the N newest points
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest point of each of the N newest hours that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest point of each of the N newest days that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest point of each of the N newest ISO weeks (Monday to Sunday) that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest point of each of the N newest months that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest point of each of the N newest years that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Keep every point taken within this long before now (e.g. 36h, 14days, 6months)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_within: Option<Duration>,
    /// Show what would be kept and removed; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Then prune (with its defaults, or the options below)
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub prune_opts: PruneArgs,
}

#[derive(Args)]
pub struct PruneArgs {
    /// Repack a pack when more than this share of its bytes is unused
    #[arg(long, value_name = "PERCENT", default_value_t = 5.0, value_parser = parse_share)]
    pub max_unused: f64,
    /// How long a pack stays marked before it may be deleted (e.g. 23h, 0s when nothing else
    /// uses the repository)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "23h")]
    pub grace: Duration,
    /// Threads repacking at once (default: one per core, at most 4); fewer leave cores to
    /// the backups that run meanwhile
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
}

#[derive(Args)]
pub struct ProtectArgs {
    /// NAME[@POINT] (POINT: an ID prefix or a time prefix; default: the newest)
    pub point: String,
    /// Remove the protection instead
    #[arg(long)]
    pub unprotect: bool,
}

fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 36h, 14days, 2weeks, 6months)"))
}

pub fn forget(g: &Global, a: &ForgetArgs) -> Result<i32> {
    let policy = Policy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
        keep_within: a.keep_within,
    };
    if a.dry_run && a.prune {
        bail!("--dry-run and --prune together: run `cairn prune --dry-run` to see what a prune would reclaim");
    }
    let req = ForgetRequest {
        select: a.select.clone(),
        policy: policy.clone(),
        dry_run: a.dry_run,
        lock_wait: Duration::from_secs(g.lock_wait),
    };
    // Refused before the repository is opened (no password asked for a request that cannot run).
    cairn_ops::maintenance::check_forget(&req)?;
    let repo = open_repo(g)?;
    let ForgetOutcome { plan, removes: removed, done: outcome } = cairn_ops::maintenance::forget(&repo, &req)?;
    if g.json {
        let mut v =
            serde_json::json!({"policy": policy.describe(), "dry_run": a.dry_run, "groups": plan, "removes": removed});
        if let Some(o) = &outcome {
            v["removed"] = serde_json::to_value(o)?;
        }
        if !a.prune {
            print_json(&v);
            return Ok(0);
        }
        let report = run_prune(g, &a.prune_opts, false)?;
        v["prune"] = serde_json::to_value(&report)?;
        print_json(&v);
        return Ok(0);
    }
    print_plan(&plan, &policy);
    match &outcome {
        None => println!("dry run: {removed} point(s) would be removed; nothing changed"),
        Some(o) => {
            println!("removed {} point(s)", o.points.len());
            for id in &o.protected_meanwhile {
                println!("kept {}: protected while forget ran", id.short());
            }
            for l in &o.locked {
                println!(
                    "pending {}: locked by the store until {} (immutability); a later forget removes it",
                    l.id.short(),
                    l.until_rfc3339
                );
            }
            if o.records > 0 {
                println!("removed {} catalog record(s) about them (boot verifications)", o.records);
            }
            if removed > 0 && !a.prune {
                println!("their data stays until `cairn prune` reclaims it");
            }
        }
    }
    if a.prune {
        let report = run_prune(g, &a.prune_opts, false)?;
        print_prune(&report);
    }
    Ok(0)
}

fn print_plan(plan: &[GroupPlan], policy: &Policy) {
    if policy.is_empty() {
        println!("removing the points named");
    } else {
        println!("policy: {}", policy.describe());
    }
    for grp in plan {
        let kept = grp.points.iter().filter(|p| p.kept_by.is_some()).count();
        if policy.is_empty() {
            println!("\n{} ({}):", grp.name, grp.group);
        } else {
            println!("\n{} ({}): keep {kept} of {}", grp.name, grp.group, grp.points.len());
        }
        for p in &grp.points {
            let what = match p.kept_by {
                Some(r) => format!("keep ({r})"),
                None => "remove".to_string(),
            };
            let renamed = if p.name != grp.name { format!("  [as {}]", p.name) } else { String::new() };
            println!("  {}  {:<24}  {what}{renamed}", p.id.short(), p.time);
        }
        if grp.newest_removed && grp.group.starts_with("vm:") {
            println!("  note: the newest point goes: the next backup of this VM reads every disk in full");
        }
    }
}

pub fn prune_cmd(g: &Global, a: &PruneArgs, dry_run: bool) -> Result<i32> {
    let report = run_prune(g, a, dry_run)?;
    if g.json {
        print_json(&report);
    } else {
        print_prune(&report);
    }
    Ok(0)
}

fn run_prune(g: &Global, a: &PruneArgs, dry_run: bool) -> Result<PruneReport> {
    let repo = open_repo(g)?;
    let opts = PruneOptions {
        max_unused: a.max_unused / 100.0,
        grace: a.grace,
        dry_run,
        lock_wait: Duration::from_secs(g.lock_wait),
        threads: a.threads,
    };
    let progress: Box<dyn Progress> = if g.json || g.quiet { Box::new(NoProgress) } else { Box::new(crate::bar(g)) };
    Ok(cairn_ops::maintenance::prune(&repo, &opts, progress.as_ref()).context("prune")?)
}

fn print_prune(r: &PruneReport) {
    let line = |what: &str, p: &prune::Packs| println!("  {what:<34} {:>7} packs  {:>11}", p.packs, bytes(p.bytes));
    println!(
        "{} restore point(s) reference {} distinct blocks ({} before compression)",
        r.points,
        r.referenced_blocks,
        bytes(r.referenced_raw_bytes)
    );
    line("stored", &r.stored);
    line("fully used", &r.used);
    line("partly used, kept", &r.partly_used);
    if r.partly_used_unused_bytes > 0 {
        println!("    (about {} unused in them, under the repack threshold)", bytes(r.partly_used_unused_bytes));
    }
    line(if r.dry_run { "to repack" } else { "repacked" }, &r.repacked);
    if !r.dry_run && r.repack_written.packs > 0 {
        line("written by the repack", &r.repack_written);
    }
    line("unindexed (left by killed backups)", &r.unindexed);
    line(if r.dry_run { "to mark for deletion" } else { "newly marked for deletion" }, &r.newly_marked);
    line("marks taken back (used again)", &r.recovered);
    line(if r.dry_run { "deletable now" } else { "deleted" }, &r.deleted);
    if r.locked.packs > 0 {
        line("locked by the store, kept", &r.locked);
    }
    let pending_bytes: u64 = r.pending.iter().map(|p| p.bytes).sum();
    if !r.pending.is_empty() {
        println!(
            "  {:<34} {:>7} packs  {:>11}",
            "pending (a later prune deletes them)",
            r.pending.len(),
            bytes(pending_bytes)
        );
        let mut reasons: Vec<&str> = r.pending.iter().map(|p| p.reason.as_str()).collect();
        reasons.sort();
        reasons.dedup();
        for why in reasons.iter().take(5) {
            println!("    {why}");
        }
    }
    if r.damaged_only_blocks > 0 {
        println!(
            "warning: {} referenced block(s) exist only as damaged copies; their packs are kept (run `cairn verify`)",
            r.damaged_only_blocks
        );
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    if r.dry_run {
        println!("dry run: nothing changed");
    }
}

pub fn protect(g: &Global, a: &ProtectArgs) -> Result<i32> {
    let repo = open_repo(g)?;
    let (id, point, changed) =
        cairn_ops::maintenance::protect(&repo, &a.point, !a.unprotect, Duration::from_secs(g.lock_wait))?;
    let state = if a.unprotect { "unprotected" } else { "protected" };
    if g.json {
        print_json(
            &serde_json::json!({"point": id, "name": point.name, "time": point.time, "protected": !a.unprotect, "changed": changed}),
        );
    } else if changed {
        println!("restore point {} of {} ({}) is now {state}", id.short(), point.name, point.time);
    } else {
        println!("restore point {} of {} ({}) was already {state}", id.short(), point.name, point.time);
    }
    Ok(0)
}

pub fn stats(g: &Global, names: &[String]) -> Result<i32> {
    let repo = open_repo(g)?;
    let s = cairn_ops::maintenance::stats(&repo, names, Duration::from_secs(g.lock_wait))?;
    if g.json {
        print_json(&s);
        return Ok(0);
    }
    let ratio = |a: u64, b: u64| if b == 0 { "-".to_string() } else { format!("{:.2}x", a as f64 / b as f64) };
    println!(
        "{} restore point(s){}",
        s.points,
        if names.is_empty() { String::new() } else { format!(" of {}", names.join(", ")) }
    );
    println!("  logical size (sum of their disks)   {:>11}", bytes(s.logical_bytes));
    println!("  distinct data blocks, uncompressed  {:>11}  ({} blocks)", bytes(s.unique_raw_bytes), s.unique_blocks);
    println!("  stored for them (compressed)        {:>11}", bytes(s.unique_stored_bytes));
    println!("  deduplication                       {:>11}", ratio(s.logical_nonzero_bytes, s.unique_raw_bytes));
    println!("  compression                         {:>11}", ratio(s.unique_raw_bytes, s.unique_stored_bytes));
    println!("repository");
    println!(
        "  packs                               {:>11}  ({} packs)",
        bytes(s.repository.stored.bytes),
        s.repository.stored.packs
    );
    println!(
        "  a prune would reclaim               {:>11}  (unused packs; more from repacking {} packs)",
        bytes(s.reclaimable_bytes),
        s.repository.repacked.packs
    );
    Ok(0)
}
