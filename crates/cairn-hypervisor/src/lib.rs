//! The hypervisor boundary.
//!
//! VM jobs (in `cairn-vm`) talk to hypervisors only through the [`Hypervisor`] trait:
//! inventory, the guest agent, freeze/thaw, pause/resume, memory state, checkpoints (persistent
//! dirty bitmaps), pull-mode backup exports served over NBD, and recovery (define, start, move
//! disks, sandboxes). VMs are described by the neutral model of [`config`]; the configuration
//! document itself (libvirt: domain XML) is opaque here and only the implementation reads or
//! rewrites it. `cairn-libvirt` implements the trait over libvirt; a bare-QEMU (QMP) or another
//! hypervisor implements the same trait and nothing above it changes. This crate links nothing
//! hypervisor-specific.
//!
//! Rules every implementation keeps:
//! - VMs are addressed by UUID (names change; UUIDs follow a VM across hosts and migrations).
//! - `begin_backup` creates the point in time and the checkpoint atomically: the checkpoint's
//!   bitmap starts recording exactly at the exported point, so the next incremental misses no write.
//! - A point's exports stay readable, unchanged, while the guest runs on, until `end_backup`.
//! - `end_backup` removes the exports and their scratch files; it never deletes checkpoints (the
//!   caller decides which checkpoint a finished or failed backup keeps).

pub mod config;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod watchdog;

use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub use config::{is_tag, ConfigEdit, PlacedDisk, Rewritten, VmConfig, VmDisk, VmFile, VmNic, MAX_TAGS};

/// The hypervisor cannot be reached at `uri` (not running, refused, unknown URI).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {hypervisor} at {uri}: {detail}")]
pub struct Unreachable {
    /// What was asked: `libvirt`.
    pub hypervisor: &'static str,
    pub uri: String,
    pub detail: String,
}

/// No VM has this name or UUID on the host.
#[derive(Debug, thiserror::Error)]
#[error("no VM named or with UUID '{name}' on {uri}")]
pub struct NoSuchVm {
    pub name: String,
    pub uri: String,
}

/// What a VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Paused,
    ShutOff,
    Crashed,
    Other,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShutOff => "shut off",
            VmState::Crashed => "crashed",
            VmState::Other => "other",
        }
    }
}

/// Whether the guest agent can be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "kebab-case")]
pub enum AgentStatus {
    /// The VM has no guest agent channel in its configuration.
    NoChannel,
    /// There is a channel but nothing answered `guest-ping` (agent not installed or not running,
    /// or the VM is not running).
    NotAnswering(String),
    Answering,
}

/// One VM as the inventory shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VmSummary {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    pub config: VmConfig,
    pub agent: AgentStatus,
}

/// A filesystem the guest agent reports.
#[derive(Clone, Debug, Serialize)]
pub struct GuestFilesystem {
    pub mountpoint: String,
    pub fs_type: String,
    pub devices: Vec<String>,
}

/// A block device the guest sees (a whole disk, not a partition), as the guest agent lists it
/// (qemu-ga `guest-get-disks`): what a backup without cairn's agent names as not captured when
/// the hypervisor does not provide it.
#[derive(Clone, Debug, Serialize)]
pub struct GuestBlockDevice {
    /// `/dev/nbd0`, `/dev/sdb`.
    pub name: String,
    /// Whether the device sits on a PCI address of the VM (the hypervisor's own device) rather
    /// than on a network or software transport the guest set up itself.
    pub on_pci: bool,
    /// The bus the guest agent says (`virtio`, `scsi`, ...), if any.
    pub bus_type: Option<String>,
    /// Devices it is built on (a device-mapper device's disks): such a device is not a disk.
    pub dependencies: Vec<String>,
}

/// A checkpoint: a named point from which the hypervisor tracks writes (one dirty bitmap per disk).
#[derive(Clone, Debug, Serialize)]
pub struct Checkpoint {
    pub name: String,
    pub parent: Option<String>,
    pub description: String,
    pub creation_time: u64,
    /// Disk targets with a bitmap in this checkpoint.
    pub disks: Vec<String>,
}

