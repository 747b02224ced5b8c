use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// The repository's `config` object (plain JSON: it must be readable before any key is).
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
}
