//! The VMs a hypervisor knows, with the backup method each qualifies for and why; and the VMs
//! of a list of hosts, one row per VM (a VM is its UUID, whichever hosts define it).

use crate::error::{OpError, OpResult};
use crate::hosts::ListedHost;
use cairn_hypervisor::{AgentStatus, Hypervisor, VmDisk, VmFile, VmNic, VmState};
use cairn_vm::backup::{app_consistent_requirements, choose_method, Method};
use cairn_vm::guest_disks::{survey, GuestSurvey};
use serde::Serialize;

/// One VM as `vm list` shows it (and its `--json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct VmListing {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    pub disks: Vec<VmDisk>,
    pub files: Vec<VmFile>,
    pub nics: Vec<VmNic>,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub agent: AgentStatus,
    pub agent_channel: bool,
    /// Its tags (hypervisor metadata), that jobs select VMs by.
    pub tags: Vec<String>,
    /// The method `auto` would pick, or `none`.
    pub method: String,
    pub method_reason: String,
    pub app_consistent: bool,
    /// Why a backup can (or cannot) be app-consistent.
    pub app_consistent_reason: String,
    /// Disks only the guest sees (an initiator in the guest, a pass-through device), and cairn's
    /// guest agent.
    pub guest: GuestSurvey,
}

/// Whether a listing asks each running VM which disks only its guest sees (cairn's agent holds
/// one session at a time: a periodic inventory must not compete with backups for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestDisks {
    Ask,
    DoNotAsk,
}

/// Every VM of `hv`. Cairn's guest agent is asked only on this machine.
pub fn list_vms(hv: &dyn Hypervisor, guests: GuestDisks) -> OpResult<Vec<VmListing>> {
    let local = cairn_vm::ssh::SshTarget::from_uri(hv.uri())
        .ok()
        .flatten()
        .is_none()
        .then(|| cairn_vm::host::LocalHost { work_dir: crate::DEFAULT_WORK_DIR.into() });
    let mut out = Vec::new();
    for vm in hv.list()? {
        let guest = if guests == GuestDisks::DoNotAsk {
            GuestSurvey { cairn_agent: "not asked".into(), disks: Vec::new() }
        } else if vm.state == VmState::Running {
            survey(hv, local.as_ref().map(|l| l as &dyn cairn_vm::host::HostAccess), &vm)
        } else {
            GuestSurvey { cairn_agent: format!("the VM is {}", vm.state.as_str()), disks: Vec::new() }
        };
        let (method, method_reason) = match choose_method(hv, &vm, Method::Auto) {
            Ok((m, why)) => (m.as_str().to_string(), why),
            Err(e) => ("none".to_string(), e.to_string()),
        };
        let app = app_consistent_requirements(hv, &vm);
        out.push(VmListing {
            name: vm.name,
            uuid: vm.uuid,
            state: vm.state,
            disks: vm.config.disks,
            files: vm.config.files,
            nics: vm.config.nics,
            memory_bytes: vm.config.memory_bytes,
            vcpus: vm.config.vcpus,
            agent: vm.agent,
            agent_channel: vm.config.agent_channel,
            tags: vm.config.tags.clone(),
            method,
            method_reason,
            app_consistent: app.is_ok(),
            app_consistent_reason: match app {
                Ok(s) | Err(s) => s,
            },
            guest,
        });
    }
    Ok(out)
}