/// What `begin_backup` should do.
pub struct BackupRequest<'a> {
    /// Disk targets to export.
    pub disks: &'a [String],
    /// The checkpoint created at the point (its bitmap records every later write).
    pub new_checkpoint: &'a str,
    pub checkpoint_description: &'a str,
    /// Export each disk's changes since this checkpoint as a dirty-bitmap context.
    pub incremental_from: Option<&'a str>,
    /// Folder for the scratch (fleecing) files.
    pub work_dir: &'a Path,
    /// Folder for the NBD socket: the emulator creates it, so with an unprivileged emulator this
    /// is a folder of its own user inside `work_dir` (everything else there stays root's).
    pub socket_dir: &'a Path,
    /// Names this run's socket and scratch files (see [`job_socket_name`]), so that a job can be
    /// told apart from another run's in the same folder: a dead run's watchdog ends only its own.
    pub run_token: &'a str,
}

/// The file name of the NBD socket of the backup job started by the run with `token`.
pub fn job_socket_name(token: &str) -> String {
    format!("nbd-{token}.sock")
}

/// The file name of the scratch (fleecing) file of disk `target` in the run with `token`.
pub fn job_scratch_name(target: &str, token: &str) -> String {
    format!("{target}-{token}.scratch.qcow2")
}

/// A running pull-mode backup: one NBD export per disk.
#[derive(Clone, Debug)]
pub struct BackupExport {
    pub socket: PathBuf,
    pub disks: Vec<ExportedDisk>,
}

#[derive(Clone, Debug)]
pub struct ExportedDisk {
    pub target: String,
    /// `nbd+unix:///EXPORT?socket=PATH`
    pub uri: String,
    /// The NBD meta context holding the writes since `incremental_from`, when asked for.
    pub dirty_context: Option<String>,
}

/// Output of a command run in the guest.
#[derive(Clone, Debug, Serialize)]
pub struct GuestExec {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// The operations a VM backup needs from a hypervisor. Blocking; every method names the VM by UUID.
pub trait Hypervisor: Send + Sync {
    /// Where this connects, for messages and for the watchdog (`qemu:///system`).
    fn uri(&self) -> &str;
    fn list(&self) -> Result<Vec<VmSummary>>;
    /// Finds a VM by name or UUID.
    fn find(&self, name_or_uuid: &str) -> Result<VmSummary>;
    fn state(&self, uuid: &str) -> Result<VmState>;
    /// The VM's persistent configuration document (libvirt domain XML, with secrets): what a
    /// recovery defines again.
    fn config_document(&self, uuid: &str) -> Result<String>;

    fn agent_ping(&self, uuid: &str) -> Result<()>;
    fn agent_filesystems(&self, uuid: &str) -> Result<Vec<GuestFilesystem>>;
    /// Runs `/bin/sh -c COMMAND` in the guest and waits for it (bounded by `timeout_s`).
    fn agent_exec(&self, uuid: &str, command: &str, timeout_s: u64) -> Result<GuestExec>;
    /// Freezes the guest's filesystems (runs its fsfreeze hooks); returns how many.
    fn freeze(&self, uuid: &str) -> Result<u32>;
    fn thaw(&self, uuid: &str) -> Result<u32>;
    /// "frozen" or "thawed".
    fn freeze_status(&self, uuid: &str) -> Result<String>;
    /// The guest's whole block devices, from its guest agent.
    fn agent_disks(&self, uuid: &str) -> Result<Vec<GuestBlockDevice>>;

    fn pause(&self, uuid: &str) -> Result<()>;
    fn resume(&self, uuid: &str) -> Result<()>;
    /// Writes the paused VM's memory and device state to `path` (the VM stays paused). The file
    /// can bring the VM back in this state (libvirt: `virsh restore`).
    fn save_memory(&self, uuid: &str, path: &Path) -> Result<()>;

