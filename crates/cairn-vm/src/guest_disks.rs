//! Disks only the guest sees (a LUN its own initiator attached, a pass-through disk), captured
//! through cairn's guest agent (`crates/cairn-agent`) in the same restore point as the host's
//! disks, at the same frozen instant.
//!
//! The order, within a VM backup (docs/design/guest-agent.md):
//! 1. [`GuestDisks::start`]: connect to the agent's channel, list its disks; those the host does
//!    not see are to be captured;
//! 2. [`GuestDisks::before_freeze`]: the agent prepares their views (copy-on-write space,
//!    devices);
//! 3. [`GuestDisks::at_freeze`], while the guest is frozen, right before the host's point: the
//!    agent switches each disk onto a device-mapper snapshot (milliseconds);
//! 4. after the thaw, [`GuestDisks::inputs`]: when the last point stored a hash list, the agent
//!    hashes every 64 KiB block of its views and only blocks whose hash differs are read (without
//!    a list, every block, in one pass) through [`AgentSource`], first in the same `backup_with`
//!    as the host's disks;
//! 5. once the last hash list is read, the views are released (on drop at the latest).
//!
//! [`restore_onto_device`] is the way back: a guest disk of a point written onto its disk
//! inside the running VM, then read back.
//!
//! The agent is not trusted: every byte stored is hashed by the engine as always, the hash list
//! a point keeps is computed here from the bytes received (never the agent's), every reply is
//! checked to be its request's answer to the byte, and every wait has a deadline. A failure
//! before the reads (no answer, no snapshot) leaves the guest's disks out of the point with the
//! reason (`not_captured`); a failure while reading fails the backup, which leaves nothing.

use anyhow::{anyhow, bail, Context, Result};
use cairn_agent_proto::{self as proto, BlockHash, DiskInfo, Message, BLOCK};
use cairn_engine::backup::DiskInput;
use cairn_engine::ranges::Range;
use cairn_engine::source::{Allocation, Extent, Source};
use cairn_hypervisor::{Hypervisor, VmSummary};
use cairn_repo::vm_record::{GuestDiskRecord, NotCaptured, VmRecord};
use cairn_repo::{PointId, Repository, RestorePoint};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::HostAccess;

pub use cairn_repo::vm_record::{ROLE_GUEST_DISK as ROLE_DISK, ROLE_GUEST_HASHES as ROLE_HASHES};
/// A hash list entry for a block the host did not read whole: never equal to an agent's hash,
/// so the block is read next time.
const UNKNOWN: [u8; 32] = [0xff; 32];
/// A hash list entry for a block of zeros.
const ZERO: [u8; 32] = [0; 32];

const HELLO_WAIT: Duration = Duration::from_secs(3);
const LIST_WAIT: Duration = Duration::from_secs(10);
const PREPARE_WAIT: Duration = Duration::from_secs(30);
/// The longest a snapshot may take, whatever is left of the freeze budget.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);
const HASHES_WAIT: Duration = Duration::from_secs(120);
/// For at most 1 MiB: an agent slower than 100 KiB/s is taken for stalled.
const READ_WAIT: Duration = Duration::from_secs(10);
/// The largest guest disk captured: its hash list (32 bytes per 64 KiB) is held in memory.
const MAX_GUEST_DISK: u64 = 1 << 40;
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// What [`GuestSurvey::cairn_agent`] says of a VM without the agent's channel.
pub const NO_CHANNEL: &str = "no channel (org.cairn.agent.0)";

/// The point's image of guest disk `disk` (its hash list is this, plus `.hashes`).
pub fn image_name(disk: &str) -> String {
    format!("guest-{disk}")
}

/// A hash list entry for `block` as the host holds it.
fn entry_of(block: &[u8]) -> [u8; 32] {
    if block.iter().all(|&x| x == 0) {
        ZERO
    } else {
        *blake3::hash(block).as_bytes()
    }
}

/// A hash list entry for what the agent says of a block.
fn entry_said(h: &BlockHash) -> [u8; 32] {
    match h {
        BlockHash::Zero => ZERO,
        BlockHash::Blake3(x) => *x,
    }
}

/// Connects to the cairn-agent of running VM `vm`, through its channel's socket on its host.
fn connect_to_agent(host: &dyn HostAccess, vm: &VmSummary) -> Result<AgentClient> {
    let socket =
        vm.config.cairn_agent_socket.as_deref().filter(|_| vm.config.cairn_agent_channel).with_context(|| {
            format!("VM {} has no cairn-agent channel (org.cairn.agent.0), or it does not run", vm.name)
        })?;
    match host.reach(&cairn_nbd::NbdAddress::unix(socket, ""))?.transport {
        cairn_nbd::Transport::Unix { socket } => AgentClient::connect(&socket),
        cairn_nbd::Transport::Tcp { .. } => bail!("the agent's channel is not a socket here"),
    }
}

/// A session with the agent over its channel: one request at a time, each under a deadline.
pub struct AgentClient {
    stream: UnixStream,
    next_id: u32,
    /// The agent's own version text.
    pub agent: String,
    /// Set once a reply was late or wrong: the stream may hold stale bytes, so nothing more is
    /// asked in this session.
    broken: Option<String>,
}

impl AgentClient {
    /// Connects to the channel's socket and says hello; bytes an earlier session left are skipped.
    pub fn connect(socket: &Path) -> Result<AgentClient> {
        let stream = connect_within(socket, HELLO_WAIT)
            .with_context(|| format!("cannot connect to the agent's channel {}", socket.display()))?;
        AgentClient::over(stream)
    }

