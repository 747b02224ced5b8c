//! Object storage: S3 (AWS and compatible stores: Ceph RGW, MinIO, moto, s3s-fs) and Azure
//! Blob, through the `object_store` crate, which signs requests, retries transient failures
//! (timeouts, 5xx, throttling) with backoff, and maps provider errors.
//!
//! Keys mirror the local backend's paths under the location's prefix (`config`,
//! `packs/ab/ab…`, `index/…`): a repository folder copied to a bucket (rclone, `aws s3 sync`)
//! is a valid repository there, and back.
//!
//! How the backend keeps the crate's contract:
//! - `put` is one PUT request (packs are 16 MiB, far below the 5 GiB single-request limit):
//!   the store makes the object visible whole or not at all, durable when it answers.
//! - `put_new` is a conditional PUT (`If-None-Match: *`). A store without conditional writes
//!   (set `conditional_put = "disabled"`, see [`ObjectOptions`]) gets a HEAD then a PUT: only
//!   the repository config uses `put_new`, and two `init`s racing on such a store is the one
//!   case it cannot catch.
//! - `list` only ever returns complete objects (stores never list an upload in progress).
//!
//! The engine calls backends from plain threads; each call runs on this backend's own small
//! runtime and the caller waits for it, so a caller inside another runtime does not panic.

use crate::object_lock::{
    lasting, Answer, LockApi, LockPolicy, LockRequest, ObjectLock, Refusal, Restoration, Restored,
};
use crate::{valid_name, Backend, Kind, Listed, Result, StorageError};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;
use std::time::Duration;

/// Where a repository lives, parsed from `--repo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(std::path::PathBuf),
    /// `s3://bucket/prefix`
    S3 {
        bucket: String,
        prefix: String,
    },
    /// `az://container/prefix` (also `azure://`)
    Azure {
        container: String,
        prefix: String,
    },
}

impl Location {
    /// Parses a repository location: `s3://BUCKET[/PREFIX]`, `az://CONTAINER[/PREFIX]`, or a
    /// local path. Any other `scheme://` is refused rather than taken for a folder name.
    pub fn parse(s: &str) -> std::result::Result<Location, String> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Location::Local(s.into()));
        };
        let (top, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(format!("{s}: a prefix cannot contain . or .. segments"));
        }
        match scheme {
            "s3" => {
                if top.is_empty() {
                    return Err(format!("{s}: no bucket (expected s3://BUCKET[/PREFIX])"));
                }
                Ok(Location::S3 { bucket: top.to_string(), prefix })
            }
            "az" | "azure" => {
                if top.is_empty() {
                    return Err(format!("{s}: no container (expected az://CONTAINER[/PREFIX])"));
                }
                Ok(Location::Azure { container: top.to_string(), prefix })
            }
            other => Err(format!("{s}: unknown scheme {other}:// (expected s3://, az:// or a local path)")),
        }
    }
}

