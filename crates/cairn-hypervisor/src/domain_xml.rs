//! What cairn reads from a libvirt domain document: identity, size, disks, NICs, and the files
//! outside the disks that the VM needs to start (direct-boot kernel and initrd, firmware, UEFI
//! variable store). The document itself is stored whole in each restore point; this is the index
//! into it.

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct DomainConfig {
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
    /// Commands run in the guest before the freeze / after the thaw, kept with the VM in its
    /// domain metadata (see [`HOOKS_NAMESPACE`]), so they follow it across hosts.
    pub pre_freeze: Vec<String>,
    pub post_thaw: Vec<String>,
}

/// The namespace of cairn's per-VM settings in libvirt domain metadata. Set them with
/// `virsh metadata VM https://cairn.dev/xmlns/hooks/1 --key cairn --set
/// '<hooks><pre-freeze>CMD</pre-freeze><post-thaw>CMD</post-thaw></hooks>'`.
pub const HOOKS_NAMESPACE: &str = "https://cairn.dev/xmlns/hooks/1";

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

pub fn parse(xml: &str) -> Result<DomainConfig> {
    let doc = roxmltree::Document::parse(xml).context("parsing the libvirt domain document")?;
    let root = doc.root_element();
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(name))
    }
    let text = |n: Option<roxmltree::Node<'_, '_>>| n.and_then(|n| n.text()).map(|t| t.trim().to_string());
    let mut c = DomainConfig {
        name: text(child(root, "name")).unwrap_or_default(),
        uuid: text(child(root, "uuid")).unwrap_or_default(),
        domain_type: root.attribute("type").unwrap_or("").to_string(),
        ..Default::default()
    };
    if let Some(m) = child(root, "memory") {
        let v: u64 = m.text().unwrap_or("0").trim().parse().unwrap_or(0);
        c.memory_bytes = v * unit_bytes(m.attribute("unit").unwrap_or("KiB"));
    }
    c.vcpus = text(child(root, "vcpu")).and_then(|t| t.parse().ok()).unwrap_or(1);
    if let Some(os) = child(root, "os") {
        for (tag, role) in
            [("kernel", "kernel"), ("initrd", "initrd"), ("dtb", "dtb"), ("loader", "loader"), ("nvram", "nvram")]
        {
            if let Some(path) = text(child(os, tag)).filter(|p| p.starts_with('/')) {
                c.files.push(VmFile { role: role.into(), path });
            }
        }
    }
    if let Some(meta) = child(root, "metadata") {
        for n in meta.descendants().filter(|n| n.is_element() && n.tag_name().namespace() == Some(HOOKS_NAMESPACE)) {
            let cmd = n.text().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
            match (n.tag_name().name(), cmd) {
                ("pre-freeze", Some(cmd)) => c.pre_freeze.push(cmd),
                ("post-thaw", Some(cmd)) => c.post_thaw.push(cmd),
                _ => {}
            }
        }
    }
    if let Some(devices) = child(root, "devices") {
        for d in devices.children().filter(|n| n.is_element()) {
            match d.tag_name().name() {
                "disk" => {
                    let source = child(d, "source");
                    let path = source.and_then(|s| s.attribute("file").or(s.attribute("dev"))).map(String::from);
                    c.disks.push(VmDisk {
                        target: child(d, "target").and_then(|t| t.attribute("dev")).unwrap_or("").to_string(),
                        device: d.attribute("device").unwrap_or("disk").to_string(),
                        source_type: d.attribute("type").unwrap_or("file").to_string(),
                        path,
                        format: child(d, "driver").and_then(|t| t.attribute("type")).unwrap_or("raw").to_string(),
                        readonly: child(d, "readonly").is_some(),
                        size: None,
                    });
                }
                "interface" => c.nics.push(VmNic {
                    mac: child(d, "mac").and_then(|m| m.attribute("address")).map(String::from),
                    kind: d.attribute("type").unwrap_or("").to_string(),
                    source: child(d, "source")
                        .and_then(|s| s.attribute("network").or(s.attribute("bridge")).or(s.attribute("dev")))
                        .map(String::from),
                    model: child(d, "model").and_then(|m| m.attribute("type")).map(String::from),
                }),
                "channel" if child(d, "target").and_then(|t| t.attribute("name")) == Some("org.qemu.guest_agent.0") => {
                    c.agent_channel = true;
                }
                _ => {}
            }
        }
    }
    Ok(c)
}

fn unit_bytes(unit: &str) -> u64 {
    match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => 1 << 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disks_nics_files_and_agent() {
        let xml = r#"<domain type='qemu'><name>web</name><uuid>2da463bf-4dab-4b65-afda-bf83f46eb22d</uuid>
          <memory unit='KiB'>262144</memory><vcpu placement='static'>2</vcpu>
          <os><type>hvm</type><kernel>/k/vmlinux</kernel><initrd>/k/initrd</initrd>
              <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/var/lib/nv.fd</nvram></os>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><target dev='vdb'/></disk>
            <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
          </devices><metadata><cairn:hooks xmlns:cairn='https://cairn.dev/xmlns/hooks/1'>
            <cairn:pre-freeze>mysql -e 'FLUSH TABLES WITH READ LOCK'</cairn:pre-freeze><cairn:post-thaw>echo done</cairn:post-thaw>
          </cairn:hooks></metadata></domain>"#;
        let c = parse(xml).unwrap();
        assert_eq!((c.name.as_str(), c.vcpus, c.memory_bytes), ("web", 2, 256 << 20));
        assert_eq!(c.disks.len(), 3);
        assert!(c.disks[0].is_backed_up() && c.disks[0].supports_checkpoints());
        assert_eq!(c.disks[1].path.as_deref(), Some("/dev/sdz"));
        assert!(c.disks[1].is_backed_up() && !c.disks[1].supports_checkpoints());
        assert!(!c.disks[2].is_backed_up());
        assert_eq!(c.nics[0].source.as_deref(), Some("default"));
        let roles: Vec<_> = c.files.iter().map(|f| f.role.as_str()).collect();
        assert_eq!(roles, ["kernel", "initrd", "loader", "nvram"]);
        assert!(c.agent_channel);
        assert_eq!(c.pre_freeze, ["mysql -e 'FLUSH TABLES WITH READ LOCK'"]);
        assert_eq!(c.post_thaw, ["echo done"]);
    }
}
