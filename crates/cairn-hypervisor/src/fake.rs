//! A scripted [`Hypervisor`] for tests of what drives one (the watchdog, the VM job): calls fail
//! a set number of times first, take a set time, and every call is recorded. Built for this
//! crate's tests and, with the `testing` feature, for other crates' tests.

use crate::{BackupExport, BackupRequest, Checkpoint, GuestExec, GuestFilesystem, Hypervisor, VmState, VmSummary};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Fake {
    pub thaw_failures: Mutex<u32>,
    pub resume_failures: Mutex<u32>,
    /// How long `begin_backup` takes.
    pub begin_delay: Mutex<Duration>,
    /// The socket of the VM's running backup job.
    pub job_socket: Mutex<Option<PathBuf>>,
    pub frozen: Mutex<bool>,
    pub paused: Mutex<bool>,
    pub calls: Mutex<Vec<String>>,
}

impl Fake {
    pub fn log(&self, s: &str) {
        self.calls.lock().unwrap().push(s.to_string());
    }
    /// How many times `call` was made.
    pub fn count(&self, call: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| *c == call).count()
    }
}

/// A connection to the one [`Fake`] a test holds (each "reconnection" hands out another).
pub struct Handle(pub Arc<Fake>);

impl Hypervisor for Handle {
    fn uri(&self) -> &str {
        "fake:///"
    }
    fn list(&self) -> Result<Vec<VmSummary>> {
        unimplemented!()
    }
    fn find(&self, _: &str) -> Result<VmSummary> {
        unimplemented!()
    }
    fn state(&self, _: &str) -> Result<VmState> {
        Ok(if *self.0.paused.lock().unwrap() { VmState::Paused } else { VmState::Running })
    }
    fn config_document(&self, _: &str) -> Result<String> {
        unimplemented!()
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
        *self.0.frozen.lock().unwrap() = true;
        Ok(1)
    }
    fn thaw(&self, _: &str) -> Result<u32> {
        self.0.log("thaw");
        let mut f = self.0.thaw_failures.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            bail!("guest agent busy");
        }
        let mut frozen = self.0.frozen.lock().unwrap();
        let was = *frozen;
        *frozen = false;
        Ok(was as u32)
    }
    fn freeze_status(&self, _: &str) -> Result<String> {
        Ok(if *self.0.frozen.lock().unwrap() { "frozen" } else { "thawed" }.into())
    }
    fn pause(&self, _: &str) -> Result<()> {
        self.0.log("pause");
        *self.0.paused.lock().unwrap() = true;
        Ok(())
    }
    fn resume(&self, _: &str) -> Result<()> {
        self.0.log("resume");
        let mut f = self.0.resume_failures.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            bail!("domain has active snapshot job");
        }
        let mut paused = self.0.paused.lock().unwrap();
        if !*paused {
            bail!("domain is already running");
        }
        *paused = false;
        Ok(())
    }
    fn save_memory(&self, _: &str, _: &Path) -> Result<()> {
        self.0.log("save_memory");
        Ok(())
    }
    fn checkpoints(&self, _: &str) -> Result<Vec<Checkpoint>> {
        Ok(vec![])
    }
    fn delete_checkpoint(&self, _: &str, name: &str) -> Result<()> {
        self.0.log(&format!("delete_checkpoint {name}"));
        Ok(())
    }
    fn begin_backup(&self, _: &str, req: &BackupRequest) -> Result<BackupExport> {
        self.0.log("begin_backup");
        std::thread::sleep(*self.0.begin_delay.lock().unwrap());
        let socket = req.work_dir.join(crate::job_socket_name(req.run_token));
        *self.0.job_socket.lock().unwrap() = Some(socket.clone());
        Ok(BackupExport { socket, disks: vec![] })
    }
    fn running_backup(&self, _: &str) -> Result<Option<PathBuf>> {
        Ok(self.0.job_socket.lock().unwrap().clone())
    }
    fn end_backup(&self, _: &str) -> Result<()> {
        self.0.log("end_backup");
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
        Ok(vec!["/usr/bin/qemu-system-x86_64".into()])
    }
}
