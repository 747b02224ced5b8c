//! Backing up VMs: each VM of the request, found by name or UUID on whichever host of the host
//! list it runs ([`crate::hosts::locate`]), backed up under its watchdog
//! ([`cairn_vm::backup::backup_vm`]) through its host's [`HostAccess`] (this machine, or another
//! host over SSH), then boot-checked if asked. Hosts run in parallel, each with at most
//! [`BackupVmsRequest::per_host`] VMs at a time; one VM's failure (or its host's) does not stop
//! the others; each gets its own outcome.

use crate::boot_check::{boot_check, BootCheckRequest, BootOutcome};
use crate::cancel::Cancel;
use crate::error::{ErrorKind, OpError, OpResult};
use crate::helpers::Helpers;
use crate::hosts::{connect_all, locate, open_access, Connect, ListedHost, RemoteSettings};
use cairn_engine::Progress;
use cairn_hypervisor::watchdog::Watchdog;
use cairn_hypervisor::{Hypervisor, VmState, VmSummary};
use cairn_repo::vm_record::VmRecord;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use cairn_vm::backup::{backup_vm, new_run_token, VmBackupOptions};
use cairn_vm::host::HostAccess;
use std::sync::{Arc, Mutex};

pub struct BackupVmsRequest {
    /// VMs by name or UUID; each becomes one restore point named after the VM.
    pub vms: Vec<String>,
    /// The options of every VM's backup (each gets its own run token).
    pub options: VmBackupOptions,
    /// Boot-check each new point, and how.
    pub boot_check: Option<BootCheckRequest>,
    /// At most this many VMs of one host backed up at once (at least 1).
    pub per_host: usize,
    /// A limit shared with other runs (the director's tasks of other repositories): a VM's
    /// backup waits for a free slot on its host.
    pub host_limits: Option<Arc<HostLimits>>,
}

/// At most `per_host` VM backups at once on each host, across every run that shares it.
pub struct HostLimits {
    per_host: usize,
    busy: Mutex<std::collections::HashMap<String, usize>>,
    freed: std::sync::Condvar,
}

/// A slot on a host, given back when dropped.
pub struct HostSlot<'a> {
    limits: &'a HostLimits,
    host: String,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Arc<HostLimits> {
        Arc::new(HostLimits { per_host: per_host.max(1), busy: Mutex::default(), freed: Default::default() })
    }

    /// Waits for a slot on `host` (saying so once, through `progress`); an error if `cancel`
    /// is set meanwhile.
    pub fn acquire(&self, host: &str, cancel: &Cancel, progress: &dyn Progress) -> OpResult<HostSlot<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let mut said = false;
        loop {
            cancel.check(&format!("waiting for a free slot on host {host}"))?;
            let n = busy.entry(host.to_string()).or_default();
            if *n < self.per_host {
                *n += 1;
                return Ok(HostSlot { limits: self, host: host.to_string() });
            }
            if !said {
                progress.note(&format!(
                    "host {host} already has {} VM backups running: waiting for one to end",
                    self.per_host
                ));
                said = true;
            }
            busy = self
                .freed
                .wait_timeout(busy, std::time::Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many backups run on `host` now.
    pub fn busy(&self, host: &str) -> usize {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).get(host).copied().unwrap_or(0)
    }
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        let mut busy = self.limits.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = busy.get_mut(&self.host) {
            *n = n.saturating_sub(1);
        }
        self.limits.freed.notify_all();
    }
}

/// A VM's restore point, and its boot check if one was asked for.
pub struct BackedUp {
    pub id: PointId,
    pub point: RestorePoint,
    pub record: VmRecord,
    pub boot: Option<OpResult<BootOutcome>>,
}

impl BackedUp {
    /// The point was boot-checked and did not come up (or the check itself failed).
    pub fn unbootable(&self) -> bool {
        match &self.boot {
            None => false,
            Some(Ok(b)) => !b.check.passed(),
            Some(Err(_)) => true,
        }
    }
}

/// One VM of the request and what became of it.
pub struct VmBackupOutcome {
    /// The VM as the request named it.
    pub vm: String,
    /// The host it was found on (its URI), if it was found.
    pub host: Option<String>,
    pub result: OpResult<BackedUp>,
}