/// A VM of a host list: where it runs (or, when it runs nowhere, the first host that defines
/// it), and every host that knows it.
#[derive(Clone, Debug, Serialize)]
pub struct HostedVm {
    #[serde(flatten)]
    pub vm: VmListing,
    /// The host it runs on; when it runs nowhere, the first listed host that defines it. When
    /// it runs on several (a migration under way, or a split brain), the first of them.
    pub host: String,
    /// Every host that knows this VM, with its state there, in the order of the host list.
    pub hosts: Vec<Presence>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Presence {
    pub host: String,
    pub state: VmState,
}

/// A host of the list that could not be asked.
#[derive(Debug)]
pub struct UnreachableHost {
    pub host: String,
    pub error: OpError,
}

/// The VMs of every host in `hosts` (hypervisor URIs; `connect` opens one: the interface picks
/// the implementation), one row per VM UUID, in the order first seen. A host that cannot be
/// reached or listed is returned apart; the others are listed all the same.
pub fn list_vms_on_hosts(
    hosts: &[String],
    connect: &crate::hosts::Connect<'_>,
    guests: GuestDisks,
) -> (Vec<HostedVm>, Vec<UnreachableHost>) {
    let mut vms: Vec<HostedVm> = Vec::new();
    let mut unreachable = Vec::new();
    for ListedHost { uri: host, hv } in crate::hosts::connect_all(hosts, connect) {
        let listed = match hv.and_then(|hv| list_vms(hv.as_ref(), guests)) {
            Ok(l) => l,
            Err(error) => {
                unreachable.push(UnreachableHost { host, error });
                continue;
            }
        };
        for vm in listed {
            let here = Presence { host: host.clone(), state: vm.state };
            match vms.iter_mut().find(|v| v.vm.uuid == vm.uuid) {
                Some(known) => {
                    // Where it runs says most about it (its disks, its agent): that host's view
                    // wins; a paused VM (at the end of a migration, say) over a shut-off one.
                    if crate::hosts::placement_rank(vm.state) < crate::hosts::placement_rank(known.vm.state) {
                        known.host = host.clone();
                        known.vm = vm;
                    }
                    known.hosts.push(here);
                }
                None => vms.push(HostedVm { vm, host: host.clone(), hosts: vec![here] }),
            }
        }
    }
    (vms, unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_hypervisor::fake::{Fake, Handle};
    use cairn_hypervisor::{VmConfig, VmSummary};
    use std::sync::Arc;

    fn vm(name: &str, state: VmState, agent: AgentStatus, format: &str) -> VmSummary {
        let disk = VmDisk {
            target: "vda".into(),
            device: "disk".into(),
            source_type: "file".into(),
            path: Some(format!("/v/{name}.{format}")),
            format: format.into(),
            readonly: false,
            size: Some(1 << 30),
        };
        VmSummary {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            state,
            config: VmConfig { name: name.into(), disks: vec![disk], ..Default::default() },
            agent,
        }
    }

    #[test]
    fn each_vm_is_listed_with_the_method_auto_would_pick_and_why() {
        let fake = Arc::new(Fake::default());
        *fake.vms.lock().unwrap() = vec![
            vm("web", VmState::Running, AgentStatus::Answering, "qcow2"),
            vm("db", VmState::Running, AgentStatus::NoChannel, "qcow2"),
            vm("raw", VmState::Running, AgentStatus::Answering, "raw"),
            vm("off", VmState::ShutOff, AgentStatus::NoChannel, "qcow2"),
        ];
        let got = list_vms(&Handle(fake), GuestDisks::Ask).unwrap();
        let row = |n: &str| got.iter().find(|v| v.name == n).unwrap();
        assert_eq!((row("web").method.as_str(), row("web").app_consistent), ("app-consistent", true));
        assert_eq!((row("db").method.as_str(), row("db").app_consistent), ("saved-state", false));
        assert!(row("db").method_reason.contains("no guest agent channel"), "{}", row("db").method_reason);
        assert_eq!(row("raw").method, "saved-state");
        assert!(row("raw").app_consistent_reason.contains("vda (raw)"), "{}", row("raw").app_consistent_reason);
        assert_eq!(row("off").method, "offline");
    }

    #[test]
    fn a_vm_on_several_hosts_is_one_row_placed_where_it_runs_and_a_host_down_is_said_apart() {
        let a = Arc::new(Fake::default());
        *a.vms.lock().unwrap() = vec![
            vm("web", VmState::ShutOff, AgentStatus::NoChannel, "qcow2"),
            vm("db", VmState::Running, AgentStatus::NoChannel, "qcow2"),
        ];
        let b = Arc::new(Fake::default());
        *b.vms.lock().unwrap() = vec![vm("web", VmState::Running, AgentStatus::Answering, "qcow2")];
        let hosts: Vec<String> = ["fake://a", "fake://down", "fake://b"].map(String::from).into();
        let connect = |uri: &str| -> anyhow::Result<Box<dyn Hypervisor>> {
            match uri {
                "fake://a" => Ok(Box::new(Handle(a.clone()))),
                "fake://b" => Ok(Box::new(Handle(b.clone()))),
                _ => {
                    Err(cairn_hypervisor::Unreachable { hypervisor: "fake", uri: uri.into(), detail: "refused".into() }
                        .into())
                }
            }
        };
        let (vms, down) = list_vms_on_hosts(&hosts, &connect, GuestDisks::Ask);
        assert_eq!(vms.iter().map(|v| v.vm.name.as_str()).collect::<Vec<_>>(), ["web", "db"]);
        let web = &vms[0];
        assert_eq!(web.host, "fake://b", "placed where it runs");
        assert_eq!(web.vm.state, VmState::Running);
        assert_eq!(web.vm.method, "app-consistent", "the running host's view of the VM");
        let seen: Vec<(&str, VmState)> = web.hosts.iter().map(|p| (p.host.as_str(), p.state)).collect();
        assert_eq!(seen, [("fake://a", VmState::ShutOff), ("fake://b", VmState::Running)]);
        assert_eq!(vms[1].host, "fake://a");
        assert_eq!(down.len(), 1);
        assert_eq!(down[0].host, "fake://down");
        assert_eq!(down[0].error.kind(), crate::ErrorKind::Failed, "{}", down[0].error);
    }
}
