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

/// A way [`FlakyProxy`] fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProxyFault {
    /// 503 SlowDown (S3's throttling), no Retry-After.
    SlowDown,
    /// 500 InternalError.
    InternalError,
    /// The connection closed before any answer; the request is not forwarded.
    Dropped,
    /// The response's first half, then the connection drops (a torn read).
    TornResponse,
    /// The request is forwarded (the server acts on it), then no answer comes for
    /// [`ProxyConfig::stall`] and the connection closes: an answer lost after a long wait.
    Stall,
    /// 429 Too Many Requests with a Retry-After header.
    TooManyRequests,
    /// 503 SlowDown with a Retry-After header.
    SlowDownRetryAfter,
    /// Part of the request body (some of its first quarter) is read and forwarded, then both
    /// connections close: the server gets a short body (it must store nothing), the client a
    /// connection cut under its upload. A request with fewer than two bytes of body gets one
    /// of the other chosen faults instead.
    TornUpload,
}

impl ProxyFault {
    pub const ALL: [ProxyFault; 8] = [
        ProxyFault::SlowDown,
        ProxyFault::InternalError,
        ProxyFault::Dropped,
        ProxyFault::TornResponse,
        ProxyFault::Stall,
        ProxyFault::TooManyRequests,
        ProxyFault::SlowDownRetryAfter,
        ProxyFault::TornUpload,
    ];
    /// What [`FlakyProxy::start`] injects.
    pub const CLASSIC: [ProxyFault; 4] =
        [ProxyFault::SlowDown, ProxyFault::InternalError, ProxyFault::Dropped, ProxyFault::TornResponse];

    pub fn name(self) -> &'static str {
        match self {
            ProxyFault::SlowDown => "slow_down_503",
            ProxyFault::InternalError => "internal_error_500",
            ProxyFault::Dropped => "dropped",
            ProxyFault::TornResponse => "torn_response",
            ProxyFault::Stall => "stall",
            ProxyFault::TooManyRequests => "too_many_requests_429",
            ProxyFault::SlowDownRetryAfter => "slow_down_503_retry_after",
            ProxyFault::TornUpload => "torn_upload",
        }
    }

    /// The fault of a [`ProxyFault::name`] (or of its first word: `slow_down`, `internal_error`,
    /// `too_many_requests`).
    pub fn parse(s: &str) -> Option<ProxyFault> {
        let s = s.trim().to_ascii_lowercase();
        ProxyFault::ALL
            .into_iter()
            .find(|f| f.name() == s || f.name().trim_end_matches(|c: char| c == '_' || c.is_ascii_digit()) == s)
    }
}

/// How a [`FlakyProxy`] fails requests.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// One request in this many is failed.
    pub one_in: u64,
    /// Seeds the generator that picks the failed requests and their faults.
    pub seed: u64,
    /// The faults to choose from (evenly).
    pub faults: Vec<ProxyFault>,
    /// How long [`ProxyFault::Stall`] holds an answer back before it closes the connection.
    pub stall: Duration,
    /// The Retry-After (seconds) of [`ProxyFault::TooManyRequests`] and
    /// [`ProxyFault::SlowDownRetryAfter`].
    pub retry_after_secs: u64,
    /// A file to append one line per request to: its request line, body size and fault.
    pub log: Option<std::path::PathBuf>,
    /// The first request with a body at least this large is a [`ProxyFault::TornUpload`],
    /// whatever the draw (so that a run surely tears one large upload, a pack's).
    pub tear_first_upload_over: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            one_in: 5,
            seed: 1,
            faults: ProxyFault::CLASSIC.to_vec(),
            stall: Duration::from_secs(2),
            retry_after_secs: 1,
            log: None,
            tear_first_upload_over: None,
        }
    }
}

/// What a [`FlakyProxy`] counts.
#[derive(Default)]
struct ProxyCounters {
    /// Faults injected, by [`ProxyFault`] (its position in [`ProxyFault::ALL`]).
    by_kind: [std::sync::atomic::AtomicU64; ProxyFault::ALL.len()],
    /// Torn uploads the server answered with a success (it took a short body for whole).
    torn_uploads_accepted: std::sync::atomic::AtomicU64,
    /// Requests (by request line) answered with a Retry-After, and when that answer was sent.
    retry_after_sent: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Duration)>>,
    /// Retries of those requests that came after their Retry-After, and those that came sooner.
    retry_after_honored: std::sync::atomic::AtomicU64,
    retry_after_early: std::sync::atomic::AtomicU64,
    /// Whether the upload [`ProxyConfig::tear_first_upload_over`] asks to tear was torn.
    first_upload_torn: std::sync::atomic::AtomicBool,
}

