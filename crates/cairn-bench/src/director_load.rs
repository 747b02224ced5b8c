//! `cairn-director-load`: the director at fleet scale. Fills a catalog with a synthetic fleet
//! (`--vms` VMs on `--hosts` hosts, `--points` restore points over 30 days, a job per host with
//! a month of daily tasks and their logs, a month of repository sizes), starts the real
//! `cairn server` on it, and measures what the console asks of it:
//!
//! - the dashboard (`/api/overview`, its server-side time as it reports it, and the request);
//! - the VM list (`/api/vms`, the whole answer) and a VM's points;
//! - a mix of API requests at `--rate` requests per second for `--seconds` (open loop: each
//!   request leaves at its planned time, late or not, so a slow server shows as latency);
//! - the server's peak memory (VmHWM).
//!
//! A benchmark tool, not a test: `bench/director.sh` runs it; one JSON line on standard output.

use anyhow::{bail, Context, Result};
use cairn_director::catalog::{Catalog, PointRow, TaskState, VmRow};
use clap::Parser;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Measure cairn server on a synthetic fleet catalog (a benchmark tool)")]
struct Args {
    /// The cairn binary
    #[arg(long, default_value = "target/release/cairn")]
    cairn: PathBuf,
    /// A folder for the catalog (made if missing; its catalog is replaced)
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    #[arg(long, default_value_t = 10)]
    hosts: usize,
    #[arg(long, default_value_t = 30000)]
    points: usize,
    /// Requests per second of the mix
    #[arg(long, default_value_t = 100)]
    rate: u32,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.dir)?;
    let catalog_path = a.dir.join("catalog.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(a.dir.join(format!("catalog.db{suffix}")));
    }
    let t = Instant::now();
    let uuids = fill(&Catalog::open(&catalog_path)?, &a)?;
    let fill_s = t.elapsed().as_secs_f64();

    let token = {
        let o = Command::new(&a.cairn)
            .args(["server", "token", "create", "bench", "--role", "viewer", "--catalog"])
            .arg(&catalog_path)
            .output()?;
        if !o.status.success() {
            bail!("token: {}", String::from_utf8_lossy(&o.stderr));
        }
        String::from_utf8(o.stdout)?.trim().to_string()
    };
    // The server's own host list is the test driver: its inventory leaves the fleet's hosts alone.
    let mut server = Command::new(&a.cairn)
        .args(["server", "--listen", "127.0.0.1:0", "--host", "test:///default", "--catalog"])
        .arg(&catalog_path)
        .arg("--work-dir")
        .arg(a.dir.join("work"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cairn server")?;
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line)?;
    let base =
        line.trim().strip_prefix("listening on ").context("the server did not say where it listens")?.to_string();
    let result = measure(&a, &base, &token, &uuids, server.id());
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    let mut out = result?;
    out["fill_s"] = serde_json::json!((fill_s * 10.0).round() / 10.0);
    println!("{out}");
    Ok(())
}

/// The fleet, into the catalog; the VMs' UUIDs.
fn fill(catalog: &Catalog, a: &Args) -> Result<Vec<String>> {
    let host = |h: usize| format!("qemu+ssh://host-{h:02}/system");
    let uuids: Vec<String> = (0..a.vms).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect();
    let vms: Vec<VmRow> = uuids
        .iter()
        .enumerate()
        .map(|(i, uuid)| VmRow {
            name: format!("vm-{i:04}"),
            uuid: uuid.clone(),
            host: host(i % a.hosts),
            state: "running".into(),
            method: "app-consistent".into(),
            method_reason: "the guest agent answers".into(),
            tags: vec![if i % 3 == 0 { "prod" } else { "dev" }.to_string()],
            last_point: None,
            points: 0,
            last_boot: None,
        })
        .collect();
    let hosts: Vec<String> = (0..a.hosts).map(host).collect();
    catalog.set_inventory(&hosts, &vms)?;
    let now = jiff::Timestamp::now();
    let mut rows = Vec::with_capacity(a.points);
    for p in 0..a.points {
        let vm = p % a.vms;
        let day = (p / a.vms) as i64;
        let time = now - jiff::SignedDuration::from_hours(24 * day + 1) - jiff::SignedDuration::from_secs(vm as i64);
        rows.push(PointRow {
            id: format!("{:064x}", p as u128 * 0x9e37_79b9_7f4a_7c15 + 1),
            repository: format!("/srv/cairn/repo-{:02}", vm % a.hosts),
            job_id: Some((vm % a.hosts) as i64 + 1),
            name: vms[vm].name.clone(),
            vm_uuid: Some(uuids[vm].clone()),
            host: Some(vms[vm].host.clone()),
            time: time.to_string(),
            chain: Some(if day % 7 == 6 { "full" } else { "incremental" }.into()),
            method: Some("app-consistent".into()),
            read_bytes: Some(64 << 20),
            boot_verdict: Some("passed".into()),
            boot_reason: Some("the guest agent answered".into()),
            screenshot: false,
        });
    }
    for h in 0..a.hosts {
        let repo = format!("/srv/cairn/repo-{h:02}");
        let mine: Vec<PointRow> = rows.iter().filter(|r| r.repository == repo).cloned().collect();
        catalog.sync_points(&repo, &mine)?;
    }
    for h in 0..a.hosts {
        let spec: cairn_director::jobs::JobSpec = serde_json::from_value(serde_json::json!({
            "name": format!("host-{h:02}"), "vms": {"all": true}, "hosts": [host(h)],
            "repository": format!("/srv/cairn/repo-{h:02}"), "schedule": "daily",
            "retention": {"keep_daily": 30}, "verify_boot": true
        }))?;
        let job = catalog.create_job(&spec, Some((now + jiff::SignedDuration::from_hours(12)).to_string()))?;
        for _day in 0..30 {
            let task = catalog.enqueue(Some(job), "backup", "schedule", "scheduler")?;
            catalog.start_task(task.id)?;
            for v in 0..(a.vms / a.hosts).min(100) {
                catalog.log(task.id, &format!("VM vm-{v:04}: restore point 0123456789ab (incremental backup)"))?;
            }
            catalog.finish_task(task.id, TaskState::Ok, Some(&serde_json::json!({"vms": []})), None)?;
        }
    }
    for h in 0..a.hosts {
        for day in 0..90 {
            catalog.record_usage(&format!("/srv/cairn/repo-{h:02}"), (day as u64 + 100) << 30, 3000)?;
        }
    }
    Ok(uuids)
}

