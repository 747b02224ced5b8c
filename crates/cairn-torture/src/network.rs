//! The network harness: the real `cairn` binary against a real S3 server (s3s-fs on loopback)
//! through a proxy that fails requests the ways object stores and networks do
//! ([`cairn_storage::test_servers::FlakyProxy`]): 503 SlowDown, 500, 429 and 503 with
//! Retry-After, connections dropped before an answer, answers torn half way, requests the
//! server acted on whose answer never comes (a stall, then the connection closes), and torn
//! uploads (the server gets part of a PUT's body, the client a cut connection; the first
//! upload over 1 MiB of each run, a pack's, is always torn).
//!
//! Each seed has a repository (odd seeds encrypted, even plain) on which the operations run
//! in turn: init, backup, backup of a changed image (changed ranges), restore and verify;
//! and, in parallel, two more: one for prune with no grace (made cleanly with the same two
//! backups, then a third point and a forget, so that the prune deletes and repacks), and the
//! target of a copy from a local repository (made cleanly with `init --copy-from`). Each
//! operation runs through its own proxy, one request in `--one-in` failed. After each run,
//! through a direct connection (no proxy, a fresh cache):
//!
//! 1. the run succeeded, or failed with exit status 1 and a message naming the store; it
//!    never panicked, never hung, never claimed damage (verify) that is not there;
//! 2. every object under keys/, packs/, index/, points/ and catalog/ hashes to its name:
//!    nothing partial or torn was stored;
//! 3. `cairn verify --json` finds nothing wrong (no damage, nothing quarantined or released);
//! 4. every restore point known before is listed; a new one appeared only from a backup (or
//!    a copy), at most one, and a run that succeeded made it; every point listed restores byte
//!    for byte to its image; a restore that failed left no image, one that succeeded wrote
//!    exactly its point's bytes;
//! 5. no lock is left by a run that succeeded (locks a failed run left are counted, then
//!    removed so that the next operation can run);
//! 6. copy: each point of the target is a copy of a source point and restores exactly to its
//!    image, no point is copied twice, a copy that succeeded copied every point, and after a
//!    failed one a clean copy completes it; the source is unchanged and no lock is left in it;
//! 7. prune: a clean prune after the faulty one succeeds and leaves the checks above true.
//!
//! An operation that failed is run again through the direct connection when the next ones
//! need what it makes (a repository, its points).

use crate::workload::{self, same_bytes, BLOCK, MIB};
use anyhow::{bail, Context, Result};
use cairn_repo::copy::copied_from;
use cairn_repo::Repository;
use cairn_storage::test_servers::{FlakyProxy, Flavor, ProxyConfig, ProxyFault, TestServer};
use cairn_storage::{Backend, Kind, LocalBackend};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OPS: [&str; 7] = ["init", "backup", "backup-changed", "restore", "verify", "copy", "prune"];
const PASSWORD: &str = "torture";
/// What the checks after the clean prune (copy) that follows a faulty one are labelled.
const PRUNE_AFTER: &str = "the clean prune after";
const COPY_AFTER: &str = "the clean copy after a failed one";

#[derive(clap::Args)]
pub struct NetworkArgs {
    /// Operations (default: all): init, backup, backup-changed, restore, verify, copy, prune.
    /// Those not named but needed by a later one run through a clean connection
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
    /// Seeds (repositories) to run, from --first-seed: each runs every operation once
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// One request in this many is failed
    #[arg(long, default_value_t = 5)]
    one_in: u64,
    /// Faults to inject (default: all): slow_down_503, internal_error_500, dropped,
    /// torn_response, stall, too_many_requests_429, slow_down_503_retry_after, torn_upload
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// How long a stalled request goes unanswered before the proxy closes its connection
    /// (a closed connection, unless the client's own timeout, --client-timeout-ms, ends the
    /// request first)
    #[arg(long, default_value_t = 500)]
    stall_ms: u64,
    /// cairn's request timeout (CAIRN_REQUEST_TIMEOUT; 300 s when not given): shorter than
    /// --stall-ms, stalled requests end in the client's timeout and its retry
    #[arg(long)]
    client_timeout_ms: Option<u64>,
    /// Chains run in parallel (a seed has three: its repository's, its prune's, its copy's)
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Size of the backed-up images, in MiB (a multiple of 8)
    #[arg(long, default_value_t = 8)]
    image_mib: u64,
    /// A run taking longer than this is a violation (hung), in seconds
    #[arg(long, default_value_t = 300)]
    op_timeout: u64,
    /// The cairn binary (default: `cairn` next to this program)
    #[arg(long)]
    cairn: Option<PathBuf>,
    /// Keep the work folder (printed), with a copy of each repository where an invariant
    /// was violated (`violation-seed<N>-<op>`, a local repository) and the run's stderr
    #[arg(long)]
    keep: bool,
}

#[derive(Default, Serialize)]
pub struct Summary {
    pub harness: &'static str,
    pub op: String,
    pub one_in: u64,
    pub runs: u64,
    /// Requests through the proxy (forwarded whole, and failed).
    pub requests: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    pub faults_total: u64,
    pub succeeded: u64,
    pub failed_cleanly: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failure_examples: Vec<String>,
    /// Runs with at least one invariant violated.
    pub violations: u64,
    /// The violations found, by what they say (point and object names left out).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub violation_kinds: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violation_examples: Vec<String>,
    /// Objects read back and hashed against their names after the runs.
    pub objects_checked: u64,
    /// Lock files failed runs left behind.
    pub locks_left: u64,
    /// Packs no index lists after a run (a failed backup's uploads; a later gc reclaims them).
    pub unindexed_packs_max: u64,
    /// Torn uploads the server answered with a success (a server that stores short bodies).
    pub torn_uploads_accepted: u64,
    /// Retries of requests answered with Retry-After: after it had passed, and sooner.
    pub retry_after_honored: u64,
    pub retry_after_early: u64,
    /// The longest run of the operation (without its checks).
    pub run_s_max: f64,
    /// The time its runs and their checks took, summed over the seeds (which run in parallel).
    pub duration_s: f64,
}

