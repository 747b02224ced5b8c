//! # cairn-libvirt: the hypervisor boundary implemented over libvirt
//!
//! - [`Libvirt`]: [`cairn_hypervisor::Hypervisor`] over a libvirt connection (local or remote
//!   URI); backup jobs and checkpoints through `virt-sys`, which `virt` 0.5 does not wrap;
//! - [`domain_xml`]: libvirt domain documents read into the neutral
//!   [`VmConfig`](cairn_hypervisor::VmConfig) and rewritten for a recovery.
//!
//! This is the only crate that links libvirt or reads domain XML: everything above it holds a
//! `&dyn Hypervisor` and treats configuration documents as opaque bytes.

mod connection;
pub mod domain_xml;

pub use connection::{parse_checkpoint, parse_firmware, without_parent, Libvirt, DEFAULT_URI};

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// The disks of the VMs running (or paused) at libvirt `uri`, as ("VM NAME (running), disk vda",
/// path), asked through `virsh` (no libvirt connection is opened: a restore of an image needs
/// no libvirtd). Without virsh there is no libvirt VM to protect: an empty list.
pub fn running_vm_disks(uri: &str) -> Result<Vec<(String, PathBuf)>> {
    let virsh = |args: &[&str]| -> Result<Option<String>> {
        let out = match std::process::Command::new("virsh").args(["-q", "-c", uri]).args(args).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r.context("running virsh")?,
        };
        if !out.status.success() {
            bail!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let mut out = Vec::new();
    // `list` shows the active VMs: running, paused, in shutdown.
    let Some(uuids) = virsh(&["list", "--uuid"])? else { return Ok(out) };
    for uuid in uuids.split_whitespace() {
        // A VM that stopped since the list has nothing open.
        let Ok(Some(xml)) = virsh(&["dumpxml", uuid]) else { continue };
        let config = domain_xml::parse(&xml)?;
        for d in config.disks {
            if let Some(path) = d.path {
                out.push((format!("VM {} (running), disk {}", config.name, d.target), PathBuf::from(path)));
            }
        }
    }
    Ok(out)
}
