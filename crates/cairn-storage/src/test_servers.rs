//! Real object storage servers on loopback, for tests: moto (S3 with versioning and Object
//! Lock), s3s-fs (plain, fast S3 on a folder) and Azurite (Azure Blob). `scripts/setup.sh`
//! installs them under `/var/lib/cairn-test` (or set `CAIRN_TEST_MOTO`, `CAIRN_TEST_S3S_FS`,
//! `CAIRN_TEST_AZURITE` to their programs). Each test starts its own on a free port and the
//! server stops when the handle drops.
//!
//! A server that is not installed makes [`TestServer::start`] return `None` and the test
//! skip, loudly, unless `CAIRN_TEST_REQUIRE_SERVERS=1` (set by `scripts/test.sh`): then it
//! fails, so CI can never pass by skipping.

use crate::object::{Location, ObjectBackend, ObjectOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Moto,
    S3sFs,
    Azurite,
}

/// The well-known development account of Azurite (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const S3_KEY: &str = "cairntest";
const S3_SECRET: &str = "cairntestsecret";

pub struct TestServer {
    pub flavor: Flavor,
    pub port: u16,
    child: Child,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A folder removed on drop (this crate has no tempfile dependency outside tests).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn program(flavor: Flavor) -> Option<PathBuf> {
    let (var, default) = match flavor {
        Flavor::Moto => ("CAIRN_TEST_MOTO", "/var/lib/cairn-test/moto/bin/moto_server"),
        Flavor::S3sFs => ("CAIRN_TEST_S3S_FS", "/var/lib/cairn-test/s3s-fs/bin/s3s-fs"),
        Flavor::Azurite => ("CAIRN_TEST_AZURITE", "/var/lib/cairn-test/azurite/node_modules/.bin/azurite-blob"),
    };
    if let Some(p) = std::env::var_os(var) {
        return Some(p.into());
    }
    let p = PathBuf::from(default);
    p.exists().then_some(p)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

impl TestServer {
    /// Starts the server, or returns `None` (the test skips) when it is not installed.
    pub fn start(flavor: Flavor) -> Option<TestServer> {
        if program(flavor).is_none() {
            if std::env::var("CAIRN_TEST_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
                panic!("{flavor:?} is not installed (scripts/setup.sh installs it) and CAIRN_TEST_REQUIRE_SERVERS=1");
            }
            eprintln!("SKIPPED: {flavor:?} is not installed (run scripts/setup.sh)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("cairn-{flavor:?}-{}", crate::random_name()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = tempfile_dir::Dir(dir);
        let port = free_port();
        let child = TestServer::spawn(flavor, port, &dir.0);
        Some(TestServer { flavor, port, child, _dir: dir })
    }

    pub fn endpoint(&self) -> String {
        match self.flavor {
            Flavor::Azurite => format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port),
            _ => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The environment a cairn process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self.flavor {
            Flavor::Azurite => vec![(
                "AZURE_STORAGE_CONNECTION_STRING",
                format!(
                    "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={};",
                    self.endpoint()
                ),
            )],
            _ => vec![
                ("AWS_ENDPOINT_URL", self.endpoint()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ACCESS_KEY_ID", S3_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
            ],
        }
    }

    pub fn options(&self) -> ObjectOptions {
        match self.flavor {
            Flavor::Azurite => ObjectOptions {
                azure_account: Some(AZURITE_ACCOUNT.into()),
                azure_key: Some(AZURITE_KEY.into()),
                azure_endpoint: Some(self.endpoint()),
                ..Default::default()
            },
            _ => ObjectOptions {
                s3_endpoint: Some(self.endpoint()),
                s3_region: Some("us-east-1".into()),
                s3_access_key_id: Some(S3_KEY.into()),
                s3_secret_access_key: Some(S3_SECRET.into()),
                ..Default::default()
            },
        }
    }

    /// Makes a bucket (container) and returns its URL for `--repo`, with `prefix`.
    pub fn bucket(&self, name: &str, prefix: &str) -> String {
        match self.flavor {
            Flavor::Moto => http(self.port, "PUT", &format!("/{name}"), &[], 200),
            // s3s-fs: a bucket is a folder of its data directory.
            Flavor::S3sFs => std::fs::create_dir_all(self._dir.0.join("data").join(name)).unwrap(),
            Flavor::Azurite => {
                let path = format!("/{AZURITE_ACCOUNT}/{name}");
                let date = httpdate::fmt_http_date(std::time::SystemTime::now());
                let version = "2021-08-06";
                let to_sign = format!(
                    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container"
                );
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD;
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(AZURITE_KEY).unwrap());
                let sig = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
                let auth = format!("SharedKey {AZURITE_ACCOUNT}:{sig}");
                http(
                    self.port,
                    "PUT",
                    &format!("{path}?restype=container"),
                    &[("x-ms-date", &date), ("x-ms-version", version), ("Authorization", &auth)],
                    201,
                )
            }
        }
        let scheme = if self.flavor == Flavor::Azurite { "az" } else { "s3" };
        if prefix.is_empty() {
            format!("{scheme}://{name}")
        } else {
            format!("{scheme}://{name}/{prefix}")
        }
    }

    /// Makes a bucket with S3 Object Lock on (moto only: the one test server that has it), and
    /// returns its URL with `prefix`.
    pub fn locked_bucket(&self, name: &str, prefix: &str) -> String {
        assert_eq!(self.flavor, Flavor::Moto, "only moto has Object Lock");
        http(self.port, "PUT", &format!("/{name}"), &[("x-amz-bucket-object-lock-enabled", "true")], 200);
        format!("s3://{name}/{prefix}")
    }

    /// Turns versioning on for a bucket made by [`TestServer::bucket`] (moto).
    pub fn enable_versioning(&self, name: &str) {
        let body = b"<VersioningConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Status>Enabled</Status></VersioningConfiguration>";
        http_body(self.port, "PUT", &format!("/{name}?versioning"), &[], body, 200);
    }

    /// Gives a locked bucket a default retention rule (moto), which cairn must refuse.
    pub fn set_default_retention(&self, name: &str, days: u32) {
        let body = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><ObjectLockEnabled>Enabled</ObjectLockEnabled>\
             <Rule><DefaultRetention><Mode>GOVERNANCE</Mode><Days>{days}</Days></DefaultRetention></Rule></ObjectLockConfiguration>"
        );
        let md5 = crate::object_lock::content_md5(body.as_bytes());
        http_body(self.port, "PUT", &format!("/{name}?object-lock"), &[("Content-MD5", &md5)], body.as_bytes(), 200);
    }

    /// A backend on `url` (made by [`TestServer::bucket`]).
    pub fn backend(&self, url: &str) -> ObjectBackend {
        ObjectBackend::open(&Location::parse(url).unwrap(), &self.options()).unwrap()
    }

    /// Stops the server as a crash would (no shutdown); [`TestServer::resume`] starts it
    /// again on the same port and data, for tests of a store that goes away mid-run.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn resume(&mut self) {
        self.child = TestServer::spawn(self.flavor, self.port, &self._dir.0);
    }

    /// Starts the server on `port` with its data in `dir` and waits until it listens.
    fn spawn(flavor: Flavor, port: u16, dir: &std::path::Path) -> Child {
        let exe = program(flavor).expect("checked by start");
        let mut cmd = Command::new(&exe);
        match flavor {
            Flavor::Moto => cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]),
            Flavor::S3sFs => {
                std::fs::create_dir_all(dir.join("data")).unwrap();
                cmd.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--access-key",
                    S3_KEY,
                    "--secret-key",
                    S3_SECRET,
                ])
                .arg(dir.join("data"))
            }
            Flavor::Azurite => cmd
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--skipApiVersionCheck", "--loose"])
                .arg("--location")
                .arg(dir.join("data")),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "{flavor:?} did not listen on port {port} within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 request to the server's loopback port; panics unless it answers `want`.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], want: u16) {
    http_body(port, method, path, headers, b"", want)
}

