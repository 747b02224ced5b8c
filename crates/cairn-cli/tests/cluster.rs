//! Several hosts (issue 14): real libvirtd "hosts" in their own namespaces on this machine
//! (`scripts/hosts.sh`), joined on addresses the script makes, with a shared folder.

mod common;

use common::guest::sh;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const STATE: &str = "/var/lib/cairn-test/hosts";
const A: &str = "qemu+tcp://10.77.0.1/system";
const B: &str = "qemu+tcp://10.77.0.2/system";

fn hosts_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hosts.sh")
}

fn virsh(uri: &str, args: &[&str]) -> String {
    sh(Command::new("virsh").args(["-q", "-c", uri]).args(args))
}

/// Hosts a and b, up while this lives; their guests destroyed and undefined when it goes.
struct Hosts {
    guests: Vec<String>,
}

impl Hosts {
    fn up() -> Hosts {
        // Made first, so that a start that fails part-way is still taken down.
        let hosts = Hosts { guests: Vec::new() };
        sh(Command::new(hosts_sh()).args(["up", "a", "b"]));
        hosts
    }

    fn remove(name: &str) {
        for uri in [A, B] {
            let _ = Command::new("virsh").args(["-q", "-c", uri, "destroy", name]).output();
            let _ = Command::new("virsh").args(["-q", "-c", uri, "undefine", name]).output();
        }
    }

    /// Defines the test guest `name` on both hosts, its disk in the shared folder; starts it on a.
    fn guest_on_a_defined_on_both(&mut self, name: &str) -> String {
        // One a killed run left behind (Drop never ran) would keep its name with another UUID,
        // and its disk open.
        Hosts::remove(name);
        let guest = Path::new(STATE).join("guest");
        let disk = Path::new(STATE).join("shared").join(format!("{name}.qcow2"));
        sh(Command::new("cp").arg("--sparse=always").arg(guest.join("data.qcow2")).arg(&disk));
        // One VM is one UUID: the same on both hosts.
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>console=ttyS0 panic=-1 loglevel=4</cmdline></os><cpu mode='maximum' check='none'/>\
             <on_reboot>destroy</on_reboot><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{d}'/><target dev='vda' bus='virtio'/></disk>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <memballoon model='none'/></devices></domain>",
            k = guest.join("kernel").display(),
            i = guest.join("initramfs.img").display(),
            d = disk.display()
        );
        let file = Path::new(STATE).join("shared").join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        self.guests.push(name.to_string());
        for uri in [A, B] {
            virsh(uri, &["define", file.to_str().unwrap()]);
        }
        virsh(A, &["start", name]);
        uuid
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.guests {
            Hosts::remove(name);
        }
        let _ = Command::new(hosts_sh()).arg("down").output();
    }
}

/// `cairn vm list` over both hosts: (host it is placed on, [(host, state)]) of the VM `uuid`.
fn placement(e: &Env, uuid: &str) -> (String, Vec<(String, String)>) {
    let vms: Value = e.json(&["vm", "list", "--host", A, "--host", B]);
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["uuid"] == uuid)
        .unwrap_or_else(|| panic!("{uuid} not listed: {vms}"));
    let hosts = vm["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["host"].as_str().unwrap().to_string(), p["state"].as_str().unwrap().to_string()))
        .collect();
    (vm["host"].as_str().unwrap().to_string(), hosts)
}

#[test]
fn a_vm_defined_on_two_hosts_is_listed_once_where_it_runs_and_followed_across_a_live_migration() {
    let e = Env::new();
    let mut hosts = Hosts::up();
    // Two hosts, two identities.
    let uuid_of = |uri: &str| {
        let caps = virsh(uri, &["capabilities"]);
        caps.split("<uuid>").nth(1).and_then(|s| s.split("</uuid>").next()).unwrap().to_string()
    };
    assert_ne!(uuid_of(A), uuid_of(B), "the two hosts are one");

    let uuid = hosts.guest_on_a_defined_on_both("cluster-web");
    let (host, seen) = placement(&e, &uuid);
    assert_eq!(host, A);
    assert_eq!(seen, [(A.to_string(), "running".to_string()), (B.to_string(), "shut-off".to_string())]);

    // A live migration on shared storage (a local folder: libvirt needs --unsafe to allow it).
    virsh(A, &["migrate", "--live", "--unsafe", "cluster-web", B]);
    let (host, seen) = placement(&e, &uuid);
    assert_eq!(host, B, "the VM is not placed where it runs now");
    assert_eq!(seen, [(A.to_string(), "shut-off".to_string()), (B.to_string(), "running".to_string())]);
}
