//! Libvirt domain documents: [`parse`] reads one into the neutral [`VmConfig`] (identity, size,
//! disks, NICs, the files outside the disks that the VM needs to start: direct-boot kernel and
//! initrd, firmware, UEFI variable store); [`rewrite`] makes a stored one the configuration of a
//! recovered VM. The document itself is stored whole in each restore point. Nothing outside this
//! crate reads or writes domain XML.

use anyhow::{bail, Context, Result};
use cairn_hypervisor::{ConfigEdit, PlacedDisk, Rewritten, VmConfig, VmDisk, VmFile, VmNic};

/// The namespace of cairn's per-VM settings in libvirt domain metadata. Set them with
/// `virsh metadata VM https://cairn.dev/xmlns/hooks/1 --key cairn --set
/// '<hooks><pre-freeze>CMD</pre-freeze><post-thaw>CMD</post-thaw><tag>prod</tag></hooks>'`.
pub const HOOKS_NAMESPACE: &str = "https://cairn.dev/xmlns/hooks/1";

pub fn parse(xml: &str) -> Result<VmConfig> {
    check_depth(xml)?;
    let doc = roxmltree::Document::parse(xml).context("parsing the libvirt domain document")?;
    let root = doc.root_element();
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(name))
    }
    let text = |n: Option<roxmltree::Node<'_, '_>>| n.and_then(|n| n.text()).map(|t| t.trim().to_string());
    let mut c = VmConfig {
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
                ("tag", Some(tag)) if cairn_hypervisor::is_tag(&tag) && c.tags.len() < cairn_hypervisor::MAX_TAGS => {
                    if !c.tags.contains(&tag) {
                        c.tags.push(tag)
                    }
                }
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
                "channel" if child(d, "target").and_then(|t| t.attribute("name")) == Some("org.cairn.agent.0") => {
                    c.cairn_agent_channel = true;
                    c.cairn_agent_socket = child(d, "source")
                        .filter(|s| d.attribute("type") == Some("unix") && s.attribute("mode") == Some("bind"))
                        .and_then(|s| s.attribute("path"))
                        .map(String::from);
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
    #[test]
    fn the_emulator_owner_is_read_from_the_dac_label() {
        let live =
            "<domain><name>x</name><seclabel type='dynamic' model='apparmor'><label>libvirt-1</label></seclabel>\
                    <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+107</label></seclabel></domain>";
        assert_eq!(super::dac_owner(live).unwrap(), Some((64055, 107)));
        assert_eq!(super::dac_owner("<domain><name>x</name></domain>").unwrap(), None);
        assert_eq!(
            super::dac_owner("<domain><seclabel model='dac'><label>qemu:kvm</label></seclabel></domain>").unwrap(),
            None
        );
    }

    #[test]
    fn a_new_vm_runs_as_the_hosts_base_label() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
                    <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+64056</baselabel>\
                    <baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host></capabilities>";
        assert_eq!(super::base_dac_owner(caps, "qemu").unwrap(), Some((64055, 64055)));
        assert_eq!(super::base_dac_owner(caps, "kvm").unwrap(), Some((64055, 64056)));
        assert_eq!(super::base_dac_owner(caps, "xen").unwrap(), None);
        assert_eq!(super::base_dac_owner("<capabilities/>", "qemu").unwrap(), None);
    }

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
            <cairn:tag>prod</cairn:tag><cairn:tag>bad tag</cairn:tag><cairn:tag>prod</cairn:tag><cairn:tag>db</cairn:tag>
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
        assert_eq!(c.tags, ["prod", "db"], "tags: plain ones, once each");
    }
}

/// The libvirt namespace of QEMU-specific overrides: `<qemu:commandline>` (extra QEMU arguments
/// and environment), `<qemu:capabilities>`, `<qemu:override>`, `<qemu:deprecation>`.
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Nesting deeper than this is refused: no libvirt document comes near it (about 6), and our XML
/// parsers recurse once per level.
pub const MAX_DEPTH: usize = 64;

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
/// repository, so the result is built from what is known to stay inside the VM, whatever the edit
/// says: every element of the domain and every device is kept only if its kind is on an allow-list
/// (with the parts of it that name host files, programs or devices removed or pointed into the
/// storage folder), and then every path the result names is checked to lie in the storage folder
/// (or to be one of the host's emulators or firmware files), or the rewrite is refused. What was
/// left out is listed in [`Rewritten::removed`].
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
    let mut r = Rewrite { edit, removed: Vec::new(), consoles: Vec::new(), shared: Vec::new() };
    drop_qemu_namespace(&mut root, &mut r.removed);
    for node in std::mem::take(&mut root.children) {
        match node {
            XMLNode::Element(e) => {
                if let Some(e) = r.top(e) {
                    root.children.push(XMLNode::Element(e));
                }
            }
            other => root.children.push(other),
        }
    }
    r.strip_everywhere(&mut root, "the configuration");
    r.check_paths(&root)?;
    let mut out = Vec::new();
    let cfg = xmltree::EmitterConfig::new().write_document_declaration(false).perform_indent(true);
    root.write_with_config(&mut out, cfg).context("writing the VM configuration")?;
    let mut removed = r.removed;
    let mut seen = std::collections::HashSet::new();
    removed.retain(|m| seen.insert(m.clone()));
    Ok(Rewritten { document: String::from_utf8(out)?, removed })
}

/// Removes every element of the QEMU namespace (extra QEMU arguments, capabilities, overrides).
fn drop_qemu_namespace(e: &mut xmltree::Element, removed: &mut Vec<String>) {
    use xmltree::XMLNode;
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

/// The element children of `e`.
fn elements(e: &xmltree::Element) -> impl Iterator<Item = &xmltree::Element> {
    e.children.iter().filter_map(|c| if let xmltree::XMLNode::Element(x) = c { Some(x) } else { None })
}

fn attr<'a>(e: &'a xmltree::Element, name: &str) -> Option<&'a str> {
    e.attributes.get(name).map(|s| s.as_str())
}

fn text_of(e: &xmltree::Element) -> String {
    e.get_text().map(|t| t.trim().to_string()).unwrap_or_default()
}

/// Keeps only the element children of `e` that `keep` accepts (other nodes stay); returns the
/// names of those removed.
fn retain_children(e: &mut xmltree::Element, mut keep: impl FnMut(&xmltree::Element) -> bool) -> Vec<String> {
    let mut gone = Vec::new();
    e.children.retain(|c| match c {
        xmltree::XMLNode::Element(x) if x.namespace.is_some() || !keep(x) => {
            gone.push(x.name.clone());
            false
        }
        _ => true,
    });
    gone
}

/// Parts of the domain that stay inside the VM, kept as they are.
const TOP_KEPT: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "memtune",
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
    "numatune",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "perf",
    "keywrap",
    "launchSecurity",
    "throttlegroups",
];

