//! Restore points: the documents that make backups visible.

use crate::map::PAGE_BLOCKS;
use crate::PointId;
use serde::{Deserialize, Serialize};

/// One backup of one machine or image: every disk as a complete block map ("synthetic full"),
/// plus free-form metadata (the VM configuration for VM backups).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestorePoint {
    pub version: u32,
    /// What the point belongs to: an image name or a VM name.
    pub name: String,
    /// RFC 3339, UTC, when the data was captured.
    pub time: String,
    pub hostname: String,
    /// Human-readable description of what was read.
    pub source: String,
    /// The point this one was made incrementally from, if any. Informational (FORMAT.md §7):
    /// one that is not a point ID is read as none rather than making the point unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "parent_or_none")]
    pub parent: Option<PointId>,
    pub disks: Vec<DiskImage>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metadata: serde_json::Value,
    pub stats: PointStats,
    /// In an immutable repository: unix seconds until which every object this point needs
    /// was locked when it was written (FORMAT.md §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<u64>,
}

/// One disk of a restore point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskImage {
    /// The disk's name: `disk0` for image backups, the target (`vda`) for VM disks.
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub source: String,
    /// IDs (hex) of the map pages, in disk order.
    pub map: Vec<String>,
    pub stats: DiskStats,
    /// What this image is when it is not one of the VM's disks: `kernel`, `initrd`, `loader`,
    /// `nvram` (files the VM configuration names) or `memory-state` (saved-state backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Where the disk or file lived on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Largest disk a restore point may describe (1 PiB): far beyond any virtual disk, and small
/// enough that sizes derived from it (block counts, qcow2 tables) never overflow.
pub const MAX_DISK_SIZE: u64 = 1 << 50;

impl DiskImage {
    /// Whether this is one of the machine's disks (not a file it needs or its memory state).
    pub fn is_disk(&self) -> bool {
        self.role.is_none()
    }

    /// How many blocks the disk has.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size.max(1) as u64)
    }

    /// How many block IDs map page `page` holds: [`PAGE_BLOCKS`], except the last page.
    pub fn page_len(&self, page: usize) -> usize {
        let before = page as u64 * PAGE_BLOCKS as u64;
        self.blocks().saturating_sub(before).min(PAGE_BLOCKS as u64) as usize
    }

    fn check(&self) -> Result<(), String> {
        if !safe_name(&self.name) {
            return Err(format!("disk name {:?} is not made of letters, digits, '.', '_' and '-'", self.name));
        }
        if let Some(role) = &self.role {
            if !safe_name(role) {
                return Err(format!("disk {} has an invalid role {role:?}", self.name));
            }
        }
        if !self.block_size.is_power_of_two()
            || !(crate::config::MIN_BLOCK_SIZE..=crate::config::MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(format!("disk {} has an invalid block size {}", self.name, self.block_size));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(format!("disk {} claims {} bytes, more than any disk cairn stores", self.name, self.size));
        }
        let pages = crate::map::page_count(self.blocks());
        if self.map.len() as u64 != pages {
            return Err(format!("disk {} has {} map pages where its size needs {pages}", self.name, self.map.len()));
        }
        if let Some(bad) = self.map.iter().find(|h| crate::BlockId::from_hex(h).is_none()) {
            return Err(format!("disk {} has an invalid map page ID {bad:?}", self.name));
        }
        Ok(())
    }
}

/// Whether a name from a restore point is safe to use in host paths and messages: 1 to 64 of
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn safe_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// What a backup did for one disk, in bytes of disk data.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskStats {
    /// The disk's size.
    pub logical_bytes: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes known to be zero or unallocated (not stored).
    pub zero_bytes: u64,
    /// Bytes not read because they hold no state worth keeping (Linux swap); restored as zeros.
    #[serde(default)]
    pub skipped_bytes: u64,
    /// Bytes taken from the parent point without reading (changed-ranges backups).
    pub unchanged_bytes: u64,
    /// Bytes read whose blocks the repository already held.
    pub dedup_bytes: u64,
    /// Bytes of blocks new to the repository, before compression.
    pub new_bytes: u64,
    /// Bytes written to packs for those new blocks (after compression and encryption).
    pub stored_bytes: u64,
    pub new_blocks: u64,
}

impl DiskStats {
    pub fn add(&mut self, o: &DiskStats) {
        self.logical_bytes += o.logical_bytes;
        self.read_bytes += o.read_bytes;
        self.zero_bytes += o.zero_bytes;
        self.skipped_bytes += o.skipped_bytes;
        self.unchanged_bytes += o.unchanged_bytes;
        self.dedup_bytes += o.dedup_bytes;
        self.new_bytes += o.new_bytes;
        self.stored_bytes += o.stored_bytes;
        self.new_blocks += o.new_blocks;
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PointStats {
    #[serde(flatten)]
    pub totals: DiskStats,
    /// Whole-point bytes written: new blocks, map pages and index.
    pub repository_growth_bytes: u64,
    pub duration_ms: u64,
    /// "full" or "changed-ranges".
    pub mode: String,
}

impl RestorePoint {
    /// Checks what readers rely on (FORMAT.md §7): known version, safe disk names and roles,
    /// sane block sizes and disk sizes, exactly the map pages each disk's size needs, no two
    /// disks with one name. Points are authenticated only in encrypted repositories, so a
    /// reader checks them before use.
    pub fn check(&self) -> Result<(), String> {
        if self.version == 0 || self.version > 1 {
            return Err(format!("unknown restore point version {}", self.version));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.disks {
            d.check()?;
            if !names.insert(d.name.as_str()) {
                return Err(format!("two disks are named {}", d.name));
            }
        }
        Ok(())
    }

    pub fn disk(&self, name: Option<&str>) -> Result<&DiskImage, String> {
        match name {
            Some(n) => self.disks.iter().find(|d| d.name == n).ok_or_else(|| {
                let have: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
                format!("restore point has no disk {n:?} (it has: {})", have.join(", "))
            }),
            None if self.disks.len() == 1 => Ok(&self.disks[0]),
            None => {
                let have: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
                Err(format!("restore point has {} disks ({}): name one", self.disks.len(), have.join(", ")))
            }
        }
    }
}

/// A point's `parent` when it is a point ID; anything else (only a foreign writer's) is none.
fn parent_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<PointId>, D::Error> {
    let raw: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
    Ok(raw.as_ref().and_then(|v| v.as_str()).and_then(PointId::parse))
}
