//! [`Hypervisor`] over libvirt (the `virt` crate; backup jobs and checkpoints through its raw
//! `virt-sys` layer, which `virt` 0.5 does not wrap).

use crate::domain_xml;
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use cairn_hypervisor::{
    AgentStatus, BackupExport, BackupRequest, Checkpoint, ConfigEdit, ExportedDisk, GuestBlockDevice, GuestExec,
    GuestFilesystem, Hypervisor, NoSuchVm, Rewritten, Unreachable, VmConfig, VmState, VmSummary,
};
use serde_json::{json, Value};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

pub const DEFAULT_URI: &str = "qemu:///system";

pub struct Libvirt {
    uri: String,
    conn: Connect,
}

/// The last libvirt error, as text.
fn last_error() -> String {
    virt::error::Error::last_error().message().to_string()
}

/// libvirt's event loop, run by one thread of the process from the first connection on: what
/// its keepalive messages need.
fn start_event_loop() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if virt::event::event_register_default_impl().is_ok() {
            let _ = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| loop {
                if virt::event::event_run_default_impl().is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        }
    });
}

impl Libvirt {
    pub fn connect(uri: &str) -> Result<Libvirt> {
        // libvirt prints every error to stderr by default; ours carry the message instead.
        virt::error::clear_error_callback();
        start_event_loop();
        let conn = Connect::open(Some(uri)).map_err(|e| Unreachable {
            hypervisor: "libvirt",
            uri: uri.to_string(),
            detail: e.message().to_string(),
        })?;
        // A daemon (or the network to it) that stops answering closes the connection after 30 s,
        // failing the call waiting on it, as virsh does: otherwise a host that went away mid-
        // backup would hold the call until TCP gives up, many minutes later.
        let _ = conn.set_keep_alive(5, 6);
        Ok(Libvirt { uri: uri.to_string(), conn })
    }

    fn domain(&self, uuid: &str) -> Result<Domain> {
        self.conn.lookup_domain_by_uuid_string(uuid).map_err(|e| {
            // Typed: a watchdog stops guarding a VM that no longer exists.
            if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN {
                return NoSuchVm { name: uuid.to_string(), uri: self.uri.clone() }.into();
            }
            anyhow!("VM {uuid}: {}", e.message())
        })
    }

    fn summary(&self, dom: &Domain) -> Result<VmSummary> {
        let state = state_of(dom)?;
        let flags = if state == VmState::ShutOff { sys::VIR_DOMAIN_XML_INACTIVE } else { 0 };
        let xml = dom.xml_desc(flags).map_err(|e| anyhow!("reading the VM's configuration: {}", e.message()))?;
        let mut config = domain_xml::parse(&xml)?;
        for d in config.disks.iter_mut().filter(|d| d.is_backed_up()) {
            d.size = dom.block_info(&d.target, 0).ok().map(|b| b.capacity);
        }
        let agent = if !config.agent_channel {
            AgentStatus::NoChannel
        } else if state != VmState::Running {
            AgentStatus::NotAnswering(format!("the VM is {}", state.as_str()))
        } else {
            match agent_command(dom, &json!({"execute": "guest-ping"}), 3) {
                Ok(_) => AgentStatus::Answering,
                Err(e) => AgentStatus::NotAnswering(e.to_string()),
            }
        };
        Ok(VmSummary { name: config.name.clone(), uuid: config.uuid.clone(), state, config, agent })
    }
}

fn state_of(dom: &Domain) -> Result<VmState> {
    let (s, _) = dom.state().map_err(|e| anyhow!("reading the VM's state: {}", e.message()))?;
    use virt::domain::DomainState as S;
    Ok(match s.known() {
        Some(S::Running) | Some(S::Blocked) => VmState::Running,
        Some(S::Paused) | Some(S::PMSuspended) => VmState::Paused,
        Some(S::Shutoff) | Some(S::Shutdown) => VmState::ShutOff,
        Some(S::Crashed) => VmState::Crashed,
        _ => VmState::Other,
    })
}

fn agent_command(dom: &Domain, cmd: &Value, timeout_s: i32) -> Result<Value> {
    let reply = dom.qemu_agent_command(&cmd.to_string(), timeout_s, 0).map_err(|e| anyhow!("{}", e.message()))?;
    let v: Value = serde_json::from_str(&reply).context("the guest agent's reply is not JSON")?;
    Ok(v.get("return").cloned().unwrap_or(Value::Null))
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).context("a string for libvirt holds a NUL byte")
}

