//! Kills of `cairn copy`.
//!
//! The harness's repository (encrypted, two points of `a`: two different images) is the
//! source. Each kill starts from a fresh target made with `init --copy-from` (encrypted, as a
//! copy of an encrypted source must be, with its own password) that holds nothing or, in half
//! the random kills, a copy of the first point; then `cairn copy --from SOURCE --to TARGET a --json` (both points) is killed, at a
//! crash point or a random moment. Planned kills start from an empty target, as the dry run
//! that planned them.
//!
//! After each kill:
//! 1. the target opens and every point it lists can be read;
//! 2. every point in it is a copy of a source point (`metadata.copied_from.point`), of each at
//!    most one, and it restores exactly to that point's image (no point without its data); a
//!    copy the target held before is still there, and a copy that finished left both;
//! 3. `verify` on the target passes (packs the killed run left unindexed are allowed);
//! 4. a clean `cairn copy` succeeds and leaves exactly one copy of each source point and no
//!    other point, each restoring exactly;
//! 5. the source is unchanged (its files but its locks, its points) and no lock is left in
//!    either repository.

use super::{list_files, Harness};
use anyhow::{bail, Context, Result};
use cairn_repo::copy::copied_from;
use cairn_repo::Repository;
use cairn_storage::LocalBackend;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The target's password (the source's is the harness's).
const TARGET_PASSWORD: &str = "target";

/// `cairn copy` of both points of `a` from the harness's repository into `target`.
pub fn copy_args(source: &Path, target: &Path) -> Vec<String> {
    vec![
        "copy".into(),
        "--from".into(),
        source.display().to_string(),
        "--to".into(),
        target.display().to_string(),
        "a".into(),
        "--json".into(),
    ]
}

/// The files of a repository but its locks, with their bytes.
fn snapshot(repo: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for p in list_files(repo) {
        let rel = p.strip_prefix(repo)?.to_path_buf();
        if rel.starts_with("locks") {
            continue;
        }
        out.insert(rel, std::fs::read(&p)?);
    }
    Ok(out)
}

fn locks_in(repo: &Path) -> usize {
    list_files(&repo.join("locks"))
        .into_iter()
        .filter(|p| !p.file_name().unwrap_or_default().to_string_lossy().starts_with(".tmp-"))
        .count()
}

impl Harness {
    /// The target of the copies.
    pub(super) fn target(&self) -> PathBuf {
        self.dir.join("target")
    }

