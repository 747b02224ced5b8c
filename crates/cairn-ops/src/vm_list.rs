//! The VMs a hypervisor knows, with the backup method each qualifies for and why.

use crate::error::OpResult;
use cairn_hypervisor::{AgentStatus, Hypervisor, VmDisk, VmFile, VmNic, VmState};
use cairn_vm::backup::{app_consistent_requirements, choose_method, Method};
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
    /// The method `auto` would pick, or `none`.
    pub method: String,
    pub method_reason: String,
    pub app_consistent: bool,
    /// Why a backup can (or cannot) be app-consistent.
    pub app_consistent_reason: String,
}

/// Every VM of `hv`.
pub fn list_vms(hv: &dyn Hypervisor) -> OpResult<Vec<VmListing>> {
    let mut out = Vec::new();
    for vm in hv.list()? {
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
            method,
            method_reason,
            app_consistent: app.is_ok(),
            app_consistent_reason: match app {
                Ok(s) | Err(s) => s,
            },
        });
    }
    Ok(out)
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
        let got = list_vms(&Handle(fake)).unwrap();
        let row = |n: &str| got.iter().find(|v| v.name == n).unwrap();
        assert_eq!((row("web").method.as_str(), row("web").app_consistent), ("app-consistent", true));
        assert_eq!((row("db").method.as_str(), row("db").app_consistent), ("saved-state", false));
        assert!(row("db").method_reason.contains("no guest agent channel"), "{}", row("db").method_reason);
        assert_eq!(row("raw").method, "saved-state");
        assert!(row("raw").app_consistent_reason.contains("vda (raw)"), "{}", row("raw").app_consistent_reason);
        assert_eq!(row("off").method, "offline");
    }
}