fn http_body(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], want: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status: u16 = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    assert_eq!(status, want, "{method} {path}: {answer}");
}

/// An HTTP proxy in front of a test server that fails some requests the ways object stores
/// and networks do: 503 (SlowDown, throttling), 500 (InternalError), a connection closed
/// before any answer, and a response cut half way (a torn read). One request in `one_in` is
/// failed, chosen by a seeded generator, so a failing run can be replayed.
pub struct FlakyProxy {
    pub port: u16,
    /// How many requests were failed so far.
    pub faults: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How many requests were forwarded whole.
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyProxy {
    pub fn start(upstream: u16, one_in: u64, seed: u64) -> FlakyProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1));
        let (f, fw, st) = (faults.clone(), forwarded.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let (f, fw, counter) = (f.clone(), fw.clone(), counter.clone());
                std::thread::spawn(move || {
                    // xorshift on a shared state: which request fails depends only on the seed
                    // and the order requests arrive in.
                    let draw = || {
                        let mut x = counter.load(Ordering::Relaxed);
                        loop {
                            let mut n = x;
                            n ^= n << 13;
                            n ^= n >> 7;
                            n ^= n << 17;
                            match counter.compare_exchange(x, n, Ordering::Relaxed, Ordering::Relaxed) {
                                Ok(_) => return n,
                                Err(now) => x = now,
                            }
                        }
                    };
                    let _ = proxy_one(client, upstream, one_in, &draw, &f, &fw);
                });
            }
        });
        FlakyProxy { port, faults, forwarded, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request from `client`, then fails it or forwards it (with `Connection: close`,
/// so each request has its own upstream connection) and closes.
fn proxy_one(
    mut client: TcpStream,
    upstream: u16,
    one_in: u64,
    draw: &dyn Fn() -> u64,
    faults: &std::sync::atomic::AtomicU64,
    forwarded: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Headers, then a body of Content-Length bytes (object_store sends no chunked bodies).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let roll = draw();
    let fault = roll.is_multiple_of(one_in).then_some((roll >> 32) % 4);
    let answer = |client: &mut TcpStream, status: &str, code: &str| {
        let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
        let msg = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(msg.as_bytes())
    };
    match fault {
        Some(0) => {
            faults.fetch_add(1, Ordering::Relaxed);
            return answer(&mut client, "503 Slow Down", "SlowDown");
        }
        Some(1) => {
            faults.fetch_add(1, Ordering::Relaxed);
            return answer(&mut client, "500 Internal Server Error", "InternalError");
        }
        Some(2) => {
            faults.fetch_add(1, Ordering::Relaxed);
            return client.shutdown(std::net::Shutdown::Both); // closed, no answer
        }
        _ => {}
    }
    // Forward with Connection: close.
    let mut rewritten = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            rewritten.push_str(line);
            rewritten.push_str("\r\n");
        }
    }
    rewritten.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(rewritten.as_bytes())?;
    up.write_all(&buf[head_end..head_end + len])?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    if fault == Some(3) && response.len() > 64 {
        // A torn response: the headers and half the body, then the connection drops.
        faults.fetch_add(1, Ordering::Relaxed);
        client.write_all(&response[..response.len() / 2 + 1])?;
        return client.shutdown(std::net::Shutdown::Both);
    }
    forwarded.fetch_add(1, Ordering::Relaxed);
    client.write_all(&response)?;
    client.shutdown(std::net::Shutdown::Both)
}
