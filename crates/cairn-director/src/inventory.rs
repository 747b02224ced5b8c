//! The VMs of the server's hosts, as last listed: what the console's VM list and dashboard read.
//!
//! Listing a host takes a libvirt connection (an SSH session for a remote one): too slow to do
//! on each page view of a thousand VMs, so the server lists every host once a minute (and
//! after each backup task) and keeps the result in the catalog. A host that does not answer
//! keeps its VMs as last seen.

use crate::catalog::{Catalog, VmRow};
use crate::Settings;

/// Lists the VMs of every host of the server's list and keeps them in the catalog; the hosts
/// that could not be listed, with why.
pub fn refresh(catalog: &Catalog, settings: &Settings) -> anyhow::Result<Vec<(String, String)>> {
    let connect = |uri: &str| (settings.connect)(uri);
    let (vms, unreachable) =
        cairn_ops::vm_list::list_vms_on_hosts(&settings.hosts, &connect, cairn_ops::vm_list::GuestDisks::DoNotAsk);
    let failed: Vec<(String, String)> =
        unreachable.iter().map(|u| (u.host.clone(), format!("{:#}", u.error.error()))).collect();
    let listed: Vec<String> = settings.hosts.iter().filter(|h| !failed.iter().any(|(f, _)| f == *h)).cloned().collect();
    let rows: Vec<VmRow> = vms
        .into_iter()
        .map(|v| VmRow {
            name: v.vm.name.clone(),
            uuid: v.vm.uuid.clone(),
            host: v.host.clone(),
            state: format!("{:?}", v.vm.state).to_lowercase(),
            method: v.vm.method.to_string(),
            method_reason: v.vm.method_reason.clone(),
            tags: v.vm.tags.clone(),
            last_point: None,
            points: 0,
            last_boot: None,
        })
        .collect();
    catalog.set_inventory(&listed, &rows)?;
    catalog.keep_inventory_of(&settings.hosts)?;
    Ok(failed)
}