/// What the proxy counted during one run.
#[derive(Default)]
struct ProxyFigures {
    faults: Vec<(ProxyFault, u64)>,
    forwarded: u64,
    torn_uploads_accepted: u64,
    retry_after: (u64, u64),
}

impl ProxyFigures {
    fn of(p: &FlakyProxy) -> ProxyFigures {
        ProxyFigures {
            faults: p.injected_by_kind(),
            forwarded: p.forwarded.load(std::sync::atomic::Ordering::Relaxed),
            torn_uploads_accepted: p.torn_uploads_accepted(),
            retry_after: p.retry_after_retries(),
        }
    }

    fn described(&self) -> String {
        let f: Vec<String> =
            self.faults.iter().filter(|(_, n)| *n > 0).map(|(k, n)| format!("{} {n}", k.name())).collect();
        if f.is_empty() {
            "no fault".into()
        } else {
            f.join(", ")
        }
    }
}

/// One run of one operation and what its checks found.
#[derive(Default)]
struct Record {
    op: &'static str,
    seed: u64,
    succeeded: bool,
    failure: Option<String>,
    violations: Vec<String>,
    proxy: ProxyFigures,
    objects_checked: u64,
    locks_left: u64,
    unindexed_packs: u64,
    run_s: f64,
    total_s: f64,
}

/// How one cairn process ended.
struct Outcome {
    code: Option<i32>,
    /// The signal that ended the process, if one did.
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    secs: f64,
    timed_out: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.stdout).ok()
    }
}

/// A local repository a copy reads from: its points and their images.
struct Source {
    dir: PathBuf,
    points: Vec<(String, PathBuf)>,
}

struct Harness {
    cairn: PathBuf,
    server: TestServer,
    dir: PathBuf,
    ops: Vec<&'static str>,
    one_in: u64,
    faults: Vec<ProxyFault>,
    stall: Duration,
    client_timeout: Option<Duration>,
    op_timeout: Duration,
    keep: bool,
    img_a: PathBuf,
    img_a2: PathBuf,
    ranges_a2: PathBuf,
    img_q: PathBuf,
    /// Plain, encrypted.
    sources: [Source; 2],
}

