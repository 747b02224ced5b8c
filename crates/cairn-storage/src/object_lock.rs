//! Immutability: objects locked against deletion for a time, by the store itself.
//!
//! An immutable repository asks its store to refuse, until a date, every deletion or overwrite
//! of the objects a restore point needs, whoever asks: cairn, an administrator, or ransomware
//! holding the keys. On S3 this is Object Lock in **compliance** mode, set on each object as it
//! is written (`x-amz-object-lock-*` headers) and extended later with PutObjectRetention. The
//! bucket must have versioning and Object Lock on and **no default retention** (a default would
//! also lock the lock files and records cairn must delete): [`ObjectLock::check_bucket`].
//!
//! Which objects are locked ([`lasting`]): packs, points, key files and the config. Index files
//! are not (`repair index` rebuilds them from packs, and prune rewrites them), nor are lock
//! files and catalog records (rewritten as a matter of course).
//!
//! **Generations** (Veeam's "block generations"): every object locked during one generation
//! (`generation_days` long, aligned on the epoch) gets the same retain-until date, the end of
//! the generation plus `days`. A pack that later points still use keeps its lock until the
//! first backup of the next generation extends it: one extension per pack per generation,
//! however many backups use it.
//!
//! In a versioned bucket a plain DELETE hides an object behind a "delete marker" instead of
//! removing it (and succeeds even on a locked object). So in an immutable repository every
//! delete removes the object's versions one by one, which the store refuses for a locked one
//! ([`StorageError::Locked`]); and markers someone else made are taken away by
//! [`ObjectLock::undelete`], which brings the hidden objects back.
//!
//! object_store has no call for any of this, and headers it adds are not signed (AWS refuses
//! unsigned `x-amz-*` headers), so these requests are made here: signed with object_store's
//! own SigV4 signer and the store's credentials, sent with reqwest.

use crate::{Kind, Result, StorageError};
use serde::{Deserialize, Serialize};

pub const DAY: u64 = 86_400;

/// How long objects stay locked: `days` at least, in generations of `generation_days`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPolicy {
    pub days: u32,
    pub generation_days: u32,
}

impl LockPolicy {
    /// The default generation: Veeam's 10 days (it uses 30 on AWS, to save requests).
    pub const DEFAULT_GENERATION_DAYS: u32 = 10;

    /// The lock every object of a point made at `now` (unix seconds) needs: `days` from now.
    pub fn required(&self, now: u64) -> u64 {
        now + u64::from(self.days) * DAY
    }

    /// The retain-until date of an object locked at `now`: the end of the current generation
    /// plus `days`. At least [`LockPolicy::required`], at most a generation more.
    pub fn until(&self, now: u64) -> u64 {
        let g = u64::from(self.generation_days.max(1)) * DAY;
        (now / g + 1) * g + u64::from(self.days) * DAY
    }
}

/// Whether objects of `kind` are locked in an immutable repository (see the module docs).
pub fn lasting(kind: Kind) -> bool {
    matches!(kind, Kind::Pack | Kind::Point | Kind::Key | Kind::Config)
}

/// The current time in unix seconds, as locks count it. In debug builds (tests),
/// `CAIRN_TEST_CLOCK_OFFSET_DAYS` (at most 3650) moves it forward, for tests of what happens a
/// generation later; release builds ignore it (a clock in the future would set compliance
/// locks nobody can shorten, and make prune take running locks for ended ones).
pub fn now() -> u64 {
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    real.saturating_add(test_clock_offset())
}