    /// cairn against the target (its password; the source's as the one to copy from).
    fn target_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(args);
        c.env("CAIRN_REPO", self.target());
        self.target_env(&mut c);
        c
    }

    /// The target's password in place of the source's.
    pub(super) fn target_env(&self, c: &mut Command) {
        c.env("CAIRN_PASSWORD", TARGET_PASSWORD);
    }

    fn target_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.target_cmd(args).output()?;
        if !o.status.success() {
            bail!("cairn {args:?} on the target failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// A fresh target made with `init --copy-from`, holding a copy of the source's first point
    /// with `with_first` (its ID in the target is returned).
    pub(super) fn prepare_target(&mut self, with_first: bool) -> Result<Option<String>> {
        let target = self.target();
        let _ = std::fs::remove_dir_all(&target);
        let source = self.repo.display().to_string();
        self.target_ok(&["init", "--copy-from", &source, "--encrypt"]).context("init --copy-from")?;
        if !with_first {
            return Ok(None);
        }
        let listed = self.json(&["points", "a"])?;
        let first = listed.as_array().and_then(|v| v.first()).context("the source lists no point")?["id"]
            .as_str()
            .context("a source point without ID")?
            .to_string();
        let spec = format!("a@{}", &first[..12]);
        let t = target.display().to_string();
        let out = self.target_ok(&["copy", "--from", &source, "--to", &t, &spec, "--json"])?;
        let v: Value = serde_json::from_str(&out).context("copy printed no JSON")?;
        let id = v["points"][0]["target_id"].as_str().context("the copy of the first point has no target ID")?;
        Ok(Some(id.to_string()))
    }

    /// The target's points: ID → the source point it is a copy of (None: none said).
    fn target_points(&self) -> Result<Vec<(String, Option<String>)>> {
        let repo = Repository::open(Arc::new(LocalBackend::new(self.target())), || Some(TARGET_PASSWORD.into()))
            .context("the target does not open")?;
        let listed = repo.list_points().context("the target's points cannot be listed")?;
        if let Some((id, why)) = listed.damaged.first() {
            bail!("point {} of the target cannot be read: {why}", &id[..8.min(id.len())]);
        }
        Ok(listed.points.iter().map(|(id, p)| (id.to_string(), copied_from(p).map(String::from))).collect())
    }

    /// Every point of the target is a copy of a source point, at most one of each, restoring
    /// exactly to its image; returns the source points copied.
    fn check_target_points(&self, when: &str) -> Result<Vec<String>> {
        let mut copied: Vec<String> = Vec::new();
        for (id, from) in self.target_points().with_context(|| when.to_string())? {
            let Some((src, img)) = from.as_ref().and_then(|f| self.points.get_key_value(f)) else {
                bail!("{when}: target point {} is a copy of no source point ({from:?})", &id[..8]);
            };
            if copied.contains(src) {
                bail!("{when}: two copies of source point {}", &src[..8]);
            }
            copied.push(src.clone());
            let out = self.dir.join("check-target.img");
            let _ = std::fs::remove_file(&out);
            let spec = format!("a@{}", &id[..12]);
            self.target_ok(&["restore", "image", &spec, "--to", out.to_str().unwrap(), "--force"])
                .with_context(|| format!("{when}: restoring target point {}", &id[..8]))?;
            let img = img.as_ref().context("a source point without its image")?;
            if !crate::workload::same_bytes(&out, img)? {
                bail!("{when}: target point {} restores to bytes that differ from its image", &id[..8]);
            }
            std::fs::remove_file(&out)?;
        }
        Ok(copied)
    }

    pub(super) fn one_copy_kill(&mut self, crash: Option<&str>, after: Option<Duration>) -> Result<()> {
        // Planned kills start as the dry run did: an empty target.
        let with_first = crash.is_none() && self.rng.below(2) == 0;
        let first = self.prepare_target(with_first)?;
        let before = snapshot(&self.repo)?;
        let source_points = self.listed()?;
        let args = copy_args(&self.repo, &self.target());
        let ended = self.run_cairn(&args, crash, after)?;
        self.count_end(&ended, crash);
        let context = format!(
            "copy into a target holding {} killed at {}",
            if with_first { "the first point" } else { "nothing" },
            crash.map(String::from).unwrap_or_else(|| format!(
                "{:?} ({})",
                after.unwrap_or_default(),
                ended.last_point
            ))
        );
        if !ended.killed && !ended.success {
            bail!("{context}: copy failed without a kill: {}", ended.stderr.trim());
        }
        // 1, 2. The target opens; its points are copies restoring exactly.
        let copied = self.check_target_points(&format!("{context}, after the kill"))?;
        if let Some(first) = &first {
            if !self.target_points()?.iter().any(|(id, _)| id == first) {
                bail!("{context}: the copy the target held before is gone");
            }
        }
        if ended.success && copied.len() != self.points.len() {
            bail!("{context}: the copy finished but the target holds {} of {} points", copied.len(), self.points.len());
        }
        // 3. verify on the target passes.
        let o = self.target_cmd(&["verify", "--json"]).output()?;
        if !o.status.success() {
            bail!("{context}: verify on the target after the kill: {}", String::from_utf8_lossy(&o.stdout));
        }
        let v: Value = serde_json::from_slice(&o.stdout).context("verify printed no JSON")?;
        let target = self.target();
        let unindexed: u64 = v["unindexed_packs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .filter_map(|p| std::fs::metadata(target.join("packs").join(&p[..2]).join(p)).ok())
            .map(|m| m.len())
            .sum();
        let (_, tmp_bytes) = crate::workload::temporaries(&target);
        self.summary.leaked_bytes_max = self.summary.leaked_bytes_max.max(unindexed + tmp_bytes);
        // 4. A clean copy completes: one copy of each source point, each restoring exactly.
        let out = self.target_ok(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())?;
        let v: Value = serde_json::from_str(&out).context("the next copy printed no JSON")?;
        if v["points"].as_array().map(|p| p.len()) != Some(self.points.len()) {
            bail!("{context}: the next copy reported {} point(s)", v["points"]);
        }
        let copied = self.check_target_points(&format!("{context}, after the next copy"))?;
        let listed = self.target_points()?.len();
        if copied.len() != self.points.len() || listed != self.points.len() {
            bail!(
                "{context}: after the next copy the target holds {listed} point(s), copies of {} of {} source points",
                copied.len(),
                self.points.len()
            );
        }
        // 5. The source is unchanged; no lock is left.
        if snapshot(&self.repo)? != before {
            bail!("{context}: the source's files changed");
        }
        if self.listed()? != source_points {
            bail!("{context}: the source's points changed");
        }
        let (s, t) = (locks_in(&self.repo), locks_in(&target));
        if s + t > 0 {
            bail!("{context}: {s} lock file(s) left in the source, {t} in the target after the next copy");
        }
        Ok(())
    }
}
