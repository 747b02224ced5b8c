//! The agent's side of the channel: find the virtio-serial port, answer the host's requests one
//! at a time, and drop every view when the host goes away (the port hangs up), says `Bye`, starts
//! a new session, or is silent for [`LEASE`].

use crate::disks::{self, Disk};
use crate::snap::Views;
use cairn_agent_proto::{read_frame, write_frame, Kind, Message, ProtoError, VERSION};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The channel's name in the domain's XML.
pub const PORT_NAME: &str = "org.cairn.agent.0";
/// Views are dropped after this long without a request.
pub const LEASE: Duration = Duration::from_secs(600);

/// Ways to misbehave, for the host's tests of a lying or stalling agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    None,
    /// Answers a snapshot request 10 s late, without taking anything.
    StallSnapshot,
    /// Sends one byte less than each read asks.
    ShortRead,
    /// Says every block is zeros.
    ZeroHashes,
    /// Exits in the middle of the first read.
    DieOnRead,
    /// Writes bytes that are no frame before each answer.
    Garbage,
    /// The mode named in [`MISBEHAVE_FILE`] at each request (none when it is absent): one guest
    /// tries them all.
    FromFile,
}

/// Where `--misbehave file` reads its mode.
pub const MISBEHAVE_FILE: &str = "/run/cairn-agent.misbehave";

impl Misbehave {
    pub fn parse(s: &str) -> Option<Misbehave> {
        Some(match s {
            "stall-snapshot" => Misbehave::StallSnapshot,
            "short-read" => Misbehave::ShortRead,
            "zero-hashes" => Misbehave::ZeroHashes,
            "die-on-read" => Misbehave::DieOnRead,
            "garbage" => Misbehave::Garbage,
            "file" => Misbehave::FromFile,
            _ => return None,
        })
    }
}

