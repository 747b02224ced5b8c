//! The guest's disks, from `/sys/block`: which the host sees itself (virtio, QEMU's SCSI and
//! NVMe), and which only the guest does (network block devices, iSCSI, pass-through), with
//! whether a point-in-time view of each can be taken.

use cairn_agent_proto::{safe_name, DiskInfo};
use std::path::{Path, PathBuf};

/// Device-mapper devices of ours are named `cairn-NAME` (`cairn-agent wrap`); their snapshot
/// devices add these suffixes.
pub const PREFIX: &str = "cairn-";
pub const REAL: &str = "-real";
pub const SNAP: &str = "-snap";

/// A disk as the agent serves it.
#[derive(Clone, Debug)]
pub struct Disk {
    pub info: DiskInfo,
    /// The device-mapper device whose snapshot is its view (`cairn-NAME`), when it has one.
    pub dm_name: Option<String>,
    /// Its `/sys/block` (and `/dev`) name: `dm-0`, `nbd2`.
    pub kernel: String,
}

/// Every disk of the guest worth naming to the host.
pub fn list(sys_block: &Path) -> Vec<Disk> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(sys_block).into_iter().flatten().flatten().map(|e| e.path()).collect();
    entries.sort();
    for dev in entries {
        let Some(kernel) = dev.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        let size = read(&dev.join("size")).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 512;
        if size == 0 || ["loop", "ram", "zram", "sr", "fd"].iter().any(|p| kernel.starts_with(p)) {
            continue;
        }
        if kernel.starts_with("dm-") {
            let name = read(&dev.join("dm/name")).unwrap_or_default();
            if let Some(short) = name.strip_prefix(PREFIX) {
                if short.ends_with(REAL) || short.ends_with(SNAP) || !safe_name(short) {
                    continue;
                }
                let under = holders_of(&dev.join("slaves")).into_iter().next().unwrap_or_default();
                out.push(Disk {
                    info: DiskInfo {
                        name: short.to_string(),
                        size,
                        transport: transport(sys_block, &under),
                        serial: serial(&sys_block.join(&under)),
                        snapshot_ready: true,
                        reason: String::new(),
                    },
                    dm_name: Some(name),
                    kernel: kernel.clone(),
                });
            }
            // Other device-mapper devices (LVM, crypt) are not disks: the disks beneath them are.
            continue;
        }
        let t = transport(sys_block, &kernel);
        let wrapped = holders_of(&dev.join("holders"))
            .iter()
            .any(|h| read(&sys_block.join(h).join("dm/name")).is_some_and(|n| n.starts_with(PREFIX)));
        if wrapped {
            continue; // named by its wrapper
        }
        let reason = if host_visible(&t) {
            "the host backs it up itself".to_string()
        } else {
            format!(
                "its filesystem is not on a device-mapper device: set it up with \
                 `cairn-agent wrap /dev/{kernel} NAME` and mount /dev/mapper/cairn-NAME instead"
            )
        };
        out.push(Disk {
            info: DiskInfo {
                name: if safe_name(&kernel) { kernel.clone() } else { "disk".into() },
                size,
                transport: t,
                serial: serial(&dev),
                snapshot_ready: false,
                reason,
            },
            dm_name: None,
            kernel: kernel.clone(),
        });
    }
    out.truncate(cairn_agent_proto::MAX_DISKS);
    out
}

/// The devices a device is built on (`/sys/block/KERNEL/slaves`), recursively: what a
/// wrapper's writes reach.
pub fn below(sys_block: &Path, kernel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![kernel.to_string()];
    while let Some(k) = todo.pop() {
        for s in holders_of(&sys_block.join(&k).join("slaves")) {
            if !out.contains(&s) && out.len() < 64 {
                out.push(s.clone());
                todo.push(s);
            }
        }
    }
    out
}

pub use cairn_agent_proto::host_visible;

fn transport(sys_block: &Path, kernel: &str) -> String {
    let dev = sys_block.join(kernel);
    let vendor = read(&dev.join("device/vendor")).unwrap_or_default();
    let model = read(&dev.join("device/model")).unwrap_or_default();
    let qemu = vendor.starts_with("QEMU") || model.starts_with("QEMU");
    let real = std::fs::canonicalize(&dev).unwrap_or_default().to_string_lossy().into_owned();
    if kernel.starts_with("vd") {
        "virtio".into()
    } else if kernel.starts_with("nbd") {
        "nbd".into()
    } else if kernel.starts_with("nvme") {
        if qemu { "qemu-nvme" } else { "nvme" }.into()
    } else if kernel.starts_with("sd") {
        if real.contains("/session") {
            "iscsi".into()
        } else if qemu {
            if real.contains("/ata") { "qemu-ata" } else { "qemu-scsi" }.into()
        } else {
            "scsi".into()
        }
    } else {
        "other".into()
    }
}

fn serial(dev: &Path) -> String {
    let raw =
        ["serial", "device/serial", "device/wwid", "wwid"].iter().find_map(|f| read(&dev.join(f))).unwrap_or_default();
    raw.chars().filter(|c| c.is_ascii_graphic()).take(cairn_agent_proto::MAX_NAME).collect()
}

fn holders_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(root: &Path, name: &str, sectors: u64) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("holders")).unwrap();
        std::fs::create_dir_all(d.join("slaves")).unwrap();
        std::fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
        d
    }

    #[test]
    fn a_wrapped_nbd_disk_is_named_by_its_wrapper_and_virtio_disks_are_the_hosts() {
        let t = std::env::temp_dir().join(format!("cairn-agent-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        dev(&t, "vda", 2048);
        let nbd = dev(&t, "nbd0", 4096);
        dev(&t, "nbd1", 0); // not connected
        dev(&t, "nbd2", 8192);
        let dm = dev(&t, "dm-0", 4096);
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::write(dm.join("dm/name"), "cairn-lun0\n").unwrap();
        std::fs::create_dir_all(dm.join("slaves/nbd0")).unwrap();
        std::fs::create_dir_all(nbd.join("holders/dm-0")).unwrap();
        let snap = dev(&t, "dm-1", 4096);
        std::fs::create_dir_all(snap.join("dm")).unwrap();
        std::fs::write(snap.join("dm/name"), "cairn-lun0-snap\n").unwrap();
        dev(&t, "zram0", 4096);
        let disks = list(&t);
        let names: Vec<&str> = disks.iter().map(|d| d.info.name.as_str()).collect();
        assert_eq!(names, ["lun0", "nbd2", "vda"]);
        assert_eq!(disks[0].info.transport, "nbd");
        assert!(disks[0].info.snapshot_ready);
        assert_eq!(disks[0].info.size, 4096 * 512);
        assert_eq!(disks[0].dm_name.as_deref(), Some("cairn-lun0"));
        assert!(!disks[1].info.snapshot_ready && disks[1].info.reason.contains("cairn-agent wrap /dev/nbd2"));
        assert_eq!(disks[2].info.transport, "virtio");
        assert!(host_visible(&disks[2].info.transport));
        std::fs::remove_dir_all(&t).unwrap();
    }
}
