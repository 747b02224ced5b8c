//! libvirt documents as cairn reads them: domain XML (from libvirt at backup, from a possibly
//! tampered repository at restore and boot check) and checkpoint XML. Never a panic, never a
//! stack overflow; and what `rewrite` returns never runs code on the host: no element of the
//! QEMU namespace, no emulator but the host's, no disk it did not restore but media, no host
//! folder for a sandbox, one <devices>, and it reads back as a domain.
#![no_main]
use cairn_hypervisor::domain_xml::{self, ConfigEdit, QEMU_NAMESPACE};
use libfuzzer_sys::fuzz_target;

const HOST_EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
const RESTORED: &str = "/st/fuzz-vda.qcow2";

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else { return };
    let _ = domain_xml::parse(xml);
    let _ = domain_xml::host_devices(xml);
    let _ = cairn_hypervisor::libvirt::parse_checkpoint(xml);
    let sandbox = data.len() % 2 == 0;
    let edit = ConfigEdit {
        name: "fuzz".into(),
        keep_identity: data.len() % 3 == 0,
        disks: vec![("vda".into(), RESTORED.into(), "qcow2".into())],
        files: vec![("kernel".into(), "/st/fuzz-kernel".into())],
        drop_all_nics: sandbox,
        drop_hostdevs: sandbox,
        drop_filesystems: sandbox,
        log_dir: Some("/st".into()),
        host_emulators: vec![HOST_EMULATOR.into()],
        ..Default::default()
    };
    let Ok(out) = domain_xml::rewrite(xml, &edit) else { return };
    let doc = roxmltree::Document::parse(&out.xml).expect("rewrite wrote a document that does not parse");
    domain_xml::parse(&out.xml).expect("rewrite wrote a document we cannot read back");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "domain");
    assert!(root.children().filter(|c| c.has_tag_name("devices")).count() <= 1);
    for n in doc.descendants().filter(|n| n.is_element()) {
        assert_ne!(n.tag_name().namespace(), Some(QEMU_NAMESPACE), "a QEMU-namespace element is left:\n{}", out.xml);
    }
    for devices in root.children().filter(|c| c.has_tag_name("devices")) {
        for d in devices.children().filter(|c| c.is_element()) {
            match d.tag_name().name() {
                "emulator" => assert_eq!(d.text().map(str::trim), Some(HOST_EMULATOR), "{}", out.xml),
                "disk" if matches!(d.attribute("device").unwrap_or("disk"), "disk" | "lun") => {
                    if let Some(src) = d.children().find(|c| c.has_tag_name("source")) {
                        let target = d.children().find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("dev"));
                        assert_eq!(target, Some("vda"), "a disk the restore did not write:\n{}", out.xml);
                        assert_eq!(src.attribute("file"), Some(RESTORED), "{}", out.xml);
                    }
                }
                "filesystem" | "interface" | "hostdev" => assert!(!sandbox, "a sandbox keeps a {}", d.tag_name().name()),
                _ => {}
            }
        }
    }
});
