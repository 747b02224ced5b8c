//! Restore points: the documents that make backups visible.

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
    /// The point this one was made incrementally from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub disks: Vec<DiskImage>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metadata: serde_json::Value,
    pub stats: PointStats,
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

impl DiskImage {
    /// Whether this is one of the machine's disks (not a file it needs or its memory state).
    pub fn is_disk(&self) -> bool {
        self.role.is_none()
    }
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
    pub fn disk(&self, name: Option<&str>) -> Result<&DiskImage, String> {
        match name {
            Some(n) => self.disks.iter().find(|d| d.name == n).ok_or_else(|| {
                let have: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
                format!("restore point has no disk {n:?} (it has: {})", have.join(", "))
            }),
            None if self.disks.len() == 1 => Ok(&self.disks[0]),
            None => {
                let have: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
                Err(format!("restore point has {} disks; pick one with --disk ({})", self.disks.len(), have.join(", ")))
            }
        }
    }
}
