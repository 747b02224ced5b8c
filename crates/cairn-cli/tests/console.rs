//! The web console (issue 15) in a real Chromium, driven through chromedriver (WebDriver, on
//! loopback), against a real `cairn server` and a real libvirt guest: sign in, see the VM, make a
//! job in the form, run it and watch it end, see the point with its boot screen, browse its files,
//! and restore it as a new VM with the wizard. Each page is photographed (PNG); with
//! `CAIRN_CONSOLE_SHOTS=DIR`, the photographs are copied there (docs/console/ holds them).

mod common;

use common::director::{catalog_in, token, Server};
use common::guest::{virsh, Guest};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// chromedriver on a loopback port, and the Chromium it starts (with profile folder
/// `profile`); both killed when dropped, even if the test failed before closing the browser.
struct Driver {
    child: Child,
    url: String,
    profile: PathBuf,
}

impl Driver {
    fn start(profile: PathBuf) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) is needed: scripts/setup.sh installs it");
        let url = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while ureq::get(&format!("{url}/status")).call().is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "chromedriver did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, url, profile }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A Chromium left by a failed test outlives its driver (it is re-parented).
        let _ = Command::new("pkill").arg("-f").arg(format!("--user-data-dir={}", self.profile.display())).status();
    }
}

/// A headless Chromium of 1280x900, with the driver's profile folder.
async fn browser(driver: &Driver) -> Client {
    let profile = &driver.profile;
    let mut caps = serde_json::Map::new();
    let args = [
        "--headless=new".to_string(),
        "--no-sandbox".to_string(),
        "--disable-dev-shm-usage".to_string(),
        "--disable-gpu".to_string(),
        "--window-size=1280,900".to_string(),
        format!("--user-data-dir={}", profile.display()),
    ];
    caps.insert("goog:chromeOptions".into(), json!({ "args": args }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("starting Chromium through chromedriver")
}

/// The page's photographs: kept in `dir`, each checked to be a PNG of the window's size.
struct Shots {
    dir: PathBuf,
    taken: Vec<PathBuf>,
}

impl Shots {
    async fn take(&mut self, c: &Client, name: &str) {
        let png = c.screenshot().await.unwrap();
        let info = png::Decoder::new(std::io::Cursor::new(&png)).read_info().unwrap().info().clone();
        assert!(info.width >= 1000 && info.height >= 600, "{name}: a {}x{} screenshot", info.width, info.height);
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        self.taken.push(path);
    }
}

async fn find(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never showed: {e}"))
}

/// Waits until the text of `css` satisfies `ok`; returns it.
async fn text_until(c: &Client, css: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(text) = e.text().await {
                if ok(&text) {
                    return text;
                }
                assert!(t.elapsed() < limit, "{css} still says {text:?} after {limit:?}");
            }
        }
        assert!(t.elapsed() < limit, "{css} not found after {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let e = find(c, css).await;
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

/// Waits until a task page says the task ended, and that it ended `ok`.
async fn task_ends_ok(c: &Client, limit: Duration) {
    let state =
        text_until(c, "#task-state", limit, |s| !s.is_empty() && !s.contains("queued") && !s.contains("running")).await;
    if state.trim() != "ok" {
        let error = c.find(Locator::Css("#task-error")).await.ok();
        let error = match error {
            Some(e) => e.text().await.unwrap_or_default(),
            None => String::new(),
        };
        let log = c.find(Locator::Css("#task-log")).await.unwrap().text().await.unwrap_or_default();
        panic!("the task ended {state:?}: {error}\n{log}");
    }
}

#[test]
fn an_operator_backs_up_browses_and_restores_a_real_guest_from_the_web_console() {
    let e = Env::new();
    e.init();
    let g = Guest::start("console", &[]);
    let marker = format!("written by the console test {}\n", std::process::id());
    g.exec(&format!("printf '{}' > /data/console.txt; sync", marker.trim_end()));
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let catalog = catalog_in(&e);
    let admin = token(&catalog, "admin", "admin");
    let restored = e.path("restored");
    std::fs::create_dir_all(&restored).unwrap();
    let s = Server::start(&catalog, &e.path("work"), &["--restore-storage", restored.to_str().unwrap()]);
    let driver = Driver::start(e.path("chromium"));
    let mut shots = Shots { dir: e.path("shots"), taken: Vec::new() };
    std::fs::create_dir_all(&shots.dir).unwrap();
    let restored_name = format!("cairn-console-restored-{}", std::process::id());
    // An offsite copy target (a second repository), typed into the job form.
    let offsite = e.path("offsite");
    e.ok(&["--repo", offsite.to_str().unwrap(), "init"]);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&s.base).await.unwrap();

        // Signing in: a wrong token is refused with the server's words, the right one admitted.
        type_into(&c, "#login-token", "cairn.nobody.nothing").await;
        find(&c, "#login-go").await.click().await.unwrap();
        text_until(&c, "#login-error", Duration::from_secs(10), |t| t.contains("token")).await;
        shots.take(&c, "login").await;
        type_into(&c, "#login-token", &admin).await;
        find(&c, "#login-go").await.click().await.unwrap();
        find(&c, "#page-dashboard").await;

        // The VM list: the guest, on its host, with its method.
        find(&c, "a#nav-vms").await.click().await.unwrap();
        let row = text_until(&c, &format!("tr[data-vm=\"{uuid}\"]"), Duration::from_secs(30), |t| !t.is_empty()).await;
        assert!(row.contains(&g.name) && row.contains("app-consistent"), "{row}");
        shots.take(&c, "vms").await;

        // A job made in the form.
        find(&c, "a#nav-jobs").await.click().await.unwrap();
        find(&c, "#new-job").await.click().await.unwrap();
        find(&c, "#job-form").await;
        type_into(&c, "#job-name", "console").await;
        type_into(&c, "#job-repository", e.repo().to_str().unwrap()).await;
        find(&c, "#job-select-names").await.click().await.unwrap();
        type_into(&c, "#job-vm-names", &g.name).await;
        // 1 January, 03:00: never due while the test runs.
        type_into(&c, "#job-schedule", "0 3 1 1 *").await;
        type_into(&c, "#job-keep-last", "3").await;
        type_into(&c, "#job-copies", offsite.to_str().unwrap()).await;
        let verify = find(&c, "#job-verify-boot").await;
        if !verify.is_selected().await.unwrap() {
            verify.click().await.unwrap();
        }
        shots.take(&c, "job-form").await;
        find(&c, "#job-save").await.click().await.unwrap();
        let row = text_until(&c, "tr[data-job=\"console\"]", Duration::from_secs(30), |t| !t.is_empty()).await;
        assert!(row.contains(&g.name), "{row}");
        let (_, jobs) = s.call("GET", "/api/jobs", Some(&admin), None);
        let spec = &jobs[0]["spec"];
        assert_eq!(
            (spec["vms"]["names"].clone(), spec["verify_boot"].as_bool(), spec["retention"]["keep_last"].as_u64()),
            (json!([g.name]), Some(true), Some(3)),
            "{jobs}"
        );
        assert_eq!(spec["copies"], json!([{"repository": offsite, "password_file": null}]), "{jobs}");
        shots.take(&c, "jobs").await;

        // Run now: the task page follows it to its end.
        find(&c, "tr[data-job=\"console\"] button.run-job").await.click().await.unwrap();
        find(&c, "#page-task").await;
        text_until(&c, "#task-log", Duration::from_secs(120), |t| t.contains("frozen") || t.contains("point"))
            .await;
        shots.take(&c, "task-running").await;
        task_ends_ok(&c, Duration::from_secs(400)).await;
        let result = find(&c, "#task-result").await.text().await.unwrap();
        assert!(result.contains(&g.name) && result.contains("passed"), "{result}");
        let page = find(&c, "#page-task").await.text().await.unwrap();
        assert!(page.contains("Offsite copy to") && page.contains("1 point copied"), "{page}");
        shots.take(&c, "task").await;

        // The point, with its boot screen shown.
        let (_, points) = s.call("GET", "/api/points", Some(&admin), None);
        let points = points.as_array().unwrap();
        // The job's repository's point, and its copy offsite.
        let at = |repo: &Path| points.iter().find(|p| p["repository"] == repo.to_str().unwrap()).cloned();
        assert!(at(&offsite).is_some(), "no copy offsite: {points:?}");
        let point = at(&e.repo()).unwrap()["id"].as_str().unwrap().to_string();
        find(&c, "a#nav-points").await.click().await.unwrap();
        find(&c, &format!("tr[data-point=\"{point}\"] img.boot-shot")).await;
        let script = format!("const i = document.querySelector('tr[data-point=\"{point}\"] img.boot-shot'); return i && i.complete ? i.naturalWidth : 0;");
        let t = Instant::now();
        while c.execute(&script, vec![]).await.unwrap().as_u64().unwrap_or(0) < 100 {
            assert!(t.elapsed() < Duration::from_secs(20), "the boot screen never loaded");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        shots.take(&c, "points").await;

        // The dashboard counts it and charts the repository's size.
        find(&c, "a#nav-dashboard").await.click().await.unwrap();
        // The point and its copy.
        text_until(&c, "#card-points", Duration::from_secs(20), |t| t.contains('2')).await;
        text_until(&c, "#card-jobs-ok", Duration::from_secs(20), |t| t.contains('1')).await;
        let drawn = c
            .execute("return document.querySelectorAll('#usage-chart polyline, #usage-chart circle').length", vec![])
            .await
            .unwrap();
        assert!(drawn.as_u64() > Some(0), "the repository's use is not drawn");
        shots.take(&c, "dashboard").await;

        // Its files: the volume holding the guest's /data, the file written before the backup.
        find(&c, "a#nav-points").await.click().await.unwrap();
        find(&c, &format!("tr[data-point=\"{point}\"] button.browse-point")).await.click().await.unwrap();
        find(&c, "#page-files").await;
        let (_, volumes) = s.call("GET", &format!("/api/points/{point}/volumes"), Some(&admin), None);
        let volume = volumes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["name"].as_str())
            .find(|v| {
                let (_, listing) =
                    s.call("GET", &format!("/api/points/{point}/files?volume={v}&path=/"), Some(&admin), None);
                listing["entries"].as_array().is_some_and(|l| l.iter().any(|f| f["name"] == "console.txt"))
            })
            .unwrap_or_else(|| panic!("no volume holds console.txt: {volumes}"))
            .to_string();
        find(&c, &format!("button.volume[data-volume=\"{volume}\"]")).await.click().await.unwrap();
        find(&c, "tr[data-file=\"console.txt\"]").await;
        shots.take(&c, "files").await;
        let got = ureq::get(&s.url(&format!("/api/points/{point}/download?volume={volume}&path=/console.txt")))
            .set("Authorization", &format!("Bearer {admin}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert_eq!(got.trim_end(), marker.trim_end(), "the downloaded file is not the guest's");

        // The restore wizard: the whole VM, as a new VM, into the server's restore folder.
        find(&c, "a#nav-points").await.click().await.unwrap();
        find(&c, &format!("tr[data-point=\"{point}\"] button.restore-point")).await.click().await.unwrap();
        find(&c, "#page-restore").await;
        find(&c, "#restore-kind-vm").await.click().await.unwrap();
        type_into(&c, "#restore-name", &restored_name).await;
        let start = find(&c, "#restore-start").await;
        if start.is_selected().await.unwrap() {
            start.click().await.unwrap();
        }
        shots.take(&c, "restore").await;
        find(&c, "#restore-go").await.click().await.unwrap();
        find(&c, "#page-task").await;
        task_ends_ok(&c, Duration::from_secs(300)).await;
        shots.take(&c, "restore-task").await;
        c.close().await.unwrap();
    });

    // The restored VM is defined, from disks in the restore folder.
    let xml = virsh(&["dumpxml", &restored_name]);
    let _ = Command::new("virsh").args(["-q", "undefine", &restored_name, "--checkpoints-metadata"]).output();
    assert!(
        xml.contains(restored.to_str().unwrap()),
        "the restored VM's disks are not in {}: {xml}",
        restored.display()
    );
    let (_, tasks) = s.call("GET", "/api/tasks", Some(&admin), None);
    let restore: &Value = tasks.as_array().unwrap().iter().find(|t| t["kind"] == "restore").unwrap();
    assert_eq!(
        (restore["state"].as_str(), restore["result"]["name"].as_str()),
        (Some("ok"), Some(restored_name.as_str()))
    );
    if let Ok(dir) = std::env::var("CAIRN_CONSOLE_SHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        for shot in &shots.taken {
            std::fs::copy(shot, Path::new(&dir).join(shot.file_name().unwrap())).unwrap();
        }
    }
}