pub fn run(a: &NetworkArgs) -> Result<Vec<Summary>> {
    let mut ops = Vec::new();
    for op in &a.ops {
        ops.push(
            *OPS.iter()
                .find(|o| **o == op)
                .with_context(|| format!("unknown operation {op:?} (known: {})", OPS.join(", ")))?,
        );
    }
    if ops.is_empty() {
        ops = OPS.to_vec();
    }
    ops.sort_by_key(|o| OPS.iter().position(|k| k == o));
    ops.dedup();
    let mut faults = Vec::new();
    for f in &a.faults {
        faults.push(ProxyFault::parse(f).with_context(|| {
            format!("unknown fault {f:?} (known: {})", ProxyFault::ALL.map(|f| f.name()).join(", "))
        })?);
    }
    if faults.is_empty() {
        faults = ProxyFault::ALL.to_vec();
    }
    if a.one_in == 0 || a.image_mib == 0 || !a.image_mib.is_multiple_of(8) {
        bail!("--one-in must be at least 1 and --image-mib a multiple of 8");
    }
    let cairn = match &a.cairn {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("cairn"),
    };
    if !cairn.exists() {
        bail!("{} not found: build it first (cargo build -p cairn-cli)", cairn.display());
    }
    // A missing server skips, unless CAIRN_TEST_REQUIRE_SERVERS=1 (then `start` panics, and
    // its message is the error; the one thread so far, so the hook is ours to swap).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(|| TestServer::start(Flavor::S3sFs));
    std::panic::set_hook(hook);
    let server = match started {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("network: SKIPPED, s3s-fs is not installed (scripts/setup.sh installs it)");
            return Ok(Vec::new());
        }
        Err(p) => bail!(
            "{}",
            p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        ),
    };
    let tmp = tempfile::Builder::new().prefix("cairn-network-").tempdir()?;
    let started = Instant::now();
    let h = Harness::new(a, cairn, server, tmp.path(), ops, faults)?;
    // Each seed's prune (on a repository of its own) and copy (into a target of its own) run
    // beside the chain of its repository: the longest first, the copies as workers come free.
    let seeds: Vec<u64> = (a.first_seed..a.first_seed + a.seeds).collect();
    let mut tasks: Vec<(u64, Part)> = Vec::new();
    for part in [Part::Prune, Part::Repo, Part::Copy] {
        if h.ops.iter().any(|o| Part::of(o) == part) {
            tasks.extend(seeds.iter().map(|&s| (s, part)));
        }
    }
    tasks.reverse();
    let tasks = Mutex::new(tasks);
    let records: Mutex<Vec<Record>> = Mutex::new(Vec::new());
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..a.jobs.max(1) {
            scope.spawn(|| loop {
                let Some((seed, part)) = tasks.lock().unwrap().pop() else { break };
                let mut chain = match Chain::new(&h, seed, part) {
                    Ok(c) => c,
                    Err(e) => {
                        errors.lock().unwrap().push(format!("seed {seed}: {e:#}"));
                        continue;
                    }
                };
                // A chain that cannot go on (a clean run failing after a faulty one, a check
                // that cannot read the store) is a violation of the operation it was at.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chain.run()));
                let stopped = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(p) => Some(format!(
                        "the harness panicked: {}",
                        p.downcast_ref::<String>()
                            .cloned()
                            .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    )),
                };
                if let Some(e) = stopped {
                    let op = chain.current;
                    let violations = vec![format!("the chain stopped at {op}: {e}")];
                    chain.records.push(Record { op, seed, violations, ..Default::default() });
                }
                records.lock().unwrap().extend(std::mem::take(&mut chain.records));
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        bail!("the harness itself failed (not an invariant of cairn): {}", errors.join("; "));
    }
    let mut out = Vec::new();
    let records = records.into_inner().unwrap();
    for op in &h.ops {
        let mut s = Summary { harness: "network", op: op.to_string(), one_in: a.one_in, ..Default::default() };
        for k in &h.faults {
            s.faults.insert(k.name().to_string(), 0);
        }
        let mut mine: Vec<&Record> = records.iter().filter(|r| r.op == *op).collect();
        mine.sort_by_key(|r| r.seed);
        for r in mine {
            s.runs += 1;
            for (k, n) in &r.proxy.faults {
                if *n > 0 {
                    *s.faults.entry(k.name().to_string()).or_default() += n;
                    s.faults_total += n;
                    s.requests += n;
                }
            }
            s.requests += r.proxy.forwarded;
            if r.succeeded {
                s.succeeded += 1;
            } else if let Some(f) = &r.failure {
                s.failed_cleanly += 1;
                if s.failure_examples.len() < 3 {
                    s.failure_examples.push(format!("seed {} ({}): {f}", r.seed, r.proxy.described()));
                }
            }
            for v in &r.violations {
                *s.violation_kinds.entry(violation_kind(v)).or_default() += 1;
            }
            if !r.violations.is_empty() {
                s.violations += 1;
                if s.violation_examples.len() < 10 {
                    // The operations of its chain up to it, through the proxy as in this run.
                    let at = OPS.iter().position(|o| o == op).unwrap();
                    let replay: Vec<&str> = OPS[..=at]
                        .iter()
                        .copied()
                        .filter(|o| h.ops.contains(o) && Part::of(o) == Part::of(op))
                        .collect();
                    s.violation_examples.push(format!(
                        "seed {} ({}; replay: --ops {} --first-seed {} --seeds 1, other options as here): {}",
                        r.seed,
                        r.proxy.described(),
                        replay.join(","),
                        r.seed,
                        r.violations.join("; ")
                    ));
                }
            }
            s.objects_checked += r.objects_checked;
            s.locks_left += r.locks_left;
            s.unindexed_packs_max = s.unindexed_packs_max.max(r.unindexed_packs);
            s.torn_uploads_accepted += r.proxy.torn_uploads_accepted;
            s.retry_after_honored += r.proxy.retry_after.0;
            s.retry_after_early += r.proxy.retry_after.1;
            s.run_s_max = s.run_s_max.max(r.run_s);
            s.duration_s += r.total_s;
        }
        s.run_s_max = (s.run_s_max * 10.0).round() / 10.0;
        s.duration_s = (s.duration_s * 10.0).round() / 10.0;
        out.push(s);
    }
    eprintln!("network: {} seed(s) in {:.1} s", a.seeds, started.elapsed().as_secs_f64());
    if a.keep {
        eprintln!("kept {}", tmp.keep().display());
    }
    Ok(out)
}

impl Harness {
    fn new(
        a: &NetworkArgs,
        cairn: PathBuf,
        server: TestServer,
        dir: &Path,
        ops: Vec<&'static str>,
        faults: Vec<ProxyFault>,
    ) -> Result<Harness> {
        let size = a.image_mib * MIB;
        let img_a = dir.join("a.img");
        let img_a2 = dir.join("a2.img");
        let ranges_a2 = dir.join("a2.ranges");
        let img_q = dir.join("q.img");
        workload::make_image_sized(&img_a, size, 1)?;
        // Scattered writes over a tenth of the image: a changed-ranges backup, and packs a
        // prune repacks once the first point is forgotten.
        let ranges = workload::mutate_sized(&img_a, &img_a2, size, size / BLOCK / 10, 2)?;
        std::fs::write(&ranges_a2, ranges)?;
        workload::make_image_sized(&img_q, size, 3)?;
        let mut h = Harness {
            cairn,
            server,
            dir: dir.to_path_buf(),
            ops,
            one_in: a.one_in,
            faults,
            stall: Duration::from_millis(a.stall_ms),
            client_timeout: a.client_timeout_ms.map(Duration::from_millis),
            op_timeout: Duration::from_secs(a.op_timeout),
            keep: a.keep,
            img_a,
            img_a2,
            ranges_a2,
            img_q,
            sources: [Source { dir: PathBuf::new(), points: vec![] }, Source { dir: PathBuf::new(), points: vec![] }],
        };
        // The sources of the copies: the two images as points of "a", plain and encrypted.
        for encrypted in [false, true] {
            let src = dir.join(if encrypted { "source-encrypted" } else { "source-plain" });
            let local = |args: &[&str]| -> Result<Outcome> {
                let o = h.cairn_cmd(src.to_str().unwrap(), None, &dir.join("cache"), encrypted, args)?;
                if !o.ok() {
                    bail!("cairn {args:?} on the local source failed: {}", o.stderr.trim());
                }
                Ok(o)
            };
            local(if encrypted { &["init", "--encrypt"] } else { &["init"] })?;
            let mut points = Vec::new();
            let a1 = local(&["backup", "image", h.img_a.to_str().unwrap(), "--name", "a", "--json"])?;
            points.push((point_id(&a1)?, h.img_a.clone()));
            let a2 = local(&[
                "backup",
                "image",
                h.img_a2.to_str().unwrap(),
                "--name",
                "a",
                "--changed-ranges",
                h.ranges_a2.to_str().unwrap(),
                "--json",
            ])?;
            points.push((point_id(&a2)?, h.img_a2.clone()));
            h.sources[encrypted as usize] = Source { dir: src, points };
        }
        Ok(h)
    }