/// `/dev/vportNpM` of the port named `name` (`/sys/class/virtio-ports/*/name`; no udev needed).
pub fn find_port(sys: &Path, name: &str) -> Option<PathBuf> {
    let mut ports: Vec<_> = std::fs::read_dir(sys).ok()?.flatten().collect();
    ports.sort_by_key(|e| e.file_name());
    ports.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Serves the port forever (it comes back when the host reconnects).
pub fn serve(port_name: &str, misbehave: Misbehave) -> io::Result<()> {
    let mut said = false;
    let port = loop {
        if let Some(p) = find_port(Path::new("/sys/class/virtio-ports"), port_name) {
            break p;
        }
        if !said {
            eprintln!("cairn-agent: waiting for the port {port_name} (the VM's channel)");
            said = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", port.display())))?;
    eprintln!("cairn-agent {}: serving {}", env!("CARGO_PKG_VERSION"), port.display());
    let mut session =
        Session { views: Views::default(), disks: Vec::new(), writing: None, misbehave, last: Instant::now() };
    loop {
        match wait_readable(&file, Duration::from_secs(1)) {
            Ready::HungUp => {
                session.end("the host closed the channel");
                std::thread::sleep(Duration::from_millis(200));
            }
            Ready::Nothing => {}
            Ready::Data => match read_request(&mut file) {
                Ok((id, request)) => {
                    session.last = Instant::now();
                    if misbehave == Misbehave::FromFile {
                        session.misbehave = std::fs::read_to_string(MISBEHAVE_FILE)
                            .ok()
                            .and_then(|m| Misbehave::parse(m.trim()))
                            .unwrap_or(Misbehave::None);
                    }
                    if let Some(reply) = session.answer(request) {
                        if session.misbehave == Misbehave::Garbage {
                            io::Write::write_all(
                                &mut file,
                                b"\x00garbage CAG1\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                            )?;
                        }
                        if let Err(e) = write_frame(&mut file, id, &reply) {
                            session.end(&format!("cannot answer: {e}"));
                        }
                    }
                }
                Err(e) => session.end(&format!("{e}")),
            },
        }
        if !session.views.is_empty() && session.last.elapsed() > LEASE {
            session.end("no request for 10 minutes");
        }
    }
}

enum Ready {
    Data,
    HungUp,
    Nothing,
}

fn wait_readable(file: &File, timeout: Duration) -> Ready {
    let mut p = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        Ready::Nothing
    } else if p.revents & libc::POLLIN != 0 {
        Ready::Data
    } else if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        Ready::HungUp
    } else {
        Ready::Nothing
    }
}

/// The next request; bytes that are not one (an earlier session's leftovers, noise) are skipped
/// up to the next `Hello`, which starts a session afresh.
fn read_request(r: &mut dyn Read) -> Result<(u32, Message), ProtoError> {
    match read_frame(r) {
        Err(ProtoError::Io(e)) => Err(ProtoError::Io(e)),
        Err(_) => skip_to_hello(r),
        ok => ok,
    }
}

fn skip_to_hello(r: &mut dyn Read) -> Result<(u32, Message), ProtoError> {
    cairn_agent_proto::scan(r, |h| h.kind == Kind::Hello && h.len <= 64, |_| true)
}

/// A disk open for a restore: exclusively, until the host closes it (after its check).
struct Writing {
    name: String,
    file: File,
    size: u64,
    /// Bytes written since the last flush: flushed every [`FLUSH_EVERY`], so that the final
    /// flush never holds gigabytes of the guest's dirty pages.
    unflushed: u64,
}

const FLUSH_EVERY: u64 = 64 << 20;

struct Session {
    views: Views,
    disks: Vec<Disk>,
    /// A disk being restored.
    writing: Option<Writing>,
    misbehave: Misbehave,
    last: Instant,
}

impl Session {
    fn end(&mut self, why: &str) {
        if let Some(w) = self.writing.take() {
            eprintln!(
                "cairn-agent: the restore of {} ended unfinished ({why}): do not mount it; restore it again",
                w.name
            );
            let _ = w.file.sync_all();
        }
        if !self.views.is_empty() {
            eprintln!("cairn-agent: dropping the disks' views: {why}");
            self.views.release();
        }
    }

    fn answer(&mut self, request: Message) -> Option<Message> {
        let failed = |code: u16, e: io::Error| Message::Error { code, message: truncate(e.to_string()) };
        Some(match request {
            Message::Hello { versions, nonce } => {
                self.end("a new session began");
                if !versions.contains(&VERSION) {
                    return Some(Message::Error { code: 1, message: format!("this agent speaks version {VERSION}") });
                }
                let agent = format!("cairn-agent {}", env!("CARGO_PKG_VERSION"));
                Message::HelloReply { version: VERSION, nonce, agent }
            }
            Message::ListDisks => {
                self.disks = disks::list(Path::new("/sys/block"));
                Message::Disks(self.disks.iter().map(|d| d.info.clone()).collect())
            }
            Message::Prepare { .. } | Message::Snapshot { .. } if self.writing.is_some() => {
                failed(4, io::Error::other("a restore is open in this session"))
            }
            Message::Prepare { disks } => {
                self.disks = disks::list(Path::new("/sys/block"));
                match self.views.prepare(&disks, &self.disks) {
                    Ok(()) => Message::Done,
                    Err(e) => failed(3, e),
                }
            }
            Message::Snapshot { disks } => {
                if self.misbehave == Misbehave::StallSnapshot {
                    std::thread::sleep(Duration::from_secs(10));
                    return Some(Message::Done);
                }
                match self.views.snapshot(&disks) {
                    Ok(()) => Message::Done,
                    Err(e) => failed(3, e),
                }
            }
            // The disk being restored is hashed as it now is on the device (the restore's check),
            // through the exclusive handle, after a flush and with the page cache dropped.
            Message::Hashes { disk, first_block, count } if self.writing.as_ref().is_some_and(|w| w.name == disk) => {
                let w = self.writing.as_mut().expect("checked");
                match flush_and_forget(w)
                    .and_then(|()| crate::snap::hash_blocks(&w.file, w.size, &disk, first_block, count))
                {
                    Ok(h) if self.misbehave == Misbehave::ZeroHashes => {
                        Message::HashList(vec![cairn_agent_proto::BlockHash::Zero; h.len()])
                    }
                    Ok(h) => Message::HashList(h),
                    Err(e) => failed(3, e),
                }
            }
            Message::Hashes { disk, first_block, count } => match self.views.hashes(&disk, first_block, count) {
                Ok(h) if self.misbehave == Misbehave::ZeroHashes => {
                    Message::HashList(vec![cairn_agent_proto::BlockHash::Zero; h.len()])
                }
                Ok(h) => Message::HashList(h),
                Err(e) => failed(3, e),
            },
            Message::Read { disk, offset, len } => {
                if self.misbehave == Misbehave::DieOnRead {
                    eprintln!("cairn-agent: dying in a read, as asked (--misbehave)");
                    std::process::exit(3);
                }
                match self.views.read(&disk, offset, len) {
                    Ok(mut data) => {
                        if self.misbehave == Misbehave::ShortRead {
                            data.pop();
                        }
                        Message::Data(data)
                    }
                    Err(e) => failed(3, e),
                }
            }
            Message::Release => {
                self.views.release();
                Message::Done
            }
            Message::OpenWrite { disk } => {
                if !self.views.is_empty() || self.writing.is_some() {
                    let e = io::Error::other("a backup's views or another restore are open in this session");
                    return Some(failed(4, e));
                }
                match self.device(&disk, true) {
                    Ok((file, size)) => {
                        eprintln!("cairn-agent: restoring {disk} ({size} bytes) from the host");
                        self.writing = Some(Writing { name: disk, file, size, unflushed: 0 });
                        Message::Done
                    }
                    Err(e) => failed(3, e),
                }
            }
            Message::Write { offset, data } => match self.write_at(offset, &data) {
                Ok(()) => Message::Done,
                Err(e) => failed(3, e),
            },
            // At most MAX_ZERO (1 MiB), like a Write: one buffer, one deadline.
            Message::Zero { offset, len } => match self.write_at(offset, &vec![0u8; len as usize]) {
                Ok(()) => Message::Done,
                Err(e) => failed(3, e),
            },
            Message::CloseWrite => match self.writing.take() {
                Some(w) => match w.file.sync_all() {
                    Ok(()) => {
                        eprintln!("cairn-agent: {} restored and flushed", w.name);
                        Message::Done
                    }
                    Err(e) => failed(3, e),
                },
                None => failed(4, io::Error::other("no disk is open for writing")),
            },
            Message::Bye => {
                self.end("the host said bye");
                return None;
            }
            other => Message::Error { code: 1, message: format!("{:?} is not a request", other.kind()) },
        })
    }
}

impl Session {
    /// The device of guest disk `name` and its size: its `cairn-NAME` wrapper, or the disk
    /// itself when it has none. For writing, opened exclusively (the kernel refuses while it is
    /// mounted or open elsewhere); never a disk the host backs up itself.
    fn device(&mut self, name: &str, write: bool) -> io::Result<(File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        self.disks = disks::list(Path::new("/sys/block"));
        let d = self
            .disks
            .iter()
            .find(|d| d.info.name == name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no disk named {name}")))?;
        if disks::host_visible(&d.info.transport) {
            return Err(io::Error::other(format!("{name} is the host's to restore, not the agent's")));
        }
        let path = Path::new("/dev").join(&d.kernel);
        let mut o = std::fs::OpenOptions::new();
        if write {
            o.read(true).write(true).custom_flags(libc::O_EXCL); // read too: the check after
        } else {
            o.read(true);
        }
        if write {
            // O_EXCL keeps out mounts and other exclusive users; a program that opened the disk
            // plainly (a database on the raw LUN, dd, an exporter) is looked for.
            let mut devs = vec![path.clone()];
            devs.extend(
                disks::below(Path::new("/sys/block"), &d.kernel).into_iter().map(|k| Path::new("/dev").join(k)),
            );
            if let Some((pid, what)) = open_elsewhere(&devs) {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!("{} ({name}) is open in process {pid} ({what}): stop it first", path.display()),
                ));
            }
        }
        let f = o.open(&path).map_err(|e| {
            let busy = if e.raw_os_error() == Some(libc::EBUSY) { " (unmount it first)" } else { "" };
            io::Error::new(e.kind(), format!("{} ({name}): {e}{busy}", path.display()))
        })?;
        Ok((f, d.info.size))
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let w = self.writing.as_mut().ok_or_else(|| io::Error::other("no disk is open for writing"))?;
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > w.size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a write past the end of {}", w.name)));
        }
        w.file.write_all_at(data, offset)?;
        w.unflushed += data.len() as u64;
        if w.unflushed >= FLUSH_EVERY {
            w.file.sync_data()?;
            w.unflushed = 0;
        }
        Ok(())
    }
}

