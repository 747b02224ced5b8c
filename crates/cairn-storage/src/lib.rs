//! Storage backends for a cairn repository.
//!
//! The repository engine sees storage as a flat set of named, immutable objects grouped by
//! [`Kind`]. Every backend (the local directory, and S3 and Azure Blob in `object.rs`)
//! implements [`Backend`] and nothing else, so the engine never changes when a backend is
//! added. [`open`] turns a `--repo` location into one.
//!
//! # Contract every backend MUST keep
//! - `put` is atomic and durable: when it returns `Ok`, a reader sees either nothing or the
//!   whole object, and the object survives a crash or power loss. A partially written object
//!   MUST never be visible under its name.
//! - `put` is idempotent: objects other than locks are named by their content, so writing the
//!   same name twice writes the same bytes; a second put of an existing name MAY skip the write.
//! - `put_new` fails with [`StorageError::AlreadyExists`] when the name exists (used for the
//!   repository config, so that two `init`s cannot both succeed).
//! - `delete` of a missing object succeeds (idempotent).
//! - `list` returns only complete objects (never temporary files).
//!
//! # Retries
//! Every operation is idempotent, so a backend whose medium can fail transiently (a network)
//! SHOULD retry with backoff inside the call and report only persistent failures. The local
//! backend does not retry: a local I/O error is not transient.

mod aligned;
pub mod cache;
mod crash;
pub mod faulty;
mod local;
pub mod object;
pub mod object_lock;
#[doc(hidden)]
pub mod test_servers;

/// The timeout of one object-store request unless `CAIRN_REQUEST_TIMEOUT` says otherwise: a
/// 16 MiB pack over a slow uplink takes minutes; the store's own retries cover dropped
/// connections. Here because data requests (`object`) and lock requests (`object_lock`) share it.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

pub use aligned::AlignedBuf;
pub use crash::crash_point;

pub use local::LocalBackend;
pub use object::{Location, ObjectBackend, ObjectOptions};
pub use object_lock::{LockPolicy, ObjectLock, Restoration, Restored};

/// Opens the backend of a repository location: `s3://BUCKET[/PREFIX]`,
/// `az://CONTAINER[/PREFIX]` (settings from [`ObjectOptions::from_env`], with a local cache of
/// index files and points, see [`cache`]) or a local path.
pub fn open(location: &str) -> Result<std::sync::Arc<dyn Backend>> {
    let parsed = Location::parse(location)
        .map_err(|e| StorageError::Io { what: e, source: std::io::ErrorKind::InvalidInput.into() })?;
    Ok(match parsed {
        Location::Local(dir) => std::sync::Arc::new(LocalBackend::new(dir)),
        remote => {
            let opts = ObjectOptions::from_env();
            let store = std::sync::Arc::new(ObjectBackend::open(&remote, &opts)?);
            // Which service: the endpoint and account, taken as `ObjectBackend::open` takes them.
            let endpoint = match remote {
                Location::Azure { .. } => {
                    let conn = opts.azure_connection_string.as_deref().map(object::parse_connection_string);
                    let conn = conn.unwrap_or_default();
                    format!(
                        "{} {}",
                        opts.azure_endpoint.or(conn.endpoint).unwrap_or_default(),
                        conn.account.or(opts.azure_account).unwrap_or_default()
                    )
                }
                _ => opts.s3_endpoint.unwrap_or_default(),
            };
            // Index files and points are read whole by every process: kept locally.
            let (root, cap) = (cache::cache_root(), cache::cache_cap_from_env());
            std::sync::Arc::new(cache::CachedBackend::new(store, &endpoint, &root, cap))
        }
    })
}

use std::fmt;

