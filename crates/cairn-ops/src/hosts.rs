//! The hosts of a host list, opened for VM jobs: each host's hypervisor connection, its
//! [`HostAccess`] (this machine, or another host over SSH), and which host a VM is on.
//!
//! A VM is its UUID: defined on several hosts, it is one VM, found on the host where it runs
//! (or, shut off everywhere, on the first host of the list that defines it).

use crate::error::{ErrorKind, OpError, OpResult};
use cairn_hypervisor::{Hypervisor, NoSuchVm, VmState, VmSummary};
use cairn_vm::host::{HostAccess, LocalHost};
use cairn_vm::ssh::{SshHost, SshTarget};
use std::path::PathBuf;

/// Opens a hypervisor connection from a URI (the interface picks the implementation).
pub type Connect<'a> = dyn Fn(&str) -> anyhow::Result<Box<dyn Hypervisor>> + Sync + 'a;

/// How cairn runs on the other hosts (host configuration `[hosts]`, or the environment).
#[derive(Clone, Debug)]
pub struct RemoteSettings {
    /// The cairn binary on a remote host (`CAIRN_REMOTE_CAIRN`; default `cairn`, from its PATH).
    pub cairn: String,
    /// The folder on a remote host for its hypervisor's sockets and scratch files
    /// (`CAIRN_REMOTE_WORK_DIR`; default [`crate::DEFAULT_WORK_DIR`]).
    pub work_dir: PathBuf,
}

impl RemoteSettings {
    pub fn from_env() -> RemoteSettings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        RemoteSettings {
            cairn: var("CAIRN_REMOTE_CAIRN").unwrap_or_else(|| "cairn".into()),
            work_dir: var("CAIRN_REMOTE_WORK_DIR").unwrap_or_else(|| crate::DEFAULT_WORK_DIR.into()).into(),
        }
    }
}

/// The host side of the host at `uri`: this machine (with `local_work_dir`), or an SSH
/// connection to it.
pub fn open_access(
    uri: &str,
    local_work_dir: &std::path::Path,
    remote: &RemoteSettings,
) -> OpResult<Box<dyn HostAccess>> {
    match SshTarget::from_uri(uri).map_err(|e| OpError::new(ErrorKind::InvalidRequest, e))? {
        None => Ok(Box::new(LocalHost { work_dir: local_work_dir.to_path_buf() })),
        Some(target) => {
            Ok(Box::new(SshHost::connect(target, &remote.cairn, &remote.work_dir).map_err(OpError::classify)?))
        }
    }
}

/// Which host a VM defined on several is placed on: where it runs; else where it is paused (at
/// the end of a migration, or by an operator: a point can still be taken); else the first.
pub fn placement_rank(state: VmState) -> u8 {
    match state {
        VmState::Running => 0,
        VmState::Paused => 1,
        _ => 2,
    }
}

/// One host of the list, connected or not.
pub struct ListedHost {
    pub uri: String,
    pub hv: OpResult<Box<dyn Hypervisor>>,
}

/// Connects to every host of `uris`; a host that cannot be reached keeps its error.
pub fn connect_all(uris: &[String], connect: &Connect<'_>) -> Vec<ListedHost> {
    uris.iter().map(|u| ListedHost { uri: u.clone(), hv: connect(u).map_err(OpError::classify) }).collect()
}