    /// Runs cairn on `repo` (through `endpoint`, the proxy's, or straight to the server),
    /// with `cache` as its cache folder; kills it after the operation timeout.
    fn cairn_cmd(
        &self,
        repo: &str,
        endpoint: Option<&str>,
        cache: &Path,
        encrypted: bool,
        args: &[&str],
    ) -> Result<Outcome> {
        let mut c = Command::new(&self.cairn);
        c.args(args).env("CAIRN_REPO", repo).env("CAIRN_CACHE_DIR", cache).env("CAIRN_CONFIG", "/dev/null");
        for v in [
            "CAIRN_PASSWORD",
            "CAIRN_FROM_PASSWORD",
            "CAIRN_CRASH_AT",
            "CAIRN_CRASH_TRACE",
            "CAIRN_LIMIT_UPLOAD",
            "CAIRN_REQUEST_TIMEOUT",
            "CAIRN_S3_CONDITIONAL_PUT",
            "CAIRN_S3_VIRTUAL_HOSTED",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT",
            "AWS_SESSION_TOKEN",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
        ] {
            c.env_remove(v);
        }
        for (k, v) in self.server.env() {
            c.env(k, v);
        }
        if let Some(e) = endpoint {
            c.env("AWS_ENDPOINT_URL", e);
        }
        if let Some(t) = self.client_timeout {
            c.env("CAIRN_REQUEST_TIMEOUT", format!("{}ms", t.as_millis()));
        }
        if encrypted {
            c.env("CAIRN_PASSWORD", PASSWORD).env("CAIRN_FROM_PASSWORD", PASSWORD);
        }
        // Output to files: a process killed on timeout cannot block on a full pipe.
        let out = tempfile::NamedTempFile::new_in(&self.dir)?;
        let err = tempfile::NamedTempFile::new_in(&self.dir)?;
        c.stdin(Stdio::null()).stdout(out.reopen()?).stderr(err.reopen()?);
        let t = Instant::now();
        let mut child = c.spawn().with_context(|| format!("starting {}", self.cairn.display()))?;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if t.elapsed() > self.op_timeout {
                timed_out = true;
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Outcome {
            code: status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&status),
            stdout: std::fs::read_to_string(out.path()).unwrap_or_default(),
            stderr: std::fs::read_to_string(err.path()).unwrap_or_default(),
            secs: t.elapsed().as_secs_f64(),
            timed_out,
        })
    }
}

fn point_id(o: &Outcome) -> Result<String> {
    o.json().and_then(|v| v["id"].as_str().map(String::from)).context("the backup printed no point id")
}

/// One seed: a repository (and a copy target) on which the operations run in turn.
struct Chain<'h> {
    h: &'h Harness,
    seed: u64,
    encrypted: bool,
    dir: PathBuf,
    url: String,
    copy_url: String,
    /// The cache of the runs through the proxy (this host's, kept from run to run).
    cache: PathBuf,
    /// This seed's copy of the source of its copies.
    source: PathBuf,
    /// The points the repository holds: ID -> (name, image).
    points: BTreeMap<String, (String, PathBuf)>,
    /// The image of the newest point of "a" (what `restore image a` restores).
    latest_a: Option<PathBuf>,
    part: Part,
    /// The selected operation being run, checked or prepared for.
    current: &'static str,
    /// The chain cannot go on (a clean run failed after a faulty one: a violation recorded).
    stopped: bool,
    records: Vec<Record>,
}

/// The chains a seed runs in parallel, each on a repository of its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// init, backup, backup-changed, restore, verify.
    Repo,
    /// prune (after init and backups made cleanly).
    Prune,
    /// copy (into a target made cleanly).
    Copy,
}

impl Part {
    fn of(op: &str) -> Part {
        match op {
            "prune" => Part::Prune,
            "copy" => Part::Copy,
            _ => Part::Repo,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Repo => "repo",
            Part::Prune => "prune",
            Part::Copy => "copy",
        }
    }
}

