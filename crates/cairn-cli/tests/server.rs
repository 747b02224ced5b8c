//! The director (issue 15): `cairn server` as a real process, driven over its REST API on
//! loopback, running jobs against real libvirt guests.

mod common;

use common::director::{catalog_in, token, wait_task, Server};
use common::guest::{frozen, Guest};
use common::*;
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::Command;
use std::time::{Duration, Instant};

/// A webhook receiver on loopback: each POST's JSON body, answered 204.
struct Hook {
    url: String,
    bodies: std::sync::mpsc::Receiver<Value>,
}

impl Hook {
    fn start() -> Hook {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, bodies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
            }
        });
        Hook { url, bodies }
    }
}

#[test]
fn the_api_needs_a_token_and_each_role_may_only_what_it_is_given() {
    let e = Env::new();
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    let viewer = token(&catalog, "viewer", "viewer");
    let backup = token(&catalog, "ci", "backup");
    // The libvirt test driver: a host with VMs, nothing real behind them.
    let s = Server::start(&catalog, &e.path("work"), &["--host", "test:///default"]);

    // The OpenAPI document is public, and describes the token scheme and the routes.
    let (status, doc) = s.call("GET", "/api/openapi.json", None, None);
    assert_eq!(status, 200);
    for path in ["/api/jobs", "/api/jobs/{id}/run", "/api/tasks/{id}/log", "/api/tokens"] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert_eq!(doc["components"]["securitySchemes"]["token"]["scheme"], "bearer");

    assert_eq!(s.call("GET", "/api/jobs", None, None).0, 401);
    let last = if viewer.ends_with('0') { "1" } else { "0" };
    let forged = format!("{}{last}", &viewer[..viewer.len() - 1]);
    assert_eq!(s.call("GET", "/api/jobs", Some(&forged), None).0, 401, "a token with a wrong secret works");
    assert_eq!(s.call("GET", "/api/jobs", Some(&viewer), None).0, 200);

    let job = json!({"name": "nightly", "vms": {"names": ["test"]}, "repository": e.repo(), "schedule": "mon..fri 22:00",
                     "retention": {"keep_daily": 7}});
    let (status, err) = s.call("POST", "/api/jobs", Some(&viewer), Some(job.clone()));
    assert_eq!(status, 403, "{err}");
    assert!(err["error"].as_str().unwrap().contains("viewer"), "{err}");
    let (status, created) = s.call("POST", "/api/jobs", Some(&admin), Some(job.clone()));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    assert!(created["next_run"].as_str().is_some_and(|t| t.ends_with('Z')), "{created}");
    assert_eq!(s.call("POST", "/api/jobs", Some(&admin), Some(job.clone())).0, 409, "a name taken twice");
    // Refused with the reason, in JSON: what the root-running server must not be told by an
    // operator (a libvirt URI that runs a program, a password file anywhere), and what cannot work.
    for (field, value, why) in [
        ("schedule", json!("25:00"), "hours"),
        ("schedule", json!("*-02-30"), "never comes due"),
        ("hosts", json!(["qemu+ext:///system?command=/bin/true"]), "not in the server's host list"),
        ("password_file", json!("/root/.ssh/id_ed25519"), "secrets folder"),
        ("repository", json!("relative/repo"), "absolute"),
    ] {
        let mut bad = job.clone();
        bad["name"] = "other".into();
        bad[field] = value;
        let (status, err) = s.call("POST", "/api/jobs", Some(&admin), Some(bad));
        assert_eq!(status, 400, "{field}: {err}");
        assert!(err["error"].as_str().unwrap().contains(why), "{field}: {err}");
    }
    let o = ureq::post(&s.url("/api/jobs"))
        .set("Authorization", &format!("bearer {admin}"))
        .set("Content-Type", "application/json")
        .send_string("{not json");
    let Err(ureq::Error::Status(400, r)) = o else { panic!("a malformed body was not a 400") };
    let err: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert!(err["error"].is_string(), "{err}");

    // A backup token runs jobs, and can neither change nor delete one (nor its retention).
    let mut weaker = job.clone();
    weaker["retention"] = json!({"keep_last": 1});
    assert_eq!(s.call("PUT", &format!("/api/jobs/{id}"), Some(&backup), Some(weaker)).0, 403);
    assert_eq!(s.call("DELETE", &format!("/api/jobs/{id}"), Some(&backup), None).0, 403);
    let (status, task) = s.call("POST", &format!("/api/jobs/{id}/run"), Some(&backup), None);
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["requested_by"], "ci");
    assert_eq!(s.call("POST", &format!("/api/jobs/{id}/run"), Some(&viewer), None).0, 403);
    // The test driver's VM has no disk file to read: the task fails, and says why.
    let ended = wait_task(&s, &viewer, task["id"].as_i64().unwrap(), Duration::from_secs(60));
    assert_eq!(ended["state"], "failed", "{ended}");
    assert!(ended["result"]["vms"][0]["error"].is_string() || ended["error"].is_string(), "{ended}");
    // A backup token cancels only its own tasks.
    let other = token(&catalog, "ci2", "backup");
    let (status, _) = s.call("POST", &format!("/api/tasks/{}/cancel", task["id"]), Some(&other), None);
    assert_eq!(status, 403);
    let (status, log) = s.call("GET", &format!("/api/tasks/{}/log", task["id"]), Some(&viewer), None);
    assert_eq!(status, 200);
    assert!(log.as_array().unwrap().len() >= 2, "{log}");
    let (_, job_now) = s.call("GET", &format!("/api/jobs/{id}"), Some(&viewer), None);
    assert_eq!(job_now["spec"]["retention"]["keep_daily"], 7, "the retention changed");

    // Restores and a point's files are for operators: a viewer reads the points, not the files.
    let nowhere = "0".repeat(64);
    assert_eq!(s.call("GET", "/api/points", Some(&viewer), None).0, 200);
    assert_eq!(s.call("GET", "/api/overview", Some(&viewer), None).0, 200);
    assert_eq!(s.call("GET", &format!("/api/points/{nowhere}/files"), Some(&viewer), None).0, 403);
    assert_eq!(s.call("GET", &format!("/api/points/{nowhere}/files"), Some(&admin), None).0, 404);
    let restore =
        json!({"point": nowhere, "kind": "vm", "host": "test:///default", "storage": "/var/lib/libvirt/images"});
    for who in [&viewer, &backup] {
        assert_eq!(s.call("POST", "/api/restores", Some(who), Some(restore.clone())).0, 403);
    }
    // Onto a host off the list, into a folder not among the restore folders: refused, with why.
    for (field, value, why) in
        [("host", "qemu+ext:///system?command=/bin/true", "host list"), ("storage", "/etc", "restore folders")]
    {
        let mut bad = restore.clone();
        bad[field] = value.into();
        let (status, err) = s.call("POST", "/api/restores", Some(&admin), Some(bad));
        assert_eq!(status, 400, "{field}: {err}");
        assert!(err["error"].as_str().unwrap().contains(why), "{field}: {err}");
    }
    assert_eq!(s.call("POST", "/api/restores", Some(&admin), Some(restore)).0, 404, "a point nobody has");
    assert_eq!(job_now["last_task"]["id"], task["id"]);

    // Prometheus metrics, for a viewer's token.
    assert_eq!(s.text("/metrics", None).0, 401);
    let (status, metrics) = s.text("/metrics", Some(&viewer));
    assert_eq!(status, 200);
    for line in ["cairn_tasks{state=\"failed\"} 1", "cairn_job_last_ok{job=\"nightly\"} 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from:\n{metrics}");
    }
    assert!(metrics.contains("cairn_job_next_run_timestamp_seconds{job=\"nightly\"} "), "{metrics}");

    // A scheduled job with no good run for longer than its schedule allows: one alert.
    let hook = Hook::start();
    let watched = json!({"name": "hourly", "vms": {"names": ["test"]}, "repository": e.repo(), "schedule": "hourly",
                         "notify": {"webhook": hook.url, "when": "problems"}});
    let (status, created) = s.call("POST", "/api/jobs", Some(&admin), Some(watched));
    assert_eq!(status, 201, "{created}");
    let c = rusqlite::Connection::open(&catalog).unwrap();
    let made = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_hours(3)).unwrap().to_string();
    c.execute("UPDATE jobs SET created = ?1 WHERE id = ?2", rusqlite::params![made, created["id"].as_i64().unwrap()])
        .unwrap();
    let alert = hook.bodies.recv_timeout(Duration::from_secs(20)).expect("no overdue alert");
    assert_eq!((alert["job"].as_str(), alert["alert"].as_str()), (Some("hourly"), Some("overdue")), "{alert}");
    assert_eq!(alert["period_seconds"], 3600, "{alert}");
    assert!(hook.bodies.recv_timeout(Duration::from_secs(4)).is_err(), "the same silence alerted twice");

    // Tokens are the admin's alone.
    assert_eq!(s.call("GET", "/api/tokens", Some(&viewer), None).0, 403);
    let (status, made) = s.call("POST", "/api/tokens", Some(&admin), Some(json!({"name": "dash", "role": "viewer"})));
    assert_eq!(status, 201, "{made}");
    let dash = made["token"].as_str().unwrap().to_string();
    assert_eq!(s.call("GET", "/api/tasks", Some(&dash), None).0, 200);
    assert_eq!(s.call("DELETE", "/api/tokens/dash", Some(&admin), None).0, 204);
    assert_eq!(s.call("GET", "/api/tasks", Some(&dash), None).0, 401, "a revoked token still works");
    // Renamed onto a name taken: a conflict, not a server error.
    let mut renamed = job.clone();
    renamed["name"] = "hourly".into();
    assert_eq!(s.call("PUT", &format!("/api/jobs/{id}"), Some(&admin), Some(renamed)).0, 409);
    assert_eq!(s.call("DELETE", &format!("/api/jobs/{id}"), Some(&admin), None).0, 204);
    assert_eq!(s.call("GET", &format!("/api/jobs/{id}"), Some(&admin), None).0, 404);
}

