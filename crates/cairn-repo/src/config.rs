use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
/// The format version of an immutable repository (FORMAT.md §13): version 1 plus
/// `immutability`. Readers that predate immutability refuse it, so that none writes unlocked
/// objects into it or deletes the way a plain repository does.
pub const IMMUTABLE_FORMAT_VERSION: u32 = 2;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Block sizes a reader accepts: powers of two in this range (cairn writes 64 KiB). Anything
/// else in a config is damage or tampering, and would otherwise divide by zero or size huge
/// buffers.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
pub const MAX_BLOCK_SIZE: u32 = 1024 * 1024;
/// The most raw bytes one frame may hold: 16 blobs of the largest block size (cairn writes
/// 1 MiB frames of 64 KiB blocks, or one 128 KiB map page). Larger claims are damage or
/// tampering; the bound keeps every buffer sized from a trailer or index small.
pub const MAX_FRAME_RAW: usize = 16 * MAX_BLOCK_SIZE as usize;

/// The repository's `config` object (plain JSON: it must be readable before any key is; in an
/// encrypted repository every key file authenticates it, see FORMAT.md §3).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub version: u32,
    /// Random repository ID (hex).
    pub id: String,
    pub created: String,
    /// Block size of image maps, in bytes.
    pub block_size: u32,
    /// "none" or "aes-256-gcm".
    pub encryption: String,
    /// "zstd".
    pub compression: String,
    /// An immutable repository: every object a restore point needs stays locked by the store
    /// (S3 Object Lock, compliance mode) for `days`, in generations (FORMAT.md §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutability: Option<cairn_storage::LockPolicy>,
}

/// The longest lock cairn sets: 100 years (compliance locks cannot be undone).
pub const MAX_LOCK_DAYS: u32 = 36_500;

/// Whether a lock policy is one cairn writes and reads: 1 to [`MAX_LOCK_DAYS`] days, in
/// generations of 1 to 365 days.
pub fn check_lock_policy(p: cairn_storage::LockPolicy) -> std::result::Result<(), String> {
    if (1..=MAX_LOCK_DAYS).contains(&p.days) && (1..=365).contains(&p.generation_days) {
        Ok(())
    } else {
        Err(format!(
            "immutability of {} days in generations of {} days (1 to {MAX_LOCK_DAYS}, and 1 to 365)",
            p.days, p.generation_days
        ))
    }
}

impl Config {
    /// Parses and checks a stored config: every field a reader relies on must make sense.
    pub fn parse(raw: &[u8], location: &str) -> Result<Config> {
        let config: Config = serde_json::from_slice(raw)
            .map_err(|e| Error::Corrupt(format!("the config file at {location} is unreadable ({e})")))?;
        let known = if config.immutability.is_some() { IMMUTABLE_FORMAT_VERSION } else { FORMAT_VERSION };
        if config.version > known {
            return Err(Error::Format(format!(
                "repository format {} is newer than this cairn understands ({known}); upgrade cairn",
                config.version
            )));
        }
        let bad = |what: String| Err(Error::Corrupt(format!("the config file at {location} is invalid: {what}")));
        if config.version == 0 {
            return bad("format version 0".into());
        }
        if config.id.len() != 32 || !config.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!("repository id {:?} is not 32 hex digits", config.id));
        }
        if !config.block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&config.block_size) {
            return bad(format!("block size {} is not a power of two from 4 KiB to 1 MiB", config.block_size));
        }
        if config.compression != "zstd" {
            return bad(format!("unknown compression {:?}", config.compression));
        }
        if config.immutability.is_some() != (config.version == IMMUTABLE_FORMAT_VERSION) {
            return bad(format!(
                "format version {} {} immutability",
                config.version,
                if config.immutability.is_some() { "with" } else { "without" }
            ));
        }
        if let Some(why) = config.immutability.and_then(|p| check_lock_policy(p).err()) {
            return bad(why);
        }
        if !matches!(config.encryption.as_str(), "none" | "aes-256-gcm") {
            return Err(Error::Format(format!("unknown encryption {:?}", config.encryption)));
        }
        Ok(config)
    }

    pub fn is_encrypted(&self) -> bool {
        self.encryption == "aes-256-gcm"
    }
}

/// The object locks of `backend`, which an immutable repository (`policy`) needs.
pub(crate) fn store_locks(
    backend: &dyn cairn_storage::Backend,
    policy: cairn_storage::LockPolicy,
) -> Result<&dyn cairn_storage::ObjectLock> {
    backend.object_lock().ok_or_else(|| {
        Error::Incompatible(format!(
            "{} is an immutable repository ({} days of Object Lock) but its store cannot lock objects \
             (immutable repositories live on S3 with Object Lock or on Azure Blob with version-level immutability)",
            backend.location(),
            policy.days
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(version: u32, immutability: &str) -> Vec<u8> {
        format!(
            r#"{{"version": {version}, "id": "0123456789abcdef0123456789abcdef", "created": "2026-11-30T00:00:00Z",
               "block_size": 65536, "encryption": "aes-256-gcm", "compression": "zstd"{immutability}}}"#
        )
        .into_bytes()
    }

    /// An immutable repository is format 2, so that readers from before immutability refuse it
    /// rather than write unlocked objects into it or delete the plain way.
    #[test]
    fn immutability_goes_with_format_2() {
        let lock = r#", "immutability": {"days": 30, "generation_days": 10}"#;
        let c = Config::parse(&config(2, lock), "here").unwrap();
        assert_eq!(c.immutability, Some(cairn_storage::LockPolicy { days: 30, generation_days: 10 }));
        assert!(Config::parse(&config(1, ""), "here").is_ok());
        assert!(Config::parse(&config(1, lock), "here").unwrap_err().to_string().contains("with immutability"));
        assert!(Config::parse(&config(2, ""), "here").unwrap_err().to_string().contains("newer than this cairn"));
        assert!(Config::parse(&config(3, lock), "here").unwrap_err().to_string().contains("newer than this cairn"));
        let zero = r#", "immutability": {"days": 0, "generation_days": 10}"#;
        assert!(Config::parse(&config(2, zero), "here").is_err());
    }
}