/// Finds the VM `name_or_uuid` among `hosts`: the index of its host, and the VM as that host
/// sees it. Not found, the error says which hosts could not be asked; a name that two different
/// VMs (UUIDs) carry on different hosts is refused (the UUID says which).
pub fn locate(name_or_uuid: &str, hosts: &[ListedHost]) -> OpResult<(usize, VmSummary)> {
    let mut found: Vec<(usize, VmSummary)> = Vec::new();
    let mut down: Vec<String> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let hv = match &h.hv {
            Ok(hv) => hv,
            Err(e) => {
                down.push(format!("{} ({e})", h.uri));
                continue;
            }
        };
        match hv.find(name_or_uuid) {
            Ok(vm) => found.push((i, vm)),
            Err(e) if e.downcast_ref::<NoSuchVm>().is_some() => {}
            Err(e) => down.push(format!("{} ({e:#})", h.uri)),
        }
    }
    let mut uuids: Vec<&str> = found.iter().map(|(_, v)| v.uuid.as_str()).collect();
    uuids.sort();
    uuids.dedup();
    if uuids.len() > 1 {
        let which: Vec<String> = found.iter().map(|(i, v)| format!("{} on {}", v.uuid, hosts[*i].uri)).collect();
        return Err(OpError::new(
            ErrorKind::InvalidRequest,
            anyhow::anyhow!(
                "{} different VMs are named {name_or_uuid}: {}; name one by its UUID",
                uuids.len(),
                which.join(", ")
            ),
        ));
    }
    if let Some(best) = found.into_iter().min_by_key(|(i, v)| (placement_rank(v.state), *i)) {
        return Ok(best);
    }
    let uris: Vec<&str> = hosts.iter().map(|h| h.uri.as_str()).collect();
    let missing = NoSuchVm { name: name_or_uuid.to_string(), uri: uris.join(", ") };
    if down.is_empty() {
        return Err(OpError::new(ErrorKind::NotFound, missing));
    }
    Err(OpError::new(
        ErrorKind::Failed,
        anyhow::Error::new(missing)
            .context(format!("it may be on a host that could not be asked: {}", down.join("; "))),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_hypervisor::fake::{Fake, Handle};
    use cairn_hypervisor::VmConfig;
    use std::sync::Arc;

    fn vm(name: &str, uuid: &str, state: VmState) -> VmSummary {
        VmSummary {
            name: name.into(),
            uuid: uuid.into(),
            state,
            config: VmConfig { name: name.into(), ..Default::default() },
            agent: cairn_hypervisor::AgentStatus::NoChannel,
        }
    }

    fn host(uri: &str, vms: Vec<VmSummary>) -> ListedHost {
        let f = Arc::new(Fake::default());
        *f.vms.lock().unwrap() = vms;
        ListedHost { uri: uri.into(), hv: Ok(Box::new(Handle(f))) }
    }

    fn down(uri: &str) -> ListedHost {
        let e = cairn_hypervisor::Unreachable { hypervisor: "fake", uri: uri.into(), detail: "refused".into() };
        ListedHost { uri: uri.into(), hv: Err(OpError::classify(e.into())) }
    }

    #[test]
    fn a_vm_is_found_where_it_runs_by_name_or_uuid() {
        let hosts = vec![
            host("a", vec![vm("web", "u-web", VmState::ShutOff)]),
            host("b", vec![vm("web", "u-web", VmState::Running), vm("db", "u-db", VmState::ShutOff)]),
        ];
        assert_eq!(locate("web", &hosts).unwrap().0, 1);
        assert_eq!(locate("u-web", &hosts).unwrap().0, 1);
        assert_eq!(locate("db", &hosts).unwrap().0, 1);
        let e = locate("ghost", &hosts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn one_name_for_two_vms_is_refused_and_a_host_down_is_named() {
        let hosts = vec![
            host("a", vec![vm("web", "u-1", VmState::Running)]),
            host("b", vec![vm("web", "u-2", VmState::Running)]),
        ];
        let e = locate("web", &hosts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        assert!(e.to_string().contains("u-1 on a") && e.to_string().contains("u-2 on b"), "{e}");
        assert_eq!(locate("u-2", &hosts).unwrap().0, 1, "the UUID says which");

        let hosts = vec![host("a", vec![]), down("b")];
        let e = locate("web", &hosts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failed, "not found while a host was down is not 'not found'");
        assert!(format!("{e:#}").contains("b (") && format!("{e:#}").contains("could not be asked"), "{e:#}");
        let hosts = vec![host("a", vec![vm("web", "u-1", VmState::Running)]), down("b")];
        assert_eq!(locate("web", &hosts).unwrap().0, 0, "found on a host that answers");
    }
}
