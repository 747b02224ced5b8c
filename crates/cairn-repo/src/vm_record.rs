//! What a VM restore point records about its VM and how it was taken: the point's
//! `metadata.vm` (FORMAT.md §7). Written by `cairn-vm`'s backup, read by recovery, boot checks,
//! retention (a VM is its UUID) and every interface; so it lives with the format.

use crate::RestorePoint;
use serde::{Deserialize, Serialize};

/// How the point in time is taken from a running VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// App-consistent when its requirements hold, else saved-state.
    Auto,
    /// Guest filesystems frozen through the guest agent (with pre-freeze/post-thaw commands).
    AppConsistent,
    /// VM paused, memory and device state saved, point taken, VM resumed.
    SavedState,
    /// Point taken with no freeze and no pause: what a power cut would leave.
    CrashConsistent,
    /// The VM is shut off: its disk files are read directly.
    Offline,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::AppConsistent => "app-consistent",
            Method::SavedState => "saved-state",
            Method::CrashConsistent => "crash-consistent",
            Method::Offline => "offline",
        }
    }
}

/// One step of a backup with when it happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub event: String,
    /// RFC 3339 with milliseconds.
    pub at: String,
    /// Milliseconds since the job started.
    pub t_ms: u64,
}

/// A file outside the disks that the VM needs, as stored in the point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    pub role: String,
    pub path: String,
    /// The image of the restore point holding it.
    pub image: String,
    pub size: u64,
    pub mtime_ns: u128,
}

/// A swap area that was not copied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedSwap {
    pub disk: String,
    pub location: String,
    pub offset: u64,
    pub length: u64,
}

/// Everything a VM restore point records about the VM and how it was taken: the point's
/// `metadata.vm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub uuid: String,
    pub name: String,
    pub hypervisor: String,
    pub host: String,
    /// The VM's state when the backup started.
    pub state: String,
    pub method: Method,
    pub method_reason: String,
    /// "incremental" (dirty extents only) or "full".
    pub chain: String,
    pub chain_reason: String,
    /// The checkpoint this point's data is relative to for the next backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<String>,
    /// The definition of `checkpoint` (libvirt: its XML without the domain), to register it again
    /// on a host the VM moved to: libvirt does not migrate checkpoint metadata, while QEMU
    /// migrates the bitmaps (and a qcow2 on shared storage keeps them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_document: Option<String>,
    pub events: Vec<Event>,
    /// Freeze returned → thaw returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_window_ms: Option<u64>,
    /// VM paused → VM running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_window_ms: Option<u64>,
    /// Bytes read from the VM's disks (not counting files and memory state).
    pub vm_read_bytes: u64,
    pub skipped_swap: Vec<SkippedSwap>,
    /// What the backup could not do but went on without (a guest structure that could not be
    /// read: nothing skipped there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub files: Vec<FileRecord>,
    /// The image holding the saved memory and device state (saved-state method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_state: Option<String>,
    /// Output of pre-freeze and post-thaw commands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookRun>,
    /// Disks only the guest sees, captured through cairn's guest agent at the same frozen instant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_disks: Vec<GuestDiskRecord>,
    /// Disks of the VM this point does not hold, and why (no agent, no snapshot possible, the
    /// agent failed): never left out silently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_captured: Vec<NotCaptured>,
    /// The hypervisor's configuration document (libvirt domain XML).
    pub config: String,
}

/// Role of the image of a disk only the guest sees (FORMAT.md §7).
pub const ROLE_GUEST_DISK: &str = "guest-disk";
/// Role of the image holding a guest disk's block hashes (FORMAT.md §7).
pub const ROLE_GUEST_HASHES: &str = "guest-hashes";

/// A disk only the guest sees, as a VM point holds it (FORMAT.md §7, role `guest-disk`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestDiskRecord {
    /// The agent's name for it (`lun0`).
    pub disk: String,
    /// The point's image holding it (`guest-lun0`).
    pub image: String,
    /// The point's image holding the BLAKE3 of each 64 KiB block as the host read it (role
    /// `guest-hashes`), which the next backup compares with the agent's.
    pub hashes_image: String,
    /// How the guest reaches it: `nbd`, `iscsi`, `scsi`, `nvme`.
    pub transport: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    pub size: u64,
    /// "full" or "changed" (only blocks whose hash differs from the last point's were read).
    pub read: String,
    pub reason: String,
}

/// A disk of the VM that a point does not hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotCaptured {
    pub disk: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport: String,
    pub why: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookRun {
    pub when: String,
    pub command: String,
    pub exit_code: i64,
    pub output: String,
}

impl VmRecord {
    /// The VM record of a restore point, if it is a VM backup.
    pub fn of(point: &RestorePoint) -> Option<VmRecord> {
        serde_json::from_value(point.metadata.get("vm")?.clone()).ok()
    }
}