/// Flushes a disk being restored and drops its cached pages, so that what is read next comes
/// from the device, not from the guest's memory of what was written.
fn flush_and_forget(w: &mut Writing) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    w.file.sync_all()?;
    w.unflushed = 0;
    // SAFETY: ioctl BLKFLSBUF (_IO(0x12, 97)) on an open block device, no argument.
    unsafe { libc::ioctl(w.file.as_raw_fd(), 0x1261 as _, 0) };
    // SAFETY: advice on an open descriptor.
    unsafe { libc::posix_fadvise(w.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// A process (other than this one) holding one of `devs` open: its PID and name.
fn open_elsewhere(devs: &[std::path::PathBuf]) -> Option<(u32, String)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wanted: Vec<u64> = devs.iter().filter_map(|d| std::fs::metadata(d).ok()).map(|m| m.rdev()).collect();
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        for fd in std::fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::metadata(fd.path()) else { continue };
            if m.file_type().is_block_device() && wanted.contains(&m.rdev()) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some((pid, comm.trim().to_string()));
            }
        }
    }
    None
}

fn truncate(mut s: String) -> String {
    if s.len() > cairn_agent_proto::MAX_TEXT {
        let mut end = cairn_agent_proto::MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_after_noise_is_found_from_its_hello() {
        let mut stream = b"left over from before CAG1 and more".to_vec();
        write_frame(&mut stream, 9, &Message::Read { disk: "lun0".into(), offset: 0, len: 4 }).unwrap();
        stream.truncate(stream.len() - 3); // a frame cut short
        write_frame(&mut stream, 1, &Message::Hello { versions: vec![1], nonce: [5; 16] }).unwrap();
        let mut r = &stream[..];
        let (id, m) = read_request(&mut r).unwrap();
        assert_eq!(id, 1);
        assert_eq!(m, Message::Hello { versions: vec![1], nonce: [5; 16] });
    }

    #[test]
    fn the_port_is_found_by_its_name() {
        let t = std::env::temp_dir().join(format!("cairn-agent-ports-{}", std::process::id()));
        for (port, name) in [("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", PORT_NAME)] {
            std::fs::create_dir_all(t.join(port)).unwrap();
            std::fs::write(t.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(find_port(&t, PORT_NAME), Some(PathBuf::from("/dev/vport1p2")));
        assert_eq!(find_port(&t, "none"), None);
        std::fs::remove_dir_all(&t).unwrap();
    }
}