/// Elements (of the domain, or nested) whose text is a host path.
const PATH_TEXT: &[&str] = &[
    "kernel", "initrd", "dtb", "loader", "nvram", "emulator", "table", "path", "block", "char", "database", "backend",
];

/// Attributes that hold a host path (libvirt resolves a relative one from its own folder, /).
const PATH_ATTRS: &[&str] =
    &["file", "path", "dir", "script", "socket", "template", "xauth", "tap", "vhost", "logFile", "runtimeDir"];

/// Elements whose text is the guest's (a command line, serial numbers, names), never a host
/// path, though it may start with '/'.
const FREE_TEXT: &[&str] = &["cmdline", "initarg", "serial", "wwn", "vendor", "product", "model", "label", "name"];

/// Parts whose content libvirt keeps for others or hands to the guest as data (SMBIOS strings, SEV
/// certificates in base64, which may start with '/'): no host path in them.
const OPAQUE: &[&str] = &["metadata", "title", "description", "sysinfo", "launchSecurity"];

/// Random-number sources a `<rng>` may read (libvirt's own list).
const RNG_SOURCES: &[&str] = &["/dev/random", "/dev/urandom", "/dev/hwrng"];

/// The state of one rewrite.
struct Rewrite<'a> {
    edit: &'a ConfigEdit,
    removed: Vec<String>,
    /// (stored path, new path) of file-backed consoles: one stored file stays one file.
    consoles: Vec<(String, String)>,
    /// Host folders shared with the guest, kept because the operator asked.
    shared: Vec<String>,
}