/// Backs up every VM of `req`, found among `hosts` (hypervisor URIs; `connect` opens one).
/// `on_done` sees each outcome as soon as it is known (an interface prints it while other VMs
/// run); the outcomes are returned in the request's order. A cancellation stops the VMs under
/// way at their next batch of blocks (their guests thawed or resumed and their backup jobs ended
/// as after any failure, no point written) and gets the VMs not started a `Cancelled` outcome.
#[allow(clippy::too_many_arguments)] // one request, and the interface's services
pub fn backup_vms(
    hosts: &[String],
    connect: &Connect<'_>,
    remote: &RemoteSettings,
    repo: &Arc<Repository>,
    req: &BackupVmsRequest,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
    cancel: &Cancel,
    on_done: &mut (dyn FnMut(&VmBackupOutcome) + Send),
) -> Vec<VmBackupOutcome> {
    let progress = &cancel.watching(progress);
    let mut slots: Vec<Option<VmBackupOutcome>> = req.vms.iter().map(|_| None).collect();
    let on_done = Mutex::new(on_done);
    let finish = |slots: &mut Vec<Option<VmBackupOutcome>>, i: usize, o: VmBackupOutcome| {
        (on_done.lock().unwrap())(&o);
        slots[i] = Some(o);
    };
    if cancel.is_cancelled() {
        for (i, name) in req.vms.iter().enumerate() {
            let result = cancel.check(&format!("the backup of VM {name}")).map(|()| unreachable!());
            finish(&mut slots, i, VmBackupOutcome { vm: name.clone(), host: None, result });
        }
        return slots.into_iter().flatten().collect();
    }
    let mut listed = connect_all(hosts, connect);
    // One host, and it cannot be reached: that is every VM's error (the first one gets it as it
    // came, typed, for the interface's advice).
    if let [only] = listed.as_mut_slice() {
        if only.hv.is_err() {
            let placeholder = Err(OpError::new(ErrorKind::Failed, anyhow::anyhow!("unreachable")));
            let Err(first) = std::mem::replace(&mut only.hv, placeholder) else { unreachable!() };
            let why = format!("{first:#}");
            let kind = first.kind();
            let mut first = Some(first);
            for (i, name) in req.vms.iter().enumerate() {
                let e = first.take().unwrap_or_else(|| OpError::new(kind, anyhow::anyhow!("{why}")));
                finish(
                    &mut slots,
                    i,
                    VmBackupOutcome { vm: name.clone(), host: Some(only.uri.clone()), result: Err(e) },
                );
            }
            return slots.into_iter().flatten().collect();
        }
    }
    // Each VM to its host; one VM named twice is backed up once.
    let mut queues: Vec<Vec<(usize, VmSummary)>> = listed.iter().map(|_| Vec::new()).collect();
    let mut seen: Vec<String> = Vec::new();
    for (i, name) in req.vms.iter().enumerate() {
        match locate(name, &listed) {
            Ok((h, vm)) if !seen.contains(&vm.uuid) => {
                seen.push(vm.uuid.clone());
                queues[h].push((i, vm));
            }
            Ok((h, vm)) => {
                let e = anyhow::anyhow!("VM {} ({}) is named twice in the request", vm.name, vm.uuid);
                let result = Err(OpError::new(ErrorKind::InvalidRequest, e));
                finish(&mut slots, i, VmBackupOutcome { vm: name.clone(), host: Some(listed[h].uri.clone()), result });
            }
            Err(e) => finish(&mut slots, i, VmBackupOutcome { vm: name.clone(), host: None, result: Err(e) }),
        }
    }
    let slots = Mutex::new(slots);
    let listed = &listed;
    std::thread::scope(|scope| {
        for (h, queue) in queues.into_iter().enumerate() {
            if queue.is_empty() {
                continue;
            }
            let (host, slots, finish) = (&listed[h], &slots, &finish);
            let done = move |i: usize, result: OpResult<BackedUp>| {
                let o = VmBackupOutcome { vm: req.vms[i].clone(), host: Some(host.uri.clone()), result };
                finish(&mut slots.lock().unwrap(), i, o);
            };
            let hv = host.hv.as_ref().expect("a VM was located on a host that answered").as_ref();
            let workers = req.per_host.max(1).min(queue.len());
            let queue = std::sync::Arc::new(Mutex::new(queue.into_iter()));
            // Each worker has its own connection to the host: an SSH server allows a connection
            // only so many sessions at once (OpenSSH: MaxSessions, 10), and a VM's backup holds a
            // few (its watchdog, the files it reads).
            for _ in 0..workers {
                let queue = queue.clone();
                scope.spawn(move || {
                    let access = open_access(&host.uri, &req.options.work_dir, remote);
                    loop {
                        let Some((i, vm)) = queue.lock().unwrap().next() else { break };
                        let name = &req.vms[i];
                        let result = cancel.check(&format!("the backup of VM {name}")).and_then(|()| {
                            let _slot = match &req.host_limits {
                                Some(limits) => Some(limits.acquire(&host.uri, cancel, progress)?),
                                None => None,
                            };
                            let access = match &access {
                                Ok(a) => a.as_ref(),
                                Err(e) => return Err(OpError::new(e.kind(), anyhow::anyhow!("{e:#}"))),
                            };
                            let vm = still_there(vm, h, listed)?;
                            back_up_and_check(hv, access, repo, vm, req, helpers, progress, cancel)
                        });
                        done(i, result);
                    }
                });
            }
        }
    });
    slots.into_inner().unwrap().into_iter().flatten().collect()
}

