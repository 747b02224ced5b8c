//! What cairn reads from a libvirt domain document: identity, size, disks, NICs, and the files
//! outside the disks that the VM needs to start (direct-boot kernel and initrd, firmware, UEFI
//! variable store). The document itself is stored whole in each restore point; this is the index
//! into it.

use anyhow::{bail, Context, Result};
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
    check_depth(xml)?;
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
        c.memory_bytes = v
            .checked_mul(unit_bytes(m.attribute("unit").unwrap_or("KiB")))
            .context("the domain's memory size does not fit in 64 bits")?;
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

/// How a stored configuration becomes the configuration of a recovered VM.
#[derive(Clone, Debug, Default)]
pub struct ConfigEdit {
    pub name: String,
    /// Keep the UUID and MAC addresses: the VM replaces the original, or resumes its memory state.
    /// Otherwise both are removed and the hypervisor makes new ones.
    pub keep_identity: bool,
    /// Disk target → (image path, format).
    pub disks: Vec<(String, String, String)>,
    /// File role (`kernel`, `initrd`, `dtb`, `loader`, `nvram`) → path.
    pub files: Vec<(String, String)>,
    /// Network or bridge name changes: (old, new).
    pub network_map: Vec<(String, String)>,
    /// Interfaces to leave out, by their (old) network or bridge name.
    pub drop_nics: Vec<String>,
    /// Leave out host devices (PCI/USB passthrough).
    pub drop_hostdevs: bool,
    /// Leave out every network interface (a sandbox: no network at all).
    pub drop_all_nics: bool,
    /// Leave out host folders shared with the guest (`<filesystem>`): a sandbox touches nothing
    /// of the host.
    pub drop_filesystems: bool,
    /// Folder for file-backed serial consoles and logs, which must not be shared with the original.
    pub log_dir: Option<String>,
    /// The emulators this host offers ([`crate::Hypervisor::emulators`]). A stored `<emulator>`
    /// not among them is removed, so the hypervisor puts its own default in.
    pub host_emulators: Vec<String>,
}

/// The libvirt namespace of QEMU-specific overrides: `<qemu:commandline>` (extra QEMU arguments
/// and environment), `<qemu:capabilities>`, `<qemu:override>`, `<qemu:deprecation>`.
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Nesting deeper than this is refused: no libvirt document comes near it (about 6), and our XML
/// parsers recurse once per level.
pub const MAX_DEPTH: usize = 64;

/// A rewritten configuration, and what was removed from the stored one because a restore must
/// never run it (said to the operator).
#[derive(Clone, Debug, Default)]
pub struct Rewritten {
    pub xml: String,
    pub removed: Vec<String>,
}

/// Refuses a document whose elements nest deeper than [`MAX_DEPTH`], or that declares a document
/// type (whose entities a parser would expand), before any parser sees it:
/// the XML parsers we use recurse once per level, so a document from a tampered repository
/// nested 100 000 deep would overflow the stack. The scan is iterative and counts what a parser
/// would (comments, CDATA, processing instructions, declarations and quoted attribute values
/// are skipped); for text that is not XML it may count wrong, and the parser refuses that anyway.
pub fn check_depth(xml: &str) -> Result<()> {
    let b = xml.as_bytes();
    let find = |from: usize, pat: &[u8]| -> usize {
        b[from.min(b.len())..]
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|p| from + p + pat.len())
            .unwrap_or(b.len())
    };
    let (mut i, mut depth) = (0usize, 0usize);
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = find(i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = find(i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = find(i + 2, b"?>");
        } else if rest.len() >= 9 && rest[..9].eq_ignore_ascii_case(b"<!DOCTYPE") {
            // Entities a DTD declares would be expanded by some parsers (xmltree does), into
            // paths or text our checks never saw; libvirt never writes one.
            bail!("the VM configuration declares a document type (<!DOCTYPE>): it is not a libvirt domain document");
        } else if rest.starts_with(b"<!") {
            i = find(i + 2, b">");
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = find(i + 2, b">");
        } else {
            // An opening tag: to its '>', outside quoted attribute values.
            let mut j = i + 1;
            let mut quote = None;
            while j < b.len() {
                match (quote, b[j]) {
                    (None, b'"' | b'\'') => quote = Some(b[j]),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => break,
                    _ => {}
                }
                j += 1;
            }
            if j >= b.len() || b[j - 1] != b'/' {
                depth += 1;
                if depth > MAX_DEPTH {
                    bail!("the VM configuration nests elements more than {MAX_DEPTH} levels deep: it is not a libvirt domain document");
                }
            }
            i = j + 1;
        }
    }
    Ok(())
}