impl Rewrite<'_> {
    fn say(&mut self, what: impl Into<String>) {
        self.removed.push(what.into());
    }

    /// One element of the domain: kept (edited) or None.
    fn top(&mut self, mut e: xmltree::Element) -> Option<xmltree::Element> {
        if e.namespace.is_some() {
            self.say(format!("<{}> (not of libvirt's domain namespace)", e.name));
            return None;
        }
        match e.name.as_str() {
            "name" => {
                e.children = vec![xmltree::XMLNode::Text(self.edit.name.clone())];
                Some(e)
            }
            "uuid" if !self.edit.keep_identity => None,
            n if TOP_KEPT.contains(&n) => Some(e),
            "os" => {
                self.os(&mut e);
                Some(e)
            }
            "devices" => {
                self.devices(&mut e);
                Some(e)
            }
            "blkiotune" => {
                // Per-device weights name host block devices.
                if !retain_children(&mut e, |c| c.name != "device").is_empty() {
                    self.say("I/O weights of host block devices (<blkiotune><device>)");
                }
                Some(e)
            }
            "resource" => {
                // The cgroup partition the VM runs in: only libvirt's default.
                let ours = elements(&e).filter(|c| c.name == "partition").all(|p| text_of(p) == "/machine");
                if ours {
                    Some(e)
                } else {
                    self.say("a cgroup partition of its own (<resource>)");
                    None
                }
            }
            "sysinfo" if attr(&e, "type") == Some("smbios") => Some(e),
            "sysinfo" => {
                self.say("host files read into the guest (<sysinfo type='fwcfg'>)");
                None
            }
            "seclabel" => {
                // A static label (DAC +0:+0 runs QEMU as root) or none: this host's default instead.
                let dynamic = attr(&e, "type").is_none_or(|t| t == "dynamic") && elements(&e).next().is_none();
                if !dynamic {
                    self.say("its security label (<seclabel>; this host's default confinement applies)");
                }
                None
            }
            other => {
                self.say(format!("<{other}> (not something a restored VM keeps)"));
                None
            }
        }
    }

    /// Boot files: those the restore wrote, and the host's own firmware; nothing else of the host.
    fn os(&mut self, os: &mut xmltree::Element) {
        let edit = self.edit;
        let mut said = Vec::new();
        os.children.retain_mut(|c| {
            let xmltree::XMLNode::Element(x) = c else { return true };
            if x.namespace.is_some() {
                said.push(format!("<os><{}>", x.name));
                return false;
            }
            match x.name.as_str() {
                "type" | "boot" | "bootmenu" | "cmdline" | "bios" | "firmware" => true,
                "smbios" if attr(x, "mode") != Some("host") => true,
                "kernel" | "initrd" | "dtb" | "loader" | "nvram" => {
                    if let Some((_, path)) = edit.files.iter().find(|(role, _)| *role == x.name) {
                        x.children = vec![xmltree::XMLNode::Text(path.clone())];
                        // A restored NVRAM needs no template; a newer <nvram type='file'> becomes
                        // the plain form.
                        x.attributes.remove("template");
                        x.attributes.remove("type");
                        return true;
                    }
                    let path = text_of(x);
                    if x.name == "loader" && edit.host_firmware.contains(&path) {
                        return true;
                    }
                    said.push(format!("<os><{}> {path:?} (a host file the restore point does not hold)", x.name));
                    false
                }
                "smbios" => {
                    said.push("the host's SMBIOS tables (<os><smbios mode='host'>)".into());
                    false
                }
                "acpi" => {
                    said.push("ACPI tables read from host files (<os><acpi>)".into());
                    false
                }
                other => {
                    said.push(format!("<os><{other}>"));
                    false
                }
            }
        });
        self.removed.extend(said);
    }

    fn devices(&mut self, devices: &mut xmltree::Element) {
        use xmltree::XMLNode;
        let mut counts: Vec<(String, usize)> = Vec::new();
        for node in std::mem::take(&mut devices.children) {
            let XMLNode::Element(d) = node else {
                devices.children.push(node);
                continue;
            };
            // The n-th device of its kind, for names and messages.
            let n = match counts.iter_mut().find(|(k, _)| *k == d.name) {
                Some((_, c)) => {
                    *c += 1;
                    *c - 1
                }
                None => {
                    counts.push((d.name.clone(), 1));
                    0
                }
            };
            if let Some(d) = self.device(d, n) {
                devices.children.push(XMLNode::Element(d));
            }
        }
    }

    /// One device: kept (edited) or None (said why, unless the caller asked for it).
    // Long on purpose: one arm per device kind libvirt knows; the allow-list reads as one
    // table, which is what a reviewer checks it against; split, it would not.
    fn device(&mut self, mut d: xmltree::Element, n: usize) -> Option<xmltree::Element> {
        let edit = self.edit;
        if d.namespace.is_some() {
            self.say(format!("<{}> (not of libvirt's domain namespace)", d.name));
            return None;
        }
        let kind = attr(&d, "type").unwrap_or("").to_string();
        match d.name.as_str() {
            "emulator" => {
                let path = text_of(&d);
                if edit.host_emulators.contains(&path) {
                    return Some(d);
                }
                // Without one, the hypervisor takes its default for the machine type.
                self.say(format!("emulator {path:?} (not one of this host's; its default is used)"));
                None
            }
            "disk" => self.disk(d),
            "controller" | "memballoon" | "watchdog" | "sound" | "panic" | "vsock" | "iommu" | "hub"
            | "redirfilter" => Some(d),
            "crypto" => Some(d),
            "interface" => self.interface(d, &kind),
            "serial" | "console" | "parallel" | "channel" => self.chardev(d, &kind, n),
            "graphics" => match kind.as_str() {
                "vnc" | "spice" | "egl-headless" => {
                    // A socket path: libvirt makes one of its own when none is given.
                    d.attributes.remove("socket");
                    for l in d.children.iter_mut() {
                        if let xmltree::XMLNode::Element(l) = l {
                            l.attributes.remove("socket");
                        }
                    }
                    Some(d)
                }
                other => {
                    self.say(format!("graphics of type {other} (they reach into the host's display)"));
                    None
                }
            },
            "video" => {
                let host = elements(&d)
                    .any(|c| c.name == "source" || c.name == "driver" && attr(c, "name") == Some("vhostuser"));
                if host {
                    self.say("a video device served by a host program (vhost-user)");
                    return None;
                }
                Some(d)
            }
            "input" => match kind.as_str() {
                "mouse" | "tablet" | "keyboard" => {
                    retain_children(&mut d, |c| c.name != "source");
                    Some(d)
                }
                other => {
                    self.say(format!("input of type {other} (a host input device)"));
                    None
                }
            },
            "audio" => match kind.as_str() {
                "none" | "spice" => Some(d),
                other => {
                    // Sound devices refer to it by id: it stays, silent.
                    self.say(format!("audio backend {other} (none instead: it reaches into the host's sound)"));
                    d.attributes.retain(|k, _| k == "id");
                    d.attributes.insert("type".into(), "none".into());
                    d.children.clear();
                    Some(d)
                }
            },
            "rng" => {
                let ok = elements(&d).filter(|c| c.name == "backend").all(|b| match attr(b, "model") {
                    Some("builtin") => true,
                    Some("random") => {
                        let t = text_of(b);
                        t.is_empty() || RNG_SOURCES.contains(&t.as_str())
                    }
                    _ => false,
                });
                if ok {
                    Some(d)
                } else {
                    self.say("a random-number device fed from a host file or socket");
                    None
                }
            }
            "tpm" => {
                let emulated =
                    elements(&d).filter(|c| c.name == "backend").all(|b| attr(b, "type") == Some("emulator"));
                if !emulated {
                    self.say("a TPM of the host, or behind a host socket (<tpm> passthrough or external)");
                    return None;
                }
                for b in d.children.iter_mut() {
                    if let xmltree::XMLNode::Element(b) = b {
                        // Where its state lives is libvirt's choice.
                        retain_children(b, |c| c.name != "source");
                    }
                }
                Some(d)
            }
            "memory" => {
                let model = attr(&d, "model").unwrap_or("");
                let host_file = elements(&d).any(|c| c.name == "source" && elements(c).any(|p| p.name == "path"));
                if matches!(model, "dimm" | "virtio-mem") && !host_file {
                    Some(d)
                } else {
                    self.say(format!("memory device {model} (backed by a host file)"));
                    None
                }
            }
            "hostdev" => {
                let mode = attr(&d, "mode").unwrap_or("subsystem");
                if edit.drop_hostdevs {
                    return None; // the caller says which, and why
                }
                let kinds = ["pci", "usb", "scsi", "scsi_host", "mdev"];
                if !edit.keep_host_devices || mode != "subsystem" || !kinds.contains(&kind.as_str()) {
                    self.say(format!(
                        "host device {} passed through (<hostdev>; kept only when asked)",
                        hostdev_name(&d)
                    ));
                    return None;
                }
                let name = hostdev_name(&d);
                if remove_rom_files(&mut d) {
                    self.say(format!("the option ROM file of host device {name} (a host file)"));
                }
                Some(d)
            }
            "filesystem" => self.filesystem(d, &kind),
            "redirdev" if kind == "spicevmc" => Some(d),
            other => {
                self.say(format!(
                    "device <{other}>{} (not something a restored VM keeps)",
                    if kind.is_empty() { String::new() } else { format!(" of type {kind}") }
                ));
                None
            }
        }
    }

    fn disk(&mut self, mut d: xmltree::Element) -> Option<xmltree::Element> {
        let target = d.get_child("target").and_then(|t| attr(t, "dev")).unwrap_or("").to_string();
        let device = attr(&d, "device").unwrap_or("disk").to_string();
        let restored = self.edit.disks.iter().find(|p| p.target == target).cloned();
        let source = d.get_child("source").map(|s| {
            ["file", "dev", "dir", "volume", "name"].iter().find_map(|k| attr(s, k)).unwrap_or("").to_string()
        });
        if restored.is_none() && is_storage(&d) && source.is_some() {
            // A disk the point does not hold: its source is a path of the host it was made on
            // (or one a tampered document chose).
            self.say(format!("disk {target} (not in the restore point)"));
            return None;
        }
        // Only what describes the drive as the guest sees it; where it reads from is ours to say.
        let gone: Vec<String> = retain_children(&mut d, |c| DISK_KEPT.contains(&c.name.as_str()))
            .into_iter()
            .filter(|g| g != "source" && g != "backingStore")
            .map(|g| format!("<{g}>"))
            .collect();
        if !gone.is_empty() {
            self.say(format!("{} of disk {target}", gone.join(", ")));
        }
        // Raw SCSI access to a host device (and CAP_SYS_RAWIO for QEMU): not for a file.
        d.attributes.remove("rawio");
        d.attributes.remove("sgio");
        d.attributes.insert("type".into(), "file".into());
        match restored {
            Some(PlacedDisk { path, format, .. }) => {
                // What the restore wrote is a disk image (a LUN, or a device kind libvirt does
                // not know, would not be).
                if device != "disk" {
                    d.attributes.insert("device".into(), "disk".into());
                }
                let mut src = xmltree::Element::new("source");
                src.attributes.insert("file".into(), path);
                d.children.insert(0, xmltree::XMLNode::Element(src));
                match d.get_mut_child("driver") {
                    Some(drv) => {
                        drv.attributes.insert("type".into(), format);
                    }
                    None => {
                        let mut drv = xmltree::Element::new("driver");
                        drv.attributes.insert("name".into(), "qemu".into());
                        drv.attributes.insert("type".into(), format);
                        d.children.insert(0, xmltree::XMLNode::Element(drv));
                    }
                }
            }
            // A media drive stays, empty: its medium was a host file or device.
            None => {
                if let Some(src) = source {
                    self.say(format!(
                        "the medium in {device} {target} ({src:?}: a host file or device; the drive stays empty)"
                    ));
                }
            }
        }
        Some(d)
    }

    fn interface(&mut self, mut d: xmltree::Element, kind: &str) -> Option<xmltree::Element> {
        let edit = self.edit;
        if edit.drop_all_nics {
            return None;
        }
        if !matches!(kind, "network" | "bridge" | "user") {
            let script = elements(&d)
                .filter(|c| c.name == "script" || c.name == "downscript")
                .filter_map(|c| attr(c, "path"))
                .map(|p| format!(", script {p:?}"))
                .collect::<String>();
            self.say(format!("NIC of type {kind}{script} (it runs host programs or uses host devices)"));
            return None;
        }
        let src_name = d.get_child("source").and_then(|s| attr(s, "network").or(attr(s, "bridge"))).map(String::from);
        if let Some(old) = &src_name {
            if edit.drop_nics.contains(old) {
                return None; // the caller says so
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
        // The name of its host tap device is libvirt's to choose; scripts, backends and the like
        // run or open things on the host.
        let on = src_name.map(|s| format!(" on {s}")).unwrap_or_default();
        let gone: Vec<String> = retain_children(&mut d, |c| NIC_KEPT.contains(&c.name.as_str()))
            .into_iter()
            .filter(|g| g != "target")
            .map(|g| format!("<{g}>"))
            .collect();
        if !gone.is_empty() {
            self.say(format!("{} of the NIC{on} (they run or open things on the host)", gone.join(", ")));
        }
        if remove_rom_files(&mut d) {
            self.say(format!("the option ROM file of the NIC{on} (a host file)"));
        }
        Some(d)
    }

    /// Consoles, serial and parallel ports, channels: a pseudo-terminal, nothing, or a file (or
    /// socket) in the storage folder; never a host device, pipe, socket or port, and no log.
    fn chardev(&mut self, mut d: xmltree::Element, kind: &str, n: usize) -> Option<xmltree::Element> {
        let what = format!("{} {n}", d.name);
        // virtlogd writes a log as root wherever it says.
        if !retain_children(&mut d, |c| c.name != "log").is_empty() {
            self.say(format!("the log file of {what} (written on the host)"));
        }
        match kind {
            "" | "pty" | "null" | "vc" | "spicevmc" | "spiceport" | "qemu-vdagent" => {
                // None of these reads a host path (a stored pty path is the old host's; libvirt
                // allocates one); a SPICE port is named by its channel.
                for c in d.children.iter_mut() {
                    if let xmltree::XMLNode::Element(s) = c {
                        if s.name == "source" {
                            s.attributes.retain(|k, _| kind == "spiceport" && k == "channel");
                            s.children.clear();
                        }
                    }
                }
                retain_children(&mut d, |c| c.name != "source" || kind == "spiceport");
                Some(d)
            }
            "file" => {
                let name = self.edit.name.clone();
                let dir = self.edit.storage_dir.clone();
                let tag = d.name.clone();
                for c in d.children.iter_mut() {
                    let xmltree::XMLNode::Element(s) = c else { continue };
                    if s.name != "source" {
                        continue;
                    }
                    let old = attr(s, "path").unwrap_or("").to_string();
                    let new = match self.consoles.iter().find(|(o, _)| *o == old) {
                        Some((_, new)) => new.clone(),
                        None => {
                            let new = format!("{dir}/{name}-{tag}{n}.log");
                            self.consoles.push((old, new.clone()));
                            new
                        }
                    };
                    s.attributes.retain(|k, _| k == "append");
                    s.attributes.insert("path".into(), new);
                }
                Some(d)
            }
            "unix" => {
                let connect = elements(&d).any(|s| s.name == "source" && attr(s, "mode") == Some("connect"));
                if connect {
                    self.say(format!("{what}, connected to a host socket"));
                    return None;
                }
                let virtio_channel =
                    d.name == "channel" && d.get_child("target").and_then(|t| attr(t, "type")) == Some("virtio");
                let path = format!("{}/{}-{}{n}.sock", self.edit.storage_dir, self.edit.name, d.name);
                for c in d.children.iter_mut() {
                    let xmltree::XMLNode::Element(s) = c else { continue };
                    if s.name == "source" {
                        s.attributes.retain(|k, _| k == "mode");
                        if !virtio_channel {
                            s.attributes.insert("path".into(), path.clone());
                        }
                    }
                }
                // A virtio channel without a path gets one from libvirt, in its own folder.
                Some(d)
            }
            other => {
                self.say(format!("{what} of type {other} (a host device, pipe, socket or network port)"));
                None
            }
        }
    }

    fn filesystem(&mut self, mut d: xmltree::Element, kind: &str) -> Option<xmltree::Element> {
        let source = d.get_child("source");
        let dir = source.and_then(|s| attr(s, "dir")).map(String::from);
        let socket = source.is_some_and(|s| s.attributes.contains_key("socket"));
        let shown = dir.clone().or(source.and_then(|s| attr(s, "file").or(attr(s, "dev"))).map(String::from));
        let ok = self.edit.keep_host_devices && matches!(kind, "" | "mount") && dir.is_some() && !socket;
        if !ok {
            self.say(format!(
                "host folder {} shared with the guest (<filesystem>; kept only when asked)",
                shown.map(|p| format!("{p:?}")).unwrap_or_default()
            ));
            return None;
        }
        // The file server is this host's own (libvirt's choice), not a program the configuration names.
        let mut binary = false;
        for c in d.children.iter_mut() {
            if let xmltree::XMLNode::Element(b) = c {
                if b.name == "binary" {
                    binary |= b.attributes.remove("path").is_some();
                }
            }
        }
        if binary {
            self.say("the file server program of a shared folder (<binary path>; this host's is used)");
        }
        let gone = retain_children(&mut d, |c| FS_KEPT.contains(&c.name.as_str()));
        if !gone.is_empty() {
            self.say(format!("<{}> of a shared folder", gone.join(">, <")));
        }
        self.shared.push(dir.unwrap_or_default());
        Some(d)
    }

    /// Removes, at any depth (but in metadata, which libvirt keeps for others and never acts on),
    /// security labels, logs and GPU render nodes of the host.
    fn strip_everywhere(&mut self, e: &mut xmltree::Element, within: &str) {
        let mut said = Vec::new();
        e.children.retain(|c| match c {
            xmltree::XMLNode::Element(x) if x.name == "seclabel" || x.name == "log" => {
                said.push(format!("<{}> in {within}", x.name));
                false
            }
            _ => true,
        });
        self.removed.extend(said);
        if e.attributes.remove("rendernode").is_some() {
            self.say("a host GPU render node (rendernode)");
        }
        for c in e.children.iter_mut() {
            if let xmltree::XMLNode::Element(x) = c {
                if x.name != "metadata" {
                    let within = format!("<{}>", x.name);
                    self.strip_everywhere(x, &within);
                }
            }
        }
    }

    /// The last line: every host path the result names lies in the storage folder, or is the
    /// host's own emulator or firmware (or a shared folder the operator kept). A path anywhere
    /// else means a part of libvirt's configuration this rewrite does not know: refused.
    fn check_paths(&self, e: &xmltree::Element) -> Result<()> {
        for (k, v) in &e.attributes {
            // <target> names what the guest sees (a device name, a mount tag), not a host path.
            let path_like = (PATH_ATTRS.contains(&k.as_str()) || v.starts_with('/')) && e.name != "target";
            if path_like && !self.allowed(&e.name, Some(k), v) {
                bail!("the rewritten VM configuration would still name the host path {v:?} (<{} {k}>), outside the storage folder {}: refusing to define it (this part of the configuration is unknown to cairn)", e.name, self.edit.storage_dir);
            }
        }
        let text = text_of(e);
        let path_like = (PATH_TEXT.contains(&e.name.as_str()) && !text.is_empty())
            || (text.starts_with('/') && !FREE_TEXT.contains(&e.name.as_str()));
        if path_like && !self.allowed(&e.name, None, &text) {
            bail!("the rewritten VM configuration would still name the host path {text:?} (<{}>), outside the storage folder {}: refusing to define it (this part of the configuration is unknown to cairn)", e.name, self.edit.storage_dir);
        }
        for c in elements(e) {
            if !OPAQUE.contains(&c.name.as_str()) {
                self.check_paths(c)?;
            }
        }
        Ok(())
    }

    fn allowed(&self, element: &str, attribute: Option<&str>, path: &str) -> bool {
        let edit = self.edit;
        match (element, attribute) {
            ("emulator", None) if edit.host_emulators.iter().any(|p| p == path) => return true,
            ("loader", None) if edit.host_firmware.iter().any(|p| p == path) => return true,
            ("backend", None) if RNG_SOURCES.contains(&path) => return true,
            ("partition", None) if path == "/machine" => return true,
            ("source", Some("dir")) if self.shared.iter().any(|p| p == path) => return true,
            _ => {}
        }
        within(path, &edit.storage_dir)
    }
}

/// Whether `path` is absolute, without `..`, and inside folder `dir` (absolute).
fn within(path: &str, dir: &str) -> bool {
    use std::path::{Component, Path};
    let (p, d) = (Path::new(path), Path::new(dir));
    let plain =
        |x: &Path| x.is_absolute() && x.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    !dir.is_empty() && plain(p) && plain(d) && p.starts_with(d)
}

/// Parts of a `<disk>` kept: how the guest sees the drive.
const DISK_KEPT: &[&str] = &[
    "driver",
    "target",
    "address",
    "boot",
    "readonly",
    "shareable",
    "transient",
    "serial",
    "wwn",
    "vendor",
    "product",
    "iotune",
    "blockio",
    "geometry",
    "alias",
];

/// Parts of an `<interface>` kept.
const NIC_KEPT: &[&str] = &[
    "source",
    "mac",
    "model",
    "address",
    "boot",
    "driver",
    "virtualport",
    "vlan",
    "link",
    "mtu",
    "coalesce",
    "bandwidth",
    "filterref",
    "tune",
    "alias",
    "rom",
    "acpi",
    "ip",
    "route",
    "port",
];

/// Parts of a `<filesystem>` kept (when shared folders are).
const FS_KEPT: &[&str] = &[
    "driver",
    "binary",
    "source",
    "target",
    "readonly",
    "address",
    "alias",
    "model",
    "space_hard_limit",
    "space_soft_limit",
    "idmap",
];

/// Removes the `file` of every `<rom>` child (an option ROM read from the host); whether one was.
fn remove_rom_files(d: &mut xmltree::Element) -> bool {
    let mut any = false;
    for c in d.children.iter_mut() {
        if let xmltree::XMLNode::Element(r) = c {
            if r.name == "rom" {
                any |= r.attributes.remove("file").is_some();
            }
        }
    }
    any
}

/// A host device as [`host_devices`] names it.
fn hostdev_name(d: &xmltree::Element) -> String {
    let kind = attr(d, "type").unwrap_or("");
    let src = d.get_child("source");
    if let Some(a) = src.and_then(|s| s.get_child("address")) {
        let f = |k: &str| attr(a, k).map(|v| v.trim_start_matches("0x").to_string()).unwrap_or_default();
        return match kind {
            "pci" => format!("pci {:0>4}:{:0>2}:{:0>2}.{}", f("domain"), f("bus"), f("slot"), f("function")),
            "usb" => format!("usb bus {} device {}", f("bus"), f("device")),
            _ => format!("{kind} device"),
        };
    }
    let id = |n: &str| {
        src.and_then(|s| s.get_child(n)).and_then(|v| attr(v, "id")).map(|v| v.trim_start_matches("0x").to_string())
    };
    match (id("vendor"), id("product")) {
        (Some(v), Some(p)) => format!("{kind} {v}:{p}"),
        _ => format!("{kind} device"),
    }
}

/// Whether a `<disk>` is storage the VM owns (not removable media).
fn is_storage(d: &xmltree::Element) -> bool {
    matches!(d.attributes.get("device").map(|s| s.as_str()).unwrap_or("disk"), "disk" | "lun")
}

/// The (uid, gid) of a running domain's DAC label (`<seclabel model='dac'><label>+UID:+GID`),
/// the user its QEMU runs as; none without one.
pub fn dac_owner(xml: &str) -> Result<Option<(u32, u32)>> {
    check_depth(xml)?;
    let doc = roxmltree::Document::parse(xml).context("parsing the VM's running configuration")?;
    let label = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("seclabel") && n.attribute("model") == Some("dac"))
        .find_map(|n| n.children().find(|c| c.has_tag_name("label")).and_then(|l| l.text()));
    Ok(label.and_then(dac_ids))
}

