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

/// The current time in unix seconds, as locks count it. `CAIRN_TEST_CLOCK_OFFSET_DAYS` moves it
/// forward, for tests of what happens a generation later (never set it in production: a lock
/// computed from a clock in the future only lasts longer, but retention would act early).
pub fn now() -> u64 {
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let offset = std::env::var("CAIRN_TEST_CLOCK_OFFSET_DAYS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    real + offset * DAY
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
    /// Makes the current version's lock last until at least `until`; returns the date it now
    /// has. A later lock is left as it is (compliance locks can only grow, and some stores
    /// would shorten one without complaint).
    fn extend(&self, kind: Kind, name: &str, until: u64) -> Result<u64>;
    /// Locks this process set, by object: what it wrote locked and what it extended.
    fn locked_here(&self) -> Vec<(Kind, String, u64)>;
    /// Finds objects of the repository hidden by delete markers (a plain DELETE in a versioned
    /// bucket) and, unless `dry_run`, removes the markers so the objects are back. Lock files
    /// stay deleted. Returns the objects found.
    fn undelete(&self, dry_run: bool) -> Result<Vec<(Kind, String)>>;
}

// ---- S3 requests ------------------------------------------------------------------------

/// The S3 side of [`ObjectLock`]: signed requests for what object_store cannot send.
pub(crate) struct S3Locks {
    client: reqwest::Client,
    credentials: object_store::aws::AwsCredentialProvider,
    region: String,
    /// `scheme://host[:port]` of the bucket's URLs: path-style (`endpoint/bucket/key`) or
    /// virtual-hosted (`bucket.host/key`).
    base: String,
    bucket: String,
    virtual_hosted: bool,
    pub(crate) location: String,
}

/// One request of ours to the store (signed when sent).
pub(crate) struct S3Request {
    pub method: http::Method,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// The answer to one request, its body bounded.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// S3 answers we read are small XML documents; anything bigger is not one of them.
const MAX_ANSWER: usize = 8 << 20;
/// Attempts of one request: waits of 0.5, 1.5, 4.5, 13.5 s, then 30 s, about 4 minutes in all.
const ATTEMPTS: u32 = 12;

impl S3Locks {
    pub(crate) fn new(
        credentials: object_store::aws::AwsCredentialProvider,
        region: &str,
        endpoint: Option<&str>,
        bucket: &str,
        virtual_hosted: bool,
        location: &str,
    ) -> Result<S3Locks> {
        let (base, virtual_hosted) = match endpoint {
            Some(e) => (e.trim_end_matches('/').to_string(), virtual_hosted),
            // AWS itself: virtual-hosted, as object_store does.
            None => (format!("https://s3.{region}.amazonaws.com"), true),
        };
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(300))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| io(location, "setting up S3 requests", e.to_string()))?;
        Ok(S3Locks {
            client,
            credentials,
            region: region.to_string(),
            base,
            bucket: bucket.to_string(),
            virtual_hosted,
            location: location.to_string(),
        })
    }

    /// The URL of `key` (or of the bucket when empty) with `query`.
    pub(crate) fn url(&self, key: &str, query: &[(&str, &str)]) -> String {
        let path = key.split('/').map(encode_segment).collect::<Vec<_>>().join("/");
        let mut url = if self.virtual_hosted {
            let (scheme, host) = self.base.split_once("://").unwrap_or(("https", &self.base));
            format!("{scheme}://{}.{host}/{path}", self.bucket)
        } else {
            format!("{}/{}/{path}", self.base, self.bucket)
        };
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode_segment(k));
            if !v.is_empty() {
                url.push('=');
                url.push_str(&encode_segment(v));
            }
        }
        url
    }

    /// Sends one signed request and waits for its answer, retrying what a store or network
    /// fails transiently (connection errors, 5xx, throttling) for up to about 4 minutes.
    pub(crate) async fn send(&self, request: &S3Request) -> std::result::Result<Answer, String> {
        let mut delay = std::time::Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(request).await;
            let transient = match &outcome {
                Ok(a) => a.status >= 500 || a.status == 429,
                Err(_) => true,
            };
            if !transient || attempt >= ATTEMPTS {
                return match outcome {
                    Ok(a) => Ok(a),
                    Err(e) => Err(format!("{e} (after {attempt} attempts)")),
                };
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 3).min(std::time::Duration::from_secs(30));
        }
    }

    async fn send_once(&self, r: &S3Request) -> std::result::Result<Answer, String> {
        let (method, url, headers, body) = (r.method.clone(), r.url.as_str(), &r.headers, r.body.clone());
        let credential = self.credentials.get_credential().await.map_err(|e| e.to_string())?;
        let mut request = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            request = request.header(*k, v.as_str());
        }
        let body = bytes::Bytes::from(body);
        let mut request: object_store::client::HttpRequest =
            request.body(body.clone().into()).map_err(|e| format!("building the request: {e}"))?;
        object_store::aws::AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| format!("signing the request: {e}"))?;
        let (parts, _) = request.into_parts();
        let response = self
            .client
            .request(parts.method, url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(format!("the answer is over {MAX_ANSWER} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body })
    }

    pub(crate) fn fail(&self, doing: &str, answer: &Answer) -> StorageError {
        let (code, message) = error_code(&answer.body);
        io(&self.location, doing, format!("HTTP {}: {code} {message}", answer.status).trim().to_string())
    }

    pub(crate) fn failed(&self, doing: &str, why: String) -> StorageError {
        io(&self.location, doing, why)
    }

    /// Headers of a PUT that creates an object locked until `until`: the lock, and the
    /// Content-MD5 that S3 requires of any PUT with lock parameters.
    pub(crate) fn locked_put_headers(data: &[u8], until: u64, create_only: bool) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("x-amz-object-lock-mode", "COMPLIANCE".to_string()),
            ("x-amz-object-lock-retain-until-date", rfc3339(until)),
            ("content-md5", content_md5(data)),
        ];
        if create_only {
            h.push(("if-none-match", "*".to_string()));
        }
        h
    }

    /// The body of PutObjectRetention (and its Content-MD5, required there too).
    pub(crate) fn retention_body(until: u64) -> Vec<u8> {
        format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            rfc3339(until)
        )
        .into_bytes()
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