/// Applies `edit` to a stored domain document. The stored document may come from a tampered
/// repository, so whatever would run code on this host as the hypervisor's user is removed
/// whatever the edit says: elements of the QEMU namespace, an emulator this host does not offer,
/// and disks the restore did not write (they would open host paths).
pub fn rewrite(xml: &str, edit: &ConfigEdit) -> Result<Rewritten> {
    use xmltree::{Element, XMLNode};
    check_depth(xml)?;
    let mut root = Element::parse(xml.as_bytes()).context("parsing the stored VM configuration")?;
    if root.name != "domain" || root.namespace.is_some() {
        bail!("the stored VM configuration is not a libvirt domain (root element <{}>)", root.name);
    }
    // libvirt reads devices from every <devices> element (and files from every <os>), we edit
    // one: a second one could carry what the edit removes from the first.
    for once in ["devices", "os", "name", "uuid"] {
        let n = root.children.iter().filter(|c| matches!(c, XMLNode::Element(e) if e.name == once)).count();
        if n > 1 {
            bail!("the stored VM configuration has {n} <{once}> elements: it is not a libvirt domain");
        }
    }
    let mut removed = Vec::new();
    fn set_text(e: &mut Element, text: &str) {
        e.children = vec![XMLNode::Text(text.to_string())];
    }
    fn drop_qemu_namespace(e: &mut Element, removed: &mut Vec<String>) {
        if let Some(ns) = e.namespaces.as_mut() {
            ns.0.retain(|_, uri| uri != QEMU_NAMESPACE);
        }
        e.children.retain(|c| match c {
            XMLNode::Element(x) if x.namespace.as_deref() == Some(QEMU_NAMESPACE) => {
                removed.push(format!("<qemu:{}> (QEMU-specific overrides)", x.name));
                false
            }
            _ => true,
        });
        for c in &mut e.children {
            if let XMLNode::Element(x) = c {
                drop_qemu_namespace(x, removed);
            }
        }
    }
    drop_qemu_namespace(&mut root, &mut removed);
    if let Some(n) = root.get_mut_child("name") {
        set_text(n, &edit.name);
    }
    if !edit.keep_identity {
        while root.take_child("uuid").is_some() {}
    }
    if let Some(os) = root.get_mut_child("os") {
        for (role, path) in &edit.files {
            if let Some(e) = os.get_mut_child(role.as_str()) {
                set_text(e, path);
            }
        }
    }
    let log_dir = edit.log_dir.clone();
    let name = edit.name.clone();
    if let Some(devices) = root.get_mut_child("devices") {
        let mut kept = Vec::new();
        for node in std::mem::take(&mut devices.children) {
            let XMLNode::Element(mut d) = node else {
                kept.push(node);
                continue;
            };
            match d.name.as_str() {
                "emulator" => {
                    let path = d.get_text().map(|t| t.trim().to_string()).unwrap_or_default();
                    if !edit.host_emulators.contains(&path) {
                        // Without one, the hypervisor takes its default for the machine type.
                        removed.push(format!("emulator {path:?} (not one of this host's; its default is used)"));
                        continue;
                    }
                }
                "disk" => {
                    let target =
                        d.get_child("target").and_then(|t| t.attributes.get("dev").cloned()).unwrap_or_default();
                    if let Some((_, path, format)) = edit.disks.iter().find(|(t, _, _)| *t == target) {
                        d.attributes.insert("type".into(), "file".into());
                        while d.take_child("source").is_some() {}
                        while d.take_child("backingStore").is_some() {}
                        let mut src = Element::new("source");
                        src.attributes.insert("file".into(), path.clone());
                        d.children.insert(0, XMLNode::Element(src));
                        match d.get_mut_child("driver") {
                            Some(drv) => {
                                drv.attributes.insert("type".into(), format.clone());
                            }
                            None => {
                                let mut drv = Element::new("driver");
                                drv.attributes.insert("name".into(), "qemu".into());
                                drv.attributes.insert("type".into(), format.clone());
                                d.children.insert(0, XMLNode::Element(drv));
                            }
                        }
                    } else if is_storage(&d) && d.get_child("source").is_some() {
                        // A disk the point does not hold: its source is a path of the host it was
                        // made on (or one a tampered document chose). Media (cdrom, floppy) stay.
                        removed.push(format!("disk {target} (not in the restore point)"));
                        continue;
                    }
                }
                "interface" if edit.drop_all_nics => continue,
                "interface" => {
                    let src_name = d
                        .get_child("source")
                        .and_then(|s| s.attributes.get("network").or(s.attributes.get("bridge")).cloned());
                    if let Some(old) = &src_name {
                        if edit.drop_nics.contains(old) {
                            continue;
                        }
                        if let Some((_, new)) = edit.network_map.iter().find(|(o, _)| o == old) {
                            if let Some(s) = d.get_mut_child("source") {
                                for k in ["network", "bridge"] {
                                    if s.attributes.contains_key(k) {
                                        s.attributes.insert(k.into(), new.clone());
                                    }
                                }
                            }
                        }
                    }
                    if !edit.keep_identity {
                        while d.take_child("mac").is_some() {}
                    }
                }
                "hostdev" if edit.drop_hostdevs => continue,
                "filesystem" if edit.drop_filesystems => {
                    removed.push("a host folder shared with the guest (<filesystem>)".to_string());
                    continue;
                }
                "serial" | "console" | "channel" if d.attributes.get("type").map(|t| t.as_str()) == Some("file") => {
                    if let (Some(dir), Some(src)) = (&log_dir, d.get_mut_child("source")) {
                        if let Some(p) = src.attributes.get("path").cloned() {
                            let base = std::path::Path::new(&p).file_name().map(|b| b.to_string_lossy().into_owned());
                            src.attributes.insert(
                                "path".into(),
                                format!("{dir}/{name}-{}", base.unwrap_or_else(|| "log".into())),
                            );
                        }
                    }
                }
                _ => {}
            }
            kept.push(XMLNode::Element(d));
        }
        devices.children = kept;
    }
    let mut out = Vec::new();
    let cfg = xmltree::EmitterConfig::new().write_document_declaration(false).perform_indent(true);
    root.write_with_config(&mut out, cfg).context("writing the VM configuration")?;
    Ok(Rewritten { xml: String::from_utf8(out)?, removed })
}

