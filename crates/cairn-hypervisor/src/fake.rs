//! A scripted [`Hypervisor`] for tests of what drives one (the watchdog, the VM job): calls fail
//! a set number of times first, take a set time, and every call is recorded. Built for this
//! crate's tests and, with the `testing` feature, for other crates' tests.

use crate::{
    BackupExport, BackupRequest, Checkpoint, GuestBlockDevice, GuestExec, GuestFilesystem, Hypervisor, VmState,
    VmSummary,
};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Fake {
    pub freeze_failures: Mutex<u32>,
    pub thaw_failures: Mutex<u32>,
    /// A failing thaw still thaws (its reply was lost).
    pub thaw_fails_after_thawing: Mutex<bool>,
    pub resume_failures: Mutex<u32>,
    pub begin_failures: Mutex<u32>,
    pub end_failures: Mutex<u32>,
    /// How long `save_memory` takes.
    pub save_delay: Mutex<Duration>,
    /// How long `begin_backup` takes.
    pub begin_delay: Mutex<Duration>,
    /// The socket of the VM's running backup job.
    pub job_socket: Mutex<Option<PathBuf>>,
    pub frozen: Mutex<bool>,
    pub paused: Mutex<bool>,
    pub calls: Mutex<Vec<String>>,
    /// `emulators` fails (libvirt cannot read the host's capabilities).
    pub emulators_fail: Mutex<bool>,
    /// The VMs `list` and `find` know (the tests that drive a job hand it a summary instead).
    pub vms: Mutex<Vec<VmSummary>>,
    /// The VM was undefined: every call about it answers `NoSuchVm`.
    pub gone: Mutex<bool>,
    /// What `agent_disks` lists.
    pub guest_disks: Mutex<Vec<GuestBlockDevice>>,
}

impl Fake {
    /// `NoSuchVm` once the VM is gone.
    fn there(&self, uuid: &str) -> Result<()> {
        if *self.gone.lock().unwrap() {
            return Err(crate::NoSuchVm { name: uuid.into(), uri: "fake:///".into() }.into());
        }
        Ok(())
    }

    pub fn log(&self, s: &str) {
        self.calls.lock().unwrap().push(s.to_string());
    }
    /// How many times `call` was made.
    pub fn count(&self, call: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| *c == call).count()
    }
}

/// Counts one failure down: whether this call fails.
fn fail(left: &Mutex<u32>) -> bool {
    let mut f = left.lock().unwrap();
    let fails = *f > 0;
    *f = f.saturating_sub(1);
    fails
}

/// A connection to the one [`Fake`] a test holds (each "reconnection" hands out another).
pub struct Handle(pub Arc<Fake>);