/// Settings of an object store that do not come with the location. Read from the
/// environment names the AWS CLI and Azure tools use ([`ObjectOptions::from_env`]).
#[derive(Clone, Debug, Default)]
pub struct ObjectOptions {
    /// `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`): an S3-compatible store's URL; AWS when unset.
    pub s3_endpoint: Option<String>,
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`); `us-east-1` when unset.
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub s3_session_token: Option<String>,
    /// `CAIRN_S3_CONDITIONAL_PUT=disabled` for stores that ignore `If-None-Match` (a quirk
    /// PBS also switches per endpoint).
    pub s3_conditional_put_disabled: bool,
    /// `CAIRN_S3_VIRTUAL_HOSTED=1` (or `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`):
    /// `bucket.host` URLs instead of `host/bucket`.
    pub s3_virtual_hosted: bool,
    /// `AZURE_STORAGE_CONNECTION_STRING`.
    pub azure_connection_string: Option<String>,
    /// `AZURE_STORAGE_ACCOUNT` and `AZURE_STORAGE_KEY`.
    pub azure_account: Option<String>,
    pub azure_key: Option<String>,
    /// `AZURE_STORAGE_ENDPOINT`: the blob endpoint (an emulator's URL, a sovereign cloud).
    pub azure_endpoint: Option<String>,
    /// `CAIRN_LIMIT_UPLOAD` (bytes per second, or with K/M/G): the average pace of uploads,
    /// for a shared uplink. Objects still go out whole at the link's speed, one after the
    /// other with pauses between them; locks are not held back.
    pub upload_limit: Option<u64>,
    /// `CAIRN_REQUEST_TIMEOUT` (seconds, or with ms/s/m): how long one request may take before
    /// it is abandoned and retried; 300 s when unset (a 16 MiB pack over a slow uplink).
    pub request_timeout: Option<Duration>,
}

impl ObjectOptions {
    pub fn from_env() -> ObjectOptions {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
        let yes =
            |names: &[&str]| var(names).is_some_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes"));
        ObjectOptions {
            s3_endpoint: var(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            s3_region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            s3_access_key_id: var(&["AWS_ACCESS_KEY_ID"]),
            s3_secret_access_key: var(&["AWS_SECRET_ACCESS_KEY"]),
            s3_session_token: var(&["AWS_SESSION_TOKEN"]),
            s3_conditional_put_disabled: var(&["CAIRN_S3_CONDITIONAL_PUT"])
                .is_some_and(|v| matches!(v.to_lowercase().as_str(), "disabled" | "off" | "0" | "false")),
            s3_virtual_hosted: yes(&["CAIRN_S3_VIRTUAL_HOSTED", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST"]),
            azure_connection_string: var(&["AZURE_STORAGE_CONNECTION_STRING"]),
            azure_account: var(&["AZURE_STORAGE_ACCOUNT"]),
            azure_key: var(&["AZURE_STORAGE_KEY"]),
            azure_endpoint: var(&["AZURE_STORAGE_ENDPOINT"]),
            upload_limit: var(&["CAIRN_LIMIT_UPLOAD"]).and_then(|v| crate::cache::parse_size(&v)).filter(|&r| r > 0),
            request_timeout: var(&["CAIRN_REQUEST_TIMEOUT"]).and_then(|v| parse_duration(&v)),
        }
    }
}

/// The parts of an Azure connection string cairn uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AzureConnection {
    pub account: Option<String>,
    pub key: Option<String>,
    pub endpoint: Option<String>,
}

/// Parses `Key=Value;Key=Value` (values may contain `=`, as base64 keys do).
pub fn parse_connection_string(s: &str) -> AzureConnection {
    let mut c = AzureConnection::default();
    let mut protocol = None;
    let mut suffix = None;
    for part in s.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = part.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "accountname" => c.account = Some(v),
            "accountkey" => c.key = Some(v),
            "blobendpoint" => c.endpoint = Some(v.trim_end_matches('/').to_string()),
            "defaultendpointsprotocol" => protocol = Some(v),
            "endpointsuffix" => suffix = Some(v),
            _ => {}
        }
    }
    if c.endpoint.is_none() {
        if let (Some(account), Some(suffix)) = (&c.account, suffix) {
            c.endpoint = Some(format!("{}://{account}.blob.{suffix}", protocol.as_deref().unwrap_or("https")));
        }
    }
    c
}

pub struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    /// The same store with few retries, for the config: the first request of every command,
    /// so that a wrong endpoint or key fails in seconds, not after minutes of retries.
    quick: Arc<dyn ObjectStore>,
    /// Key prefix, without slashes at either end ("" for the bucket's root).
    prefix: String,
    location: String,
    conditional_put: bool,
    runtime: tokio::runtime::Runtime,
    pace: Option<Pace>,
    /// Lock requests (S3 Object Lock, Azure version-level immutability; object_lock.rs).
    lock_api: Option<Arc<LockApi>>,
    /// Set for an immutable repository: objects of lasting kinds are written locked, and
    /// deletes remove versions.
    policy: std::sync::RwLock<Option<LockPolicy>>,
    /// Locks this process set: object -> retain-until.
    locked: std::sync::Mutex<std::collections::HashMap<(Kind, String), u64>>,
}

/// Uploads at no more than `rate` bytes per second on average: each upload reserves the time
/// its bytes take at that rate, after those reserved before it, and starts when its turn comes.
struct Pace {
    rate: f64,
    next: std::sync::Mutex<std::time::Instant>,
}

impl Pace {
    fn wait_for(&self, bytes: usize) {
        let now = std::time::Instant::now();
        let start = {
            let mut next = self.next.lock().unwrap();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate);
            start
        };
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

/// A duration written as seconds (`30`) or with a unit (`500ms`, `30s`, `2m`); never zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

use crate::DEFAULT_REQUEST_TIMEOUT;

fn client_options(endpoint: Option<&str>, timeout: Option<Duration>) -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT))
        .with_connect_timeout(Duration::from_secs(10))
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

/// Transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried
/// with jittered exponential backoff for up to 4 minutes per request: a store restarting or a
/// network cut of a few minutes delays a backup, it does not fail it. (Longer would outlive
/// the request's signature, object_store warns.)
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            base: 3.0,
        },
        max_retries: 30,
        retry_timeout: Duration::from_secs(240),
    }
}

/// Whether a request failed in a way object_store does not retry itself: its response broke
/// off or could not be decoded, or it timed out while object_store took it for one that is not
/// idempotent (S3's bulk delete is a POST). Every request of this backend is idempotent (see
/// the crate docs), so these are tried again here. (A timed-out bulk delete failed whole
/// prunes and verifies: `cairn-torture network --client-timeout-ms`.)
fn broken_response(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<HttpError>() {
            return matches!(
                h.kind(),
                HttpErrorKind::Decode | HttpErrorKind::Interrupted | HttpErrorKind::Unknown | HttpErrorKind::Timeout
            );
        }
        cause = c.source();
    }
    false
}

/// For the config (see `ObjectBackend::quick`): six retries within 15 s. A wrong endpoint fails
/// in about 15 s; a store that fails one request in four still answers (three retries were
/// seen to run out there: a failed CI run of the flaky-store test).
fn quick_retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(300),
            max_backoff: Duration::from_secs(5),
            base: 3.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(15),
    }
}

/// A version listing longer than this many pages (of up to 1,000 versions: S3's and Azure's
/// page size) is taken for a store that never ends its answer.
const MAX_VERSION_PAGES: usize = 100_000;

/// Extra attempts for a request whose response broke off (see `ObjectBackend::run`).
const BODY_RETRIES: u32 = 4;

fn setup_error(location: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io { what: format!("opening {location}"), source: std::io::Error::other(e.to_string()) }
}

impl ObjectBackend {
    pub fn open(location: &Location, opts: &ObjectOptions) -> Result<ObjectBackend> {
        type Stores = (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>);
        let lock_api;
        let ((store, quick), prefix, shown, conditional_put): (Stores, _, _, _) = match location {
            Location::S3 { bucket, prefix } => {
                let shown = display("s3", bucket, prefix);
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(opts.s3_region.clone().unwrap_or_else(|| "us-east-1".into()))
                    .with_virtual_hosted_style_request(opts.s3_virtual_hosted)
                    .with_client_options(client_options(opts.s3_endpoint.as_deref(), opts.request_timeout))
                    .with_retry(retry_config());
                if let Some(e) = &opts.s3_endpoint {
                    b = b.with_endpoint(e);
                }
                if let (Some(id), Some(secret)) = (&opts.s3_access_key_id, &opts.s3_secret_access_key) {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(t) = &opts.s3_session_token {
                        b = b.with_token(t);
                    }
                }
                if opts.s3_conditional_put_disabled {
                    b = b.with_conditional_put(object_store::aws::S3ConditionalPut::Disabled);
                }
                let quick = b.clone().with_retry(quick_retry_config()).build().map_err(|e| setup_error(&shown, e))?;
                let store = b.build().map_err(|e| setup_error(&shown, e))?;
                lock_api = Some(Arc::new(LockApi::s3(
                    store.credentials().clone(),
                    opts.s3_region.as_deref().unwrap_or("us-east-1"),
                    opts.s3_endpoint.as_deref(),
                    bucket,
                    opts.s3_virtual_hosted,
                    &shown,
                    opts.request_timeout,
                )?));
                ((Arc::new(store), Arc::new(quick)), prefix.clone(), shown, !opts.s3_conditional_put_disabled)
            }
            Location::Azure { container, prefix } => {
                let shown = display("az", container, prefix);
                let from_string =
                    opts.azure_connection_string.as_deref().map(parse_connection_string).unwrap_or_default();
                let account = from_string.account.or(opts.azure_account.clone());
                let key = from_string.key.or(opts.azure_key.clone());
                let endpoint = opts.azure_endpoint.clone().or(from_string.endpoint);
                let Some(account) = account else {
                    return Err(setup_error(
                        &shown,
                        "no Azure account: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY",
                    ));
                };
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(&account)
                    .with_container_name(container)
                    .with_client_options(client_options(endpoint.as_deref(), opts.request_timeout))
                    .with_retry(retry_config());
                if let Some(k) = key {
                    b = b.with_access_key(k);
                }
                let endpoint_for_locks = endpoint.clone();
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                let quick = b.clone().with_retry(quick_retry_config()).build().map_err(|e| setup_error(&shown, e))?;
                let store = b.build().map_err(|e| setup_error(&shown, e))?;
                lock_api = Some(Arc::new(LockApi::azure(
                    store.credentials().clone(),
                    &account,
                    endpoint_for_locks.as_deref(),
                    container,
                    &shown,
                    opts.request_timeout,
                )?));
                ((Arc::new(store), Arc::new(quick)), prefix.clone(), shown, true)
            }
            Location::Local(p) => {
                return Err(setup_error(&p.display().to_string(), "a local path is not an object store"))
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-object-store")
            .enable_all()
            .build()
            .map_err(|e| setup_error(&shown, e))?;
        let pace = opts
            .upload_limit
            .map(|rate| Pace { rate: rate as f64, next: std::sync::Mutex::new(std::time::Instant::now()) });
        Ok(ObjectBackend {
            store,
            quick,
            prefix,
            location: shown,
            conditional_put,
            runtime,
            pace,
            lock_api,
            policy: std::sync::RwLock::new(None),
            locked: Default::default(),
        })
    }

    /// The client for objects of `kind` (the config's answers fast, see `quick`).
    fn store_for(&self, kind: Kind) -> Arc<dyn ObjectStore> {
        if kind == Kind::Config {
            self.quick.clone()
        } else {
            self.store.clone()
        }
    }

    /// The object's key: the local backend's path under the prefix.
    fn key(&self, kind: Kind, name: &str) -> Result<ObjectPath> {
        let rel = if kind == Kind::Config {
            "config".to_string()
        } else if !valid_name(name) {
            return Err(StorageError::Io {
                what: format!("invalid {kind} object name {name:?}"),
                source: std::io::ErrorKind::InvalidInput.into(),
            });
        } else if kind == Kind::Pack {
            format!("packs/{}/{name}", &name[..2])
        } else {
            format!("{}/{name}", kind.dir())
        };
        Ok(ObjectPath::from(self.join(&rel)))
    }

    fn join(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// Runs one request (made by `request`, again for each attempt) on this backend's runtime
    /// and waits for it. object_store retries failed requests itself, but not a response whose
    /// body breaks off (a dropped connection mid-answer): those get a few more attempts here.
    fn run<T: Send + 'static, F>(&self, request: impl Fn() -> F) -> object_store::Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let mut attempt = 0;
        loop {
            let result = self.wait(request()).unwrap_or_else(|| {
                Err(object_store::Error::Generic { store: "cairn", source: "the request's task was dropped".into() })
            });
            match result {
                Err(e) if attempt < BODY_RETRIES && broken_response(&e) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(250 << attempt));
                }
                other => return other,
            }
        }
    }

    /// Runs `fut` on this backend's runtime and waits for it (`None`: its task was dropped).
    fn wait<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().ok()
    }

    fn error(&self, kind: Kind, name: &str, doing: &str, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound { kind, name: name.to_string() },
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StorageError::AlreadyExists { kind, name: name.to_string() }
            }
            other => StorageError::Io {
                what: format!("{doing} {kind} object {name} at {}", self.location),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }

    fn put_mode(&self, kind: Kind, name: &str, data: &[u8], mode: PutMode) -> Result<()> {
        let key = self.key(kind, name)?;
        // Locks and the config are never held back behind packs: a lock refresh that waited
        // its turn on a slow link would let the lock be taken for lost.
        if let Some(p) = self.pace.as_ref().filter(|_| !matches!(kind, Kind::Lock | Kind::Config)) {
            p.wait_for(data.len());
        }
        if let (Some(policy), Some(api)) = (self.current_policy().filter(|_| lasting(kind)), &self.lock_api) {
            return self.put_locked(api, kind, name, key.as_ref(), data, policy, mode == PutMode::Create);
        }
        let payload = PutPayload::from(data.to_vec());
        self.run(|| {
            let (store, key, payload) = (self.store_for(kind), key.clone(), payload.clone());
            let opts = PutOptions { mode: mode.clone(), ..Default::default() };
            async move { store.put_opts(&key, payload, opts).await.map(drop) }
        })
        .map_err(|e| self.error(kind, name, "writing", e))
    }

    fn current_policy(&self) -> Option<LockPolicy> {
        *self.policy.read().unwrap()
    }

    /// Runs one lock request on this backend's runtime and waits for its answer.
    fn lock_call(&self, api: &Arc<LockApi>, request: LockRequest) -> std::result::Result<Answer, String> {
        let api = api.clone();
        self.wait(async move { api.send(&request).await })
            .unwrap_or_else(|| Err("the request's task was dropped".into()))
    }

    /// A lock request whose failure to get any answer is an I/O error saying what was done.
    fn lock_ask(&self, api: &Arc<LockApi>, request: LockRequest, doing: &str) -> Result<Answer> {
        self.lock_call(api, request).map_err(|e| api.failed(doing, e))
    }

    /// A PUT that creates the object locked until the current generation's date.
    #[allow(clippy::too_many_arguments)]
    fn put_locked(
        &self,
        api: &Arc<LockApi>,
        kind: Kind,
        name: &str,
        key: &str,
        data: &[u8],
        policy: LockPolicy,
        create_only: bool,
    ) -> Result<()> {
        let until = policy.until(crate::object_lock::now());
        let doing = format!("writing {kind} object {name}");
        let answer =
            self.lock_ask(api, api.put_locked(key, data, until, create_only && self.conditional_put), &doing)?;
        match answer.status {
            200..=299 => {
                self.locked.lock().unwrap().insert((kind, name.to_string()), until);
                Ok(())
            }
            412 | 409 => Err(StorageError::AlreadyExists { kind, name: name.to_string() }),
            _ => Err(api.fail(&doing, &answer)),
        }
    }

    /// HEAD of an object (a version of it, if given): its version ID and lock date.
    fn head_lock(
        &self,
        api: &Arc<LockApi>,
        kind: Kind,
        name: &str,
        version: Option<&str>,
    ) -> Result<(String, Option<u64>)> {
        let key = self.key(kind, name)?;
        let doing = format!("reading the lock of {kind} object {name}");
        let answer = self.lock_ask(api, api.head(key.as_ref(), version), &doing)?;
        match answer.status {
            200..=299 => Ok(api.head_answer(&answer)),
            404 => Err(StorageError::NotFound { kind, name: name.to_string() }),
            _ => Err(api.fail(&doing, &answer)),
        }
    }

    /// Every version (and S3 delete marker) whose key starts with `prefix`.
    fn list_versions(&self, api: &Arc<LockApi>, prefix: &str) -> Result<Vec<crate::object_lock::Version>> {
        let mut out = Vec::new();
        let mut next: crate::object_lock::NextPage = None;
        for _page in 0..MAX_VERSION_PAGES {
            let answer = self.lock_ask(api, api.list_versions(prefix, &next), "listing object versions")?;
            if !answer.ok() {
                return Err(api.fail("listing object versions", &answer));
            }
            let (entries, more) = api.versions_page(&answer).map_err(|e| api.failed("listing object versions", e))?;
            out.extend(entries);
            if more.is_none() {
                return Ok(out);
            }
            if more == next {
                return Err(api.failed("listing object versions", "the store answered the same page again".into()));
            }
            next = more;
        }
        Err(api.failed("listing object versions", format!("more than {MAX_VERSION_PAGES} pages")))
    }

    /// Sends a delete; a refusal because of a lock becomes `Locked` with its date.
    fn delete_checked(
        &self,
        api: &Arc<LockApi>,
        kind: Kind,
        name: &str,
        request: LockRequest,
        version: Option<&str>,
    ) -> Result<()> {
        let doing = format!("deleting {kind} object {name}");
        let answer = self.lock_ask(api, request, &doing)?;
        if answer.ok() || answer.status == 404 {
            return Ok(());
        }
        if api.refused_for_lock(&answer) {
            // Only a lock still running explains a refusal; otherwise it is a permission
            // problem, reported as such.
            let now = crate::object_lock::now();
            if let Ok((_, Some(until))) = self.head_lock(api, kind, name, version) {
                if until > now {
                    return Err(StorageError::Locked { kind, name: name.to_string(), until });
                }
            }
        }
        Err(api.fail(&doing, &answer))
    }

    /// An immutable repository's delete: every version of the object, objects first and
    /// delete markers last, so a locked version stops the delete with the object still
    /// visible. On Azure the current version is deleted first (it then becomes a previous
    /// version; a current version cannot be deleted by its ID), refused while it is locked.
    fn delete_all_versions(&self, api: &Arc<LockApi>, kind: Kind, name: &str) -> Result<()> {
        let key = self.key(kind, name)?;
        let key = key.as_ref();
        if api.is_azure() {
            self.delete_checked(api, kind, name, api.delete_current(key), None)?;
        }
        let mut versions: Vec<_> = self.list_versions(api, key)?.into_iter().filter(|v| v.key == key).collect();
        versions.sort_by_key(|v| v.delete_marker);
        for v in versions {
            self.delete_checked(api, kind, name, api.delete_version(key, &v.version_id), Some(&v.version_id))?;
        }
        Ok(())
    }

    /// The kind and name of a key of this repository (`None` for anything else).
    fn parse_key(&self, key: &str) -> Option<(Kind, String)> {
        let rel = if self.prefix.is_empty() { key } else { key.strip_prefix(&self.prefix)?.strip_prefix('/')? };
        if rel == "config" {
            return Some((Kind::Config, "config".into()));
        }
        let (dir, rest) = rel.split_once('/')?;
        let kind = Kind::ALL.into_iter().find(|k| k.dir() == dir && *k != Kind::Config)?;
        let name = rest.rsplit('/').next()?.to_string();
        (valid_name(&name) && self.key(kind, &name).ok()?.as_ref() == key).then_some((kind, name))
    }

    /// The object's size, asked with few retries (to explain a failed read, not to do work).
    fn quick_size(&self, kind: Kind, name: &str) -> Result<u64> {
        self.head_size(self.quick.clone(), kind, name)
    }

    fn io(&self, kind: Kind, name: &str, why: String) -> StorageError {
        StorageError::Io {
            what: format!("reading {kind} object {name} at {}", self.location),
            source: std::io::Error::other(why),
        }
    }

    fn size_of(&self, kind: Kind, name: &str) -> Result<u64> {
        self.head_size(self.store_for(kind), kind, name)
    }

    fn head_size(&self, store: Arc<dyn ObjectStore>, kind: Kind, name: &str) -> Result<u64> {
        let key = self.key(kind, name)?;
        self.run(|| {
            let (store, key) = (store.clone(), key.clone());
            async move { store.head(&key).await.map(|m| m.size) }
        })
        .map_err(|e| self.error(kind, name, "reading", e))
    }
}

fn display(scheme: &str, top: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("{scheme}://{top}")
    } else {
        format!("{scheme}://{top}/{prefix}")
    }
}

impl Backend for ObjectBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn create(&self) -> Result<()> {
        // Buckets and containers are made (with their versioning and lock settings) by the
        // operator; here, only prove the location answers, before a config is written.
        // A listing, not a HEAD: a HEAD of a missing bucket and of a missing key look alike.
        let prefix = ObjectPath::from(self.join("config"));
        self.run(|| {
            let (store, prefix) = (self.quick.clone(), prefix.clone());
            async move { store.list_with_delimiter(Some(&prefix)).await.map(drop) }
        })
        .map_err(|e| StorageError::Io {
            what: format!("reaching {} (the bucket or container must exist)", self.location),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn exists(&self, kind: Kind, name: &str) -> Result<bool> {
        match self.size_of(kind, name) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.put_mode(kind, name, data, PutMode::Overwrite)
    }

    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        if !self.conditional_put && self.exists(kind, name)? {
            return Err(StorageError::AlreadyExists { kind, name: name.to_string() });
        }
        let mode = if self.conditional_put { PutMode::Create } else { PutMode::Overwrite };
        match self.put_mode(kind, name, data, mode) {
            // A create whose answer was lost is retried, and the retry finds the object it
            // made: the same bytes (a config holds a random ID) mean it is ours.
            Err(StorageError::AlreadyExists { .. }) if self.get(kind, name).is_ok_and(|b| b == data) => Ok(()),
            other => other,
        }
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let key = self.key(kind, name)?;
        self.run(|| {
            let (store, key) = (self.store_for(kind), key.clone());
            async move { store.get(&key).await?.bytes().await }
        })
        .map(|b| b.to_vec())
        .map_err(|e| self.error(kind, name, "reading", e))
    }

    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(kind, name, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, kind: Kind, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        if len == 0 {
            return Ok(());
        }
        let key = self.key(kind, name)?;
        let got = self.run(|| {
            let (store, key) = (self.store_for(kind), key.clone());
            async move { store.get_range(&key, offset..offset + len).await }
        });
        let short =
            |size: u64| StorageError::ShortRead { kind, name: name.to_string(), offset, end: offset + len, size };
        match got {
            Ok(bytes) if bytes.len() as u64 == len => {
                // Takes the response's buffer over where it can (no second copy of a span
                // per read in flight).
                *buf = Vec::from(bytes);
                Ok(())
            }
            // Stores answer a range past the end with fewer bytes or an error; so may a broken
            // answer. The object's size (asked quickly) tells which: only a really short object
            // is a ShortRead (which marks a pack truncated), anything else an I/O error with its
            // cause.
            Ok(bytes) => {
                let got = bytes.len();
                match self.quick_size(kind, name) {
                    Ok(size) if size < offset + len => Err(short(size)),
                    _ => Err(self.io(kind, name, format!("the store answered {got} of {len} bytes at {offset}"))),
                }
            }
            Err(e) => match self.error(kind, name, "reading", e) {
                StorageError::Io { what, source } => match self.quick_size(kind, name) {
                    Ok(size) if size < offset + len => Err(short(size)),
                    _ => Err(StorageError::Io { what: format!("{what} (bytes {offset}..{})", offset + len), source }),
                },
                other => Err(other),
            },
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<Listed>> {
        if kind == Kind::Config {
            return match self.size_of(kind, "config") {
                Ok(size) => Ok(vec![Listed { name: "config".into(), size }]),
                Err(e) if e.is_not_found() => Ok(vec![]),
                Err(e) => Err(e),
            };
        }
        let prefix = ObjectPath::from(self.join(kind.dir()));
        let metas = self.run(|| {
            let (store, prefix) = (self.store.clone(), prefix.clone());
            async move {
                use futures::TryStreamExt;
                store.list(Some(&prefix)).try_collect::<Vec<_>>().await
            }
        });
        let metas = metas.map_err(|e| self.error(kind, "(listing)", "listing", e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                valid_name(&name).then_some(Listed { name, size: m.size })
            })
            .collect())
    }

    fn reads_in_flight(&self) -> usize {
        8
    }

    fn object_lock(&self) -> Option<&dyn ObjectLock> {
        self.lock_api.as_ref().map(|_| self as &dyn ObjectLock)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        if let (Some(_), Some(api)) = (self.current_policy(), &self.lock_api) {
            return self.delete_all_versions(api, kind, name);
        }
        let key = self.key(kind, name)?;
        match self.run(|| {
            let (store, key) = (self.store_for(kind), key.clone());
            async move { store.delete(&key).await }
        }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(kind, name, "deleting", e)),
        }
    }
}

impl ObjectLock for ObjectBackend {
    fn check_bucket(&self) -> Result<()> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        let mut answers = Vec::new();
        for request in api.check_requests() {
            answers.push(self.lock_ask(api, request, "reading the bucket's settings")?);
        }
        api.check_answers(&answers).map_err(|r| match r {
            Refusal::Refused(why) => StorageError::Io {
                what: format!("making {} immutable", self.location),
                source: std::io::Error::other(why),
            },
            Refusal::Failed(e) => e,
        })
    }

    fn lock_writes(&self, policy: LockPolicy) {
        *self.policy.write().unwrap() = Some(policy);
    }

    fn policy(&self) -> Option<LockPolicy> {
        self.current_policy()
    }

    fn retained_until(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        Ok(self.head_lock(api, kind, name, None)?.1)
    }

    /// Extends cairn's versions of the object: every version that carries a lock (cairn
    /// writes lasting objects locked only), not only the current one, which may be a version
    /// someone wrote over cairn's. Returns the lowest lock among them afterwards.
    fn extend(&self, kind: Kind, name: &str, until: u64) -> Result<u64> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        let key = self.key(kind, name)?;
        let key = key.as_ref();
        let mut locked = self.locked_versions(api, kind, name, key)?;
        if locked.is_empty() {
            // No version carries a lock (a store that forgets ended ones): the current one.
            let (version, current) = self.head_lock(api, kind, name, None)?;
            locked.push((version, current.unwrap_or(0)));
        }
        let doing = format!("extending the lock of {kind} object {name}");
        let mut lowest = u64::MAX;
        for (version, current) in locked {
            if current >= until {
                lowest = lowest.min(current);
                continue;
            }
            let answer = self.lock_ask(api, api.extend(key, &version, until), &doing)?;
            if !answer.ok() {
                // Another writer may have extended it further meanwhile (a store refuses an
                // earlier date): what counts is the date it has now.
                match self.head_lock(api, kind, name, Some(&version)) {
                    Ok((_, Some(c))) if c >= until => {
                        lowest = lowest.min(c);
                        continue;
                    }
                    Err(e) if e.is_not_found() => continue,
                    _ => return Err(api.fail(&doing, &answer)),
                }
            }
            lowest = lowest.min(until);
        }
        if lowest == u64::MAX {
            return Err(StorageError::NotFound { kind, name: name.to_string() });
        }
        self.locked.lock().unwrap().insert((kind, name.to_string()), lowest);
        Ok(lowest)
    }

    fn lowest_retained(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        let key = self.key(kind, name)?;
        let locked = self.locked_versions(api, kind, name, key.as_ref())?;
        Ok(locked.into_iter().map(|(_, u)| u).min())
    }

    fn locked_config(&self) -> Result<Option<Vec<u8>>> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        let key = self.key(Kind::Config, "config")?;
        let key = key.as_ref();
        // The oldest locked version: cairn writes the config once, create-only.
        let Some((version, _)) = self.locked_versions(api, Kind::Config, "config", key)?.pop() else {
            return Ok(None);
        };
        let doing = "reading the locked config";
        let answer = self.lock_ask(api, api.get_version(key, &version, 1 << 20), doing)?;
        if !answer.ok() {
            return Err(api.fail(doing, &answer));
        }
        Ok(Some(answer.body))
    }

    fn locked_here(&self) -> Vec<(Kind, String, u64)> {
        self.locked.lock().unwrap().iter().map(|((k, n), u)| (*k, n.clone(), *u)).collect()
    }

    fn undelete(&self, dry_run: bool) -> Result<Vec<Restored>> {
        let api = self.lock_api.as_ref().ok_or_else(|| no_locks(&self.location))?;
        let prefix = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let mut by_key: std::collections::BTreeMap<String, Vec<crate::object_lock::Version>> = Default::default();
        for v in self.list_versions(api, &prefix)? {
            by_key.entry(v.key.clone()).or_default().push(v);
        }
        let mut found = Vec::new();
        for (key, mut versions) in by_key {
            let Some((kind, name)) = self.parse_key(&key).filter(|(k, _)| *k != Kind::Lock) else { continue };
            // Azure has no delete markers: a blob without a current version may be one a
            // delete of cairn's left half done (it deletes the current version first). Only
            // lasting objects, which cairn never deletes while locked, come back there.
            if api.is_azure() && !lasting(kind) {
                continue;
            }
            // Newest first: S3 lists a key's versions so; Azure's version IDs are timestamps.
            if api.is_azure() {
                versions.sort_by(|a, b| b.version_id.cmp(&a.version_id));
            }
            // The current version first, then the others newest first.
            let mut objects: Vec<&crate::object_lock::Version> = versions.iter().filter(|v| !v.delete_marker).collect();
            objects.sort_by_key(|v| !v.latest);
            if objects.is_empty() {
                continue;
            }
            let hidden = if api.is_azure() {
                !versions.iter().any(|v| v.latest)
            } else {
                versions.iter().any(|v| v.latest && v.delete_marker)
            };
            let good = match self.sound_version(api, kind, &name, &key, &objects) {
                Ok(Some(v)) => v,
                // Nothing better to bring back (verify reports the object), or it could not be
                // read: left as it is.
                Ok(None) | Err(_) if objects.len() > 1 => continue,
                _ => objects[0],
            };
            let current_is_good = good.version_id == objects[0].version_id && objects[0].latest;
            let overwritten = !hidden && !current_is_good;
            if !hidden && !overwritten {
                continue;
            }
            if !dry_run {
                self.bring_back(api, kind, &name, &key, &versions, &objects, good, hidden)?;
            }
            let how = if hidden { Restoration::Hidden } else { Restoration::Overwritten };
            found.push(Restored { kind, name, how });
        }
        Ok(found)
    }
}

/// The largest object version `undelete` reads to check it (packs close near 16 MiB); larger
/// ones are not cairn's.
const MAX_VERSION_READ: u64 = 256 << 20;

impl ObjectBackend {
    /// The versions of `key` that carry a lock, with its date (expired or not), oldest last.
    fn locked_versions(&self, api: &Arc<LockApi>, kind: Kind, name: &str, key: &str) -> Result<Vec<(String, u64)>> {
        let versions: Vec<_> =
            self.list_versions(api, key)?.into_iter().filter(|v| v.key == key && !v.delete_marker).collect();
        let mut out = Vec::new();
        for v in versions {
            match self.head_lock(api, kind, name, Some(&v.version_id)) {
                Ok((_, Some(until))) => out.push((v.version_id, until)),
                Ok((_, None)) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        if api.is_azure() {
            out.sort_by(|a, b| b.0.cmp(&a.0));
        }
        Ok(out)
    }

    /// The version to keep: for content-named objects, the first of `objects` (current first)
    /// whose bytes hash to the name; for the config (written once, create-only), its oldest
    /// locked version. `None` when there is none.
    fn sound_version<'v>(
        &self,
        api: &Arc<LockApi>,
        kind: Kind,
        name: &str,
        key: &str,
        objects: &[&'v crate::object_lock::Version],
    ) -> Result<Option<&'v crate::object_lock::Version>> {
        if kind == Kind::Config {
            let locked = self.locked_versions(api, kind, name, key)?;
            let Some((oldest, _)) = locked.last() else { return Ok(None) };
            return Ok(objects.iter().find(|v| &v.version_id == oldest).copied());
        }
        if objects.len() == 1 {
            return Ok(Some(objects[0]));
        }
        for v in objects {
            if v.size > MAX_VERSION_READ {
                continue;
            }
            let doing = format!("reading a version of {key}");
            let answer = self.lock_ask(api, api.get_version(key, &v.version_id, MAX_VERSION_READ as usize), &doing)?;
            if answer.status == 404 {
                continue;
            }
            if !answer.ok() {
                return Err(api.fail(&doing, &answer));
            }
            if blake3::hash(&answer.body).to_hex().as_str() == name {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    }

    /// Makes `good` the current version of `key` again. S3: a hidden object gets its delete
    /// markers removed; versions over `good` (someone else's: they do not hash to the name)
    /// are deleted, and if the store keeps one (locked), `good` is copied back on top and the
    /// copy locked as `good` is. Azure: `good` is copied back in place, locked as it was.
    #[allow(clippy::too_many_arguments)]
    fn bring_back(
        &self,
        api: &Arc<LockApi>,
        kind: Kind,
        name: &str,
        key: &str,
        versions: &[crate::object_lock::Version],
        objects: &[&crate::object_lock::Version],
        good: &crate::object_lock::Version,
        hidden: bool,
    ) -> Result<()> {
        let doing = format!("bringing back {kind} object {name}");
        let now = crate::object_lock::now();
        let until = self.head_lock(api, kind, name, Some(&good.version_id))?.1.filter(|&u| u > now);
        if api.is_azure() {
            let answer = self.lock_ask(api, api.restore_version(key, &good.version_id, until), &doing)?;
            return if answer.ok_without_error() { Ok(()) } else { Err(api.fail(&doing, &answer)) };
        }
        if hidden {
            for m in versions.iter().filter(|v| v.delete_marker) {
                self.delete_checked(api, kind, name, api.delete_version(key, &m.version_id), None)?;
            }
        }
        // Newer than `good`: listed before it (current first, then newest first).
        let newer: Vec<&&crate::object_lock::Version> =
            objects.iter().take_while(|v| v.version_id != good.version_id).collect();
        let mut kept = 0;
        for v in &newer {
            match self.delete_checked(api, kind, name, api.delete_version(key, &v.version_id), Some(&v.version_id)) {
                Ok(()) => {}
                Err(StorageError::Locked { .. }) => kept += 1,
                Err(e) => return Err(e),
            }
        }
        if kept > 0 {
            // A locked version of someone else's stays on top: `good` goes over it.
            let answer = self.lock_ask(api, api.restore_version(key, &good.version_id, until), &doing)?;
            if !answer.ok_without_error() {
                return Err(api.fail(&doing, &answer));
            }
            if let (Some(u), Some(copy)) = (until, answer.header("x-amz-version-id").map(str::to_string)) {
                let answer = self.lock_ask(api, api.extend(key, &copy, u), &doing)?;
                if !answer.ok() {
                    return Err(api.fail(&doing, &answer));
                }
            }
        }
        Ok(())
    }
}

fn no_locks(location: &str) -> StorageError {
    StorageError::Io {
        what: format!("object locks at {location}"),
        source: std::io::Error::other("this store has no object locks"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(Location::parse("/srv/repo").unwrap(), Location::Local("/srv/repo".into()));
        assert_eq!(Location::parse("rel/dir").unwrap(), Location::Local("rel/dir".into()));
        assert_eq!(Location::parse("s3://b/x/y/").unwrap(), Location::S3 { bucket: "b".into(), prefix: "x/y".into() });
        assert_eq!(Location::parse("s3://b").unwrap(), Location::S3 { bucket: "b".into(), prefix: "".into() });
        assert_eq!(
            Location::parse("azure://c/p").unwrap(),
            Location::Azure { container: "c".into(), prefix: "p".into() }
        );
        assert!(Location::parse("s3:///p").unwrap_err().contains("no bucket"));
        assert!(Location::parse("gs://b").unwrap_err().contains("unknown scheme"));
        assert!(Location::parse("s3://b/a/../c").unwrap_err().contains(".."));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 2m "), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("5h"), None);
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn connection_strings_parse() {
        let c = parse_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=a2V5==;BlobEndpoint=http://127.0.0.1:10000/dev/;",
        );
        assert_eq!(
            c,
            AzureConnection {
                account: Some("dev".into()),
                key: Some("a2V5==".into()),
                endpoint: Some("http://127.0.0.1:10000/dev".into())
            }
        );
        let c = parse_connection_string("AccountName=acct;AccountKey=k;EndpointSuffix=core.windows.net");
        assert_eq!(c.endpoint.as_deref(), Some("https://acct.blob.core.windows.net"));
    }
}