#[cfg(debug_assertions)]
fn test_clock_offset() -> u64 {
    let days = std::env::var("CAIRN_TEST_CLOCK_OFFSET_DAYS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    days.min(3650) * DAY
}

#[cfg(not(debug_assertions))]
fn test_clock_offset() -> u64 {
    0
}

/// An RFC 3339 UTC date of unix seconds `t`, as S3 takes retain-until dates.
pub fn rfc3339(t: u64) -> String {
    jiff::Timestamp::from_second(t as i64).map(|ts| ts.to_string()).unwrap_or_else(|_| t.to_string())
}

/// What a store that can lock objects offers (see the module docs).
pub trait ObjectLock: Send + Sync {
    /// Checks that the bucket can hold cairn's locks: versioning on, Object Lock on, no default
    /// retention. The error says which is missing and what to do.
    fn check_bucket(&self) -> Result<()>;
    /// From now on, objects of [`lasting`] kinds are written locked by `policy`, and deletes
    /// remove versions (refused for a locked one) instead of leaving delete markers.
    fn lock_writes(&self, policy: LockPolicy);
    /// The policy set by [`ObjectLock::lock_writes`], if any.
    fn policy(&self) -> Option<LockPolicy>;
    /// The current version's retain-until date (unix seconds), `None` when it has no lock.
    fn retained_until(&self, kind: Kind, name: &str) -> Result<Option<u64>>;
    /// Makes the locks of the object's locked versions (cairn's: it writes lasting objects
    /// locked only; not only the current version, which someone may have written over it)
    /// last until at least `until`; returns the lowest date they now have. A later lock is
    /// left as it is (compliance locks can only grow, and some stores would shorten one
    /// without complaint).
    fn extend(&self, kind: Kind, name: &str, until: u64) -> Result<u64>;
    /// The lowest lock date among the object's versions that carry one (expired or not):
    /// what cairn's own version has even if someone wrote a version over it. `None`: no
    /// version is locked.
    fn lowest_retained(&self, kind: Kind, name: &str) -> Result<Option<u64>>;
    /// The bytes of the config's oldest locked version (the one cairn wrote: the config is
    /// written once), whatever the current version is; `None` when no version is locked.
    fn locked_config(&self) -> Result<Option<Vec<u8>>>;
    /// Locks this process set, by object: what it wrote locked and what it extended.
    fn locked_here(&self) -> Vec<(Kind, String, u64)>;
    /// Finds objects of the repository that someone hid or replaced: hidden by a delete marker
    /// (a plain DELETE in a versioned bucket), or overwritten (a lasting object whose current
    /// version is unlocked over an older locked one: cairn writes those locked only). Unless
    /// `dry_run`, makes the locked or hidden version current again. Lock files stay deleted.
    fn undelete(&self, dry_run: bool) -> Result<Vec<Restored>>;
}

/// An object [`ObjectLock::undelete`] found (and brought back unless it was a dry run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub kind: Kind,
    pub name: String,
    pub how: Restoration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restoration {
    /// Behind a delete marker (S3), or with no current version (Azure).
    Hidden,
    /// An unlocked version written over a locked one.
    Overwritten,
}

// ---- Requests to the store ------------------------------------------------------------

/// Who answers lock requests, and how they are signed.
pub(crate) enum Provider {
    /// S3 Object Lock; SigV4 with the store's credentials.
    S3 { credentials: object_store::aws::AwsCredentialProvider, region: String },
    /// Azure Blob version-level immutability (time-based retention policies on blob
    /// versions, mode `locked`); Shared Key or token with the store's credentials. Written to
    /// the documented REST API; no local server implements it (Azurite answers "not
    /// implemented"), so only the container check runs against a real server in the tests.
    Azure { credentials: object_store::azure::AzureCredentialProvider, account: String },
}

/// The lock side of an object store: builds the requests object_store cannot send, signs and
/// sends them, and reads their answers.
pub(crate) struct LockApi {
    provider: Provider,
    client: reqwest::Client,
    /// `scheme://host[:port][/path]` of URLs: before the bucket or container, or with it
    /// (`bucket_in_base`: S3 virtual-hosted style).
    base: String,
    bucket_in_base: bool,
    /// The bucket or container.
    bucket: String,
    pub(crate) location: String,
}

/// One request of ours to the store (signed when sent).
pub(crate) struct LockRequest {
    pub method: http::Method,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// The largest answer accepted (XML answers are small; a version's bytes are not).
    pub max_answer: usize,
}

/// Why a request got no answer, and whether trying again may help.
pub(crate) struct SendError {
    why: String,
    transient: bool,
}

/// The answer to one request, its body bounded.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub(crate) fn ok(&self) -> bool {
        (200..=299).contains(&self.status)
    }
    /// A success status whose body is not an error document (S3 may answer a copy with 200
    /// and report its failure in the body).
    pub(crate) fn ok_without_error(&self) -> bool {
        self.ok() && error_code(&self.body).0.is_empty()
    }
}

/// Answers we read are small XML documents; anything bigger is not one of them.
const MAX_ANSWER: usize = 8 << 20;
/// Attempts of one request: waits of 0.5, 1.5, 4.5, 13.5 s, then 30 s, about 4 minutes in all.
const ATTEMPTS: u32 = 12;

/// What a bucket or container check found wrong, for the operator.
pub(crate) enum Refusal {
    Refused(String),
    Failed(StorageError),
}