/// Percent-encodes one path segment or query part (RFC 3986 unreserved characters stay).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
}

/// One entry of a ListObjectVersions answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub key: String,
    pub version_id: String,
    pub latest: bool,
    pub delete_marker: bool,
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
        }));
    }
    let next = match (doc.is_truncated, doc.next_key_marker, doc.next_version_id_marker) {
        (true, Some(k), v) => Some((k, v.unwrap_or_default())),
        (true, None, _) => return Err("a truncated version listing without a next marker".into()),
        _ => None,
    };
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

    #[test]
    fn a_locked_put_carries_its_lock_and_checksum() {
        let h = S3Locks::locked_put_headers(b"hello", 1_798_675_200, true);
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("x-amz-object-lock-mode"), Some("COMPLIANCE"));
        assert_eq!(get("x-amz-object-lock-retain-until-date"), Some("2026-12-31T00:00:00Z"));
        // md5("hello"), base64: what S3 checks the body against.
        assert_eq!(get("content-md5"), Some("XUFAKrxLKna5cZ2REBfFkg=="));
        assert_eq!(get("if-none-match"), Some("*"));
        assert!(S3Locks::locked_put_headers(b"x", 1, false).iter().all(|(n, _)| *n != "if-none-match"));
        let body = String::from_utf8(S3Locks::retention_body(1_798_675_200)).unwrap();
        assert!(body.contains("<Mode>COMPLIANCE</Mode>") && body.contains("2026-12-31T00:00:00Z"), "{body}");
    }

    #[test]
    fn urls_are_path_or_virtual_hosted() {
        let creds: object_store::aws::AwsCredentialProvider =
            std::sync::Arc::new(object_store::StaticCredentialProvider::new(object_store::aws::AwsCredential {
                key_id: "k".into(),
                secret_key: "s".into(),
                token: None,
            }));
        let s = S3Locks::new(creds.clone(), "us-east-1", Some("http://127.0.0.1:9000/"), "b", false, "s3://b").unwrap();
        assert_eq!(
            s.url("p/packs/ab/ab12", &[("retention", ""), ("versionId", "v 1")]),
            "http://127.0.0.1:9000/b/p/packs/ab/ab12?retention&versionId=v%201"
        );
        assert_eq!(s.url("", &[("versioning", "")]), "http://127.0.0.1:9000/b/?versioning");
        let aws = S3Locks::new(creds, "eu-west-3", None, "b", false, "s3://b").unwrap();
        assert_eq!(aws.url("k", &[]), "https://b.s3.eu-west-3.amazonaws.com/k");
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
        assert!(parse_versions(b"not xml <").is_err() || parse_versions(b"not xml <").unwrap().0.is_empty());
    }
}
