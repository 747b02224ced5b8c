//! libvirt documents as cairn reads them: domain XML (from libvirt at backup, from a possibly
//! tampered repository at restore and boot check), its DAC label, and checkpoint XML (from a
//! restore point too, registered again on another host without its parent). Never a panic, never a
//! stack overflow; and what `rewrite` returns never reaches the host: no element of the QEMU
//! namespace, no emulator but the host's, no disk it did not restore, media drives empty, no
//! security label, log, fw_cfg file, NIC script or host-facing NIC, console on a host device,
//! host device or folder unless asked (never for a sandbox), one <devices>, it reads back as a
//! domain, and every host path it names lies in the storage folder (or is the host's emulator or
//! firmware, or a folder the operator shares).
#![no_main]
use cairn_hypervisor::{ConfigEdit, PlacedDisk};
use cairn_libvirt::domain_xml::{self, QEMU_NAMESPACE};
use libfuzzer_sys::fuzz_target;

const HOST_EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
const HOST_FIRMWARE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const STORAGE: &str = "/st";
const RESTORED: &str = "/st/fuzz-vda.qcow2";

/// Attributes that name a host path whatever their value looks like.
const PATH_ATTRS: &[&str] =
    &["file", "path", "dir", "script", "socket", "template", "xauth", "tap", "vhost", "logFile", "runtimeDir"];

/// In the storage folder (checked here independently of the rewrite's own check).
fn in_storage(path: &str) -> bool {
    path.starts_with("/st/") && !path.split('/').any(|c| c == ".." || c == ".")
}

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else { return };
    let _ = domain_xml::parse(xml);
    let _ = domain_xml::host_devices(xml);
    let _ = domain_xml::dac_owner(xml);
    let _ = domain_xml::base_dac_owner(xml, "qemu");
    if let Ok(cp) = cairn_libvirt::parse_checkpoint(xml) {
        let alone = cairn_libvirt::parse_checkpoint(&cairn_libvirt::without_parent(xml))
            .expect("a checkpoint without its parent no longer reads");
        assert_eq!((alone.name, alone.parent, alone.disks), (cp.name, None, cp.disks), "{xml}");
    }
    let _ = cairn_libvirt::parse_firmware(xml);
    let sandbox = data.len() % 2 == 0;
    let keep_host = !sandbox && data.len() % 5 == 0;
    let edit = ConfigEdit {
        name: "fuzz".into(),
        keep_identity: data.len() % 3 == 0,
        disks: vec![PlacedDisk { target: "vda".into(), path: RESTORED.into(), format: "qcow2".into() }],
        files: vec![("kernel".into(), "/st/fuzz-kernel".into())],
        drop_all_nics: sandbox,
        keep_host_devices: keep_host,
        storage_dir: STORAGE.into(),
        host_emulators: vec![HOST_EMULATOR.into()],
        host_firmware: vec![HOST_FIRMWARE.into()],
        ..Default::default()
    };
    let Ok(out) = domain_xml::rewrite(xml, &edit) else { return };
    let x = &out.document;
    let doc = roxmltree::Document::parse(x).expect("rewrite wrote a document that does not parse");
    domain_xml::parse(x).expect("rewrite wrote a document we cannot read back");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "domain");
    assert!(root.children().filter(|c| c.has_tag_name("devices")).count() <= 1);
    for n in doc.descendants().filter(|n| n.is_element()) {
        assert_ne!(n.tag_name().namespace(), Some(QEMU_NAMESPACE), "a QEMU-namespace element is left:\n{x}");
        let opaque = n.ancestors().any(|a| {
            matches!(a.tag_name().name(), "metadata" | "title" | "description" | "sysinfo" | "launchSecurity")
        });
        if opaque {
            continue;
        }
        let name = n.tag_name().name();
        assert!(!matches!(name, "seclabel" | "log" | "script" | "downscript" | "bootloader" | "acpi"), "<{name}> left:\n{x}");
        if name == "sysinfo" {
            assert_eq!(n.attribute("type"), Some("smbios"), "{x}");
        }
        // Every host path: in the storage folder, or the host's own.
        let shared_dir = keep_host
            && name == "source"
            && n.parent_element().is_some_and(|p| p.has_tag_name("filesystem"));
        for a in n.attributes() {
            let (k, v) = (a.name(), a.value());
            if name != "target" && (PATH_ATTRS.contains(&k) || v.starts_with('/')) {
                assert!(in_storage(v) || (shared_dir && k == "dir"), "host path {v:?} in <{name} {k}>:\n{x}");
            }
        }
        let text: String = n.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect();
        let text = text.trim();
        let guest_text =
            matches!(name, "cmdline" | "initarg" | "serial" | "wwn" | "vendor" | "product" | "model" | "label" | "name");
        if text.starts_with('/') && !guest_text {
            let host_own = match name {
                "emulator" => text == HOST_EMULATOR,
                "loader" => text == HOST_FIRMWARE,
                "backend" => ["/dev/random", "/dev/urandom", "/dev/hwrng"].contains(&text),
                "partition" => text == "/machine",
                _ => false,
            };
            assert!(host_own || in_storage(text), "host path {text:?} in <{name}>:\n{x}");
        }
    }
    for devices in root.children().filter(|c| c.has_tag_name("devices")) {
        for d in devices.children().filter(|c| c.is_element()) {
            let kind = d.attribute("type").unwrap_or("");
            match d.tag_name().name() {
                "emulator" => assert_eq!(d.text().map(str::trim), Some(HOST_EMULATOR), "{x}"),
                "disk" => {
                    let src = d.children().find(|c| c.has_tag_name("source"));
                    if matches!(d.attribute("device").unwrap_or("disk"), "disk" | "lun") {
                        if let Some(src) = src {
                            let target = d.children().find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("dev"));
                            assert_eq!(target, Some("vda"), "a disk the restore did not write:\n{x}");
                            assert_eq!(src.attribute("file"), Some(RESTORED), "{x}");
                        }
                    } else {
                        assert!(src.is_none(), "a medium of the host left in a drive:\n{x}");
                    }
                    assert!(d.attribute("rawio").is_none(), "{x}");
                }
                "interface" => {
                    assert!(!sandbox, "a sandbox keeps a NIC");
                    assert!(matches!(kind, "network" | "bridge" | "user"), "a NIC of type {kind}:\n{x}");
                }
                "hostdev" | "filesystem" => assert!(keep_host, "a {} kept unasked:\n{x}", d.tag_name().name()),
                "serial" | "console" | "parallel" | "channel" => assert!(
                    matches!(kind, "" | "pty" | "null" | "vc" | "spicevmc" | "spiceport" | "qemu-vdagent" | "file" | "unix"),
                    "a console of type {kind}:\n{x}"
                ),
                "input" => assert!(matches!(kind, "mouse" | "tablet" | "keyboard"), "{x}"),
                _ => {}
            }
        }
    }
});
