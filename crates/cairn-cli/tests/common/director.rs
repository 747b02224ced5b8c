//! A real `cairn server` process, driven over its REST API on loopback (the director's tests).

use super::Env;
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `cairn server`, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(catalog: &Path, work: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(catalog, work, extra, &[])
    }

    /// With these environment variables too (an object store's credentials).
    pub fn start_with_env(catalog: &Path, work: &Path, extra: &[&str], env: &[(&str, String)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["server", "--listen", "127.0.0.1:0", "--tick", "1", "--catalog"])
            .arg(catalog)
            .arg("--work-dir")
            .arg(work)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("the server said {line:?}"));
        Server { child, base: addr.to_string() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with `token` (if any): (status, body as JSON, or null).
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = ureq::request(method, &self.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A GET answered in text: (status, body).
    pub fn text(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = ureq::get(&self.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    pub fn kill(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(catalog: &Path, name: &str, role: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["server", "token", "create", name, "--role", role, "--catalog"])
        .arg(catalog)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// Waits until task `id` has ended; returns it.
pub fn wait_task(s: &Server, token: &str, id: i64, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let (status, task) = s.call("GET", &format!("/api/tasks/{id}"), Some(token), None);
        assert_eq!(status, 200, "{task}");
        if !matches!(task["state"].as_str(), Some("queued" | "running")) {
            return task;
        }
        assert!(t.elapsed() < limit, "task {id} still {} after {limit:?}: {task}", task["state"]);
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn catalog_in(e: &Env) -> PathBuf {
    e.path("director/catalog.db")
}