impl LockApi {
    pub(crate) fn s3(
        credentials: object_store::aws::AwsCredentialProvider,
        region: &str,
        endpoint: Option<&str>,
        bucket: &str,
        virtual_hosted: bool,
        location: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<LockApi> {
        // As object_store does: path-style unless virtual-hosted is asked for; an endpoint as
        // given, which in virtual-hosted style already names the bucket.
        let (base, bucket_in_base) = match (endpoint, virtual_hosted) {
            (Some(e), _) => (e.trim_end_matches('/').to_string(), virtual_hosted),
            (None, true) => (format!("https://{bucket}.s3.{region}.amazonaws.com"), true),
            (None, false) => (format!("https://s3.{region}.amazonaws.com"), false),
        };
        let provider = Provider::S3 { credentials, region: region.to_string() };
        let mut api = LockApi::new(provider, base, bucket, location, timeout)?;
        api.bucket_in_base = bucket_in_base;
        Ok(api)
    }

    pub(crate) fn azure(
        credentials: object_store::azure::AzureCredentialProvider,
        account: &str,
        endpoint: Option<&str>,
        container: &str,
        location: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<LockApi> {
        let base = match endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://{account}.blob.core.windows.net"),
        };
        LockApi::new(Provider::Azure { credentials, account: account.to_string() }, base, container, location, timeout)
    }

    fn new(
        provider: Provider,
        base: String,
        bucket: &str,
        location: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<LockApi> {
        let client = reqwest::Client::builder()
            .timeout(timeout.unwrap_or(crate::DEFAULT_REQUEST_TIMEOUT))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| io(location, "setting up lock requests", e.to_string()))?;
        Ok(LockApi {
            provider,
            client,
            base,
            bucket_in_base: false,
            bucket: bucket.to_string(),
            location: location.to_string(),
        })
    }

    pub(crate) fn is_azure(&self) -> bool {
        matches!(self.provider, Provider::Azure { .. })
    }

    /// The URL of `key` (of the bucket or container when empty) with `query`.
    pub(crate) fn url(&self, key: &str, query: &[(&str, &str)]) -> String {
        let path = key.split('/').map(encode_segment).collect::<Vec<_>>().join("/");
        let mut url = if self.bucket_in_base {
            format!("{}/{path}", self.base)
        } else if key.is_empty() && self.is_azure() {
            format!("{}/{}", self.base, self.bucket)
        } else {
            format!("{}/{}/{path}", self.base, self.bucket)
        };
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode_segment(k));
            if !v.is_empty() || self.is_azure() {
                url.push('=');
                url.push_str(&encode_segment(v));
            }
        }
        url
    }

    fn request(&self, method: http::Method, key: &str, query: &[(&str, &str)]) -> LockRequest {
        LockRequest { method, url: self.url(key, query), headers: Vec::new(), body: Vec::new(), max_answer: MAX_ANSWER }
    }

    /// The date header of a lock, in the provider's format.
    fn date(&self, until: u64) -> String {
        if self.is_azure() {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(until))
        } else {
            rfc3339(until)
        }
    }

    /// A PUT that creates the object locked until `until` (with the Content-MD5 S3 requires
    /// of any PUT with lock parameters).
    pub(crate) fn put_locked(&self, key: &str, data: &[u8], until: u64, create_only: bool) -> LockRequest {
        let mut r = self.request(http::Method::PUT, key, &[]);
        r.headers = if self.is_azure() {
            vec![
                ("x-ms-blob-type", "BlockBlob".to_string()),
                ("x-ms-immutability-policy-mode", "locked".to_string()),
                ("x-ms-immutability-policy-until-date", self.date(until)),
            ]
        } else {
            vec![
                ("x-amz-object-lock-mode", "COMPLIANCE".to_string()),
                ("x-amz-object-lock-retain-until-date", self.date(until)),
            ]
        };
        r.headers.push(("content-md5", content_md5(data)));
        if create_only {
            r.headers.push(("if-none-match", "*".to_string()));
        }
        r.body = data.to_vec();
        r
    }

    /// HEAD of an object (a version of it if given).
    pub(crate) fn head(&self, key: &str, version: Option<&str>) -> LockRequest {
        let name = if self.is_azure() { "versionid" } else { "versionId" };
        let query: Vec<(&str, &str)> = version.map(|v| vec![(name, v)]).unwrap_or_default();
        self.request(http::Method::HEAD, key, &query)
    }

    /// What a HEAD says: the version's ID and its lock date (unix seconds), if any.
    pub(crate) fn head_answer(&self, a: &Answer) -> (String, Option<u64>) {
        if self.is_azure() {
            let until = a.header("x-ms-immutability-policy-until-date").and_then(parse_http_date);
            (a.header("x-ms-version-id").unwrap_or_default().to_string(), until)
        } else {
            let until = a.header("x-amz-object-lock-retain-until-date").and_then(parse_date);
            (a.header("x-amz-version-id").unwrap_or_default().to_string(), until)
        }
    }

    /// Sets the lock of a version to `until` (callers never ask for an earlier date).
    pub(crate) fn extend(&self, key: &str, version: &str, until: u64) -> LockRequest {
        if self.is_azure() {
            let mut query = vec![("comp", "immutabilityPolicies")];
            if !version.is_empty() {
                query.push(("versionid", version));
            }
            let mut r = self.request(http::Method::PUT, key, &query);
            r.headers = vec![
                ("x-ms-immutability-policy-mode", "locked".to_string()),
                ("x-ms-immutability-policy-until-date", self.date(until)),
            ];
            r
        } else {
            let mut query = vec![("retention", "")];
            if !version.is_empty() {
                query.push(("versionId", version));
            }
            let mut r = self.request(http::Method::PUT, key, &query);
            r.body = format!(
                "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
                 <RetainUntilDate>{}</RetainUntilDate></Retention>",
                self.date(until)
            )
            .into_bytes();
            r.headers = vec![("content-md5", content_md5(&r.body))];
            r
        }
    }

    /// One page of the versions of objects whose key starts with `prefix`.
    pub(crate) fn list_versions(&self, prefix: &str, next: &NextPage) -> LockRequest {
        let mut query: Vec<(&str, &str)> = if self.is_azure() {
            vec![("restype", "container"), ("comp", "list"), ("include", "versions"), ("prefix", prefix)]
        } else {
            vec![("versions", ""), ("prefix", prefix)]
        };
        if let Some((k, v)) = next {
            if self.is_azure() {
                query.push(("marker", k));
            } else {
                query.push(("key-marker", k));
                if !v.is_empty() {
                    query.push(("version-id-marker", v));
                }
            }
        }
        self.request(http::Method::GET, "", &query)
    }

    pub(crate) fn versions_page(&self, a: &Answer) -> std::result::Result<(Vec<Version>, NextPage), String> {
        if self.is_azure() {
            parse_azure_versions(&a.body)
        } else {
            parse_versions(&a.body)
        }
    }

    /// Deletes one version.
    pub(crate) fn delete_version(&self, key: &str, version: &str) -> LockRequest {
        let name = if self.is_azure() { "versionid" } else { "versionId" };
        self.request(http::Method::DELETE, key, &[(name, version)])
    }

    /// Azure: deletes the current version (it becomes a previous version, which can then be
    /// deleted by its ID; a current version cannot be named by its ID in a delete).
    pub(crate) fn delete_current(&self, key: &str) -> LockRequest {
        self.request(http::Method::DELETE, key, &[])
    }

    /// The bytes of one version (bounded by `max`).
    pub(crate) fn get_version(&self, key: &str, version: &str, max: usize) -> LockRequest {
        let name = if self.is_azure() { "versionid" } else { "versionId" };
        let mut r = self.request(http::Method::GET, key, &[(name, version)]);
        r.max_answer = max;
        r
    }

    /// Makes `version` the current version again by copying it onto its own name (S3
    /// CopyObject, unlocked: the caller extends the copy, since a copy with lock headers needs
    /// a checksum some stores refuse on a copy; Azure Copy Blob, locked until `until`).
    pub(crate) fn restore_version(&self, key: &str, version: &str, until: Option<u64>) -> LockRequest {
        if self.is_azure() {
            return self.promote(key, version, until);
        }
        let path = key.split('/').map(encode_segment).collect::<Vec<_>>().join("/");
        let mut r = self.request(http::Method::PUT, key, &[]);
        r.headers =
            vec![("x-amz-copy-source", format!("{}/{path}?versionId={}", self.bucket, encode_segment(version)))];
        r
    }

    /// Azure: makes `version` the current version again (a copy of it onto its own name),
    /// locked until `until` if given.
    pub(crate) fn promote(&self, key: &str, version: &str, until: Option<u64>) -> LockRequest {
        let mut r = self.request(http::Method::PUT, key, &[]);
        r.headers = vec![("x-ms-copy-source", self.url(key, &[("versionid", version)]))];
        if let Some(u) = until {
            r.headers.push(("x-ms-immutability-policy-mode", "locked".to_string()));
            r.headers.push(("x-ms-immutability-policy-until-date", self.date(u)));
        }
        r
    }

    /// Whether a refused delete was refused because of a lock (S3: 403 AccessDenied; Azure:
    /// 409 with an immutability error code).
    pub(crate) fn refused_for_lock(&self, a: &Answer) -> bool {
        if self.is_azure() {
            a.status == 409 && a.header("x-ms-error-code").is_some_and(|c| c.contains("Immutab"))
        } else {
            a.status == 403
        }
    }

    /// The requests that read a bucket's or container's settings.
    pub(crate) fn check_requests(&self) -> Vec<LockRequest> {
        if self.is_azure() {
            vec![self.request(http::Method::GET, "", &[("restype", "container")])]
        } else {
            vec![
                self.request(http::Method::GET, "", &[("versioning", "")]),
                self.request(http::Method::GET, "", &[("object-lock", "")]),
            ]
        }
    }

    /// Judges the answers to [`LockApi::check_requests`].
    pub(crate) fn check_answers(&self, answers: &[Answer]) -> std::result::Result<(), Refusal> {
        if self.is_azure() {
            let a = &answers[0];
            if !a.ok() {
                return Err(Refusal::Failed(self.fail("reading the container's settings", a)));
            }
            if a.header("x-ms-immutable-storage-with-versioning-enabled") != Some("true") {
                return Err(Refusal::Refused(
                    "the container does not have version-level immutability enabled (it needs blob versioning \
                     on the storage account, and version-level immutability on the container or account)"
                        .into(),
                ));
            }
            if a.header("x-ms-has-immutability-policy") == Some("true") {
                return Err(Refusal::Refused(
                    "the container has a container-level immutability policy; cairn sets each blob's own and \
                     must be able to delete its lock files and records: remove the container policy"
                        .into(),
                ));
            }
            return Ok(());
        }
        let (versioning, lock) = (&answers[0], &answers[1]);
        if !versioning.ok() {
            return Err(Refusal::Failed(self.fail("reading the bucket's versioning", versioning)));
        }
        if !versioning_enabled(&versioning.body) {
            return Err(Refusal::Refused(
                "the bucket does not have versioning enabled; Object Lock needs a versioned bucket \
                 (create it with Object Lock enabled, which turns versioning on)"
                    .into(),
            ));
        }
        let (code, _) = error_code(&lock.body);
        if lock.status == 404 || code == "ObjectLockConfigurationNotFoundError" {
            return Err(Refusal::Refused(
                "the bucket does not have Object Lock enabled (it can only be turned on at creation, \
                 e.g. aws s3api create-bucket --object-lock-enabled-for-bucket)"
                    .into(),
            ));
        }
        if !lock.ok() {
            return Err(Refusal::Failed(self.fail("reading the bucket's Object Lock settings", lock)));
        }
        match lock_configuration(&lock.body) {
            (false, _) => Err(Refusal::Refused("the bucket does not have Object Lock enabled".into())),
            (true, Some(default)) => Err(Refusal::Refused(format!(
                "the bucket has a default retention ({default}); cairn locks each object itself and must \
                 be able to delete its lock files and records: remove the default retention rule"
            ))),
            (true, None) => Ok(()),
        }
    }

    /// Sends one signed request and waits for its answer, retrying what a store or network
    /// fails transiently (connection errors, 5xx, throttling) for up to about 4 minutes.
    pub(crate) async fn send(&self, request: &LockRequest) -> std::result::Result<Answer, String> {
        let mut delay = std::time::Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(request).await;
            // Only the network and the store fail transiently; a request that cannot be
            // built or signed, or an answer too large, fails the same way again.
            let transient = match &outcome {
                Ok(a) => a.status >= 500 || a.status == 429,
                Err(e) => e.transient,
            };
            if !transient || attempt >= ATTEMPTS {
                return match outcome {
                    Ok(a) => Ok(a),
                    Err(e) if e.transient => Err(format!("{} (after {attempt} attempts)", e.why)),
                    Err(e) => Err(e.why),
                };
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 3).min(std::time::Duration::from_secs(30));
        }
    }

    async fn send_once(&self, r: &LockRequest) -> std::result::Result<Answer, SendError> {
        let local = |why: String| SendError { why, transient: false };
        let network = |why: String| SendError { why, transient: true };
        let mut builder = http::Request::builder().method(r.method.clone()).uri(r.url.as_str());
        for (k, v) in &r.headers {
            builder = builder.header(*k, v.as_str());
        }
        let body = bytes::Bytes::from(r.body.clone());
        let mut request: object_store::client::HttpRequest =
            builder.body(body.clone().into()).map_err(|e| local(format!("building the request: {e}")))?;
        match &self.provider {
            Provider::S3 { credentials, region, .. } => {
                let credential = credentials.get_credential().await.map_err(|e| network(e.to_string()))?;
                object_store::aws::AwsAuthorizer::new(&credential, "s3", region)
                    .try_authorize(&mut request, None)
                    .map_err(|e| local(format!("signing the request: {e}")))?;
            }
            Provider::Azure { credentials, account } => {
                let credential = credentials.get_credential().await.map_err(|e| network(e.to_string()))?;
                // Shared Key signs Content-Length, which reqwest sets from the body later.
                if !r.body.is_empty() || r.method == http::Method::PUT {
                    request.headers_mut().insert(http::header::CONTENT_LENGTH, r.body.len().into());
                }
                object_store::azure::AzureAuthorizer::new(&credential, account)
                    .try_authorize(&mut request)
                    .map_err(|e| local(format!("signing the request: {e}")))?;
            }
        }
        let (parts, _) = request.into_parts();
        let url = parts.uri.to_string();
        let response = self
            .client
            .request(parts.method, url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| network(error_chain(&e)))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(|e| network(error_chain(&e)))? {
            if body.len() + chunk.len() > r.max_answer {
                return Err(local(format!("the answer is over {} bytes", r.max_answer)));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body })
    }

    pub(crate) fn fail(&self, doing: &str, answer: &Answer) -> StorageError {
        let (mut code, message) = error_code(&answer.body);
        if code.is_empty() {
            code = answer.header("x-ms-error-code").unwrap_or_default().to_string();
        }
        io(&self.location, doing, format!("HTTP {}: {code} {message}", answer.status).trim().to_string())
    }

    pub(crate) fn failed(&self, doing: &str, why: String) -> StorageError {
        io(&self.location, doing, why)
    }
}