/// A `UID:GID` label (`+64055:+64055`, or numbers without the `+`); none for names, which only
/// the host could resolve.
fn dac_ids(label: &str) -> Option<(u32, u32)> {
    let id = |s: &str| s.trim().trim_start_matches('+').parse::<u32>().ok();
    label.split_once(':').and_then(|(u, g)| Some((id(u)?, id(g)?)))
}

/// The (uid, gid) the host runs QEMU as for VMs of type `virt_type` (`qemu`, `kvm`) without a
/// label of their own: its capabilities' `<secmodel><model>dac</model><baselabel type=...>`.
pub fn base_dac_owner(capabilities: &str, virt_type: &str) -> Result<Option<(u32, u32)>> {
    check_depth(capabilities)?;
    let doc = roxmltree::Document::parse(capabilities).context("parsing the host's capabilities")?;
    let dac = doc
        .descendants()
        .filter(|n| n.has_tag_name("secmodel"))
        .find(|m| m.children().any(|c| c.has_tag_name("model") && c.text().map(str::trim) == Some("dac")));
    Ok(dac
        .and_then(|m| {
            m.children()
                .find(|c| c.has_tag_name("baselabel") && c.attribute("type") == Some(virt_type))
                .and_then(|l| l.text())
        })
        .and_then(dac_ids))
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

    fn placed(target: &str, path: &str, format: &str) -> PlacedDisk {
        PlacedDisk { target: target.into(), path: path.into(), format: format.into() }
    }

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
            <console type='file'><source path='/old/vm/serial.log'/><target type='serial' port='0'/></console>
          </devices></domain>"#;
        assert_eq!(host_devices(xml).unwrap(), ["pci 0000:03:00.0"]);
        let edit = ConfigEdit {
            name: "web-restored".into(),
            keep_identity: false,
            disks: vec![placed("vda", "/st/web-restored-vda.qcow2", "qcow2")],
            files: vec![("kernel".into(), "/st/web-restored-kernel".into())],
            network_map: vec![("prod".into(), "lab".into())],
            drop_nics: vec!["br-gone".into()],
            keep_host_devices: true,
            drop_hostdevs: true,
            storage_dir: "/st".into(),
            ..Default::default()
        };
        let r = rewrite(xml, &edit).unwrap();
        let out = r.document;
        let c = parse(&out).unwrap();
        assert_eq!(c.name, "web-restored");
        assert!(c.uuid.is_empty(), "{out}");
        assert_eq!(c.disks[0].path.as_deref(), Some("/st/web-restored-vda.qcow2"));
        assert_eq!((c.disks[0].format.as_str(), c.disks[0].source_type.as_str()), ("qcow2", "file"));
        assert!(!out.contains("backingStore") && !out.contains("/dev/sdz"));
        assert_eq!(c.disks[1].device, "cdrom");
        assert_eq!(c.nics.len(), 1);
        assert_eq!((c.nics[0].source.as_deref(), c.nics[0].mac.as_deref()), (Some("lab"), None));
        // The kernel the restore wrote; the NVRAM it did not write (a path of the old host) goes.
        let files: Vec<_> = c.files.iter().map(|f| (f.role.as_str(), f.path.as_str())).collect();
        assert_eq!(files, [("kernel", "/st/web-restored-kernel")]);
        assert!(r.removed.iter().any(|m| m.contains("nvram") && m.contains("/old/nvram.fd")), "{:?}", r.removed);
        assert!(host_devices(&out).unwrap().is_empty());
        // One console file, in the storage folder, named by the VM and the port (never by the
        // stored name, which could be one of the restored images).
        assert_eq!(out.matches("/st/web-restored-serial0.log").count(), 2, "{out}");
        // A sandbox has no network at all.
        let sandbox =
            parse(&rewrite(xml, &ConfigEdit { drop_all_nics: true, ..edit.clone() }).unwrap().document).unwrap();
        assert!(sandbox.nics.is_empty());
        // Keeping the identity keeps UUID and MACs.
        let kept = parse(&rewrite(xml, &ConfigEdit { keep_identity: true, ..edit }).unwrap().document).unwrap();
        assert_eq!(kept.uuid, "2da463bf-4dab-4b65-afda-bf83f46eb22d");
        assert_eq!(kept.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
    }

    /// A stored configuration as a tampered repository could hold it: extra QEMU arguments and
    /// capabilities (under any prefix), an emulator of the attacker's choice, a host disk the
    /// point does not hold, host media, a host folder.
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

    fn edit() -> ConfigEdit {
        ConfigEdit {
            name: "web-restored".into(),
            disks: vec![placed("vda", "/st/web-restored-vda.qcow2", "qcow2")],
            storage_dir: "/st".into(),
            host_emulators: vec!["/usr/bin/qemu-system-x86_64".into()],
            host_firmware: vec!["/usr/share/OVMF/OVMF_CODE.fd".into()],
            ..Default::default()
        }
    }

    #[test]
    fn rewrite_removes_qemu_overrides_foreign_emulators_and_unrestored_disks() {
        let edit = edit();
        let r = rewrite(HOSTILE, &edit).unwrap();
        for gone in
            ["commandline", "qemu:arg", "fw_cfg", "capabilities", "override", "/tmp/evil", "/dev/sda", "vdz", "/iso"]
        {
            assert!(!r.document.contains(gone), "{gone} still in\n{}", r.document);
        }
        assert!(!r.document.contains("http://libvirt.org/schemas/domain/qemu/1.0"), "{}", r.document);
        let c = parse(&r.document).unwrap();
        let disks: Vec<_> = c.disks.iter().map(|d| (d.target.as_str(), d.path.as_deref())).collect();
        // The cdrom drive stays, empty.
        assert_eq!(disks, [("vda", Some("/st/web-restored-vda.qcow2")), ("sda", None)]);
        // Each removal is said.
        let said = r.removed.join("; ");
        for what in [
            "qemu:commandline",
            "qemu:capabilities",
            "qemu:override",
            "/tmp/evil",
            "disk vda",
            "disk vdz",
            "install.iso",
        ] {
            if what == "disk vda" {
                assert!(!said.contains("disk vda ("), "the restored disk reported removed: {said}");
                continue;
            }
            assert!(said.contains(what), "{what} not reported: {said}");
        }
        // Host folders only when the operator asks (and never for a sandbox, which does not).
        assert!(!r.document.contains("<filesystem"), "{}", r.document);
        assert!(said.contains("host folder \"/\""), "{said}");
        let shared = rewrite(HOSTILE, &ConfigEdit { keep_host_devices: true, ..edit.clone() }).unwrap();
        assert!(shared.document.contains("<filesystem"), "{}", shared.document);
        // This host's own emulator stays, silently.
        let own = HOSTILE.replace("/tmp/evil/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64");
        let r = rewrite(&own, &edit).unwrap();
        assert!(r.document.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"), "{}", r.document);
        assert!(!r.removed.iter().any(|m| m.contains("emulator")), "{:?}", r.removed);
    }

    /// Everything the second review found reaching the host through a stored configuration.
    const REACHES_THE_HOST: &str = r#"<domain type='kvm'><name>web</name>
          <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
          <sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>
          <bootloader>/usr/bin/pygrub</bootloader>
          <blkiotune><weight>500</weight><device><path>/dev/sda</path><weight>1000</weight></device></blkiotune>
          <os><type>hvm</type><kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd</initrd><dtb>/boot/x.dtb</dtb>
            <loader readonly='yes' type='pflash'>/tmp/evil.fd</loader><nvram template='/etc/shadow'>/etc/passwd</nvram>
            <acpi><table type='slic'>/etc/shadow</table></acpi><smbios mode='host'/></os>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'><seclabel model='dac' relabel='no'/></source><target dev='vda'/><encryption format='luks'><secret type='passphrase' uuid='x'/></encryption></disk>
            <disk type='block' device='lun' rawio='yes'><source dev='/dev/sdb'/><target dev='sdb'/></disk>
            <disk type='block' device='cdrom'><source dev='/dev/sda'/><target dev='hdc'/><readonly/></disk>
            <disk type='file' device='floppy'><source file='/etc/shadow'/><target dev='fda'/></disk>
            <interface type='ethernet'><script path='/tmp/up.sh'/><downscript path='/tmp/down.sh'/></interface>
            <interface type='bridge'><source bridge='br0'/><script path='/tmp/up2.sh'/><target dev='tap-evil'/><backend tap='/dev/net/tun' vhost='/dev/vhost-net'/><rom file='/etc/shadow'/></interface>
            <interface type='vhostuser'><source type='unix' path='/run/evil.sock' mode='client'/></interface>
            <interface type='direct'><source dev='eth0' mode='bridge'/></interface>
            <serial type='pty'><log file='/etc/cron.d/x'/><target port='0'/></serial>
            <serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>
            <serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/><target port='2'/></serial>
            <parallel type='file'><source path='/etc/cron.d/y'/><target port='0'/></parallel>
            <channel type='unix'><source mode='connect' path='/run/evil.sock'/><target type='virtio' name='x'/></channel>
            <channel type='unix'><source mode='bind' path='/etc/evil.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
            <channel type='pipe'><source path='/tmp/fifo'/><target type='virtio' name='y'/></channel>
            <console type='pty'><source path='/dev/pts/3'/><log file='/root/.bashrc' append='on'/><target type='serial' port='0'/></console>
            <input type='evdev'><source dev='/dev/input/event0'/></input>
            <input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>
            <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
            <memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>524288</size></target></memory>
            <hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source><rom file='/etc/shadow'/></hostdev>
            <hostdev mode='capabilities' type='storage'><source><block>/dev/sda</block></source></hostdev>
            <filesystem type='mount'><driver type='virtiofs'/><binary path='/tmp/evil-virtiofsd'/><source dir='/srv/share'/><target dir='share'/></filesystem>
            <filesystem type='file'><source file='/etc/shadow'/><target dir='x'/></filesystem>
            <rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>
            <rng model='virtio'><backend model='egd' type='unix'><source mode='connect' path='/run/egd.sock'/></backend></rng>
            <shmem name='x'><server path='/run/shmem.sock'/></shmem>
            <smartcard mode='host-certificates'><certificate>a</certificate><database>/etc/pki/nssdb</database></smartcard>
            <lease><lockspace>x</lockspace><key>y</key><target path='/etc/shadow'/></lease>
            <graphics type='vnc' socket='/etc/vnc.sock'><listen type='socket' socket='/etc/vnc2.sock'/></graphics>
            <graphics type='sdl' display=':0' xauth='/root/.Xauthority'/>
            <video><model type='virtio'><acceleration accel3d='yes' rendernode='/dev/dri/renderD128'/></model></video>
            <audio id='1' type='file' path='/etc/cron.d/z'/>
            <redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/></redirdev>
            <future-device path='/etc/shadow'/>
          </devices></domain>"#;

    #[test]
    fn nothing_of_the_host_is_kept_but_what_the_restore_wrote() {
        let mut e = edit();
        e.files = vec![("kernel".into(), "/st/web-restored-kernel".into())];
        e.disks.push(placed("sdb", "/st/web-restored-sdb.qcow2", "qcow2"));
        let r = rewrite(REACHES_THE_HOST, &e).unwrap();
        let x = &r.document;
        for gone in [
            "/etc",
            "/tmp",
            "/dev/",
            "/run",
            "/root",
            "/boot",
            "/srv",
            "pygrub",
            "seclabel",
            "sysinfo",
            "<log",
            "script",
            "backend tap",
            "rawio",
            "tap-evil",
            "rendernode",
            "evdev",
            "nvdimm",
            "hostdev",
            "filesystem",
            "shmem",
            "smartcard",
            "lease",
            "xauth",
            "future-device",
            "<encryption",
            "<acpi",
            "smbios",
            "<dtb",
            "<initrd",
            "<loader",
            "<nvram",
            "vhostuser",
            "direct",
            "type=\"tcp\"",
            "pipe",
            "type=\"dev\"",
        ] {
            assert!(!x.contains(gone), "{gone} still in\n{x}");
        }
        // What stays: the restored disk and kernel, the bridge NIC (without its script), the pty
        // console and serial (without their logs), the parallel port redirected into the
        // storage folder, the agent channel (libvirt makes its socket), VNC, the video device,
        // a silent audio backend.
        let c = parse(x).unwrap();
        let disks: Vec<_> = c.disks.iter().map(|d| (d.target.as_str(), d.device.as_str(), d.path.as_deref())).collect();
        assert_eq!(
            disks,
            [
                ("vda", "disk", Some("/st/web-restored-vda.qcow2")),
                ("sdb", "disk", Some("/st/web-restored-sdb.qcow2")),
                ("hdc", "cdrom", None),
                ("fda", "floppy", None)
            ]
        );
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.nics.len(), 1);
        assert!(c.agent_channel);
        assert!(x.contains("/st/web-restored-parallel0.log"), "{x}");
        assert!(x.contains("<graphics type=\"vnc\"") && x.contains("<video>") && x.contains("type=\"none\""), "{x}");
        // Each is said.
        let said = r.removed.join("\n");
        for what in [
            "<seclabel>",
            "fwcfg",
            "<bootloader>",
            "blkiotune",
            "/boot/initrd",
            "/tmp/evil.fd",
            "/etc/passwd",
            "ACPI",
            "SMBIOS",
            "<encryption>",
            "\"/dev/sda\"",
            "/etc/shadow",
            "script \"/tmp/up.sh\"",
            "<script>",
            "NIC of type vhostuser",
            "NIC of type direct",
            "log file of serial 0",
            "log file of console 0",
            "serial 1 of type dev",
            "serial 2 of type tcp",
            "channel 0, connected to a host socket",
            "channel 2 of type pipe",
            "input of type evdev",
            "input of type passthrough",
            "TPM",
            "memory device nvdimm",
            "host device pci 0000:03:00.0",
            "host device storage device",
            "host folder \"/srv/share\"",
            "random-number",
            "<shmem>",
            "<smartcard>",
            "<lease>",
            "graphics of type sdl",
            "render node",
            "audio backend file",
            "<redirdev> of type tcp",
            "<future-device>",
        ] {
            assert!(said.contains(what), "{what:?} not said:\n{said}");
        }
        // Host devices and shared folders when the operator asks: still none of the host's
        // programs or files with them.
        let kept = rewrite(REACHES_THE_HOST, &ConfigEdit { keep_host_devices: true, ..e.clone() }).unwrap();
        let k = &kept.document;
        assert!(k.contains("<hostdev") && k.contains("bus=\"0x03\"") && k.contains("/srv/share"), "{k}");
        assert!(!k.contains("evil-virtiofsd") && !k.contains("<rom file") && !k.contains("<block>"), "{k}");
        assert_eq!(k.matches("<filesystem").count(), 1, "{k}");
        // A loader the restore wrote, or this host's firmware, stays.
        let uefi = REACHES_THE_HOST.replace("/tmp/evil.fd", "/usr/share/OVMF/OVMF_CODE.fd");
        let r = rewrite(&uefi, &ConfigEdit { files: vec![("nvram".into(), "/st/web-restored-nvram".into())], ..e })
            .unwrap();
        let c = parse(&r.document).unwrap();
        let files: Vec<_> = c.files.iter().map(|f| (f.role.as_str(), f.path.as_str())).collect();
        assert_eq!(files, [("loader", "/usr/share/OVMF/OVMF_CODE.fd"), ("nvram", "/st/web-restored-nvram")]);
        assert!(!r.document.contains("template"), "{}", r.document);
    }

    /// A VM as virt-install makes it (UEFI, SPICE, the agent, a NIC on the default network):
    /// nothing of it is lost or said.
    const ORDINARY: &str = r#"<domain type='kvm'>
  <name>fedora</name><uuid>8c3b4a54-0e07-4c43-a7a4-1a2b3c4d5e6f</uuid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"><libosinfo:os id="http://fedoraproject.org/fedora/39"/></libosinfo:libosinfo></metadata>
  <memory unit='KiB'>2097152</memory><currentMemory unit='KiB'>2097152</currentMemory><vcpu placement='static'>2</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <firmware><feature enabled='yes' name='enrolled-keys'/><feature enabled='yes' name='secure-boot'/></firmware>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/fedora_VARS.fd</nvram><boot dev='hd'/></os>
  <features><acpi/><apic/><vmport state='off'/><smm state='on'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/><timer name='pit' tickpolicy='delay'/><timer name='hpet' present='no'/></clock>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/><source file='/var/lib/libvirt/images/fedora.qcow2'/><target dev='vda' bus='virtio'/><address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/><address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/><controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/><target chassis='1' port='0x10'/></controller>
    <controller type='sata' index='0'/><controller type='virtio-serial' index='0'/>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>
    <input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>
    <graphics type='spice' autoport='yes'><listen type='address'/><image compression='off'/></graphics>
    <sound model='ich9'><audio id='1'/></sound><audio id='1' type='spice'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/><redirdev bus='usb' type='spicevmc'/>
    <watchdog model='itco' action='reset'/>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"#;

    #[test]
    fn an_ordinary_vm_keeps_every_device() {
        let mut e = edit();
        e.files = vec![("nvram".into(), "/st/fedora-restored-nvram".into())];
        let r = rewrite(ORDINARY, &e).unwrap();
        assert!(r.removed.is_empty(), "{:?}", r.removed);
        let count = |x: &str, t: &str| x.matches(&format!("<{t}")).count();
        for tag in [
            "controller",
            "interface",
            "serial",
            "console",
            "channel",
            "input",
            "graphics",
            "sound",
            "audio",
            "video",
            "redirdev",
            "watchdog",
            "memballoon",
            "rng",
            "tpm",
            "disk",
            "loader",
            "firmware",
            "features",
            "libosinfo:os",
        ] {
            assert_eq!(count(&r.document, tag), count(ORDINARY, tag), "<{tag}> lost:\n{}", r.document);
        }
        assert!(
            r.document.contains("/st/fedora-restored-nvram") && r.document.contains("/dev/urandom"),
            "{}",
            r.document
        );
    }

    #[test]
    fn a_restored_image_is_always_a_disk() {
        // Found by fuzzing: a device kind libvirt does not know, on a target the restore wrote.
        let xml = "<domain><name>x</name><devices><disk type='file' device='di\u{7f}sk'>\
                   <source file='/v/a.qcow2'/><target dev='vda'/></disk></devices></domain>";
        let c = parse(&rewrite(xml, &edit()).unwrap().document).unwrap();
        assert_eq!(
            (c.disks[0].device.as_str(), c.disks[0].path.as_deref()),
            ("disk", Some("/st/web-restored-vda.qcow2"))
        );
    }

    #[test]
    fn a_path_outside_the_storage_folder_is_refused() {
        let e = edit();
        let r = Rewrite { edit: &e, removed: vec![], consoles: vec![], shared: vec![] };
        let doc = |x: &str| xmltree::Element::parse(x.as_bytes()).unwrap();
        r.check_paths(&doc(
            "<domain><devices><disk><source file='/st/a.qcow2'/><target dev='/x'/></disk></devices></domain>",
        ))
        .unwrap();
        for bad in [
            "<domain><devices><x file='/etc/shadow'/></devices></domain>",
            "<domain><devices><x file='relative/path'/></devices></domain>",
            "<domain><devices><x dev='/dev/sda'/></devices></domain>",
            "<domain><devices><x path='/st/../etc/shadow'/></devices></domain>",
            "<domain><os><kernel>/boot/vmlinuz</kernel></os></domain>",
            "<domain><os><loader>/tmp/evil.fd</loader></os></domain>",
            "<domain><devices><emulator>/tmp/qemu</emulator></devices></domain>",
            "<domain><x><y>/etc/shadow</y></x></domain>",
        ] {
            let err = r.check_paths(&doc(bad)).unwrap_err().to_string();
            assert!(err.contains("outside the storage folder /st"), "{bad}: {err}");
        }
        for ok in [
            "<domain><launchSecurity type='sev'><dhCert>/AbC+dEf=</dhCert></launchSecurity></domain>",
            "<domain><sysinfo type='smbios'><system><entry name='serial'>/x</entry></system></sysinfo></domain>",
            "<domain><devices><disk><serial>/x</serial></disk></devices></domain>",
            "<domain><os><loader>/usr/share/OVMF/OVMF_CODE.fd</loader></os></domain>",
            "<domain><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>",
            "<domain><metadata><x file='/etc/shadow'>/etc/shadow</x></metadata><description>/etc</description></domain>",
            "<domain><os><cmdline>/init root=/dev/vda</cmdline></os></domain>",
        ] {
            r.check_paths(&doc(ok)).unwrap();
        }
        assert!(
            within("/st/a", "/st") && !within("/sta/a", "/st") && !within("/st/../a", "/st") && !within("/st/a", "")
        );
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