fn get(base: &str, token: &str, path: &str) -> Result<(Duration, serde_json::Value)> {
    let t = Instant::now();
    let r = ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(30))
        .call()
        .with_context(|| format!("GET {path}"))?;
    let body: serde_json::Value = r.into_json()?;
    Ok((t.elapsed(), body))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10000.0).round() / 10.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

fn measure(a: &Args, base: &str, token: &str, uuids: &[String], pid: u32) -> Result<serde_json::Value> {
    // Warm: the first requests open what later ones reuse.
    get(base, token, "/api/overview")?;
    let mut dashboard_server = Vec::new();
    let mut dashboard = Vec::new();
    let mut vm_list = Vec::new();
    let mut vms_seen = 0;
    for _ in 0..20 {
        let (d, o) = get(base, token, "/api/overview")?;
        dashboard.push(d);
        dashboard_server.push(o["generated_ms"].as_f64().unwrap_or(f64::NAN));
        let (d, v) = get(base, token, "/api/vms")?;
        vm_list.push(d);
        vms_seen = v.as_array().map_or(0, |v| v.len());
    }
    if vms_seen < a.vms {
        bail!("the VM list has {vms_seen} VMs, not {}", a.vms);
    }
    dashboard.sort();
    vm_list.sort();
    dashboard_server.sort_by(f64::total_cmp);

    // The mix, open loop: request i leaves at i / rate seconds.
    let total = a.rate as u64 * a.seconds;
    let paths: Vec<String> = (0..total)
        .map(|i| match i % 10 {
            0 => "/api/overview".to_string(),
            1 => "/api/vms".to_string(),
            2 | 3 => format!("/api/points?vm={}&limit=50", uuids[(i as usize * 7919) % uuids.len()]),
            4 => "/api/jobs".to_string(),
            5 => "/api/tasks?limit=50".to_string(),
            6 => format!("/api/tasks/{}", 1 + i % 300),
            7 => format!("/api/tasks/{}/log", 1 + i % 300),
            8 => "/api/points?limit=100".to_string(),
            _ => "/api/hosts".to_string(),
        })
        .collect();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / a.rate as f64);
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (paths, latencies, errors, next) = (paths.clone(), latencies.clone(), errors.clone(), next.clone());
            let (base, token) = (base.to_string(), token.to_string());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= paths.len() as u64 {
                    return;
                }
                let due = start + period * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let sent = Instant::now();
                // Latency from the planned time: a request that left late waited in line.
                match get(&base, &token, &paths[i as usize]) {
                    Ok(_) => latencies.lock().unwrap().push(sent.duration_since(due.min(sent)) + sent.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status.lines().find_map(|x| x.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Ok(serde_json::json!({
        "bench": "director",
        "vms": a.vms, "hosts": a.hosts, "points": a.points,
        "dashboard_server_ms_p50": dashboard_server[dashboard_server.len() / 2],
        "dashboard_server_ms_max": dashboard_server[dashboard_server.len() - 1],
        "dashboard_request_ms_p50": ms(percentile(&dashboard, 0.5)),
        "dashboard_request_ms_max": ms(dashboard[dashboard.len() - 1]),
        "vm_list_request_ms_p50": ms(percentile(&vm_list, 0.5)),
        "vm_list_request_ms_max": ms(vm_list[vm_list.len() - 1]),
        "mix_rate": a.rate, "mix_requests": total, "mix_errors": errors.load(std::sync::atomic::Ordering::SeqCst),
        "mix_achieved_rate": ((l.len() as f64 / elapsed.as_secs_f64()) * 10.0).round() / 10.0,
        "mix_ms_p50": ms(percentile(&l, 0.5)), "mix_ms_p99": ms(percentile(&l, 0.99)), "mix_ms_max": ms(l[l.len() - 1]),
        "server_rss_peak_mib": kib("VmHWM:").map(|k| k / 1024),
        "server_rss_mib": kib("VmRSS:").map(|k| k / 1024),
    }))
}