#[test]
fn a_job_run_through_the_api_backs_up_a_real_guest_and_keeps_what_its_retention_says() {
    let e = Env::new();
    e.init();
    let g = Guest::start("director", &[]);
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    let smtp = common::smtp::Smtp::start(e.dir.path());
    let hook = Hook::start();
    let smtp_server = format!("127.0.0.1:{}", smtp.port);
    // Tagged in cairn's libvirt metadata; the job selects it by tag.
    let tag = format!("director-{}", std::process::id());
    let hooks = format!("<hooks><tag>{tag}</tag></hooks>");
    common::guest::virsh(&["metadata", &g.name, "https://cairn.dev/xmlns/hooks/1", "--key", "cairn", "--set", &hooks]);
    // An offsite copy to S3 (s3s-fs on loopback) after each run.
    let s3 = cairn_storage::test_servers::TestServer::start(cairn_storage::test_servers::Flavor::S3sFs);
    let offsite = s3.as_ref().map(|s3| {
        let url = s3.bucket("offsite", "director");
        let mut env = s3.env();
        env.push(("CAIRN_CACHE_DIR", e.path("cache").to_str().unwrap().to_string()));
        Env::on(s3, url.clone()).init();
        (url, env)
    });
    let env = offsite.as_ref().map(|(_, env)| env.clone()).unwrap_or_default();
    let s = Server::start_with_env(&catalog, &e.path("work"), &["--smtp-server", &smtp_server], &env);
    let (status, vms) = s.call("GET", "/api/vms", Some(&admin), None);
    assert_eq!(status, 200);
    let listed = vms.as_array().unwrap().iter().find(|v| v["name"] == g.name.as_str()).cloned().unwrap();
    assert_eq!(listed["method"], "app-consistent", "{vms}");
    assert_eq!(listed["tags"], json!([tag]), "{listed}");
    let copies: Vec<Value> = offsite.iter().map(|(url, _)| json!({"repository": url})).collect();
    let job = json!({"name": "guest", "vms": {"tags": [tag]}, "repository": e.repo(), "retention": {"keep_last": 1},
                     "verify_boot": true, "notify": {"mail_to": "ops@example.org", "webhook": hook.url},
                     "copies": copies});
    let (status, created) = s.call("POST", "/api/jobs", Some(&admin), Some(job));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();

    let mut points = Vec::new();
    let mut copies_sent = Vec::new();
    for (run, chain) in [(1, "full"), (2, "incremental")] {
        g.exec(&format!("echo run-{run} > /data/run; sync"));
        let (status, task) = s.call("POST", &format!("/api/jobs/{id}/run"), Some(&admin), None);
        assert_eq!(status, 202, "{task}");
        let tid = task["id"].as_i64().unwrap();
        // Asked again while it runs: refused, not queued twice.
        let (again, _) = s.call("POST", &format!("/api/jobs/{id}/run"), Some(&admin), None);
        let task = wait_task(&s, &admin, tid, Duration::from_secs(300));
        assert!(again == 409 || task["ended"].is_string(), "a second run was queued: {again}");
        assert_eq!(task["state"], "ok", "{task}");
        let vm = &task["result"]["vms"][0];
        assert_eq!((vm["ok"].as_bool(), vm["chain"].as_str()), (Some(true), Some(chain)), "{task}");
        assert!(task["progress"]["total"].as_u64().unwrap() > 0, "{task}");
        points.push(vm["point"].as_str().unwrap().to_string());
        let (_, log) = s.call("GET", &format!("/api/tasks/{tid}/log"), Some(&admin), None);
        let text = log.to_string();
        assert!(text.contains("restore point") && text.contains(&points[run - 1][..8]), "{text}");
        assert_eq!(vm["boot"]["verdict"], "passed", "{task}");
        if run == 2 {
            assert_eq!(task["result"]["retention"]["forgotten"], 1, "{task}");
        }
        if offsite.is_some() {
            let copy = &task["result"]["copies"][0];
            assert_eq!((copy["ok"].as_bool(), copy["points"].as_u64()), (Some(true), Some(1)), "{task}");
            copies_sent.push(copy["raw_bytes_sent"].as_u64().unwrap());
        }
        // The report went to the webhook (the task as the API gives it) and by mail, with the
        // boot check's screenshot.
        let posted = hook.bodies.recv_timeout(Duration::from_secs(30)).expect("no report posted to the webhook");
        assert_eq!((posted["job"].as_str(), posted["task"]["id"].as_i64()), (Some("guest"), Some(tid)), "{posted}");
        assert_eq!(posted["task"]["state"], "ok", "{posted}");
        let t = Instant::now();
        while smtp.messages().len() < run {
            assert!(t.elapsed() < Duration::from_secs(30), "no report mailed");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mails = smtp.messages();
    assert_eq!(mails.len(), 2);
    for (subject, text, png) in &mails {
        assert!(subject.contains("cairn job guest: OK"), "{subject}");
        assert!(text.contains(&g.name) && text.contains("boot check: PASSED"), "{text}");
        assert!(png.as_ref().is_some_and(|p| p.starts_with(b"\x89PNG")), "the report has no screenshot");
    }
    // The repository holds the second point only: the retention forgot the first.
    let listed = e.json(&["points"]);
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(ids, vec![points[1].as_str()], "{listed}");
    let (_, tasks) = s.call("GET", &format!("/api/tasks?job={id}"), Some(&admin), None);
    assert_eq!(tasks.as_array().unwrap().len(), 2);
    // The catalog's points match the repository (the forgotten one gone), with the boot check
    // and its screen; the VM list and the dashboard count them.
    let (_, listed) = s.call("GET", &format!("/api/points?vm={}", g.name), Some(&admin), None);
    let listed = listed.as_array().unwrap();
    let repo_key = e.repo().to_str().unwrap().to_string();
    let (here, there): (Vec<&Value>, Vec<&Value>) = listed.iter().partition(|p| p["repository"] == repo_key.as_str());
    // The offsite copy keeps both points (its own retention is none), and the second sent
    // only what changed.
    if let Some((url, env)) = &offsite {
        assert_eq!(there.len(), 2, "{listed:?}");
        assert!(copies_sent[1] * 4 < copies_sent[0], "the second copy sent {copies_sent:?}");
        let mut at = Env::new();
        at.remote = Some((url.clone(), env.clone()));
        assert_eq!(at.json(&["points"]).as_array().unwrap().len(), 2);
    }
    let listed = here;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let p = &listed[0];
    assert_eq!((p["id"].as_str(), p["chain"].as_str()), (Some(points[1].as_str()), Some("incremental")), "{p}");
    assert_eq!((p["boot_verdict"].as_str(), p["screenshot"].as_bool()), (Some("passed"), Some(true)), "{p}");
    let png = ureq::get(&s.url(&format!("/api/points/{}/screenshot", points[1])))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap();
    assert_eq!(png.content_type(), "image/png");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut png.into_reader(), &mut bytes).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    let (_, overview) = s.call("GET", "/api/overview", Some(&admin), None);
    let total = 1 + if offsite.is_some() { 2 } else { 0 };
    assert_eq!(
        (overview["jobs"]["ok"].as_u64(), overview["points"]["total"].as_u64()),
        (Some(1), Some(total)),
        "{overview}"
    );
    let usage = &overview["usage"][0]["samples"];
    assert!(usage.as_array().unwrap().len() >= 2 && usage[1]["stored_bytes"].as_u64() > Some(0), "{overview}");
}

#[test]
fn a_killed_server_leaves_no_guest_frozen_and_a_schedule_missed_while_it_was_down_runs_once() {
    let e = Env::new();
    e.init();
    let g = Guest::start("director-kill", &[]);
    let catalog = catalog_in(&e);
    let work = e.path("work");
    let admin = token(&catalog, "admin", "admin");
    // Each guest stays frozen 60 s after its point, unless something thaws it; the watchdog's
    // limit is 30 s: a thaw within seconds of the kill is the watchdog seeing the server gone.
    let s = Server::start(&catalog, &work, &["--debug-hold", "60", "--freeze-limit", "30"]);
    let job = json!({"name": "kill", "vms": {"names": [g.name]}, "repository": e.repo(), "schedule": "daily"});
    let (_, created) = s.call("POST", "/api/jobs", Some(&admin), Some(job));
    let id = created["id"].as_i64().unwrap();
    let (_, task) = s.call("POST", &format!("/api/jobs/{id}/run"), Some(&admin), None);
    let tid = task["id"].as_i64().unwrap();
    let t = Instant::now();
    while !frozen(&g) {
        assert!(t.elapsed() < Duration::from_secs(120), "the guest was never frozen");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.kill();
    let killed = Instant::now();
    while frozen(&g) {
        assert!(killed.elapsed() < Duration::from_secs(15), "the guest stayed frozen after the server was killed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The job's daily run came due while the server was down.
    let c = rusqlite::Connection::open(&catalog).unwrap();
    let past = "2026-01-01T00:00:00Z";
    c.execute("UPDATE jobs SET next_run = ?1 WHERE id = ?2", rusqlite::params![past, id]).unwrap();
    drop(c);
    let s = Server::start(&catalog, &work, &[]);
    let (_, task) = s.call("GET", &format!("/api/tasks/{tid}"), Some(&admin), None);
    assert_eq!(task["state"], "interrupted", "{task}");
    assert!(task["error"].as_str().unwrap().contains("server stopped"), "{task}");
    // Run once, at once, with its reason; its next run is counted from now.
    let t = Instant::now();
    let missed = loop {
        let (_, tasks) = s.call("GET", &format!("/api/tasks?job={id}"), Some(&admin), None);
        if let Some(m) = tasks.as_array().unwrap().iter().find(|t| t["trigger"] == "missed") {
            break m.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the missed run never started: {tasks}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let done = wait_task(&s, &admin, missed["id"].as_i64().unwrap(), Duration::from_secs(300));
    assert_eq!(done["state"], "ok", "{done}");
    assert_eq!(done["requested_by"], "scheduler");
    let (_, tasks) = s.call("GET", &format!("/api/tasks?job={id}"), Some(&admin), None);
    let count = tasks.as_array().unwrap().iter().filter(|t| t["trigger"] == "missed").count();
    assert_eq!(count, 1, "{tasks}");
    let (_, job) = s.call("GET", &format!("/api/jobs/{id}"), Some(&admin), None);
    let next: String = job["next_run"].as_str().unwrap().into();
    assert!(next.as_str() > "2026-11-30", "{job}");
}

#[test]
fn the_api_is_served_over_tls_and_plain_http_only_on_loopback() {
    let e = Env::new();
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    // Plain HTTP on an address others reach: refused before anything listens.
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["server", "--listen", "0.0.0.0:0", "--catalog"])
        .arg(&catalog)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && said.contains("not a loopback address") && said.contains("--tls-cert"), "{said}");

    let (cert, key) = (e.path("cert.pem"), e.path("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let s = Server::start(&catalog, &e.path("work"), &["--tls-cert", c, "--tls-key", k]);
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);
    // A client that connects and never speaks holds no one else up.
    let _silent = std::net::TcpStream::connect(s.base.trim_start_matches("https://")).unwrap();
    let curl = |url: &str| {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", c, "-H", &format!("Authorization: Bearer {admin}")])
            .arg(url)
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (ok, body) = curl(&s.url("/api/version"));
    assert!(ok, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["version"].is_string(), "{v}");
    // Plain HTTP to the HTTPS port gets nothing.
    let (ok, _) = curl(&s.url("/api/version").replace("https://", "http://"));
    assert!(!ok, "plain HTTP was answered on the HTTPS port");
}

/// Two jobs of two repositories back up VMs of one host: with `--per-host-limit 1`, the second
/// waits for the first to end on that host (its log says so), and both end ok.
#[test]
fn the_per_host_limit_holds_across_the_tasks_of_different_repositories() {
    let e = Env::new();
    e.init();
    let other = e.path("repo2");
    e.ok(&["--repo", other.to_str().unwrap(), "init"]);
    let g = Guest::start("director-limit", &[]);
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    // Each point is held 3 s with the guest frozen: long enough for the two runs to meet.
    let s = Server::start(&catalog, &e.path("work"), &["--per-host-limit", "1", "--debug-hold", "3"]);
    let mut tasks = Vec::new();
    for (name, repo) in [("first", e.repo()), ("second", other.clone())] {
        let job = json!({"name": name, "vms": {"names": [g.name]}, "repository": repo});
        let (status, created) = s.call("POST", "/api/jobs", Some(&admin), Some(job));
        assert_eq!(status, 201, "{created}");
        let (status, task) = s.call("POST", &format!("/api/jobs/{}/run", created["id"]), Some(&admin), None);
        assert_eq!(status, 202, "{task}");
        tasks.push(task["id"].as_i64().unwrap());
    }
    let ended: Vec<Value> = tasks.iter().map(|t| wait_task(&s, &admin, *t, Duration::from_secs(300))).collect();
    for t in &ended {
        assert_eq!(t["state"], "ok", "{t}");
    }
    // One of them waited for the other's slot on the host (whichever got it first).
    let waited = tasks.iter().any(|t| {
        let (_, log) = s.call("GET", &format!("/api/tasks/{t}/log"), Some(&admin), None);
        log.to_string().contains("waiting for one to end")
    });
    assert!(waited, "neither task waited for the host: {ended:?}");
}

/// A restore through the API, as the console's wizard asks it: an instant recovery of a real
/// guest's point onto this host, into a restore folder the server's configuration file names.
/// The VM runs from the repository at once, then its disks move into the folder; it keeps
/// running, with the guest's file, and nothing of the recovery is left running.
#[test]
fn an_instant_recovery_through_the_api_runs_the_point_and_moves_its_disks() {
    let e = Env::new();
    e.init();
    let g = Guest::start("director-instant", &[]);
    let marker = format!("instant {}", std::process::id());
    g.exec(&format!("echo '{marker}' > /data/instant.txt; sync"));
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    // The server's settings from its configuration file (`--config`).
    let restored = e.path("restored");
    std::fs::create_dir_all(&restored).unwrap();
    let config = e.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nrestore_storage = [\"{}\"]\nper_host_limit = 2\n[hosts]\nuris = [\"qemu:///system\"]\n",
            restored.display()
        ),
    )
    .unwrap();
    let s = Server::start(&catalog, &e.path("work"), &["--config", config.to_str().unwrap()]);
    let (_, hosts) = s.call("GET", "/api/hosts", Some(&admin), None);
    assert_eq!(hosts, json!({"hosts": ["qemu:///system"], "restore_storage": [restored]}), "{hosts}");

    let job = json!({"name": "instant", "vms": {"names": [g.name]}, "repository": e.repo()});
    let (_, created) = s.call("POST", "/api/jobs", Some(&admin), Some(job));
    let (_, task) = s.call("POST", &format!("/api/jobs/{}/run", created["id"]), Some(&admin), None);
    let task = wait_task(&s, &admin, task["id"].as_i64().unwrap(), Duration::from_secs(300));
    assert_eq!(task["state"], "ok", "{task}");
    let point = task["result"]["vms"][0]["point"].as_str().unwrap().to_string();

    let name = format!("cairn-instant-{}", std::process::id());
    let ask = json!({"point": point, "kind": "instant", "host": "qemu:///system", "storage": restored, "name": name});
    let (status, task) = s.call("POST", "/api/restores", Some(&admin), Some(ask));
    assert_eq!(status, 202, "{task}");
    let task = wait_task(&s, &admin, task["id"].as_i64().unwrap(), Duration::from_secs(300));
    let cleanup = || {
        let _ = Command::new("virsh").args(["-q", "destroy", &name]).output();
        let _ = Command::new("virsh").args(["-q", "undefine", &name, "--checkpoints-metadata"]).output();
    };
    if task["state"] != "ok" {
        cleanup();
        panic!("the instant recovery failed: {task}");
    }
    assert_eq!((task["kind"].as_str(), task["result"]["name"].as_str()), (Some("restore"), Some(name.as_str())));
    let state = common::guest::virsh(&["domstate", &name]);
    let disks = common::guest::virsh(&["domblklist", &name]);
    // It was started from the point: its guest agent answers once it has booted.
    let booted = Command::new(common::guest::guest_sh()).args(["wait", &name]).output().unwrap();
    let guest = Guest { name: name.clone() };
    let seen = if booted.status.success() { guest.exec("cat /data/instant.txt") } else { String::new() };
    std::mem::forget(guest); // not a test guest's folder: removed below
    let servers = common::guest::pgrep(&format!("serve-nbd {}", g.name));
    cleanup();
    assert_eq!(state.trim(), "running");
    assert!(disks.contains(restored.to_str().unwrap()), "the disks did not move into the folder: {disks}");
    assert_eq!(seen.trim(), marker, "the recovered guest does not hold its file");
    assert!(servers.is_empty(), "the point's NBD server is still running: {servers:?}");
}