/// Escapes text for an XML attribute or element.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn list(&self) -> Result<Vec<VmSummary>> {
        let doms = self.conn.list_all_domains(0).map_err(|e| anyhow!("listing VMs: {}", e.message()))?;
        let mut out = Vec::new();
        for d in &doms {
            out.push(self.summary(d)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn find(&self, name_or_uuid: &str) -> Result<VmSummary> {
        let dom = self
            .conn
            .lookup_domain_by_uuid_string(name_or_uuid)
            .or_else(|_| self.conn.lookup_domain_by_name(name_or_uuid))
            .map_err(|_| NoSuchVm { name: name_or_uuid.to_string(), uri: self.uri.clone() })?;
        self.summary(&dom)
    }

    fn state(&self, uuid: &str) -> Result<VmState> {
        state_of(&self.domain(uuid)?)
    }

    fn config_document(&self, uuid: &str) -> Result<String> {
        // The persistent definition, not the live one: it is what a recovery defines again (the
        // live form carries runtime details such as pty paths, aliases and the domain id).
        let dom = self.domain(uuid)?;
        dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| anyhow!("reading the VM's configuration: {}", e.message()))
    }

    fn agent_ping(&self, uuid: &str) -> Result<()> {
        agent_command(&self.domain(uuid)?, &json!({"execute": "guest-ping"}), 3).map(|_| ())
    }

    fn agent_filesystems(&self, uuid: &str) -> Result<Vec<GuestFilesystem>> {
        let v = agent_command(&self.domain(uuid)?, &json!({"execute": "guest-get-fsinfo"}), 10)?;
        let list = v.as_array().context("guest-get-fsinfo did not return a list")?;
        Ok(list
            .iter()
            .map(|f| GuestFilesystem {
                mountpoint: f["mountpoint"].as_str().unwrap_or("").into(),
                fs_type: f["type"].as_str().unwrap_or("").into(),
                devices: f["disk"]
                    .as_array()
                    .map(|d| d.iter().filter_map(|x| x["dev"].as_str().map(String::from)).collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn agent_exec(&self, uuid: &str, command: &str, timeout_s: u64) -> Result<GuestExec> {
        let dom = self.domain(uuid)?;
        let started = agent_command(
            &dom,
            &json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", command], "capture-output": true}}),
            10,
        )
        .with_context(|| format!("starting `{command}` in the guest"))?;
        let pid = started["pid"].as_i64().context("guest-exec returned no pid")?;
        let t0 = Instant::now();
        loop {
            let s = agent_command(&dom, &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}), 10)?;
            if s["exited"].as_bool() == Some(true) {
                let decode = |k: &str| {
                    s[k].as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                return Ok(GuestExec {
                    exit_code: s["exitcode"].as_i64().unwrap_or(if s["signal"].is_i64() { 128 } else { 0 }),
                    stdout: decode("out-data"),
                    stderr: decode("err-data"),
                });
            }
            if t0.elapsed() > Duration::from_secs(timeout_s) {
                bail!("`{command}` did not finish in the guest within {timeout_s} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn freeze(&self, uuid: &str) -> Result<u32> {
        let dom = self.domain(uuid)?;
        let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
        if n < 0 {
            bail!("freezing the guest's filesystems failed: {}", last_error());
        }
        Ok(n as u32)
    }

    fn thaw(&self, uuid: &str) -> Result<u32> {
        let dom = self.domain(uuid)?;
        let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
        if n < 0 {
            bail!("thawing the guest's filesystems failed: {}", last_error());
        }
        Ok(n as u32)
    }

    fn freeze_status(&self, uuid: &str) -> Result<String> {
        let v = agent_command(&self.domain(uuid)?, &json!({"execute": "guest-fsfreeze-status"}), 5)?;
        Ok(v.as_str().unwrap_or("unknown").to_string())
    }

    fn agent_disks(&self, uuid: &str) -> Result<Vec<GuestBlockDevice>> {
        let v = agent_command(&self.domain(uuid)?, &json!({"execute": "guest-get-disks"}), 10)?;
        let list = v.as_array().context("guest-get-disks did not return a list")?;
        Ok(list
            .iter()
            .take(4096)
            .filter(|d| d["partition"].as_bool() != Some(true))
            .map(|d| GuestBlockDevice {
                name: d["name"].as_str().unwrap_or("").chars().take(256).collect(),
                on_pci: d["address"]["pci-controller"].is_object(),
                bus_type: d["address"]["bus-type"].as_str().map(|s| s.chars().take(32).collect()),
                dependencies: d["dependencies"]
                    .as_array()
                    .map(|a| a.iter().take(64).filter_map(|x| x.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn pause(&self, uuid: &str) -> Result<()> {
        self.domain(uuid)?.suspend().map_err(|e| anyhow!("pausing the VM: {}", e.message()))
    }

    fn resume(&self, uuid: &str) -> Result<()> {
        self.domain(uuid)?.resume().map_err(|e| anyhow!("resuming the VM: {}", e.message()))
    }

    fn save_memory(&self, uuid: &str, path: &Path) -> Result<()> {
        // A memory-only external snapshot: libvirt writes the save-image format (`virsh restore`
        // reads it) and, unlike virDomainSave, keeps the QEMU process: the VM stays paused, not
        // stopped, so it resumes in milliseconds. The snapshot's metadata is dropped at once: the
        // file is all we keep.
        let dom = self.domain(uuid)?;
        let cfg = domain_xml::parse(&dom.xml_desc(0).map_err(|e| anyhow!("{}", e.message()))?)?;
        let name = format!("cairn-state-{}", std::process::id());
        let mut xml = format!(
            "<domainsnapshot><name>{name}</name><memory snapshot='external' file='{}'/><disks>",
            xml_escape(&path.to_string_lossy())
        );
        for d in &cfg.disks {
            xml.push_str(&format!("<disk name='{}' snapshot='no'/>", xml_escape(&d.target)));
        }
        xml.push_str("</disks></domainsnapshot>");
        let snap =
            dom.create_snapshot_xml(&xml, 0).map_err(|e| anyhow!("saving the VM's memory state: {}", e.message()))?;
        snap.delete(sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            .map_err(|e| anyhow!("dropping the memory snapshot's metadata: {}", e.message()))
    }

    fn checkpoints(&self, uuid: &str) -> Result<Vec<Checkpoint>> {
        let dom = self.domain(uuid)?;
        let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
        let n = unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) };
        if n < 0 {
            bail!("listing the VM's checkpoints: {}", last_error());
        }
        // Every handle and the list are freed before anything is parsed: an early return can
        // leak nothing.
        let mut docs = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let cp = unsafe { *list.add(i) };
            let xml = unsafe { sys::virDomainCheckpointGetXMLDesc(cp, 0) };
            if !xml.is_null() {
                docs.push(unsafe { CStr::from_ptr(xml) }.to_string_lossy().into_owned());
                unsafe { libc::free(xml as *mut libc::c_void) };
            }
            unsafe { sys::virDomainCheckpointFree(cp) };
        }
        unsafe { libc::free(list as *mut libc::c_void) };
        let mut out = docs.iter().map(|d| parse_checkpoint(d)).collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|c| c.creation_time);
        Ok(out)
    }

    fn delete_checkpoint(&self, uuid: &str, name: &str) -> Result<()> {
        let dom = self.domain(uuid)?;
        let cname = cstring(name)?;
        let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), cname.as_ptr(), 0) };
        if cp.is_null() {
            bail!("no checkpoint {name}: {}", last_error());
        }
        let mut r = unsafe { sys::virDomainCheckpointDelete(cp, 0) };
        if r < 0 {
            // The bitmap is already gone from the disk (QEMU killed, image replaced): drop the
            // metadata so it cannot be mistaken for a usable checkpoint again.
            r = unsafe { sys::virDomainCheckpointDelete(cp, sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY) };
        }
        let err = if r < 0 { Some(last_error()) } else { None };
        unsafe { sys::virDomainCheckpointFree(cp) };
        match err {
            Some(e) => bail!("deleting checkpoint {name}: {e}"),
            None => Ok(()),
        }
    }

    fn emulator_owner(&self, uuid: &str) -> Result<Option<(u32, u32)>> {
        let live = self
            .domain(uuid)?
            .xml_desc(0)
            .map_err(|e| anyhow!("reading the VM's running configuration: {}", e.message()))?;
        Ok(domain_xml::dac_owner(&live)?.filter(|&(uid, _)| uid != 0))
    }

    fn emulator_owner_for(&self, config: &str) -> Result<Option<(u32, u32)>> {
        // Only the host's default: a recovery rewrites the configuration without any
        // <seclabel> (a label from a restore point could name any user of the host).
        let caps = self.conn.capabilities().map_err(|e| anyhow!("reading the host's capabilities: {}", e.message()))?;
        let owner = domain_xml::base_dac_owner(&caps, &domain_xml::parse(config)?.domain_type)?;
        Ok(owner.filter(|&(uid, _)| uid != 0))
    }

    fn checkpoint_document(&self, uuid: &str, name: &str) -> Result<String> {
        let dom = self.domain(uuid)?;
        let cname = cstring(name)?;
        let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), cname.as_ptr(), 0) };
        if cp.is_null() {
            bail!("no checkpoint {name}: {}", last_error());
        }
        let xml = unsafe { sys::virDomainCheckpointGetXMLDesc(cp, sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN) };
        let doc = if xml.is_null() {
            None
        } else {
            let d = unsafe { CStr::from_ptr(xml) }.to_string_lossy().into_owned();
            unsafe { libc::free(xml as *mut libc::c_void) };
            Some(d)
        };
        let err = if doc.is_none() { Some(last_error()) } else { None };
        unsafe { sys::virDomainCheckpointFree(cp) };
        doc.ok_or_else(|| anyhow!("reading checkpoint {name}: {}", err.unwrap_or_default()))
    }

    fn redefine_checkpoint(&self, uuid: &str, name: &str, document: &str) -> Result<()> {
        let dom = self.domain(uuid)?;
        // Parsed first: a restore point's bytes, bounded and checked before libvirt sees them.
        let cp = parse_checkpoint(document).context("the stored checkpoint definition")?;
        if cp.name != name {
            bail!("the stored definition of checkpoint {name} defines {:?}", cp.name);
        }
        // Its parent was this repository's previous checkpoint, deleted once the point was
        // committed: the checkpoint stands alone now (as libvirt made it on the first host).
        let doc = without_parent(document);
        let c = cstring(&doc)?;
        let flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
        let made = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), c.as_ptr(), flags) };
        if made.is_null() {
            bail!("registering checkpoint {} again: {}", cp.name, last_error());
        }
        unsafe { sys::virDomainCheckpointFree(made) };
        Ok(())
    }

    fn begin_backup(&self, uuid: &str, req: &BackupRequest) -> Result<BackupExport> {
        let dom = self.domain(uuid)?;
        let socket = req.socket_dir.join(cairn_hypervisor::job_socket_name(req.run_token));
        let _ = std::fs::remove_file(&socket);
        let mut backup = format!(
            "<domainbackup mode='pull'>{}<server transport='unix' socket='{}'/><disks>",
            req.incremental_from.map(|c| format!("<incremental>{}</incremental>", xml_escape(c))).unwrap_or_default(),
            xml_escape(&socket.to_string_lossy())
        );
        let mut checkpoint = format!(
            "<domaincheckpoint><name>{}</name><description>{}</description><disks>",
            xml_escape(req.new_checkpoint),
            xml_escape(req.checkpoint_description)
        );
        let cfg = domain_xml::parse(&dom.xml_desc(0).map_err(|e| anyhow!("{}", e.message()))?)?;
        for d in &cfg.disks {
            let wanted = req.disks.contains(&d.target);
            if wanted {
                let scratch = req.work_dir.join(cairn_hypervisor::job_scratch_name(&d.target, req.run_token));
                let _ = std::fs::remove_file(&scratch);
                backup.push_str(&format!(
                    "<disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>",
                    xml_escape(&d.target),
                    xml_escape(&scratch.to_string_lossy())
                ));
            } else {
                backup.push_str(&format!("<disk name='{}' backup='no'/>", xml_escape(&d.target)));
            }
            let bitmap = if wanted && d.supports_checkpoints() { "bitmap" } else { "no" };
            checkpoint.push_str(&format!("<disk name='{}' checkpoint='{bitmap}'/>", xml_escape(&d.target)));
        }
        backup.push_str("</disks></domainbackup>");
        checkpoint.push_str("</disks></domaincheckpoint>");
        let (b, c) = (cstring(&backup)?, cstring(&checkpoint)?);
        let r = unsafe { sys::virDomainBackupBegin(dom.as_ptr(), b.as_ptr(), c.as_ptr(), 0) };
        if r < 0 {
            bail!("starting the backup job: {}", last_error());
        }
        let disks = req
            .disks
            .iter()
            .map(|t| ExportedDisk {
                target: t.clone(),
                uri: format!("nbd+unix:///{t}?socket={}", socket.display()),
                dirty_context: req.incremental_from.map(|_| format!("qemu:dirty-bitmap:backup-{t}")),
            })
            .collect();
        Ok(BackupExport { socket, disks })
    }

    fn running_backup(&self, uuid: &str) -> Result<Option<PathBuf>> {
        let dom = self.domain(uuid)?;
        if state_of(&dom)? == VmState::ShutOff {
            return Ok(None);
        }
        let xml = unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) };
        if xml.is_null() {
            // NULL is an error; "no backup job" is one particular error. Any other (a broken
            // connection, a busy domain) must not be taken for "no job": the caller would then
            // start one next to a job that is still running, or stop looking for a dead run's.
            if unsafe { sys::virGetLastErrorCode() } == sys::VIR_ERR_NO_DOMAIN_BACKUP as i32 {
                return Ok(None);
            }
            bail!("reading the VM's backup job: {}", last_error());
        }
        let text = unsafe { CStr::from_ptr(xml) }.to_string_lossy().into_owned();
        unsafe { libc::free(xml as *mut libc::c_void) };
        let doc = roxmltree::Document::parse(&text)?;
        let socket = doc.descendants().find(|n| n.has_tag_name("server")).and_then(|s| s.attribute("socket"));
        Ok(Some(PathBuf::from(socket.unwrap_or(""))))
    }

    fn end_backup(&self, uuid: &str) -> Result<()> {
        let dom = self.domain(uuid)?;
        if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
            bail!("ending the backup job: {}", last_error());
        }
        Ok(())
    }

    fn define(&self, config: &str) -> Result<String> {
        let dom = self.conn.define_domain_xml(config).map_err(|e| Self::recovery_error("defining the VM", e))?;
        dom.uuid_string().map_err(|e| Self::recovery_error("reading the new VM's UUID", e))
    }

    fn start(&self, uuid: &str) -> Result<()> {
        self.domain(uuid)?.create().map_err(|e| Self::recovery_error("starting the VM", e))
    }

    fn power_off(&self, uuid: &str) -> Result<()> {
        let dom = self.domain(uuid)?;
        if dom.is_active().unwrap_or(false) {
            dom.destroy().map_err(|e| Self::recovery_error("stopping the VM", e))?;
        }
        Ok(())
    }

    fn undefine(&self, uuid: &str) -> Result<()> {
        let dom = self.domain(uuid)?;
        let flags = sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM;
        dom.undefine_flags(flags).map_err(|e| Self::recovery_error("removing the VM's definition", e))
    }

    fn start_from_memory(&self, path: &Path, config: &str) -> Result<()> {
        self.conn
            .restore_domain_flags(&path.to_string_lossy(), Some(config), sys::VIR_DOMAIN_SAVE_RUNNING)
            .map_err(|e| Self::recovery_error("starting the VM from its saved memory state", e))
    }

    fn move_disk(
        &self,
        uuid: &str,
        target: &str,
        dest: &Path,
        format: &str,
        progress: &dyn Fn(u64, u64),
    ) -> Result<()> {
        let dom = self.domain(uuid)?;
        let disk = cstring(target)?;
        let xml = format!(
            "<disk type='file'><source file='{}'/><driver type='{}' discard='unmap' detect_zeroes='unmap'/></disk>",
            xml_escape(&dest.to_string_lossy()),
            xml_escape(format)
        );
        let dxml = cstring(&xml)?;
        // A transient job: the VM stays persistent, and libvirt updates its definition on pivot.
        let flags = sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        if unsafe {
            sys::virDomainBlockCopy(dom.as_ptr(), disk.as_ptr(), dxml.as_ptr(), std::ptr::null_mut(), 0, flags)
        } < 0
        {
            bail!("starting the copy of disk {target} to {}: {}", dest.display(), last_error());
        }
        let t0 = Instant::now();
        let mut info: sys::virDomainBlockJobInfo = unsafe { std::mem::zeroed() };
        loop {
            let r = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) };
            if r < 0 {
                bail!("following the copy of disk {target}: {}", last_error());
            }
            if r == 0 {
                bail!("the copy of disk {target} stopped before it was complete");
            }
            progress(info.cur, info.end);
            // Mirrored and in step: switch the VM onto the copy. Until the job reports itself
            // ready the pivot is refused; then try again.
            if info.end > 0 && info.cur == info.end {
                if unsafe {
                    sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                } == 0
                {
                    break;
                }
                let e = last_error();
                if !e.contains("not ready") && !e.contains("not yet") {
                    bail!("switching disk {target} to its copy: {e}");
                }
            }
            if t0.elapsed() > Duration::from_secs(24 * 3600) {
                bail!("the copy of disk {target} did not finish in a day");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The pivot completes asynchronously: wait until the VM reads from the copy.
        while self.disk_source(uuid, target)?.as_deref() != Some(&*dest.to_string_lossy()) {
            if t0.elapsed() > Duration::from_secs(24 * 3600) {
                bail!("disk {target} was not switched to its copy");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn start_transient(&self, config: &str) -> Result<String> {
        let dom =
            self.conn.create_domain_xml(config, 0).map_err(|e| Self::recovery_error("starting the sandbox VM", e))?;
        dom.uuid_string().map_err(|e| Self::recovery_error("reading the sandbox's UUID", e))
    }

    fn screenshot(&self, uuid: &str) -> Result<(Vec<u8>, String)> {
        let dom = self.domain(uuid)?;
        let stream =
            virt::stream::Stream::new(&self.conn, 0).map_err(|e| anyhow!("opening a stream: {}", e.message()))?;
        let mime = dom.screenshot(&stream, 0, 0).map_err(|e| anyhow!("taking a screenshot: {}", e.message()))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.recv(&mut buf).map_err(|e| anyhow!("reading the screenshot: {}", e.message()))?;
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        let _ = stream.finish();
        Ok((out, mime))
    }

    fn disk_source(&self, uuid: &str, target: &str) -> Result<Option<String>> {
        let dom = self.domain(uuid)?;
        let cfg = domain_xml::parse(&dom.xml_desc(0).map_err(|e| anyhow!("{}", e.message()))?)?;
        Ok(cfg.disks.into_iter().find(|d| d.target == target).and_then(|d| d.path))
    }

    fn emulators(&self) -> Result<Vec<String>> {
        let caps = self.conn.capabilities().map_err(|e| anyhow!("reading the host's capabilities: {}", e.message()))?;
        let doc = roxmltree::Document::parse(&caps).context("parsing the host's capabilities")?;
        let mut out: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("emulator"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .filter(|t| !t.is_empty())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn firmware(&self) -> Result<Vec<String>> {
        // The default machine, and q35 (where UEFI firmware with secure boot is offered).
        let mut out = Vec::new();
        let mut failed = None;
        for machine in [None, Some("q35")] {
            match self.conn.domain_capabilities(None, None, machine, None, 0) {
                Ok(caps) => out.extend(parse_firmware(&caps)?),
                Err(e) => failed = Some(e.message().to_string()),
            }
        }
        if let (true, Some(e)) = (out.is_empty(), failed) {
            bail!("reading the host's domain capabilities: {e}");
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn parse_config(&self, document: &str) -> Result<VmConfig> {
        domain_xml::parse(document)
    }

    fn rewrite_config(&self, document: &str, edit: &ConfigEdit) -> Result<Rewritten> {
        domain_xml::rewrite(document, edit)
    }

    fn host_devices(&self, document: &str) -> Result<Vec<String>> {
        domain_xml::host_devices(document)
    }

    fn network_available(&self, kind: &str, name: &str) -> Result<bool> {
        Ok(match kind {
            "network" => self.conn.lookup_network_by_name(name).and_then(|n| n.is_active()).unwrap_or(false),
            "bridge" => Path::new("/sys/class/net").join(name).join("bridge").exists(),
            _ => true,
        })
    }
}

impl Libvirt {
    fn recovery_error(what: &str, e: virt::error::Error) -> anyhow::Error {
        anyhow!("{what}: {}", e.message())
    }
}

/// The firmware files a libvirt domain-capabilities document lists (`<os><loader><value>`).
pub fn parse_firmware(caps: &str) -> Result<Vec<String>> {
    let doc = roxmltree::Document::parse(caps).context("parsing the host's domain capabilities")?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("loader") && n.parent().is_some_and(|p| p.has_tag_name("os")))
        .flat_map(|l| l.children().filter(|v| v.has_tag_name("value")))
        .filter_map(|v| v.text().map(|t| t.trim().to_string()))
        .filter(|t| t.starts_with('/'))
        .collect())
}

/// `document` (a checkpoint document, parsed already) without its `<parent>` element (public for
/// the fuzz targets: the document comes from a restore point).
pub fn without_parent(document: &str) -> String {
    let Ok(doc) = roxmltree::Document::parse(document) else { return document.to_string() };
    let mut out = String::with_capacity(document.len());
    let mut at = 0;
    for p in doc.root_element().children().filter(|n| n.has_tag_name("parent")) {
        out.push_str(&document[at..p.range().start]);
        at = p.range().end;
    }
    out.push_str(&document[at..]);
    out
}

/// Reads a libvirt checkpoint document (public for the fuzz targets: these come from libvirt, which
/// may hold whatever an earlier writer of the VM's metadata put there).
pub fn parse_checkpoint(xml: &str) -> Result<Checkpoint> {
    domain_xml::check_depth(xml)?;
    let doc = roxmltree::Document::parse(xml).context("parsing a checkpoint document")?;
    let root = doc.root_element();
    let text =
        |tag: &str| root.children().find(|c| c.has_tag_name(tag)).and_then(|n| n.text()).map(|t| t.trim().to_string());
    let parent = root
        .children()
        .find(|c| c.has_tag_name("parent"))
        .and_then(|p| p.children().find(|c| c.has_tag_name("name")).and_then(|n| n.text()).map(String::from));
    let disks = root
        .children()
        .find(|c| c.has_tag_name("disks"))
        .map(|ds| {
            ds.children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|d| d.attribute("name").map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(Checkpoint {
        name: text("name").unwrap_or_default(),
        parent,
        description: text("description").unwrap_or_default(),
        creation_time: text("creationTime").and_then(|t| t.parse().ok()).unwrap_or(0),
        disks,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redefined_checkpoint_loses_only_its_parent() {
        let doc = "<domaincheckpoint><name>cp2</name><parent><name>cp1</name></parent><creationTime>1</creationTime>\
                   <disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>";
        let out = super::without_parent(doc);
        assert_eq!(
            out,
            "<domaincheckpoint><name>cp2</name><creationTime>1</creationTime>\
             <disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
        );
        let cp = super::parse_checkpoint(&out).unwrap();
        assert_eq!((cp.name.as_str(), cp.parent, cp.disks), ("cp2", None, vec!["vda".to_string()]));
        assert_eq!(
            super::without_parent("<domaincheckpoint><name>x</name></domaincheckpoint>"),
            "<domaincheckpoint><name>x</name></domaincheckpoint>"
        );
    }

    #[test]
    fn parses_checkpoint_documents() {
        let c = super::parse_checkpoint(
            "<domaincheckpoint><name>cp2</name><description>cairn repo=ab</description><parent><name>cp1</name></parent>\
             <creationTime>1764073467</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='cp2'/>\
             <disk name='vdb' checkpoint='no'/></disks><domain/></domaincheckpoint>",
        )
        .unwrap();
        assert_eq!((c.name.as_str(), c.parent.as_deref(), c.creation_time), ("cp2", Some("cp1"), 1764073467));
        assert_eq!(c.disks, ["vda"]);
        assert_eq!(c.description, "cairn repo=ab");
    }

    #[test]
    fn firmware_is_read_from_domain_capabilities() {
        // As libvirt 9 lists it on a host with OVMF: the paths, not the enum values.
        let caps = "<domainCapabilities><os supported='yes'><enum name='firmware'><value>efi</value></enum>\
            <loader supported='yes'><value>/usr/share/OVMF/OVMF_CODE_4M.fd</value>\
            <value>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</value>\
            <enum name='type'><value>rom</value><value>pflash</value></enum></loader></os>\
            <devices><disk><enum name='x'><value>/not/firmware</value></enum></disk></devices></domainCapabilities>";
        assert_eq!(
            super::parse_firmware(caps).unwrap(),
            ["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"]
        );
        // This host's libvirt (no OVMF here: none, but no error either).
        if let Ok(hv) = super::Libvirt::connect(super::DEFAULT_URI) {
            use cairn_hypervisor::Hypervisor;
            for f in hv.firmware().unwrap() {
                assert!(std::path::Path::new(&f).exists(), "{f}");
            }
        }
    }
}