impl<'h> Chain<'h> {
    /// One of `seed`'s chains.
    fn new(h: &'h Harness, seed: u64, part: Part) -> Result<Chain<'h>> {
        let dir = h.dir.join(format!("seed{seed}-{}", part.name()));
        std::fs::create_dir_all(&dir)?;
        let bucket = format!("net-{seed}");
        let url = h.server.bucket(&bucket, part.name());
        let copy_url = h.server.bucket(&bucket, "copy");
        let encrypted = seed % 2 == 1;
        let source = dir.join("source");
        if part == Part::Copy {
            workload::copy_tree(&h.sources[encrypted as usize].dir, &source)?;
        }
        Ok(Chain {
            h,
            seed,
            encrypted,
            cache: dir.join("cache"),
            dir,
            url,
            copy_url,
            source,
            points: BTreeMap::new(),
            latest_a: None,
            part,
            stopped: false,
            current: OPS.iter().copied().find(|o| h.ops.contains(o) && Part::of(o) == part).unwrap_or("init"),
            records: Vec::new(),
        })
    }

    /// A backup's new point of "a", of `image`.
    fn add_point(&mut self, id: String, image: &Path) {
        self.points.insert(id, ("a".into(), image.to_path_buf()));
        self.latest_a = Some(image.to_path_buf());
    }

    /// Whether `op` runs through the proxy in this chain.
    fn selected(&self, op: &str) -> bool {
        self.h.ops.contains(&op) && Part::of(op) == self.part
    }

    /// Whether an operation of the repository's chain must run (faulty if selected, else
    /// cleanly): it or a later one is selected.
    fn needed(&self, op: &str) -> bool {
        let at = OPS.iter().position(|o| *o == op).unwrap();
        OPS[at..].iter().any(|o| self.selected(o))
    }

    fn run(&mut self) -> Result<()> {
        let h = self.h;
        if self.part == Part::Copy {
            return self.copy_step();
        }
        if self.needed("init") {
            let init: &[&str] = if self.encrypted { &["init", "--encrypt", "--json"] } else { &["init", "--json"] };
            self.step("init", init, None)?;
            if self.stopped {
                return Ok(());
            }
        }
        if self.needed("backup") {
            let img = h.img_a.to_str().unwrap();
            self.step("backup", &["backup", "image", img, "--name", "a", "--json"], Some(&h.img_a))?;
            if self.stopped {
                return Ok(());
            }
        }
        if self.needed("backup-changed") {
            let (img, ranges) = (h.img_a2.to_str().unwrap(), h.ranges_a2.to_str().unwrap());
            let args = ["backup", "image", img, "--name", "a", "--changed-ranges", ranges, "--json"];
            self.step("backup-changed", &args, Some(&h.img_a2))?;
            if self.stopped {
                return Ok(());
            }
        }
        if self.selected("restore") {
            let out = self.dir.join("restored.img");
            let args = ["restore", "image", "a", "--to", out.to_str().unwrap(), "--force", "--json"];
            self.step("restore", &args, None)?;
        }
        if self.selected("verify") {
            self.step("verify", &["verify", "--json"], None)?;
        }
        if self.selected("prune") {
            self.current = "prune";
            // Work for the prune: Q's packs unused, the first point of A's partly (A' has
            // overwritten a tenth of it).
            let q = self
                .clean(&self.url.clone(), &["backup", "image", h.img_q.to_str().unwrap(), "--name", "q", "--json"])?;
            let id_q = point_id(&q)?;
            let id_a = self.points.iter().find(|(_, (_, img))| *img == h.img_a).map(|(id, _)| id.clone());
            let mut forget = vec![format!("q@{}", &id_q[..12])];
            forget.extend(id_a.iter().map(|id| format!("a@{}", &id[..12])));
            let mut args: Vec<&str> = vec!["forget", "--json"];
            args.extend(forget.iter().map(|s| s.as_str()));
            self.clean(&self.url.clone(), &args)?;
            if let Some(id) = id_a {
                self.points.remove(&id);
            }
            self.step("prune", &["prune", "--grace", "0s", "--json"], None)?;
        }
        Ok(())
    }

    /// Runs `op` through a new proxy (if selected; else cleanly), checks the repository, and
    /// runs it again cleanly if it failed and later operations need what it makes.
    fn step(&mut self, op: &'static str, args: &[&str], image: Option<&Path>) -> Result<()> {
        if self.selected(op) {
            self.current = op;
        }
        let url = self.url.clone();
        if !self.selected(op) {
            let o = self.clean(&url, args)?;
            if let Some(img) = image {
                self.add_point(point_id(&o)?, img);
            }
            return Ok(());
        }
        let started = Instant::now();
        let mut r = Record { op, seed: self.seed, ..Default::default() };
        let restored = self.dir.join("restored.img");
        let _ = std::fs::remove_file(&restored);
        let (o, figures) = self.through_proxy(op, &url, args)?;
        r.proxy = figures;
        r.run_s = o.secs;
        self.judge(&o, &mut r);
        if op == "verify" && o.code == Some(3) {
            r.violations.push(format!("verify through the flaky store reported damage: {}", short(&o.stdout, 400)));
        }
        if op == "restore" {
            let partial = self.dir.join("restored.img.cairn-partial");
            let oracle = self.latest_a.clone();
            if r.succeeded {
                match oracle {
                    Some(img) if restored.exists() && same_bytes(&restored, &img)? => {}
                    _ => r.violations.push("restore succeeded with bytes that differ from the point's image".into()),
                }
            } else if restored.exists() || partial.exists() {
                r.violations.push("a failed restore left its image (or its partial file) behind".into());
            }
            let _ = std::fs::remove_file(&restored);
            let _ = std::fs::remove_file(&partial);
        }
        if op == "init" {
            self.check_init(&mut r)?;
            if self.stopped {
                self.records.push(r);
                return Ok(());
            }
        }
        let made = if r.succeeded && image.is_some() {
            o.json().and_then(|v| v["id"].as_str().map(String::from))
        } else {
            None
        };
        self.check(&url, op, image, made.as_deref(), r.succeeded, &mut r)?;
        if op == "prune" {
            // A clean prune completes what the faulty one began.
            match self.clean(&url, args) {
                Ok(_) => self.check(&url, PRUNE_AFTER, None, None, true, &mut r)?,
                Err(e) => r.violations.push(format!("a clean prune after the faulty one failed: {e:#}")),
            }
        }
        // What the next operations need, if this run did not make it.
        if !r.succeeded {
            if let Some(img) = image {
                if !self.points.values().any(|(_, i)| i == img) {
                    match self.clean(&url, args).and_then(|o| point_id(&o)) {
                        Ok(id) => self.add_point(id, img),
                        Err(e) => {
                            r.violations.push(format!("the clean {op} after the failed one: {e:#}"));
                            self.stopped = true;
                        }
                    }
                }
            }
        }
        if !r.violations.is_empty() {
            self.keep_violation(&url, op, &o);
        }
        r.total_s = started.elapsed().as_secs_f64();
        self.records.push(r);
        Ok(())
    }

    /// Runs cairn with `args` on `url` through a new proxy; returns how it ended and what the
    /// proxy injected.
    fn through_proxy(&self, op: &str, url: &str, args: &[&str]) -> Result<(Outcome, ProxyFigures)> {
        let at = OPS.iter().position(|o| *o == op).unwrap() as u64;
        let config = ProxyConfig {
            one_in: self.h.one_in,
            seed: self.seed * 16 + at,
            faults: self.h.faults.clone(),
            stall: self.h.stall,
            retry_after_secs: 1,
            log: Some(self.dir.join(format!("{op}.requests"))),
            // Every run that uploads a pack has one torn.
            tear_first_upload_over: self.h.faults.contains(&ProxyFault::TornUpload).then_some(1 << 20),
        };
        let proxy = FlakyProxy::start_with(self.h.server.port, config);
        let o = self.h.cairn_cmd(url, Some(&proxy.endpoint()), &self.cache, self.encrypted, args)?;
        let figures = ProxyFigures::of(&proxy);
        Ok((o, figures))
    }

    /// Runs cairn straight to the server with a fresh cache; an error unless it succeeds.
    fn clean(&self, url: &str, args: &[&str]) -> Result<Outcome> {
        let cache = self.dir.join("check-cache");
        let _ = std::fs::remove_dir_all(&cache);
        let o = self.h.cairn_cmd(url, None, &cache, self.encrypted, args)?;
        if !o.ok() {
            bail!("cairn {} (no faults) failed ({:?}): {}", args.join(" "), o.code, short(&o.stderr, 600));
        }
        Ok(o)
    }

    /// Sorts how the faulty run ended: success, a clean failure (status 1, an error naming
    /// the store), or a violation (a panic, another status, a hang, an error that names no
    /// store).
    fn judge(&self, o: &Outcome, r: &mut Record) {
        let panicked = o.stderr.contains("panicked") || o.code == Some(101);
        if panicked {
            r.violations.push(format!("cairn panicked: {}", short(&o.stderr, 600)));
        }
        if o.timed_out {
            r.violations.push(format!("did not finish within {} s", self.h.op_timeout.as_secs()));
            return;
        }
        match o.code {
            Some(0) => r.succeeded = true,
            Some(1) => {
                let first = o.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
                let store = format!("s3://net-{}", self.seed);
                if first.is_empty() || !o.stderr.contains(&store) {
                    r.violations
                        .push(format!("failed with an error that does not name the store: {}", short(&o.stderr, 600)));
                } else {
                    r.failure = Some(short(first, 300));
                }
            }
            // verify's 3 (damage found) is judged by the caller.
            Some(3) => r.failure = Some(short(o.stderr.lines().next().unwrap_or_default(), 300)),
            None => r.violations.push(format!(
                "killed by signal {} ({}) with no error message: {}",
                o.signal.unwrap_or(0),
                signal_name(o.signal.unwrap_or(0)),
                short(&o.stderr, 600)
            )),
            other => r.violations.push(format!("exit status {other:?}: {}", short(&o.stderr, 600))),
        }
    }

    /// After an init: a repository that opens with one key (encrypted) or none, or no config
    /// at all (then a clean init makes one; an init that succeeded must have left one).
    fn check_init(&mut self, r: &mut Record) -> Result<()> {
        let url = self.url.clone();
        let b = self.h.server.backend(&url);
        if b.exists(Kind::Config, "")? {
            if let Err(e) = self.clean(&url, &["points", "--json"]) {
                r.violations.push(format!("init left a config that does not open: {e:#}"));
            }
        } else {
            if r.succeeded {
                r.violations.push("init succeeded but left no config".into());
            }
            let init: &[&str] = if self.encrypted { &["init", "--encrypt", "--json"] } else { &["init", "--json"] };
            if let Err(e) = self.clean(&url, init) {
                r.violations.push(format!("a clean init after the failed one: {e:#}"));
                self.stopped = true;
                return Ok(());
            }
        }
        let keys = b.list(Kind::Key)?.len();
        if keys != self.encrypted as usize {
            r.violations.push(format!("{keys} key file(s) after init"));
        }
        Ok(())
    }

    /// The checks every run gets, through a direct connection (see the module docs). `image`:
    /// the image a new point may hold (a backup's); `made`: the point the run said it made.
    fn check(
        &mut self,
        url: &str,
        op: &str,
        image: Option<&Path>,
        made: Option<&str>,
        succeeded: bool,
        r: &mut Record,
    ) -> Result<()> {
        let b: Arc<dyn Backend> = Arc::new(self.h.server.backend(url));
        self.check_store(&b, op, succeeded, r)?;
        if !b.exists(Kind::Config, "")? {
            return Ok(());
        }
        self.check_verify(url, op, r)?;
        // Points: the known ones all listed, at most one new, from a backup, of its image.
        let repo = Repository::open(b.clone(), || Some(PASSWORD.into()))?;
        let listed = repo.list_points()?;
        if !listed.damaged.is_empty() {
            r.violations.push(format!("{op}: {} point(s) do not load: {:?}", listed.damaged.len(), listed.damaged));
        }
        let ids: BTreeSet<&str> = listed.points.iter().map(|(id, _)| id.as_str()).collect();
        for id in self.points.keys() {
            if !ids.contains(id.as_str()) {
                r.violations.push(format!("{op}: point {} that existed before is gone", &id[..8]));
            }
        }
        let new: Vec<&(cairn_repo::PointId, cairn_repo::RestorePoint)> =
            listed.points.iter().filter(|(id, _)| !self.points.contains_key(id.as_str())).collect();
        match image {
            None if !new.is_empty() => {
                r.violations.push(format!("{op} made {} restore point(s)", new.len()));
            }
            Some(_) if new.len() > 1 => r.violations.push(format!("one {op} made {} restore points", new.len())),
            Some(_) if succeeded && new.is_empty() => r.violations.push(format!("{op} succeeded but made no point")),
            _ => {}
        }
        if let Some(id) = made {
            if !ids.contains(id.to_string().as_str()) {
                r.violations.push(format!("{op} printed point {} but it is not listed", &id[..8.min(id.len())]));
            }
        }
        if let (Some(img), [(id, _)]) = (image, new.as_slice()) {
            let id = id.to_string();
            self.add_point(id, img);
        }
        // Every point restores byte for byte.
        let points: Vec<(String, String, PathBuf)> =
            self.points.iter().map(|(id, (n, img))| (id.clone(), n.clone(), img.clone())).collect();
        for (id, name, img) in points.iter().filter(|(id, _, _)| ids.contains(id.as_str())) {
            if let Err(e) = self.restores_exactly(url, id, name, img) {
                r.violations.push(format!("{op}: {e:#}"));
            }
        }
        Ok(())
    }

    /// Locks and objects: no lock after a run that succeeded (those of failed runs counted and
    /// removed), and every object of a content-named kind hashes to its name.
    fn check_store(&self, b: &Arc<dyn Backend>, op: &str, succeeded: bool, r: &mut Record) -> Result<()> {
        let locks = b.list(Kind::Lock)?;
        if !locks.is_empty() {
            r.locks_left += locks.len() as u64;
            if succeeded {
                r.violations.push(format!("{op} succeeded but left {} lock file(s)", locks.len()));
            }
            for l in &locks {
                b.delete(Kind::Lock, &l.name)?;
            }
        }
        for kind in [Kind::Key, Kind::Pack, Kind::Index, Kind::Point, Kind::Catalog] {
            for l in b.list(kind)? {
                let bytes = b.get(kind, &l.name)?;
                r.objects_checked += 1;
                let hash = cairn_repo::pack::name_of(&bytes);
                if hash != l.name || bytes.len() as u64 != l.size {
                    r.violations.push(format!(
                        "{op}: {kind} object {} is partial or altered ({} bytes listed, {} read, hashing to {})",
                        &l.name[..8.min(l.name.len())],
                        l.size,
                        bytes.len(),
                        &hash[..8]
                    ));
                }
            }
        }
        Ok(())
    }

    /// `cairn verify --json` through a direct connection: nothing damaged, unreadable,
    /// quarantined or released (a sound copy the faulty run quarantined is released here).
    fn check_verify(&self, url: &str, op: &str, r: &mut Record) -> Result<()> {
        let cache = self.dir.join("check-cache");
        let _ = std::fs::remove_dir_all(&cache);
        let o = self.h.cairn_cmd(url, None, &cache, self.encrypted, &["verify", "--json"])?;
        let Some(v) = o.json() else {
            r.violations.push(format!("{op}: verify printed no JSON ({:?}): {}", o.code, short(&o.stderr, 400)));
            return Ok(());
        };
        let nonempty = |k: &str| v[k].as_array().is_some_and(|a| !a.is_empty());
        let bad: Vec<&str> = [
            "damaged_packs",
            "damaged_blocks",
            "damaged_index_files",
            "damaged_points",
            "unreadable_packs",
            "released_copies",
            "quarantined_packs",
        ]
        .into_iter()
        .filter(|k| nonempty(k))
        .collect();
        if o.code != Some(0) || v["ok"] != true || !bad.is_empty() {
            r.violations.push(format!(
                "{op}: verify after the run: status {:?}, {:?}: {}",
                o.code,
                bad,
                short(&o.stdout, 600)
            ));
        }
        r.unindexed_packs = r.unindexed_packs.max(v["unindexed_packs"].as_array().map_or(0, |a| a.len() as u64));
        Ok(())
    }

    fn restores_exactly(&self, url: &str, id: &str, name: &str, img: &Path) -> Result<()> {
        let out = self.dir.join("check.img");
        let _ = std::fs::remove_file(&out);
        let spec = format!("{name}@{}", &id[..12]);
        self.clean(url, &["restore", "image", &spec, "--to", out.to_str().unwrap(), "--force", "-q"])
            .with_context(|| format!("point {} does not restore", &id[..8]))?;
        let same = same_bytes(&out, img)?;
        std::fs::remove_file(&out)?;
        if !same {
            bail!("point {} restores to bytes that differ from its image", &id[..8]);
        }
        Ok(())
    }

    /// copy: a target made cleanly with `init --copy-from`, then the copy through the proxy.
    fn copy_step(&mut self) -> Result<()> {
        self.current = "copy";
        let started = Instant::now();
        let url = self.copy_url.clone();
        let src = self.source.to_str().unwrap().to_string();
        self.clean(&url, &["init", "--copy-from", &src, "--json"])?;
        let before = source_files(&self.source);
        let mut r = Record { op: "copy", seed: self.seed, ..Default::default() };
        let args = ["copy", "--from", &src, "--json"];
        let (o, figures) = self.through_proxy("copy", &url, &args)?;
        r.proxy = figures;
        r.run_s = o.secs;
        self.judge(&o, &mut r);
        self.check_copy(&url, "copy", r.succeeded, &mut r)?;
        if !r.succeeded {
            match self.clean(&url, &args) {
                Ok(_) => self.check_copy(&url, COPY_AFTER, true, &mut r)?,
                Err(e) => r.violations.push(format!("a clean copy after the failed one: {e:#}")),
            }
        }
        // The source: nothing written, nothing left (locks included).
        let after = source_files(&self.source);
        if after != before {
            let changed: Vec<&String> = after.symmetric_difference(&before).take(3).collect();
            r.violations.push(format!("the copy changed its source: {changed:?}"));
        }
        if !r.violations.is_empty() {
            self.keep_violation(&url, "copy", &o);
        }
        r.total_s = started.elapsed().as_secs_f64();
        self.records.push(r);
        Ok(())
    }

    /// The target of a copy: store and verify checks, each point a copy of a source point
    /// restoring to its image, none twice, all of them after a copy that succeeded.
    fn check_copy(&mut self, url: &str, op: &str, succeeded: bool, r: &mut Record) -> Result<()> {
        let b: Arc<dyn Backend> = Arc::new(self.h.server.backend(url));
        self.check_store(&b, op, succeeded, r)?;
        self.check_verify(url, op, r)?;
        let repo = Repository::open(b, || Some(PASSWORD.into()))?;
        let listed = repo.list_points()?;
        let source = &self.h.sources[self.encrypted as usize].points;
        for (id, p) in &listed.points {
            let Some((from, img)) = copied_from(p).and_then(|f| source.iter().find(|(s, _)| *s == f.as_str())) else {
                r.violations.push(format!("{op}: point {} is a copy of no source point", id.short()));
                continue;
            };
            let copies =
                listed.points.iter().filter(|(_, q)| copied_from(q).is_some_and(|f| f == from.as_str())).count();
            if copies > 1 {
                r.violations.push(format!("{op}: {copies} copies of source point {}", &from[..8]));
            }
            if let Err(e) = self.restores_exactly(url, id.as_str(), &p.name, img) {
                r.violations.push(format!("{op}: {e:#}"));
            }
        }
        if succeeded {
            for (from, _) in source {
                if !listed.points.iter().any(|(_, q)| copied_from(q).is_some_and(|f| f == from.as_str())) {
                    r.violations.push(format!("{op} succeeded but source point {} has no copy", &from[..8]));
                }
            }
        }
        Ok(())
    }

    /// With --keep: the repository as the checks left it, as a local repository, with the
    /// run's output.
    fn keep_violation(&self, url: &str, op: &str, o: &Outcome) {
        if !self.h.keep {
            return;
        }
        let to = self.h.dir.join(format!("violation-seed{}-{op}", self.seed));
        let from = self.h.server.backend(url);
        let local = LocalBackend::new(&to);
        let _ = local.create();
        for kind in Kind::ALL {
            for l in from.list(kind).unwrap_or_default() {
                if let Ok(bytes) = from.get(kind, &l.name) {
                    let _ = local.put(kind, &l.name, &bytes);
                }
            }
        }
        let _ = std::fs::write(to.join("run.stderr"), &o.stderr);
        let _ = std::fs::write(to.join("run.stdout"), &o.stdout);
        let _ = std::fs::copy(self.dir.join(format!("{op}.requests")), to.join("run.requests"));
    }
}

/// The files of a local repository, by path under it.
fn source_files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(format!("{} ({len} bytes)", e.path().strip_prefix(dir).unwrap_or(&e.path()).display()));
            }
        }
    }
    out
}

/// What a violation says, without its details: up to its first colon, names of points and
/// objects (hex) left out.
fn violation_kind(v: &str) -> String {
    // Those the checks of a run found start with the check's label.
    let labels = [PRUNE_AFTER, COPY_AFTER];
    let parts: Vec<&str> = v.splitn(3, ": ").collect();
    let labelled = parts.len() > 1 && (OPS.contains(&parts[0]) || labels.contains(&parts[0]));
    let head = if labelled { format!("{}: {}", parts[0], parts[1]) } else { parts[0].to_string() };
    let words: Vec<&str> = head
        .split(' ')
        .map(|w| if w.len() >= 6 && w.chars().all(|c| c.is_ascii_hexdigit()) { "…" } else { w })
        .collect();
    short(&words.join(" "), 120)
}

/// At most `n` characters of `s`, on one line.
fn short(s: &str, n: usize) -> String {
    let one: String = s.trim().replace('\n', " | ");
    if one.chars().count() <= n {
        one
    } else {
        one.chars().take(n).collect::<String>() + "…"
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGBUS => "SIGBUS",
        _ => "another signal",
    }
}