impl Hypervisor for Handle {
    fn uri(&self) -> &str {
        "fake:///"
    }
    fn list(&self) -> Result<Vec<VmSummary>> {
        Ok(self.0.vms.lock().unwrap().clone())
    }
    fn find(&self, name_or_uuid: &str) -> Result<VmSummary> {
        self.0.log("find");
        let vms = self.0.vms.lock().unwrap();
        match vms.iter().find(|v| v.uuid == name_or_uuid || v.name == name_or_uuid) {
            Some(v) => Ok(v.clone()),
            None => Err(crate::NoSuchVm { name: name_or_uuid.into(), uri: "fake:///".into() }.into()),
        }
    }
    fn state(&self, uuid: &str) -> Result<VmState> {
        self.0.there(uuid)?;
        Ok(if *self.0.paused.lock().unwrap() { VmState::Paused } else { VmState::Running })
    }
    fn config_document(&self, _: &str) -> Result<String> {
        Ok("fake configuration of web".into())
    }
    fn agent_ping(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn agent_filesystems(&self, _: &str) -> Result<Vec<GuestFilesystem>> {
        Ok(vec![])
    }
    fn agent_exec(&self, _: &str, _: &str, _: u64) -> Result<GuestExec> {
        unimplemented!()
    }
    fn freeze(&self, _: &str) -> Result<u32> {
        self.0.log("freeze");
        // A freeze that times out still completes in the guest.
        *self.0.frozen.lock().unwrap() = true;
        if fail(&self.0.freeze_failures) {
            bail!("guest agent timed out");
        }
        Ok(1)
    }
    fn thaw(&self, uuid: &str) -> Result<u32> {
        self.0.log("thaw");
        self.0.there(uuid)?;
        if fail(&self.0.thaw_failures) {
            if *self.0.thaw_fails_after_thawing.lock().unwrap() {
                *self.0.frozen.lock().unwrap() = false;
            }
            bail!("guest agent busy");
        }
        let mut frozen = self.0.frozen.lock().unwrap();
        let was = *frozen;
        *frozen = false;
        Ok(was as u32)
    }
    fn freeze_status(&self, uuid: &str) -> Result<String> {
        self.0.there(uuid)?;
        Ok(if *self.0.frozen.lock().unwrap() { "frozen" } else { "thawed" }.into())
    }
    fn agent_disks(&self, uuid: &str) -> Result<Vec<GuestBlockDevice>> {
        self.0.there(uuid)?;
        Ok(self.0.guest_disks.lock().unwrap().clone())
    }
    fn pause(&self, _: &str) -> Result<()> {
        self.0.log("pause");
        *self.0.paused.lock().unwrap() = true;
        Ok(())
    }
    fn resume(&self, _: &str) -> Result<()> {
        self.0.log("resume");
        if fail(&self.0.resume_failures) {
            bail!("domain has active snapshot job");
        }
        let mut paused = self.0.paused.lock().unwrap();
        if !*paused {
            bail!("domain is already running");
        }
        *paused = false;
        Ok(())
    }
    fn save_memory(&self, _: &str, path: &Path) -> Result<()> {
        self.0.log("save_memory");
        std::thread::sleep(*self.0.save_delay.lock().unwrap());
        std::fs::write(path, b"guest memory")?;
        Ok(())
    }
    fn checkpoints(&self, _: &str) -> Result<Vec<Checkpoint>> {
        Ok(vec![])
    }
    fn delete_checkpoint(&self, _: &str, name: &str) -> Result<()> {
        self.0.log(&format!("delete_checkpoint {name}"));
        Ok(())
    }
    fn emulator_owner(&self, _: &str) -> Result<Option<(u32, u32)>> {
        Ok(None)
    }
    fn emulator_owner_for(&self, _: &str) -> Result<Option<(u32, u32)>> {
        Ok(None)
    }
    fn checkpoint_document(&self, _: &str, name: &str) -> Result<String> {
        Ok(format!("checkpoint {name}"))
    }
    fn redefine_checkpoint(&self, _: &str, _name: &str, document: &str) -> Result<()> {
        self.0.log(&format!("redefine_checkpoint {document}"));
        bail!("the fake has no bitmaps")
    }
    fn begin_backup(&self, _: &str, req: &BackupRequest) -> Result<BackupExport> {
        self.0.log("begin_backup");
        std::thread::sleep(*self.0.begin_delay.lock().unwrap());
        if fail(&self.0.begin_failures) {
            bail!("cannot begin the backup");
        }
        let socket = req.socket_dir.join(crate::job_socket_name(req.run_token));
        *self.0.job_socket.lock().unwrap() = Some(socket.clone());
        // Exports nobody serves: a reader fails to connect.
        let disks = req
            .disks
            .iter()
            .map(|d| crate::ExportedDisk {
                target: d.clone(),
                uri: format!("nbd+unix:///{d}?socket={}", socket.display()),
                dirty_context: None,
            })
            .collect();
        Ok(BackupExport { socket, disks })
    }
    fn running_backup(&self, uuid: &str) -> Result<Option<PathBuf>> {
        self.0.there(uuid)?;
        Ok(self.0.job_socket.lock().unwrap().clone())
    }
    fn end_backup(&self, _: &str) -> Result<()> {
        self.0.log("end_backup");
        if fail(&self.0.end_failures) {
            bail!("libvirtd is restarting");
        }
        *self.0.job_socket.lock().unwrap() = None;
        Ok(())
    }
    fn define(&self, _: &str) -> Result<String> {
        unimplemented!()
    }
    fn start(&self, _: &str) -> Result<()> {
        unimplemented!()
    }
    fn power_off(&self, _: &str) -> Result<()> {
        unimplemented!()
    }
    fn undefine(&self, _: &str) -> Result<()> {
        unimplemented!()
    }
    fn start_from_memory(&self, _: &Path, _: &str) -> Result<()> {
        unimplemented!()
    }
    fn network_available(&self, _: &str, _: &str) -> Result<bool> {
        Ok(true)
    }
    fn move_disk(&self, _: &str, _: &str, _: &Path, _: &str, _: &dyn Fn(u64, u64)) -> Result<()> {
        unimplemented!()
    }
    fn start_transient(&self, _: &str) -> Result<String> {
        unimplemented!()
    }
    fn screenshot(&self, _: &str) -> Result<(Vec<u8>, String)> {
        unimplemented!()
    }
    fn disk_source(&self, _: &str, _: &str) -> Result<Option<String>> {
        unimplemented!()
    }
    fn emulators(&self) -> Result<Vec<String>> {
        if *self.0.emulators_fail.lock().unwrap() {
            bail!("cannot read the host's capabilities");
        }
        Ok(vec!["/usr/bin/qemu-system-x86_64".into()])
    }
    fn firmware(&self) -> Result<Vec<String>> {
        Ok(vec!["/usr/share/OVMF/OVMF_CODE.fd".into()])
    }
    // The fake's VMs have no configuration documents: recovery is tested against libvirt.
    fn parse_config(&self, _: &str) -> Result<crate::VmConfig> {
        bail!("the fake hypervisor has no configuration documents")
    }
    fn rewrite_config(&self, _: &str, _: &crate::ConfigEdit) -> Result<crate::Rewritten> {
        bail!("the fake hypervisor has no configuration documents")
    }
    fn host_devices(&self, _: &str) -> Result<Vec<String>> {
        bail!("the fake hypervisor has no configuration documents")
    }
}