/// The groups of objects a repository holds. Each maps to a folder (local) or key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `config`: the single repository configuration object (name ignored).
    Config,
    /// `keys/`: password-wrapped master keys of an encrypted repository.
    Key,
    /// `packs/`: pack files of compressed, possibly encrypted blocks.
    Pack,
    /// `index/`: index files that locate every block in the packs.
    Index,
    /// `points/`: restore point documents.
    Point,
    /// `locks/`: lock files of running operations.
    Lock,
    /// `catalog/`: records about restore points written after them (boot verifications).
    Catalog,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::Config, Kind::Key, Kind::Pack, Kind::Index, Kind::Point, Kind::Lock, Kind::Catalog];

    /// The folder (or key prefix) of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Key => "keys",
            Kind::Pack => "packs",
            Kind::Index => "index",
            Kind::Point => "points",
            Kind::Lock => "locks",
            Kind::Catalog => "catalog",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Config => "config",
            other => other.dir(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{kind} object {name} does not exist")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} object {name} already exists")]
    AlreadyExists { kind: Kind, name: String },
    #[error("{kind} object {name}: asked for bytes {offset}..{end} but it holds {size}")]
    ShortRead { kind: Kind, name: String, offset: u64, end: u64, size: u64 },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The store refuses to delete the object: it is locked (immutability) until `until`.
    #[error("{kind} object {name} is locked until {}", object_lock::rfc3339(*until))]
    Locked { kind: Kind, name: String, until: u64 },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// One object found by [`Backend::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
}

/// A place that stores repository objects. See the crate docs for the contract.
pub trait Backend: Send + Sync {
    /// A human-readable location (a path or URL) for messages.
    fn location(&self) -> String;
    /// Prepares an empty location for a new repository (folders, buckets).
    fn create(&self) -> Result<()>;
    /// Whether a repository config exists at this location.
    fn exists(&self, kind: Kind, name: &str) -> Result<bool>;
    /// Stores an object atomically and durably (see the crate docs).
    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()>;
    /// Like `put`, but fails with `AlreadyExists` if the name is taken.
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object.
    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`; a short object is an error, never a short read.
    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Like `get_range`, into a reused buffer (replacing its contents).
    fn get_range_into(&self, kind: Kind, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get_range(kind, name, offset, len)?;
        Ok(())
    }
    /// Reads a large range that is read once and streamed through (a restore walking a pack):
    /// the bytes of `[offset, offset + len)` land at the returned range of `buf`, which is
    /// reused across calls. A backend may read around the range to bypass its caches (O_DIRECT
    /// needs aligned offsets); the same errors as `get_range`.
    fn get_span(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>> {
        self.get_range_into(kind, name, offset, len, buf)?;
        Ok(0..len as usize)
    }
    /// Lists the complete objects of a kind, in no particular order.
    fn list(&self, kind: Kind) -> Result<Vec<Listed>>;
    /// Deletes an object; deleting a missing one succeeds.
    fn delete(&self, kind: Kind, name: &str) -> Result<()>;
    /// How many reads this storage serves well at once (a restore keeps that many in
    /// flight): a local disk a few, an object store, where each read waits for a round trip,
    /// more.
    fn reads_in_flight(&self) -> usize {
        4
    }
    /// Deletes what writers killed more than `max_age` ago left behind (temporary files);
    /// returns how many. Stores where nothing is left behind have nothing to do.
    fn remove_stale_temporaries(&self, max_age: std::time::Duration) -> Result<usize> {
        let _ = max_age;
        Ok(0)
    }
    /// Object locks (immutability), on a store that has them: S3 (Object Lock) and Azure Blob
    /// (version-level immutability).
    fn object_lock(&self) -> Option<&dyn ObjectLock> {
        None
    }
}

/// Whether `name` is a valid object name: lowercase hex, 8 to 64 characters. Backends reject
/// anything else, so a name can never escape its folder.
pub fn valid_name(name: &str) -> bool {
    (8..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A fresh random object name (for lock files), 32 hex characters.
pub fn random_name() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).expect("system random source failed");
    hex::encode(b)
}