/// An HTTP proxy in front of a test server that fails some requests the ways object stores
/// and networks do ([`ProxyFault`]): by default ([`FlakyProxy::start`]) 503 (SlowDown,
/// throttling), 500 (InternalError), a connection closed before any answer, and a response
/// cut half way (a torn read); [`FlakyProxy::start_with`] adds stalls, 429 and 503 with
/// Retry-After, and torn uploads. One request in `one_in` is failed, chosen by a seeded
/// generator, so a failing run can be replayed (as far as the order requests arrive in is).
/// Every request is forwarded on its own upstream connection (`Connection: close`), and the
/// client's connection closes after each answer.
pub struct FlakyProxy {
    pub port: u16,
    /// How many requests were failed so far.
    pub faults: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How many requests were forwarded whole.
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    counters: std::sync::Arc<ProxyCounters>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyProxy {
    /// Fails one request in `one_in` with one of [`ProxyFault::CLASSIC`].
    pub fn start(upstream: u16, one_in: u64, seed: u64) -> FlakyProxy {
        FlakyProxy::start_with(upstream, ProxyConfig { one_in, seed, ..Default::default() })
    }

    /// Fails requests as `config` says.
    pub fn start_with(upstream: u16, config: ProxyConfig) -> FlakyProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        assert!(config.one_in > 0, "one_in must be at least 1");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(ProxyCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1));
        let config = Arc::new(config);
        let (f, fw, c, st) = (faults.clone(), forwarded.clone(), counters.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let (f, fw, c, counter, config) = (f.clone(), fw.clone(), c.clone(), counter.clone(), config.clone());
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
                    let counts = Counts { faults: &f, forwarded: &fw, counters: &c };
                    let _ = proxy_one(client, upstream, &config, &draw, &counts);
                });
            }
        });
        FlakyProxy { port, faults, forwarded, counters, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many faults of `kind` were injected so far.
    pub fn injected(&self, kind: ProxyFault) -> u64 {
        let i = ProxyFault::ALL.iter().position(|k| *k == kind).unwrap();
        self.counters.by_kind[i].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Faults injected so far, by kind (every kind, injected or not).
    pub fn injected_by_kind(&self) -> Vec<(ProxyFault, u64)> {
        ProxyFault::ALL.iter().map(|&k| (k, self.injected(k))).collect()
    }

    /// Torn uploads the server answered with a success: it took a short body for a whole one
    /// (a server bug; 0 on a sound server).
    pub fn torn_uploads_accepted(&self) -> u64 {
        self.counters.torn_uploads_accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Of the retries of requests answered with a Retry-After: how many came once it had
    /// passed, and how many sooner (a client that does not read the header retries on its own
    /// backoff schedule).
    pub fn retry_after_retries(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.counters.retry_after_honored.load(Ordering::Relaxed),
            self.counters.retry_after_early.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The counters one proxied request updates.
struct Counts<'a> {
    faults: &'a std::sync::atomic::AtomicU64,
    forwarded: &'a std::sync::atomic::AtomicU64,
    counters: &'a ProxyCounters,
}

impl Counts<'_> {
    fn fault(&self, kind: ProxyFault) {
        use std::sync::atomic::Ordering;
        self.faults.fetch_add(1, Ordering::Relaxed);
        let i = ProxyFault::ALL.iter().position(|k| *k == kind).unwrap();
        self.counters.by_kind[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Which fault (if any) a request with `body_len` bytes of body gets, from one draw: every
/// `one_in`th draw fails, with one of the configured faults that fit the request.
fn choose_fault(config: &ProxyConfig, roll: u64, body_len: usize) -> Option<ProxyFault> {
    if !roll.is_multiple_of(config.one_in) {
        return None;
    }
    let fitting: Vec<ProxyFault> =
        config.faults.iter().copied().filter(|&f| f != ProxyFault::TornUpload || body_len >= 2).collect();
    if fitting.is_empty() {
        return None;
    }
    Some(fitting[((roll >> 32) % fitting.len() as u64) as usize])
}

/// The request's head with `Connection: close` (each request has its own upstream connection).
fn rewrite_head(head: &str) -> String {
    let mut rewritten = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            rewritten.push_str(line);
            rewritten.push_str("\r\n");
        }
    }
    rewritten.push_str("Connection: close\r\n\r\n");
    rewritten
}

/// An S3-style error answer.
fn error_answer(client: &mut TcpStream, status: &str, code: &str, retry_after: Option<u64>) -> std::io::Result<()> {
    let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
    let retry_after = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n{retry_after}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(msg.as_bytes())
}

/// Reads one request from `client`, then fails it or forwards it (with `Connection: close`,
/// so each request has its own upstream connection) and closes.
fn proxy_one(
    mut client: TcpStream,
    upstream: u16,
    config: &ProxyConfig,
    draw: &dyn Fn() -> u64,
    counts: &Counts,
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
    // A retry of a request answered with a Retry-After: did it wait as told?
    let request_line = head.lines().next().unwrap_or_default().to_string();
    if let Some((sent, wait)) = counts.counters.retry_after_sent.lock().unwrap().remove(&request_line) {
        let c = &counts.counters;
        let n = if sent.elapsed() >= wait { &c.retry_after_honored } else { &c.retry_after_early };
        n.fetch_add(1, Ordering::Relaxed);
    }
    let roll = draw();
    let forced = config.tear_first_upload_over.is_some_and(|min| len >= min.max(2))
        && !counts.counters.first_upload_torn.swap(true, Ordering::Relaxed);
    let fault = if forced { Some(ProxyFault::TornUpload) } else { choose_fault(config, roll, len) };
    if let Some(path) = &config.log {
        let line = format!("{request_line} ({len} bytes): {}\n", fault.map_or("forwarded", |f| f.name()));
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    // A torn upload reads the body only this far.
    let cut = match fault {
        // In its first quarter: a large body is then still being sent when the connection
        // drops, as a network cut finds it.
        Some(ProxyFault::TornUpload) => 1 + ((roll >> 8) % (len as u64 / 4).max(1)) as usize,
        _ => len,
    };
    while buf.len() < head_end + cut {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let retry_after = Some(config.retry_after_secs);
    if matches!(fault, Some(ProxyFault::TooManyRequests | ProxyFault::SlowDownRetryAfter)) {
        let wait = Duration::from_secs(config.retry_after_secs);
        counts.counters.retry_after_sent.lock().unwrap().insert(request_line, (std::time::Instant::now(), wait));
    }
    match fault {
        Some(ProxyFault::SlowDown) => {
            counts.fault(ProxyFault::SlowDown);
            return error_answer(&mut client, "503 Slow Down", "SlowDown", None);
        }
        Some(ProxyFault::InternalError) => {
            counts.fault(ProxyFault::InternalError);
            return error_answer(&mut client, "500 Internal Server Error", "InternalError", None);
        }
        Some(ProxyFault::Dropped) => {
            counts.fault(ProxyFault::Dropped);
            return client.shutdown(std::net::Shutdown::Both); // closed, no answer
        }
        Some(ProxyFault::TooManyRequests) => {
            counts.fault(ProxyFault::TooManyRequests);
            return error_answer(&mut client, "429 Too Many Requests", "TooManyRequests", retry_after);
        }
        Some(ProxyFault::SlowDownRetryAfter) => {
            counts.fault(ProxyFault::SlowDownRetryAfter);
            return error_answer(&mut client, "503 Slow Down", "SlowDown", retry_after);
        }
        Some(ProxyFault::TornUpload) => {
            // The server gets the head (its full Content-Length) and `cut` bytes, then the end
            // of the stream; the client, a connection closed under its upload.
            counts.fault(ProxyFault::TornUpload);
            let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
            up.write_all(rewrite_head(&head).as_bytes())?;
            up.write_all(&buf[head_end..head_end + cut])?;
            let _ = up.shutdown(std::net::Shutdown::Write);
            let _ = client.shutdown(std::net::Shutdown::Both);
            drop(client);
            up.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut answer = Vec::new();
            let _ = up.read_to_end(&mut answer);
            let status =
                String::from_utf8_lossy(&answer[..answer.len().min(16)]).split_whitespace().nth(1).map(String::from);
            if status.is_some_and(|s| s.starts_with('2')) {
                counts.counters.torn_uploads_accepted.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        _ => {}
    }
    // Forward with Connection: close.
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(rewrite_head(&head).as_bytes())?;
    up.write_all(&buf[head_end..head_end + len])?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    if fault == Some(ProxyFault::Stall) {
        // The server acted on the request; its answer never comes.
        counts.fault(ProxyFault::Stall);
        std::thread::sleep(config.stall);
        return client.shutdown(std::net::Shutdown::Both);
    }
    if fault == Some(ProxyFault::TornResponse) && response.len() > 64 {
        // A torn response: the headers and half the body, then the connection drops.
        counts.fault(ProxyFault::TornResponse);
        client.write_all(&response[..response.len() / 2 + 1])?;
        return client.shutdown(std::net::Shutdown::Both);
    }
    counts.forwarded.fetch_add(1, Ordering::Relaxed);
    client.write_all(&response)?;
    client.shutdown(std::net::Shutdown::Both)
}
