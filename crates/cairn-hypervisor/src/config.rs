//! The neutral VM model: what cairn knows of a VM's configuration (identity, size, disks, NICs,
//! the files outside the disks it needs to start, guest-agent hooks) and how a recovery wants it
//! changed. The configuration *document* (libvirt domain XML for libvirt) is stored whole in each
//! restore point and stays opaque above this crate: only the hypervisor implementation reads or
//! rewrites it ([`crate::Hypervisor::parse_config`], [`crate::Hypervisor::rewrite_config`]).

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct VmConfig {
    pub name: String,
    pub uuid: String,
    /// `qemu` (TCG) or `kvm`.
    pub domain_type: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    pub files: Vec<VmFile>,
    /// A virtio-serial channel named `org.qemu.guest_agent.0` exists.
    pub agent_channel: bool,
    /// A virtio-serial channel named `org.cairn.agent.0` exists: cairn's own guest agent, for
    /// the disks only the guest sees.
    pub cairn_agent_channel: bool,
    /// Its socket on the host, as the running VM's configuration names it (libvirt picks it).
    pub cairn_agent_socket: Option<String>,
    /// Commands run in the guest before the freeze / after the thaw, kept with the VM in its
    /// hypervisor's per-VM metadata (libvirt: domain metadata in cairn's namespace), so they follow it across hosts.
    pub pre_freeze: Vec<String>,
    pub post_thaw: Vec<String>,
    /// Tags, kept in the same metadata, that jobs select VMs by (`prod`, `db`): at most
    /// [`MAX_TAGS`], each 1 to 64 letters, digits, `-`, `_`, `.`; others are ignored.
    pub tags: Vec<String>,
}

/// The most tags a VM has (more are ignored).
pub const MAX_TAGS: usize = 64;

/// Whether `tag` is a tag: 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn is_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= 64 && tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[derive(Clone, Debug, Serialize)]
pub struct VmDisk {
    /// Target device name as the VM sees it: `vda`, `sdb`.
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`.
    pub source_type: String,
    /// File or device path (None for network disks or an empty cdrom).
    pub path: Option<String>,
    /// Image format from the driver element: `qcow2`, `raw`.
    pub format: String,
    pub readonly: bool,
    /// Virtual size in bytes, when the hypervisor could tell.
    pub size: Option<u64>,
}

impl VmDisk {
    /// Whether a backup copies this disk (cdroms and floppies are media, not state).
    pub fn is_backed_up(&self) -> bool {
        matches!(self.device.as_str(), "disk" | "lun") && (self.path.is_some() || self.source_type == "network")
    }
    /// Whether the format can carry a persistent dirty bitmap (libvirt checkpoints).
    pub fn supports_checkpoints(&self) -> bool {
        self.format == "qcow2"
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VmNic {
    pub mac: Option<String>,
    /// `network`, `bridge`, `direct`, `user`.
    pub kind: String,
    /// The network or bridge name.
    pub source: Option<String>,
    pub model: Option<String>,
}

/// A file outside the disks the VM needs: role is `kernel`, `initrd`, `dtb`, `loader` or `nvram`.
#[derive(Clone, Debug, Serialize)]
pub struct VmFile {
    pub role: String,
    pub path: String,
}

/// How a stored configuration becomes the configuration of a recovered VM.
#[derive(Clone, Debug, Default)]
pub struct ConfigEdit {
    pub name: String,
    /// Keep the UUID and MAC addresses: the VM replaces the original, or resumes its memory state.
    /// Otherwise both are removed and the hypervisor makes new ones.
    pub keep_identity: bool,
    /// Where each disk's image now is.
    pub disks: Vec<PlacedDisk>,
    /// File role (`kernel`, `initrd`, `dtb`, `loader`, `nvram`) → path.
    pub files: Vec<(String, String)>,
    /// Network or bridge name changes: (old, new).
    pub network_map: Vec<(String, String)>,
    /// Interfaces to leave out, by their (old) network or bridge name.
    pub drop_nics: Vec<String>,
    /// Keep host devices passed through (`<hostdev>`: PCI, USB, SCSI, mediated) and host folders
    /// shared with the guest (`<filesystem>`). A stored configuration could name any device or
    /// folder of this host, so only when the operator asks; a sandbox never.
    pub keep_host_devices: bool,
    /// Leave out host devices even so (some do not exist here; the caller says which).
    pub drop_hostdevs: bool,
    /// Leave out every network interface (a sandbox: no network at all).
    pub drop_all_nics: bool,
    /// The folder that holds everything of the new VM (its disks and files, where the restore
    /// wrote them, and its file-backed consoles): absolute. Every host path of the result lies in
    /// it, but the host's own emulators and firmware (and shared folders, when kept).
    pub storage_dir: String,
    /// The emulators this host offers ([`crate::Hypervisor::emulators`]). A stored `<emulator>`
    /// not among them is removed, so the hypervisor puts its own default in.
    pub host_emulators: Vec<String>,
    /// The firmware files this host's hypervisor offers ([`crate::Hypervisor::firmware`]): a
    /// `<loader>` the restore did not write is kept only if it is one of them.
    pub host_firmware: Vec<String>,
}

/// A disk of a recovered VM: the guest's target name (`vda`) and the image the restore wrote.
#[derive(Clone, Debug)]
pub struct PlacedDisk {
    pub target: String,
    pub path: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// A rewritten configuration, and what was removed from the stored one because a restore must
/// never run it (said to the operator).
#[derive(Clone, Debug, Default)]
pub struct Rewritten {
    /// The configuration document of the recovered VM.
    pub document: String,
    pub removed: Vec<String>,
}