    /// Says hello over a connected stream.
    fn over(stream: UnixStream) -> Result<AgentClient> {
        let mut nonce = [0u8; 16];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut nonce))?;
        let mut c = AgentClient { stream, next_id: 1, agent: String::new(), broken: None };
        let hello = Message::Hello { versions: vec![proto::VERSION], nonce };
        proto::write_frame(&mut c.stream, 0, &hello)?;
        let mut r = DeadlineReader { stream: &c.stream, until: Instant::now() + HELLO_WAIT };
        let reply = proto::resync(&mut r, &nonce).map_err(|e| match e {
            proto::ProtoError::Io(e) if is_timeout(&e) => anyhow!(
                "no answer from cairn-agent within {} s (is it running in the guest? is another program \
                 connected to the channel?)",
                HELLO_WAIT.as_secs()
            ),
            e => anyhow!("the agent's hello: {e}"),
        })?;
        if let Message::HelloReply { version, agent, .. } = reply {
            if version != proto::VERSION {
                bail!("{agent} speaks version {version} of the protocol, cairn {}", proto::VERSION);
            }
            c.agent = agent;
        }
        Ok(c)
    }

    /// Sends `request`, waits at most `wait` for its answer; an agent's error is an error.
    fn call(&mut self, request: Message, wait: Duration) -> Result<Message> {
        if let Some(why) = &self.broken {
            bail!("the agent's session ended: {why}");
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let answer = (|| -> Result<Message> {
            self.stream.set_write_timeout(Some(wait))?;
            proto::write_frame(&mut self.stream, id, &request)?;
            let mut r = DeadlineReader { stream: &self.stream, until: Instant::now() + wait };
            let (got, reply) = proto::read_frame(&mut r).map_err(|e| match e {
                proto::ProtoError::Io(e) if is_timeout(&e) => {
                    anyhow!("no answer to {:?} within {} s", request.kind(), wait.as_secs())
                }
                e => anyhow!("{e}"),
            })?;
            proto::check_reply(id, &request, got, &reply)?;
            Ok(reply)
        })();
        match answer {
            Ok(Message::Error { code, message }) => {
                bail!("the agent refused {:?} (code {code}): {message}", request.kind())
            }
            Ok(m) => Ok(m),
            Err(e) => {
                self.broken = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    pub fn disks(&mut self) -> Result<Vec<DiskInfo>> {
        match self.call(Message::ListDisks, LIST_WAIT)? {
            Message::Disks(d) => Ok(d),
            _ => unreachable!("check_reply lets only Disks answer ListDisks"),
        }
    }

    fn hashes(&mut self, disk: &str, first_block: u64, count: u32) -> Result<Vec<BlockHash>> {
        match self.call(Message::Hashes { disk: disk.into(), first_block, count }, HASHES_WAIT)? {
            Message::HashList(h) => Ok(h),
            _ => unreachable!("check_reply lets only HashList answer Hashes"),
        }
    }

    fn read(&mut self, disk: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let len = (out.len() - done).min(proto::MAX_READ as usize);
            let at = offset + done as u64;
            match self.call(Message::Read { disk: disk.into(), offset: at, len: len as u32 }, READ_WAIT)? {
                Message::Data(d) => out[done..done + len].copy_from_slice(&d),
                _ => unreachable!("check_reply lets only Data of the length asked answer Read"),
            }
            done += len;
        }
        Ok(())
    }

    fn done(&mut self, request: Message, wait: Duration) -> Result<()> {
        self.call(request, wait).map(|_| ())
    }
}

/// Connects to a unix socket, giving up after `wait`: QEMU's channel serves one client at a time,
/// and a blocking connect to it waits while its backlog is full (another session holds it).
fn connect_within(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in bounds below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the descriptor is owned by the UnixStream made from it.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let until = Instant::now() + wait;
    loop {
        // SAFETY: addr is a valid sockaddr_un of the size given.
        let r = unsafe {
            libc::connect(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        // A full backlog (EAGAIN) is retried until the deadline.
        if e.raw_os_error() != Some(libc::EAGAIN) || Instant::now() >= until {
            return Err(if e.raw_os_error() == Some(libc::EAGAIN) {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the channel is busy (another session holds it)")
            } else {
                e
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The client, even if a thread panicked while holding it (its state is then `broken` or
/// consistent: every call either completes or marks it).
fn lock(c: &Mutex<AgentClient>) -> std::sync::MutexGuard<'_, AgentClient> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads from the stream until a deadline for the whole reply (a socket timeout alone would
/// let an agent that trickles a byte at a time hold the backup forever).
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    until: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        match (&mut &*self.stream).read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(std::io::ErrorKind::TimedOut.into()),
            Ok(0) if !buf.is_empty() => {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the channel closed"))
            }
            r => r,
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

/// What the backup of one VM does with the disks only its guest sees.
pub struct GuestDisks {
    client: Option<Arc<Mutex<AgentClient>>>,
    /// The disks to capture, as the agent listed them.
    capture: Vec<DiskInfo>,
    prepared: bool,
    taken: bool,
    agent: String,
    not_captured: Vec<NotCaptured>,
}

impl GuestDisks {
    /// Nothing to capture (a VM without guest disks, or a method that cannot freeze the guest).
    pub fn none() -> GuestDisks {
        GuestDisks {
            client: None,
            capture: Vec::new(),
            prepared: false,
            taken: false,
            agent: String::new(),
            not_captured: Vec::new(),
        }
    }

    /// Looks for the disks only the guest sees: through cairn's agent when the VM has its
    /// channel, else through the guest agent's list of disks. `frozen`: the method freezes the
    /// guest (only then can its disks be taken at the host's instant).
    pub fn start(hv: &dyn Hypervisor, host: &dyn HostAccess, vm: &VmSummary, frozen: bool) -> GuestDisks {
        let mut g = GuestDisks::none();
        if vm.config.cairn_agent_socket.is_none() || !vm.config.cairn_agent_channel {
            g.not_captured = seen_without_agent(hv, vm);
            return g;
        }
        let mut client = match connect_to_agent(host, vm) {
            Ok(c) => c,
            Err(e) => {
                let mut missing = seen_without_agent(hv, vm);
                if missing.is_empty() {
                    // The channel is there but nobody answers: say so, without a disk name.
                    missing.push(NotCaptured {
                        disk: "(unknown)".into(),
                        transport: String::new(),
                        why: format!("{e:#}"),
                    });
                }
                for m in &mut missing {
                    m.why = format!("cairn-agent did not answer: {e:#}");
                }
                g.not_captured = missing;
                return g;
            }
        };
        g.agent = client.agent.clone();
        let disks = match client.disks() {
            Ok(d) => d,
            Err(e) => {
                g.not_captured.push(NotCaptured {
                    disk: "(all)".into(),
                    transport: String::new(),
                    why: format!("{e:#}"),
                });
                return g;
            }
        };
        let mut seen = std::collections::HashSet::new();
        for d in disks.into_iter().filter(|d| !proto::host_visible(&d.transport)) {
            let why = if !d.snapshot_ready {
                Some(d.reason.clone())
            } else if !frozen {
                Some("the backup method does not freeze the guest, so its disks cannot be taken at the host's instant (use app-consistent)".into())
            } else if d.name.len() > 48 || d.name.ends_with(".hashes") || !seen.insert(d.name.clone()) {
                // Its images would collide with another's (`guest-NAME`, `guest-NAME.hashes`).
                Some("its name is too long, ends in .hashes, or is another disk's".into())
            } else if d.size == 0 || d.size > MAX_GUEST_DISK {
                Some(format!(
                    "its size ({} bytes) is out of bounds (guest disks up to {} GiB: its hash list is held in memory)",
                    d.size,
                    MAX_GUEST_DISK >> 30
                ))
            } else {
                None
            };
            match why {
                Some(why) => {
                    g.not_captured.push(NotCaptured { disk: d.name.clone(), transport: d.transport.clone(), why })
                }
                None => g.capture.push(d),
            }
        }
        g.client = Some(Arc::new(Mutex::new(client)));
        g
    }

    /// [`GuestDisks::start`] for a VM backup, which says what it found.
    pub fn for_backup(
        hv: &dyn Hypervisor,
        host: &dyn HostAccess,
        vm: &VmSummary,
        frozen: bool,
        progress: &dyn cairn_engine::progress::Progress,
    ) -> GuestDisks {
        let g = GuestDisks::start(hv, host, vm, frozen);
        if g.any() {
            let names: Vec<&str> = g.capture.iter().map(|d| d.name.as_str()).collect();
            progress.note(&format!("{}: guest disk(s) {} through {}", vm.name, names.join(", "), g.agent));
        }
        g
    }

    /// Whether there is anything to capture.
    pub fn any(&self) -> bool {
        self.client.is_some() && !self.capture.is_empty()
    }

    fn names(&self) -> Vec<String> {
        self.capture.iter().map(|d| d.name.clone()).collect()
    }

    /// Leaves every disk to capture out of the point, with the reason. The views are released
    /// later, never here: this may run while the guest is frozen.
    fn leave_out(&mut self, why: String) {
        for d in self.capture.drain(..) {
            self.not_captured.push(NotCaptured { disk: d.name, transport: d.transport, why: why.clone() });
        }
    }

    /// Before the pre-freeze commands: the agent makes ready what the views need (again, if an
    /// earlier try prepared or took them: a retried point must have its guest disks from its own
    /// instant).
    pub fn before_freeze(&mut self) {
        if !self.any() {
            return;
        }
        if self.prepared || self.taken {
            self.release();
        }
        let names = self.names();
        let client = self.client.clone().expect("any() holds a client");
        let r = lock(&client).done(Message::Prepare { disks: names }, PREPARE_WAIT);
        match r {
            Ok(()) => self.prepared = true,
            Err(e) => self.leave_out(format!("the agent could not prepare the snapshot: {e:#}")),
        }
    }

    /// While the guest is frozen: the agent takes the views, within `budget` (what is left of the
    /// freeze limit, at most 2 s). A failure leaves the guest's disks out, never the guest frozen:
    /// nothing more is asked of the agent until the guest is thawed.
    pub fn at_freeze(&mut self, budget: Duration) {
        if !self.any() || !self.prepared {
            return;
        }
        let wait = budget.min(SNAPSHOT_WAIT).max(Duration::from_millis(100));
        let names = self.names();
        let client = self.client.clone().expect("any() holds a client");
        let r = lock(&client).done(Message::Snapshot { disks: names }, wait);
        match r {
            Ok(()) => self.taken = true,
            Err(e) => {
                self.leave_out(format!("the agent could not take the snapshot while the guest was frozen: {e:#}"))
            }
        }
    }

    /// After the thaw: one input per guest disk and one per hash list, each list right after its
    /// disk (the engine backs up a point's inputs one after the other). They go first in the
    /// point, so the views live only as long as their reads: the last list, once read, releases
    /// them. The record says what was captured and what was not.
    pub fn inputs(
        &mut self,
        repo: &Arc<Repository>,
        last: Option<&(PointId, RestorePoint)>,
        record: &mut VmRecord,
    ) -> Result<Vec<DiskInput>> {
        let mut inputs = Vec::new();
        if self.any() && self.taken {
            match self.plan_reads(repo, last) {
                Ok(planned) => {
                    for (input, hashes, rec) in planned {
                        inputs.push(input);
                        inputs.push(hashes);
                        record.guest_disks.push(rec);
                    }
                }
                Err(e) => {
                    self.leave_out(format!("the agent could not hash its snapshot: {e:#}"));
                    self.release();
                }
            }
        } else {
            self.release(); // prepared, or a snapshot that failed: nothing to read
        }
        for m in &self.not_captured {
            record.warnings.push(format!("guest disk {} is not in this point: {}", m.disk, m.why));
        }
        record.not_captured.extend(self.not_captured.iter().cloned());
        Ok(inputs)
    }

    fn plan_reads(
        &mut self,
        repo: &Arc<Repository>,
        last: Option<&(PointId, RestorePoint)>,
    ) -> Result<Vec<(DiskInput, DiskInput, GuestDiskRecord)>> {
        let client = self.client.clone().expect("any() holds a client");
        let mut out = Vec::new();
        let count = self.capture.len();
        for (i, d) in self.capture.iter().enumerate() {
            let image = image_name(&d.name);
            let hashes_image = format!("{image}.hashes");
            let stored = last.and_then(|(_, p)| stored_hashes(repo, p, &image, &hashes_image, d.size));
            let blocks = d.size.div_ceil(BLOCK);
            let mut list = vec![UNKNOWN; blocks as usize];
            let mut zero = vec![false; blocks as usize];
            let mut changed: Vec<Range> = Vec::new();
            // The agent's hashes a request at a time, compared as they come: only the host's own
            // list is held whole. Without a list to compare with, there is nothing to skip: the
            // view is read once, whole (zeros are found by the engine), not hashed first.
            let mut first = if stored.is_some() { 0 } else { blocks };
            if stored.is_none() {
                changed.push(Range { offset: 0, length: d.size });
            }
            while first < blocks {
                let n = (blocks - first).min(proto::MAX_HASHES as u64);
                let agent = lock(&client).hashes(&d.name, first, n as u32)?;
                let old = stored.as_ref().map(|o| &o[first as usize..(first + n) as usize]);
                let span = first as usize..(first + n) as usize;
                plan_blocks(&agent, old, first, d.size, &mut list[span.clone()], &mut changed);
                for (z, h) in zero[span].iter_mut().zip(&agent) {
                    *z = matches!(h, BlockHash::Zero);
                }
                first += n;
            }
            let changed = cairn_engine::ranges::normalize(changed);
            drop(stored);
            let list = Arc::new(Mutex::new(list));
            let source = AgentSource {
                client: client.clone(),
                disk: d.name.clone(),
                size: d.size,
                zero,
                queue: VecDeque::new(),
                list: list.clone(),
            };
            let incremental = last.is_some_and(|(_, p)| stored_hashes_present(p, &image, &hashes_image, d.size));
            let mut input = DiskInput::new(&image, Box::new(source));
            input.role = Some(ROLE_DISK.into());
            input.path = Some(format!("guest:{}", d.name));
            let changed_bytes: u64 = changed.iter().map(|r| r.length).sum();
            if incremental {
                input.changed = Some(changed);
            }
            let release = (i + 1 == count).then(|| client.clone());
            let mut hashes =
                DiskInput::new(&hashes_image, Box::new(HashListSource { list, release, pending: VecDeque::new() }));
            hashes.role = Some(ROLE_HASHES.into());
            let rec = GuestDiskRecord {
                disk: d.name.clone(),
                image,
                hashes_image,
                transport: d.transport.clone(),
                serial: d.serial.clone(),
                size: d.size,
                read: if incremental { "changed" } else { "full" }.into(),
                reason: if incremental {
                    format!("{changed_bytes} bytes in blocks whose hash differs from the last point's")
                } else {
                    "no hash list from an earlier point of this disk".into()
                },
            };
            out.push((input, hashes, rec));
        }
        Ok(out)
    }

    /// Drops the agent's views (best effort: the agent also drops them when the channel closes).
    pub fn release(&mut self) {
        if let Some(c) = &self.client {
            if self.prepared || self.taken {
                let _ = lock(c).done(Message::Release, RELEASE_WAIT);
            }
        }
        self.prepared = false;
        self.taken = false;
    }
}

impl Drop for GuestDisks {
    fn drop(&mut self) {
        self.release();
        if let Some(c) = &self.client {
            let mut c = lock(c);
            let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = proto::write_frame(&mut c.stream, 0, &Message::Bye);
            let _ = c.stream.flush();
        }
    }
}

/// Plans blocks `first..first + agent.len()` of a guest disk of `size` bytes: into `list` (their
/// entries), what the host will believe the point holds: zeros where the agent says so, the
/// last point's hash where the agent's equals it (kept from the last point), else [`UNKNOWN`]
/// until read; into `changed`, the blocks to read. Without a stored list, every block not zero
/// is read.
fn plan_blocks(
    agent: &[BlockHash],
    stored: Option<&[[u8; 32]]>,
    first: u64,
    size: u64,
    list: &mut [[u8; 32]],
    changed: &mut Vec<Range>,
) {
    for (i, h) in agent.iter().enumerate() {
        let now = entry_said(h);
        if stored.is_some_and(|old| old.get(i) == Some(&now)) {
            list[i] = now;
            continue;
        }
        if now == ZERO {
            list[i] = ZERO; // recorded as zeros from the allocation, never read
        }
        let offset = (first + i as u64) * BLOCK;
        changed.push(Range { offset, length: BLOCK.min(size - offset) });
    }
}

/// Whether the last point holds `image` (a guest disk of `size` bytes) and its hash list.
fn stored_hashes_present(last: &RestorePoint, image: &str, hashes: &str, size: u64) -> bool {
    let blocks = size.div_ceil(BLOCK);
    last.disks.iter().any(|d| d.name == image && d.role.as_deref() == Some(ROLE_DISK) && d.size == size)
        && last
            .disks
            .iter()
            .any(|d| d.name == hashes && d.role.as_deref() == Some(ROLE_HASHES) && d.size == blocks * 32)
}

/// The hash list the last point stored for `image`, when it has both images at this size (read
/// back checked against its blocks' hashes, like every read).
fn stored_hashes(
    repo: &Arc<Repository>,
    last: &RestorePoint,
    image: &str,
    hashes: &str,
    size: u64,
) -> Option<Vec<[u8; 32]>> {
    if !stored_hashes_present(last, image, hashes, size) {
        return None;
    }
    let list = last.disks.iter().find(|d| d.name == hashes)?;
    let reader = cairn_engine::serve::PointDisk::new(repo.clone(), list.clone());
    let mut out: Vec<[u8; 32]> = Vec::with_capacity((list.size / 32) as usize);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < list.size {
        let n = (list.size - at).min(buf.len() as u64) as usize;
        reader.read_exact_at(at, &mut buf[..n]).ok()?;
        out.extend(buf[..n].chunks_exact(32).map(|c| <[u8; 32]>::try_from(c).expect("32 bytes")));
        at += n as u64;
    }
    Some(out)
}

/// Disks the guest agent (qemu-ga) lists that the hypervisor does not provide: what a backup
/// without cairn's agent leaves out. Pass-through devices are named by the hypervisor.
fn seen_without_agent(hv: &dyn Hypervisor, vm: &VmSummary) -> Vec<NotCaptured> {
    let mut out = Vec::new();
    if let Ok(doc) = hv.config_document(&vm.uuid) {
        for dev in hv.host_devices(&doc).unwrap_or_default() {
            out.push(NotCaptured {
                disk: dev,
                transport: "pass-through".into(),
                why: "a host device passed through to the guest: the host cannot read it; install cairn-agent in the guest".into(),
            });
        }
    }
    if vm.agent != cairn_hypervisor::AgentStatus::Answering {
        return out;
    }
    let disks = hv.agent_disks(&vm.uuid).unwrap_or_default();
    let is_dependency: Vec<&str> = disks.iter().flat_map(|d| d.dependencies.iter().map(String::as_str)).collect();
    for d in &disks {
        let kernel = d.name.rsplit('/').next().unwrap_or("");
        let software = ["dm-", "md", "loop", "zram", "ram", "sr"].iter().any(|p| kernel.starts_with(p));
        if software || d.on_pci || !d.dependencies.is_empty() && !is_dependency.contains(&d.name.as_str()) {
            continue;
        }
        out.push(NotCaptured {
            disk: d.name.clone(),
            transport: d.bus_type.clone().unwrap_or_else(|| if kernel.starts_with("nbd") { "nbd".into() } else { String::new() }),
            why: "the guest attached it itself (no device of the VM holds it): install cairn-agent in the guest to back it up".into(),
        });
    }
    out
}

/// A guest disk's view, read through the agent. Blocks the agent says are zeros are never asked
/// for; every block read whole is hashed here into the list the point keeps.
struct AgentSource {
    client: Arc<Mutex<AgentClient>>,
    disk: String,
    size: u64,
    zero: Vec<bool>,
    queue: VecDeque<(u64, usize, Vec<u8>)>,
    list: Arc<Mutex<Vec<[u8; 32]>>>,
}

impl Source for AgentSource {
    fn describe(&self) -> String {
        format!("guest disk {} (cairn-agent)", self.disk)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let b = (at / BLOCK) as usize;
            let next = ((b as u64 + 1) * BLOCK).min(end);
            let kind = if self.zero.get(b).copied().unwrap_or(false) { Allocation::Zero } else { Allocation::Data };
            match out.last_mut() {
                Some(e) if e.kind == kind && e.offset + e.length == at => e.length += next - at,
                _ => out.push(Extent { offset: at, length: next - at, kind }),
            }
            at = next;
        }
        Ok(out)
    }
    fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()> {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.size) {
            bail!("a read past the end of guest disk {}", self.disk);
        }
        self.queue.push_back((offset, len, buf));
        Ok(())
    }
    fn next(&mut self) -> Result<Vec<u8>> {
        let (offset, len, mut buf) = self.queue.pop_front().context("no read was submitted")?;
        buf.resize(len, 0);
        lock(&self.client)
            .read(&self.disk, offset, &mut buf)
            .with_context(|| format!("reading guest disk {} through cairn-agent", self.disk))?;
        let mut list = self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let end = offset + len as u64;
        let mut b = offset.div_ceil(BLOCK);
        while b * BLOCK < end {
            let start = b * BLOCK;
            let block_end = (start + BLOCK).min(self.size);
            if block_end > end {
                break; // a block only partly in this read: left UNKNOWN, read again next time
            }
            let block = &buf[(start - offset) as usize..(block_end - offset) as usize];
            list[b as usize] = entry_of(block);
            b += 1;
        }
        Ok(buf)
    }
    fn finish(&mut self) -> Result<()> {
        if !self.queue.is_empty() {
            bail!("reads of guest disk {} were left unanswered", self.disk);
        }
        Ok(())
    }
}

/// A guest disk's hash list as the host computed it, read once its disk's reads are done (the
/// engine backs up a point's disks one after the other, the list after its disk). The last
/// one releases the agent's views: every guest disk has been read.
struct HashListSource {
    list: Arc<Mutex<Vec<[u8; 32]>>>,
    release: Option<Arc<Mutex<AgentClient>>>,
    pending: VecDeque<Vec<u8>>,
}

impl Source for HashListSource {
    fn describe(&self) -> String {
        "a guest disk's block hashes".into()
    }
    fn size(&self) -> u64 {
        self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() as u64 * 32
    }
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length: len.min(self.size().saturating_sub(offset)), kind: Allocation::Data }])
    }
    fn submit(&mut self, offset: u64, len: usize, mut buf: Vec<u8>) -> Result<()> {
        if let Some(c) = self.release.take() {
            // Best effort: the agent also drops its views when the session ends.
            let _ = lock(&c).done(Message::Release, RELEASE_WAIT);
        }
        let list = self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let end = offset.checked_add(len as u64).filter(|&e| e <= list.len() as u64 * 32);
        let end = end.context("a read past the hash list's end")?;
        buf.clear();
        for entry in (offset / 32)..end.div_ceil(32) {
            let e = &list[entry as usize];
            let from = offset.saturating_sub(entry * 32).min(32) as usize;
            let to = (end - entry * 32).min(32) as usize;
            buf.extend_from_slice(&e[from..to]);
        }
        self.pending.push_back(buf);
        Ok(())
    }
    fn next(&mut self) -> Result<Vec<u8>> {
        self.pending.pop_front().context("no read was submitted")
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What [`restore_onto_device`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceRestore {
    pub disk: String,
    pub size: u64,
    /// Bytes sent as data, and as zeros (a request each run, no data).
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Blocks whose hash the agent read back from the device and found equal (all of them).
    pub verified_blocks: u64,
    pub duration_ms: u64,
}

/// Writes guest disk `disk` of VM point `point` back onto that disk in the running VM `vm`,
/// through its agent: the disk must not be mounted or open in the guest (the agent opens it
/// exclusively) and must have the point's size. Every block read from the repository is
/// checked against its hash; afterwards the agent hashes the device and every block must equal
/// what was sent.
pub fn restore_onto_device(
    host: &dyn HostAccess,
    vm: &VmSummary,
    repo: &Arc<Repository>,
    point: &RestorePoint,
    disk: &str,
    progress: &dyn cairn_engine::progress::Progress,
) -> Result<DeviceRestore> {
    let started = Instant::now();
    let image_name = image_name(disk);
    let image = point
        .disks
        .iter()
        .find(|d| d.name == image_name && d.role.as_deref() == Some(ROLE_DISK))
        .with_context(|| {
            let have: Vec<&str> = point
                .disks
                .iter()
                .filter(|d| d.role.as_deref() == Some(ROLE_DISK))
                .map(|d| d.name.trim_start_matches("guest-"))
                .collect();
            format!(
                "the point holds no guest disk {disk} (it holds: {})",
                if have.is_empty() { "none".into() } else { have.join(", ") }
            )
        })?
        .clone();
    if image.size > MAX_GUEST_DISK {
        bail!(
            "{disk} is over {} GiB: restore it to a file (restore vm, or restore image --disk {image_name})",
            MAX_GUEST_DISK >> 30
        );
    }
    let mut c = connect_to_agent(host, vm)?;
    let found = c.disks()?.into_iter().find(|d| d.name == disk);
    let found = found.with_context(|| format!("cairn-agent in {} sees no disk {disk}", vm.name))?;
    if found.size != image.size {
        bail!(
            "{disk} in {} is {} bytes and the point's is {}: a restore onto it needs the same size (or restore it to a file with restore vm)",
            vm.name,
            found.size,
            image.size
        );
    }
    // The same LUN, when both sides know its serial: a disk of the same name and size may be
    // another LUN now.
    let recorded =
        VmRecord::of(point).and_then(|r| r.guest_disks.into_iter().find(|g| g.disk == disk)).map(|g| g.serial);
    if let Some(serial) = recorded.filter(|s| !s.is_empty() && !found.serial.is_empty() && *s != found.serial) {
        bail!(
            "{disk} in {} has serial {}, the point's had serial {serial}: not the same LUN; nothing was written",
            vm.name,
            found.serial
        );
    }
    c.done(Message::OpenWrite { disk: disk.into() }, PREPARE_WAIT)?;
    let written = write_and_check(&mut c, repo, &image, disk, progress);
    let (data_bytes, zero_bytes) = written.with_context(|| {
        format!("{disk} in {} is partly overwritten: do not mount it there; restore it again", vm.name)
    })?;
    let blocks = image.size.div_ceil(BLOCK);
    let _ = proto::write_frame(&mut c.stream, 0, &Message::Bye);
    Ok(DeviceRestore {
        disk: disk.into(),
        size: image.size,
        data_bytes,
        zero_bytes,
        verified_blocks: blocks,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Writes `image` onto the disk open for writing through `c`, then has the agent hash the device
/// and compares every block with what was sent; closes it. The first MiB (where a filesystem
/// keeps its superblock) is zeroed first and written last: a restore cut short leaves a disk
/// nothing mounts, never a mix of old and new that looks whole. Returns (data, zero) bytes.
fn write_and_check(
    c: &mut AgentClient,
    repo: &Arc<Repository>,
    image: &cairn_repo::DiskImage,
    disk: &str,
    progress: &dyn cairn_engine::progress::Progress,
) -> Result<(u64, u64)> {
    let reader = cairn_engine::serve::PointDisk::new(repo.clone(), image.clone());
    let blocks = image.size.div_ceil(BLOCK);
    let mut sent = vec![ZERO; blocks as usize];
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    let chunk = proto::MAX_READ as u64;
    let head = image.size.min(chunk);
    c.done(Message::Zero { offset: 0, len: head }, READ_WAIT)?;
    progress.start(&format!("writing {disk}"), image.size);
    let mut buf = vec![0u8; chunk as usize];
    // Every chunk but the first, then the first.
    let offsets = (1..image.size.div_ceil(chunk)).map(|i| i * chunk).chain(std::iter::once(0));
    for at in offsets {
        if progress.cancelled() {
            bail!("cancelled");
        }
        let n = (image.size - at).min(chunk) as usize;
        reader.read_exact_at(at, &mut buf[..n])?;
        for (i, block) in buf[..n].chunks(BLOCK as usize).enumerate() {
            let b = (at / BLOCK) as usize + i;
            sent[b] = entry_of(block);
        }
        if buf[..n].iter().all(|&x| x == 0) {
            c.done(Message::Zero { offset: at, len: n as u64 }, READ_WAIT)?;
            zero_bytes += n as u64;
        } else {
            c.done(Message::Write { offset: at, data: buf[..n].to_vec() }, READ_WAIT)?;
            data_bytes += n as u64;
        }
        progress.advance(n as u64);
    }
    progress.finish();
    // Read back from the device (flushed, its cache dropped), before it is let go.
    let mut first = 0u64;
    while first < blocks {
        let n = (blocks - first).min(proto::MAX_HASHES as u64);
        let got = c.hashes(disk, first, n as u32)?;
        for (i, h) in got.iter().enumerate() {
            let b = first as usize + i;
            if entry_said(h) != sent[b] {
                bail!("the disk does not hold what was written at block {b} (offset {})", b as u64 * BLOCK);
            }
        }
        first += n;
    }
    c.done(Message::CloseWrite, PREPARE_WAIT)?;
    Ok((data_bytes, zero_bytes))
}

/// A disk only the guest sees, as `vm list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GuestDiskView {
    pub disk: String,
    pub transport: String,
    /// Bytes, when the agent said.
    pub size: Option<u64>,
    /// Whether an app-consistent backup captures it (through cairn's agent).
    pub captured: bool,
    /// Why not, when it is not.
    pub why: String,
}

/// What a VM's backup would do with the disks only its guest sees.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GuestSurvey {
    /// `cairn-agent VERSION` when it answered; else why not (`no channel`, its error).
    pub cairn_agent: String,
    pub disks: Vec<GuestDiskView>,
}

/// Asks the VM's agents (cairn's through `host`, else the guest agent) which disks only the
/// guest sees, as an app-consistent backup would. `host` none: cairn's agent is not asked
/// (a host this process does not reach), only the guest agent.
pub fn survey(hv: &dyn Hypervisor, host: Option<&dyn HostAccess>, vm: &VmSummary) -> GuestSurvey {
    let channel = vm.config.cairn_agent_channel;
    let g = match host {
        Some(host) if channel => GuestDisks::start(hv, host, vm, true),
        _ => {
            let mut g = GuestDisks::none();
            g.not_captured = seen_without_agent(hv, vm);
            g
        }
    };
    let cairn_agent = if !g.agent.is_empty() {
        g.agent.clone()
    } else if !channel {
        NO_CHANNEL.into()
    } else if host.is_none() {
        "channel present (asked at backup time on that host)".into()
    } else {
        "channel present, not answering".into()
    };
    let mut disks: Vec<GuestDiskView> = g
        .capture
        .iter()
        .map(|d| GuestDiskView {
            disk: d.name.clone(),
            transport: d.transport.clone(),
            size: Some(d.size),
            captured: true,
            why: String::new(),
        })
        .collect();
    disks.extend(g.not_captured.iter().map(|m| GuestDiskView {
        disk: m.disk.clone(),
        transport: m.transport.clone(),
        size: None,
        captured: false,
        why: m.why.clone(),
    }));
    GuestSurvey { cairn_agent, disks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A fake agent on the other end of a socket pair: answers the hello, then runs `script`
    /// on each request it reads.
    fn fake(script: impl Fn(&mut UnixStream, u32, Message) + Send + 'static) -> AgentClient {
        let (host, mut agent) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            while let Ok((id, m)) = proto::read_frame(&mut agent) {
                if let Message::Hello { nonce, .. } = m {
                    let reply = Message::HelloReply { version: proto::VERSION, nonce, agent: "fake".into() };
                    proto::write_frame(&mut agent, id, &reply).unwrap();
                } else {
                    script(&mut agent, id, m);
                }
            }
        });
        AgentClient::over(host).unwrap()
    }

    #[test]
    fn a_reply_of_another_length_or_to_another_request_ends_the_session() {
        let mut c = fake(|a, id, m| {
            if let Message::Read { len, .. } = m {
                proto::write_frame(a, id, &Message::Data(vec![7; len as usize - 1])).unwrap();
            }
        });
        let mut buf = vec![0u8; 4096];
        let e = c.read("lun0", 0, &mut buf).unwrap_err();
        assert!(format!("{e:#}").contains("4095 bytes for 4096"), "{e:#}");
        let again = c.read("lun0", 0, &mut buf).unwrap_err();
        assert!(format!("{again:#}").contains("session ended"), "{again:#}");

        let mut c = fake(|a, id, _| proto::write_frame(a, id + 1, &Message::Done).unwrap());
        let e = c.done(Message::Release, Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("answers request"), "{e:#}");
    }

    #[test]
    fn an_agent_that_trickles_or_stalls_is_cut_at_the_deadline() {
        let mut c = fake(|a, id, _| {
            let mut frame = Vec::new();
            proto::write_frame(&mut frame, id, &Message::Done).unwrap();
            for b in frame {
                std::io::Write::write_all(a, &[b]).unwrap();
                thread::sleep(Duration::from_millis(150));
            }
        });
        let t0 = Instant::now();
        let e = c.done(Message::Release, Duration::from_millis(600)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(format!("{e:#}").contains("no answer"), "{e:#}");

        // Silence at the hello.
        let (host, _agent) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let e = AgentClient::over(host).err().unwrap();
        assert!(t0.elapsed() < HELLO_WAIT + Duration::from_secs(1));
        assert!(format!("{e:#}").contains("no answer from cairn-agent"), "{e:#}");
    }

    fn plan(agent: &[BlockHash], stored: Option<&[[u8; 32]]>, size: u64) -> (Vec<[u8; 32]>, Vec<(u64, u64)>) {
        // In two calls, as the hash pass does a request at a time.
        let mut list = vec![UNKNOWN; agent.len()];
        let mut changed = Vec::new();
        let half = agent.len() / 2;
        plan_blocks(&agent[..half], stored.map(|s| &s[..half]), 0, size, &mut list[..half], &mut changed);
        plan_blocks(&agent[half..], stored.map(|s| &s[half..]), half as u64, size, &mut list[half..], &mut changed);
        let changed = cairn_engine::ranges::normalize(changed);
        (list, changed.iter().map(|r| (r.offset, r.length)).collect())
    }

    #[test]
    fn blocks_are_read_where_the_agents_hash_differs_from_the_stored_list() {
        let h = |x: u8| BlockHash::Blake3([x; 32]);
        let size = 4 * BLOCK + 100; // a short last block
                                    // First backup: everything is in the changed ranges (zero blocks come from the allocation).
        let (list, changed) = plan(&[h(1), BlockHash::Zero, h(3), h(4), h(5)], None, size);
        assert_eq!(list, [UNKNOWN, ZERO, UNKNOWN, UNKNOWN, UNKNOWN]);
        assert_eq!(changed, [(0, 4 * BLOCK + 100)]);
        // Next: block 2 changed, block 1 became data, block 4 became zeros.
        let stored = [[1; 32], ZERO, [3; 32], [4; 32], [5; 32]];
        let (list, changed) = plan(&[h(1), h(9), h(8), h(4), BlockHash::Zero], Some(&stored), size);
        assert_eq!(list, [[1; 32], UNKNOWN, UNKNOWN, [4; 32], ZERO]);
        assert_eq!(changed, [(BLOCK, 2 * BLOCK), (4 * BLOCK, 100)]);
        // A block the host could not hash whole (UNKNOWN) never matches.
        let (_, changed) = plan(&[h(1), h(1)], Some(&[UNKNOWN, [1; 32]]), 2 * BLOCK);
        assert_eq!(changed, [(0, BLOCK)]);
    }

    #[test]
    fn the_hash_list_is_served_from_the_hosts_list_and_its_reading_releases_the_views() {
        let released = Arc::new(Mutex::new(false));
        let seen = released.clone();
        let client = fake(move |a, id, m| {
            if m == Message::Release {
                *seen.lock().unwrap() = true;
            }
            proto::write_frame(a, id, &Message::Done).unwrap();
        });
        let list = Arc::new(Mutex::new(vec![[1u8; 32], [2; 32], [3; 32]]));
        let client = Arc::new(Mutex::new(client));
        let mut src = HashListSource { list, release: Some(client), pending: VecDeque::new() };
        assert_eq!(src.size(), 96);
        src.submit(16, 48, Vec::new()).unwrap();
        let got = src.next().unwrap();
        assert_eq!(got, [vec![1u8; 16], vec![2; 32]].concat());
        assert!(*released.lock().unwrap(), "the views were not released");
        assert!(src.submit(90, 10, Vec::new()).is_err());
    }
}