fn io(location: &str, doing: &str, why: String) -> StorageError {
    StorageError::Io { what: format!("{doing} at {location}"), source: std::io::Error::other(why) }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

pub(crate) fn content_md5(data: &[u8]) -> String {
    use base64::Engine;
    use md5::Digest;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

/// RFC 3986's unreserved characters stay as they are; everything else is percent-encoded.
const UNRESERVED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes one path segment or query part.
fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// An HTTP date (`Wed, 30 Dec 2026 00:00:00 GMT`, Azure's lock dates) as unix seconds.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let t = httpdate::parse_http_date(s.trim()).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// A retain-until date from a header or XML (`2026-12-30T00:00:00.000Z`), as unix seconds.
pub fn parse_date(s: &str) -> Option<u64> {
    let t: jiff::Timestamp = s.trim().parse().ok()?;
    u64::try_from(t.as_second()).ok()
}

// ---- S3 answers (XML, from the store: bounded by MAX_ANSWER, parsed by quick-xml) ----------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorDoc {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The `Code` and `Message` of an S3 error document (empty when the body is not one).
pub fn error_code(body: &[u8]) -> (String, String) {
    let doc: ErrorDoc =
        std::str::from_utf8(body).ok().and_then(|s| quick_xml::de::from_str(s).ok()).unwrap_or_default();
    (doc.code, doc.message)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersioningDoc {
    #[serde(default)]
    status: Option<String>,
}

/// Whether a GetBucketVersioning answer says versioning is enabled.
pub fn versioning_enabled(body: &[u8]) -> bool {
    let doc: VersioningDoc =
        std::str::from_utf8(body).ok().and_then(|s| quick_xml::de::from_str(s).ok()).unwrap_or_default();
    doc.status.as_deref() == Some("Enabled")
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockConfigDoc {
    #[serde(default)]
    object_lock_enabled: Option<String>,
    #[serde(default)]
    rule: Option<LockRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockRule {
    #[serde(default)]
    default_retention: Option<DefaultRetention>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DefaultRetention {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    days: Option<u64>,
    #[serde(default)]
    years: Option<u64>,
}

/// What a GetObjectLockConfiguration answer says: whether Object Lock is on, and the default
/// retention if there is one (described for a message).
pub fn lock_configuration(body: &[u8]) -> (bool, Option<String>) {
    let doc: LockConfigDoc =
        std::str::from_utf8(body).ok().and_then(|s| quick_xml::de::from_str(s).ok()).unwrap_or_default();
    let default = doc.rule.and_then(|r| r.default_retention).map(|d| {
        let span = match (d.days, d.years) {
            (Some(n), _) => format!("{n} days"),
            (_, Some(n)) => format!("{n} years"),
            _ => "no period".into(),
        };
        format!("{} for {span}", d.mode.unwrap_or_else(|| "?".into()))
    });
    (doc.object_lock_enabled.as_deref() == Some("Enabled"), default)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionsDoc {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_version_id_marker: Option<String>,
    #[serde(default, rename = "Version")]
    versions: Vec<VersionEntry>,
    #[serde(default, rename = "DeleteMarker")]
    markers: Vec<VersionEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionEntry {
    #[serde(default)]
    key: String,
    #[serde(default)]
    version_id: String,
    #[serde(default)]
    is_latest: bool,
    #[serde(default)]
    size: u64,
}

/// One entry of a ListObjectVersions answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub key: String,
    pub version_id: String,
    pub latest: bool,
    pub delete_marker: bool,
    /// Bytes (0 for a delete marker).
    pub size: u64,
}

/// Where the next page of a version listing starts: (key marker, version ID marker).
pub type NextPage = Option<(String, String)>;

/// One page of ListObjectVersions: its entries, and where the next page starts if any.
pub fn parse_versions(body: &[u8]) -> std::result::Result<(Vec<Version>, NextPage), String> {
    let text = std::str::from_utf8(body).map_err(|_| "the version listing is not UTF-8".to_string())?;
    let doc: VersionsDoc = quick_xml::de::from_str(text).map_err(|e| format!("unreadable version listing: {e}"))?;
    let mut out = Vec::with_capacity(doc.versions.len() + doc.markers.len());
    for (entries, delete_marker) in [(doc.versions, false), (doc.markers, true)] {
        out.extend(entries.into_iter().map(|v| Version {
            key: v.key,
            version_id: v.version_id,
            latest: v.is_latest,
            delete_marker,
            size: v.size,
        }));
    }
    // Both markers: a key marker alone would skip the rest of that key's versions.
    let next = match (doc.is_truncated, doc.next_key_marker, doc.next_version_id_marker) {
        (true, Some(k), Some(v)) => Some((k, v)),
        (true, _, _) => return Err("a truncated version listing without its next markers".into()),
        _ => None,
    };
    Ok((out, next))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureEnumeration {
    #[serde(default)]
    blobs: AzureBlobs,
    #[serde(default)]
    next_marker: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AzureBlobs {
    #[serde(default, rename = "Blob")]
    blobs: Vec<AzureBlob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureBlob {
    #[serde(default)]
    name: String,
    #[serde(default)]
    version_id: String,
    #[serde(default)]
    is_current_version: bool,
    #[serde(default)]
    properties: AzureProperties,
}

#[derive(Debug, Default, Deserialize)]
struct AzureProperties {
    #[serde(default, rename = "Content-Length")]
    content_length: u64,
}

/// One page of an Azure listing with versions (List Blobs, `include=versions`). Azure has no
/// delete markers: a deleted blob is one whose versions are all previous ones.
pub fn parse_azure_versions(body: &[u8]) -> std::result::Result<(Vec<Version>, NextPage), String> {
    let text = std::str::from_utf8(body).map_err(|_| "the version listing is not UTF-8".to_string())?;
    let text = text.trim_start_matches('\u{feff}');
    let doc: AzureEnumeration =
        quick_xml::de::from_str(text).map_err(|e| format!("unreadable version listing: {e}"))?;
    let out = doc
        .blobs
        .blobs
        .into_iter()
        .map(|b| Version {
            key: b.name,
            version_id: b.version_id,
            latest: b.is_current_version,
            delete_marker: false,
            size: b.properties.content_length,
        })
        .collect();
    let next = doc.next_marker.filter(|m| !m.is_empty()).map(|m| (m, String::new()));
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_share_one_date_and_cover_the_period() {
        let p = LockPolicy { days: 30, generation_days: 10 };
        let t0 = 1_800_000_000;
        for dt in [0, 1, 3600, 5 * DAY, 9 * DAY] {
            let now = t0 + dt;
            assert!(p.until(now) >= p.required(now));
            assert!(p.until(now) <= p.required(now) + 10 * DAY);
        }
        // The generation boundary: the same date just before it, a later one after.
        let g = 10 * DAY;
        let start = (t0 / g + 1) * g;
        assert_eq!(p.until(start - 1), p.until(start - 5 * DAY));
        assert_eq!(p.until(start), p.until(start - 1) + g);
        // A generation of 0 days is taken as 1, not a division by zero.
        let p0 = LockPolicy { days: 1, generation_days: 0 };
        assert!(p0.until(t0) >= p0.required(t0));
    }

    #[test]
    fn dates_round_trip() {
        let t = 1_798_675_200; // 2026-12-31T00:00:00Z
        assert_eq!(rfc3339(t), "2026-12-31T00:00:00Z");
        assert_eq!(parse_date("2026-12-31T00:00:00.000Z"), Some(t));
        assert_eq!(parse_date(&rfc3339(t)), Some(t));
        assert_eq!(parse_date("yesterday"), None);
    }

    fn s3_api(endpoint: Option<&str>, region: &str) -> LockApi {
        let creds: object_store::aws::AwsCredentialProvider =
            std::sync::Arc::new(object_store::StaticCredentialProvider::new(object_store::aws::AwsCredential {
                key_id: "k".into(),
                secret_key: "s".into(),
                token: None,
            }));
        LockApi::s3(creds, region, endpoint, "b", false, "s3://b", None).unwrap()
    }

    fn azure_api() -> LockApi {
        let creds: object_store::azure::AzureCredentialProvider = std::sync::Arc::new(
            object_store::StaticCredentialProvider::new(object_store::azure::AzureCredential::AccessKey(
                object_store::azure::AzureAccessKey::try_new("a2V5").unwrap(),
            )),
        );
        LockApi::azure(creds, "acct", None, "c", "az://c", None).unwrap()
    }

    fn header<'a>(r: &'a LockRequest, k: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_locked_put_carries_its_lock_and_checksum() {
        let s3 = s3_api(Some("http://127.0.0.1:9000"), "us-east-1");
        let r = s3.put_locked("p/packs/ab/ab01", b"hello", 1_798_675_200, true);
        assert_eq!(r.method, http::Method::PUT);
        assert_eq!(header(&r, "x-amz-object-lock-mode"), Some("COMPLIANCE"));
        assert_eq!(header(&r, "x-amz-object-lock-retain-until-date"), Some("2026-12-31T00:00:00Z"));
        // md5("hello"), base64: what S3 checks the body against.
        assert_eq!(header(&r, "content-md5"), Some("XUFAKrxLKna5cZ2REBfFkg=="));
        assert_eq!(header(&r, "if-none-match"), Some("*"));
        assert_eq!(r.body, b"hello");
        assert!(header(&s3.put_locked("k", b"x", 1, false), "if-none-match").is_none());
        let e = s3.extend("p/packs/ab/ab01", "v1", 1_798_675_200);
        assert_eq!(e.url, "http://127.0.0.1:9000/b/p/packs/ab/ab01?retention&versionId=v1");
        let body = String::from_utf8(e.body.clone()).unwrap();
        assert!(body.contains("<Mode>COMPLIANCE</Mode>") && body.contains("2026-12-31T00:00:00Z"), "{body}");
        assert_eq!(header(&e, "content-md5"), Some(content_md5(&e.body).as_str()));
    }

    /// Azure requests, to the documented REST API (Put Blob with an immutability policy, Set
    /// Blob Immutability Policy, List Blobs with versions, Delete Blob by version, Copy Blob):
    /// no local server implements them.
    #[test]
    fn azure_requests_follow_the_rest_api() {
        let az = azure_api();
        let r = az.put_locked("repo/packs/ab/ab01", b"hello", 1_798_675_200, true);
        assert_eq!(r.url, "https://acct.blob.core.windows.net/c/repo/packs/ab/ab01");
        assert_eq!(header(&r, "x-ms-blob-type"), Some("BlockBlob"));
        assert_eq!(header(&r, "x-ms-immutability-policy-mode"), Some("locked"));
        assert_eq!(header(&r, "x-ms-immutability-policy-until-date"), Some("Thu, 31 Dec 2026 00:00:00 GMT"));
        assert_eq!(header(&r, "if-none-match"), Some("*"));
        let e = az.extend("repo/config", "2026-11-30T01:02:03.0000000Z", 1_798_675_200);
        assert_eq!(e.method, http::Method::PUT);
        assert_eq!(
            e.url,
            "https://acct.blob.core.windows.net/c/repo/config?comp=immutabilityPolicies&versionid=2026-11-30T01%3A02%3A03.0000000Z"
        );
        assert_eq!(header(&e, "x-ms-immutability-policy-mode"), Some("locked"));
        let l = az.list_versions("repo/", &Some(("m1".into(), String::new())));
        assert_eq!(
            l.url,
            "https://acct.blob.core.windows.net/c?restype=container&comp=list&include=versions&prefix=repo%2F&marker=m1"
        );
        let d = az.delete_version("repo/points/ab", "v1");
        assert_eq!(d.method, http::Method::DELETE);
        assert_eq!(d.url, "https://acct.blob.core.windows.net/c/repo/points/ab?versionid=v1");
        let p = az.promote("repo/points/ab", "v1", Some(1_798_675_200));
        assert_eq!(header(&p, "x-ms-immutability-policy-until-date"), Some("Thu, 31 Dec 2026 00:00:00 GMT"));
        assert_eq!(
            header(&p, "x-ms-copy-source"),
            Some("https://acct.blob.core.windows.net/c/repo/points/ab?versionid=v1")
        );
        let c = &az.check_requests()[0];
        assert_eq!(c.url, "https://acct.blob.core.windows.net/c?restype=container");
        // Answers.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-ms-immutability-policy-until-date", "Thu, 31 Dec 2026 00:00:00 GMT".parse().unwrap());
        headers.insert("x-ms-version-id", "v9".parse().unwrap());
        let head = Answer { status: 200, headers, body: vec![] };
        assert_eq!(az.head_answer(&head), ("v9".to_string(), Some(1_798_675_200)));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-ms-error-code", "BlobImmutableDueToPolicy".parse().unwrap());
        assert!(az.refused_for_lock(&Answer { status: 409, headers, body: vec![] }));
        let refused = |h: &[(&'static str, &str)]| {
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in h {
                headers.insert(*k, v.parse().unwrap());
            }
            match az.check_answers(&[Answer { status: 200, headers, body: vec![] }]) {
                Ok(()) => None,
                Err(Refusal::Refused(why)) => Some(why),
                Err(Refusal::Failed(e)) => Some(e.to_string()),
            }
        };
        assert!(refused(&[]).unwrap().contains("version-level immutability"));
        let both =
            [("x-ms-immutable-storage-with-versioning-enabled", "true"), ("x-ms-has-immutability-policy", "true")];
        assert!(refused(&both).unwrap().contains("container-level"));
        assert_eq!(refused(&[("x-ms-immutable-storage-with-versioning-enabled", "true")]), None);
        let page = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"x\" ContainerName=\"c\">\
            <Blobs><Blob><Name>repo/config</Name><VersionId>v1</VersionId><IsCurrentVersion>true</IsCurrentVersion></Blob>\
            <Blob><Name>repo/keys/ab</Name><VersionId>v2</VersionId></Blob></Blobs><NextMarker>n2</NextMarker></EnumerationResults>";
        let (entries, next) = parse_azure_versions(page.as_bytes()).unwrap();
        assert_eq!(next, Some(("n2".into(), String::new())));
        assert_eq!(entries.len(), 2);
        assert!(entries[0].latest && !entries[1].latest && !entries[1].delete_marker);
    }

    #[test]
    fn urls_are_path_or_virtual_hosted() {
        let s = s3_api(Some("http://127.0.0.1:9000/"), "us-east-1");
        assert_eq!(
            s.url("p/packs/ab/ab12", &[("retention", ""), ("versionId", "v 1")]),
            "http://127.0.0.1:9000/b/p/packs/ab/ab12?retention&versionId=v%201"
        );
        assert_eq!(s.url("", &[("versioning", "")]), "http://127.0.0.1:9000/b/?versioning");
        assert_eq!(s3_api(None, "eu-west-3").url("k", &[]), "https://s3.eu-west-3.amazonaws.com/b/k");
        // A virtual-hosted endpoint names the bucket already (object_store's rule).
        let creds: object_store::aws::AwsCredentialProvider =
            std::sync::Arc::new(object_store::StaticCredentialProvider::new(object_store::aws::AwsCredential {
                key_id: "k".into(),
                secret_key: "s".into(),
                token: None,
            }));
        let vh = LockApi::s3(creds, "r", Some("https://b.s3.example.com"), "b", true, "s3://b", None).unwrap();
        assert_eq!(vh.url("p/k", &[]), "https://b.s3.example.com/p/k");
        assert_eq!(parse_http_date("Thu, 31 Dec 2026 00:00:00 GMT"), Some(1_798_675_200));
    }

    #[test]
    fn answers_parse() {
        assert!(versioning_enabled(
            b"<?xml version=\"1.0\"?><VersioningConfiguration xmlns=\"x\"><Status>Enabled</Status></VersioningConfiguration>"
        ));
        assert!(!versioning_enabled(b"<GetBucketVersioningResponse xmlns=\"x\"/>"));
        assert!(!versioning_enabled(b"<VersioningConfiguration><Status>Suspended</Status></VersioningConfiguration>"));
        assert!(!versioning_enabled(b"\xff\xfe"));
        assert_eq!(
            lock_configuration(
                b"<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled></ObjectLockConfiguration>"
            ),
            (true, None)
        );
        assert_eq!(
            lock_configuration(
                b"<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention>\
                  <Mode>GOVERNANCE</Mode><Days>7</Days></DefaultRetention></Rule></ObjectLockConfiguration>"
            ),
            (true, Some("GOVERNANCE for 7 days".into()))
        );
        assert_eq!(
            lock_configuration(b"<Error><Code>ObjectLockConfigurationNotFoundError</Code></Error>"),
            (false, None)
        );
        let (code, msg) = error_code(b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>");
        assert_eq!((code.as_str(), msg.as_str()), ("AccessDenied", "Access Denied"));
        let page = b"<ListVersionsResult><IsTruncated>true</IsTruncated><NextKeyMarker>k2</NextKeyMarker>\
            <NextVersionIdMarker>v2</NextVersionIdMarker>\
            <Version><Key>k1</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest></Version>\
            <DeleteMarker><Key>k1</Key><VersionId>m1</VersionId><IsLatest>true</IsLatest></DeleteMarker>\
            <Version><Key>k2</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest></Version></ListVersionsResult>";
        let (entries, next) = parse_versions(page).unwrap();
        assert_eq!(next, Some(("k2".into(), "v2".into())));
        assert_eq!(entries.len(), 3);
        assert!(entries.iter().any(|v| v.key == "k1" && v.delete_marker && v.latest));
        assert!(entries.iter().any(|v| v.key == "k2" && !v.delete_marker && v.latest));
        assert!(parse_versions(b"<ListVersionsResult><IsTruncated>true</IsTruncated></ListVersionsResult>").is_err());
        let key_only =
            b"<ListVersionsResult><IsTruncated>true</IsTruncated><NextKeyMarker>k</NextKeyMarker></ListVersionsResult>";
        assert!(parse_versions(key_only).is_err());
        assert!(parse_versions(b"not xml <").is_err() || parse_versions(b"not xml <").unwrap().0.is_empty());
    }
}