    fn checkpoints(&self, uuid: &str) -> Result<Vec<Checkpoint>>;
    /// Deletes a checkpoint; its bitmap's bits are merged into its parent's, so other chains keep working.
    fn delete_checkpoint(&self, uuid: &str, name: &str) -> Result<()>;
    /// A checkpoint's definition (libvirt: its XML without the domain), as a restore point keeps
    /// it to register the checkpoint again on another host.
    fn checkpoint_document(&self, uuid: &str, name: &str) -> Result<String>;
    /// The user and group (uid, gid) the running VM's emulator process runs as, when it is not
    /// root (libvirt: the domain's DAC label): the files and sockets a backup job has the
    /// hypervisor put in a folder of ours must be reachable by that user.
    fn emulator_owner(&self, uuid: &str) -> Result<Option<(u32, u32)>>;
    /// The user and group (uid, gid) the emulator of a VM defined from `config` (as a recovery
    /// rewrites it: without security labels) will run as, when not root (libvirt: the host's
    /// default DAC label for its kind of VM): an instant recovery's NBD socket must be
    /// reachable by that user.
    fn emulator_owner_for(&self, config: &str) -> Result<Option<(u32, u32)>>;
    /// Registers a checkpoint from its definition on this host, where its bitmaps already are
    /// (migrated with the guest, or in the disk images on shared storage): libvirt does not
    /// migrate checkpoint metadata. Fails, defining nothing, unless every disk of the checkpoint
    /// holds its bitmap, consistent. The document comes from a restore point: untrusted bytes.
    /// `name` is the checkpoint the caller expects the document to define: another is refused.
    fn redefine_checkpoint(&self, uuid: &str, name: &str, document: &str) -> Result<()>;

    /// Takes the point in time (with a new checkpoint) and exports every disk over NBD.
    fn begin_backup(&self, uuid: &str, req: &BackupRequest) -> Result<BackupExport>;
    /// The socket of the VM's running backup job, if one runs (a leftover of a killed run, or
    /// someone else's).
    fn running_backup(&self, uuid: &str) -> Result<Option<PathBuf>>;
    /// Ends the VM's backup job; its exports and scratch files go away.
    fn end_backup(&self, uuid: &str) -> Result<()>;

    // Recovery.
    /// Registers a VM from a configuration document; returns its UUID.
    fn define(&self, config: &str) -> Result<String>;
    fn start(&self, uuid: &str) -> Result<()>;
    /// Stops a VM at once (power off), if it runs.
    fn power_off(&self, uuid: &str) -> Result<()>;
    /// Removes a VM's definition and its checkpoint metadata; its disks and NVRAM file stay.
    fn undefine(&self, uuid: &str) -> Result<()>;
    /// Starts a VM from a memory state file saved by [`Hypervisor::save_memory`], with this
    /// configuration (same identity, disks possibly elsewhere); it runs on from that state.
    fn start_from_memory(&self, path: &Path, config: &str) -> Result<()>;
    /// Whether a NIC can attach to `name`: `kind` is `network` (a hypervisor network, which must
    /// be active) or `bridge` (a host bridge).
    fn network_available(&self, kind: &str, name: &str) -> Result<bool>;
    /// Copies a running VM's disk (its whole backing chain, flattened) into a new image at
    /// `dest` while the guest runs, then switches the VM onto it; the VM's definition follows.
    /// `progress` gets (copied, total) bytes.
    fn move_disk(&self, uuid: &str, target: &str, dest: &Path, format: &str, progress: &dyn Fn(u64, u64))
        -> Result<()>;
    /// Starts a throwaway VM from a configuration: it exists only while it runs (libvirt:
    /// transient), so stopping it leaves nothing behind. Returns its UUID.
    fn start_transient(&self, config: &str) -> Result<String>;
    /// The VM's screen, as an image; returns (bytes, MIME type).
    fn screenshot(&self, uuid: &str) -> Result<(Vec<u8>, String)>;
    /// The file a VM's disk currently reads from.
    fn disk_source(&self, uuid: &str, target: &str) -> Result<Option<String>>;
    /// The emulator binaries this host's hypervisor offers (libvirt capabilities): the only ones a
    /// recovered configuration may name.
    fn emulators(&self) -> Result<Vec<String>>;
    /// The firmware files (UEFI code, BIOS images) this host's hypervisor offers (libvirt domain
    /// capabilities): the only host files a recovered configuration may name as its loader.
    fn firmware(&self) -> Result<Vec<String>>;

    // Configuration documents (as `config_document` returns them and restore points keep them).
    /// Reads a configuration document into the neutral model. Documents come from restore points,
    /// so this is a bounded parser of untrusted bytes.
    fn parse_config(&self, document: &str) -> Result<VmConfig>;
    /// Makes a stored configuration the configuration of a recovered VM on this host: what
    /// `edit` says, and nothing of the stored host's paths or devices that a restore must not run.
    fn rewrite_config(&self, document: &str, edit: &ConfigEdit) -> Result<Rewritten>;
    /// The host devices (PCI/USB pass-through) a configuration names, as `pci 0000:03:00.0` or
    /// `usb 046d:c52b`.
    fn host_devices(&self, document: &str) -> Result<Vec<String>>;
}