/// The VM as its host sees it now: the run found it on host `h` when it started, maybe long
/// ago (VMs of a host are backed up a few at a time). It may have been started, stopped or moved
/// since; a VM now running on another host is not read here (its files would be read while
/// another host writes them).
fn still_there(vm: VmSummary, h: usize, listed: &[ListedHost]) -> OpResult<VmSummary> {
    let (now, fresh) = locate(&vm.uuid, listed)?;
    if now != h {
        return Err(OpError::new(
            ErrorKind::Conflict,
            anyhow::anyhow!(
                "VM {} moved from {} to {} during this run; back it up again",
                vm.name,
                listed[h].uri,
                listed[now].uri
            ),
        ));
    }
    Ok(fresh)
}

/// One VM's backup and its boot check.
#[allow(clippy::too_many_arguments)]
fn back_up_and_check(
    hv: &dyn Hypervisor,
    access: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: VmSummary,
    req: &BackupVmsRequest,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> OpResult<BackedUp> {
    let name = vm.name.clone();
    let (id, point, record) = backup_one(hv, access, repo, vm, &req.options, helpers, progress)?;
    let boot = req.boot_check.as_ref().map(|b| {
        cancel.check(&format!("the boot check of {name}"))?;
        // On the VM's own host, where its emulator is; the point is read from here.
        boot_check(hv, access, repo, &id, &point, b, helpers, progress)
    });
    Ok(BackedUp { id, point, record, boot })
}

/// One VM's backup, guarded by a watchdog while its guest runs (on the VM's host).
fn backup_one(
    hv: &dyn Hypervisor,
    access: &dyn HostAccess,
    repo: &Arc<Repository>,
    vm: VmSummary,
    options: &VmBackupOptions,
    helpers: &dyn Helpers,
    progress: &dyn Progress,
) -> Result<(PointId, RestorePoint, VmRecord), OpError> {
    let opts = VmBackupOptions { run_token: new_run_token(), ..options.clone() };
    // A shut-off VM has nothing to guard: no freeze, no pause, no backup job.
    let mut dog = if vm.state != VmState::ShutOff {
        let dog = helpers.start_watchdog(access, hv.uri(), &vm.uuid, opts.freeze_limit, &opts.run_token)?;
        progress.note(&format!("{}: watchdog running on {} {}", vm.name, access.name(), dog.mode()));
        dog
    } else {
        Watchdog::none()
    };
    let r = backup_vm(hv, access, repo, &vm, &opts, &mut dog, progress);
    if r.is_ok() {
        dog.done();
    }
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use cairn_hypervisor::fake::{Fake, Handle};
    use cairn_repo::vm_record::Method;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    #[test]
    fn a_host_full_of_backups_makes_the_next_wait_and_a_cancel_ends_the_wait() {
        let limits = HostLimits::new(1);
        let cancel = Cancel::new();
        let first = limits.acquire("qemu+ssh://a/system", &cancel, &cairn_engine::NoProgress).unwrap();
        // Another host is not held up.
        drop(limits.acquire("qemu+ssh://b/system", &cancel, &cairn_engine::NoProgress).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let slot = limits.acquire("qemu+ssh://a/system", &Cancel::new(), &cairn_engine::NoProgress);
                tx.send(slot.is_ok()).unwrap();
            });
            assert!(rx.recv_timeout(Duration::from_millis(700)).is_err(), "a second backup got the host's one slot");
            drop(first);
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        });
        assert_eq!(limits.busy("qemu+ssh://a/system"), 0);
        let held = limits.acquire("qemu+ssh://a/system", &cancel, &cairn_engine::NoProgress).unwrap();
        let waiting = Cancel::new();
        std::thread::scope(|s| {
            let w = s.spawn(|| limits.acquire("qemu+ssh://a/system", &waiting, &cairn_engine::NoProgress).is_err());
            std::thread::sleep(Duration::from_millis(200));
            waiting.cancel();
            assert!(w.join().unwrap(), "a cancelled wait went on");
        });
        drop(held);
    }

    /// Helpers that must not be reached.
    struct NoHelpers;
    impl Helpers for NoHelpers {
        fn start_nbd_server(&self, _: &str, _: &Path) -> anyhow::Result<u32> {
            panic!("no NBD server expected")
        }
        fn start_watchdog(
            &self,
            _: &dyn HostAccess,
            _: &str,
            _: &str,
            _: Duration,
            _: &str,
        ) -> anyhow::Result<Watchdog> {
            panic!("no watchdog expected")
        }
    }

    fn request(vms: &[&str]) -> BackupVmsRequest {
        BackupVmsRequest {
            host_limits: None,
            vms: vms.iter().map(|v| v.to_string()).collect(),
            options: VmBackupOptions {
                method: Method::Auto,
                full: false,
                skip_swap: true,
                pre_freeze: vec![],
                post_thaw: vec![],
                work_dir: PathBuf::from("/nonexistent"),
                compression_level: 1,
                workers: 1,
                oracle_dir: None,
                hold_point: None,
                run_token: String::new(),
                freeze_limit: Duration::from_secs(10),
            },
            boot_check: None,
            per_host: 1,
        }
    }

    /// Backs up `vms` on the one host that `fake` is.
    fn run(
        fake: &Arc<Fake>,
        repo: &Arc<Repository>,
        vms: &[&str],
        cancel: &Cancel,
        seen: &mut Vec<String>,
    ) -> Vec<VmBackupOutcome> {
        let connect = |_: &str| -> anyhow::Result<Box<dyn Hypervisor>> { Ok(Box::new(Handle(fake.clone()))) };
        backup_vms(
            &["fake:///".to_string()],
            &connect,
            &RemoteSettings::from_env(),
            repo,
            &request(vms),
            &NoHelpers,
            &cairn_engine::NoProgress,
            cancel,
            &mut |o| seen.push(o.vm.clone()),
        )
    }

    fn new_repository() -> (tempfile::TempDir, Arc<Repository>) {
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(cairn_storage::LocalBackend::new(t.path().join("repo")));
        let repo = Arc::new(Repository::init(backend, None).unwrap());
        (t, repo)
    }

    #[test]
    fn a_cancelled_request_touches_no_vm_and_says_so_for_each() {
        let (_t, repo) = new_repository();
        let fake = Arc::new(Fake::default());
        let cancel = Cancel::new();
        cancel.cancel();
        let mut seen = Vec::new();
        let outcomes = run(&fake, &repo, &["web", "db"], &cancel, &mut seen);
        assert_eq!(seen, ["web", "db"], "each outcome is reported as it is known");
        for o in &outcomes {
            let e = o.result.as_ref().err().expect("a cancelled VM backed up");
            assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        }
        assert!(fake.calls.lock().unwrap().is_empty(), "the hypervisor was called: {:?}", fake.calls.lock().unwrap());
        assert!(repo.list_points().unwrap().points.is_empty());
    }

    #[test]
    fn an_unknown_vm_is_not_found_and_the_others_go_on() {
        let (_t, repo) = new_repository();
        let fake = Arc::new(Fake::default());
        let outcomes = run(&fake, &repo, &["ghost", "phantom"], &Cancel::new(), &mut Vec::new());
        assert_eq!(outcomes.len(), 2, "one VM's failure stopped the others");
        for o in &outcomes {
            let e = o.result.as_ref().err().expect("an unknown VM backed up");
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains(&o.vm), "{e}");
        }
        assert_eq!(fake.count("find"), 2);
    }
}