/// Whether a `<disk>` is storage the VM owns (not removable media).
fn is_storage(d: &xmltree::Element) -> bool {
    matches!(d.attributes.get("device").map(|s| s.as_str()).unwrap_or("disk"), "disk" | "lun")
}

/// Host devices (PCI/USB passthrough) a configuration names, as `pci 0000:03:00.0` or `usb 046d:c52b`.
pub fn host_devices(xml: &str) -> Result<Vec<String>> {
    check_depth(xml)?;
    let doc = roxmltree::Document::parse(xml).context("parsing the VM configuration")?;
    let mut out = Vec::new();
    for h in doc.descendants().filter(|n| n.has_tag_name("hostdev")) {
        let kind = h.attribute("type").unwrap_or("");
        let Some(src) = h.children().find(|c| c.has_tag_name("source")) else { continue };
        if let Some(a) = src.children().find(|c| c.has_tag_name("address")) {
            let f = |k: &str| a.attribute(k).map(|v| v.trim_start_matches("0x").to_string()).unwrap_or_default();
            match kind {
                "pci" => {
                    out.push(format!("pci {:0>4}:{:0>2}:{:0>2}.{}", f("domain"), f("bus"), f("slot"), f("function")))
                }
                "usb" => out.push(format!("usb bus {} device {}", f("bus"), f("device"))),
                _ => out.push(format!("{kind} device")),
            }
        } else if let (Some(v), Some(p)) = (
            src.children().find(|c| c.has_tag_name("vendor")).and_then(|v| v.attribute("id")),
            src.children().find(|c| c.has_tag_name("product")).and_then(|p| p.attribute("id")),
        ) {
            out.push(format!("{kind} {}:{}", v.trim_start_matches("0x"), p.trim_start_matches("0x")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod rewrite_tests {
    use super::*;

    #[test]
    fn rewrites_identity_disks_files_networks_and_logs() {
        let xml = r#"<domain type='qemu'><name>web</name><uuid>2da463bf-4dab-4b65-afda-bf83f46eb22d</uuid>
          <os><type>hvm</type><kernel>/old/kernel</kernel><nvram>/old/nvram.fd</nvram></os>
          <devices>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><backingStore/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><target dev='sda'/></disk>
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='prod'/></interface>
            <interface type='bridge'><mac address='52:54:00:aa:bb:cd'/><source bridge='br-gone'/></interface>
            <hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>
            <serial type='file'><source path='/old/vm/serial.log'/><target port='0'/></serial>
          </devices></domain>"#;
        assert_eq!(host_devices(xml).unwrap(), ["pci 0000:03:00.0"]);
        let edit = ConfigEdit {
            name: "web-restored".into(),
            keep_identity: false,
            disks: vec![("vda".into(), "/st/web-restored-vda.qcow2".into(), "qcow2".into())],
            files: vec![("kernel".into(), "/st/web-restored-kernel".into())],
            network_map: vec![("prod".into(), "lab".into())],
            drop_nics: vec!["br-gone".into()],
            drop_hostdevs: true,
            log_dir: Some("/st".into()),
            ..Default::default()
        };
        let out = rewrite(xml, &edit).unwrap().xml;
        let c = parse(&out).unwrap();
        assert_eq!(c.name, "web-restored");
        assert!(c.uuid.is_empty(), "{out}");
        assert_eq!(c.disks[0].path.as_deref(), Some("/st/web-restored-vda.qcow2"));
        assert_eq!((c.disks[0].format.as_str(), c.disks[0].source_type.as_str()), ("qcow2", "file"));
        assert!(!out.contains("backingStore") && !out.contains("/dev/sdz"));
        assert_eq!(c.disks[1].device, "cdrom");
        assert_eq!(c.nics.len(), 1);
        assert_eq!((c.nics[0].source.as_deref(), c.nics[0].mac.as_deref()), (Some("lab"), None));
        assert_eq!(c.files[0].path, "/st/web-restored-kernel");
        assert_eq!(c.files[1].path, "/old/nvram.fd");
        assert!(host_devices(&out).unwrap().is_empty());
        assert!(out.contains("/st/web-restored-serial.log"), "{out}");
        // A sandbox has no network at all.
        let sandbox = parse(&rewrite(xml, &ConfigEdit { drop_all_nics: true, ..edit.clone() }).unwrap().xml).unwrap();
        assert!(sandbox.nics.is_empty());
        // Keeping the identity keeps UUID and MACs.
        let kept = parse(&rewrite(xml, &ConfigEdit { keep_identity: true, ..edit }).unwrap().xml).unwrap();
        assert_eq!(kept.uuid, "2da463bf-4dab-4b65-afda-bf83f46eb22d");
        assert_eq!(kept.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
    }

    /// A stored configuration as a tampered repository could hold it: extra QEMU arguments and
    /// capabilities (under any prefix), an emulator of the attacker's choice, a host disk the
    /// point does not hold.
    const HOSTILE: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' xmlns:q2='http://libvirt.org/schemas/domain/qemu/1.0'>
          <name>web</name><memory unit='MiB'>256</memory>
          <os><type>hvm</type></os>
          <devices>
            <emulator>/tmp/evil/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sda'/><target dev='vdz'/></disk>
            <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda'/><readonly/></disk>
            <filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>
          </devices>
          <qemu:commandline><qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/x,string=y'/><qemu:env name='X' value='1'/></qemu:commandline>
          <q2:capabilities><q2:del capability='sandbox'/></q2:capabilities>
          <metadata><qemu:override xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/></metadata>
        </domain>"#;

    #[test]
    fn rewrite_removes_qemu_overrides_foreign_emulators_and_unrestored_disks() {
        let edit = ConfigEdit {
            name: "web-restored".into(),
            disks: vec![("vda".into(), "/st/web-restored-vda.qcow2".into(), "qcow2".into())],
            host_emulators: vec!["/usr/bin/qemu-system-x86_64".into()],
            ..Default::default()
        };
        let r = rewrite(HOSTILE, &edit).unwrap();
        for gone in ["commandline", "qemu:arg", "fw_cfg", "capabilities", "override", "/tmp/evil", "/dev/sda", "vdz"] {
            assert!(!r.xml.contains(gone), "{gone} still in\n{}", r.xml);
        }
        assert!(!r.xml.contains("http://libvirt.org/schemas/domain/qemu/1.0"), "{}", r.xml);
        let c = parse(&r.xml).unwrap();
        let disks: Vec<_> = c.disks.iter().map(|d| (d.target.as_str(), d.path.as_deref())).collect();
        assert_eq!(disks, [("vda", Some("/st/web-restored-vda.qcow2")), ("sda", Some("/iso/install.iso"))]);
        // Each removal is said.
        let said = r.removed.join("; ");
        for what in ["qemu:commandline", "qemu:capabilities", "qemu:override", "/tmp/evil", "disk vdz"] {
            assert!(said.contains(what), "{what} not reported: {said}");
        }
        // Host folders stay for a recovery (the operator's shares), and go from a sandbox.
        assert!(r.xml.contains("<filesystem"));
        let sandbox = rewrite(HOSTILE, &ConfigEdit { drop_filesystems: true, ..edit.clone() }).unwrap();
        assert!(!sandbox.xml.contains("<filesystem"), "{}", sandbox.xml);
        // This host's own emulator stays, silently.
        let own = HOSTILE.replace("/tmp/evil/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64");
        let r = rewrite(&own, &edit).unwrap();
        assert!(r.xml.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"), "{}", r.xml);
        assert!(!r.removed.iter().any(|m| m.contains("emulator")), "{:?}", r.removed);
    }

    #[test]
    fn deep_or_foreign_documents_are_refused_without_recursing() {
        let deep = format!("<domain>{}{}</domain>", "<a>".repeat(200_000), "</a>".repeat(200_000));
        for f in [parse(&deep).err(), host_devices(&deep).err(), rewrite(&deep, &ConfigEdit::default()).err()] {
            assert!(f.unwrap().to_string().contains("levels deep"));
        }
        // A second <devices> (libvirt reads them all; an edit of the first would miss it).
        let two = HOSTILE.replacen("<devices>", "<devices></devices><devices>", 1);
        assert!(rewrite(&two, &ConfigEdit::default()).unwrap_err().to_string().contains("2 <devices>"));
        // Quoted '>' and comments do not fool the count; self-closing elements do not nest.
        let ok = format!("<domain a='x>y'><!-- <b><b><b> -->{}</domain>", "<e/>".repeat(1000));
        check_depth(&ok).unwrap();
        assert!(rewrite("<network><name>x</name></network>", &ConfigEdit::default()).is_err());
        assert!(parse("<domain><memory unit='TiB'>99999999</memory></domain>").is_err(), "memory overflow accepted");
    }

    #[test]
    fn a_document_type_is_refused_before_any_parser_expands_its_entities() {
        // xmltree expands internal entities: a path no check of ours would see as written.
        let xml = r#"<!DOCTYPE domain [<!ENTITY e "/etc/shadow">]><domain type='kvm'><name>x</name><devices>
            <serial type='file'><source path='&e;'/></serial></devices></domain>"#;
        let edit = ConfigEdit { name: "x".into(), ..Default::default() };
        for e in [rewrite(xml, &edit).err(), parse(xml).err(), host_devices(xml).err(), check_depth(xml).err()] {
            assert!(e.expect("accepted").to_string().contains("<!DOCTYPE>"));
        }
        // In a comment it declares nothing.
        check_depth("<!-- <!DOCTYPE x> --><domain/>").unwrap();
    }
}
