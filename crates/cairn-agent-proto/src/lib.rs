//! # cairn-agent-proto: what cairn and its guest agent say over a virtio-serial port
//!
//! The host drives; the agent (`cairn-agent`, inside a Linux guest) answers. The agent sees the
//! disks the host cannot (an in-guest iSCSI or NBD LUN, a pass-through disk): it lists them,
//! takes a point-in-time view of them while the guest is frozen, and sends hashes and bytes of
//! those views when asked. It never holds repository credentials and never freezes or thaws.
//!
//! ## Frames
//!
//! Every message is one frame, little-endian:
//!
//! ```text
//! magic "CAG1" (4) | kind u16 | flags u16 (0) | id u32 | len u32 | payload (len bytes)
//! ```
//!
//! - `len` is at most [`MAX_PAYLOAD`]; every field inside has its own bound (names
//!   [`MAX_NAME`] bytes of `A-Za-z0-9._-`, texts [`MAX_TEXT`], [`MAX_DISKS`] disks,
//!   [`MAX_HASHES`] hashes, [`MAX_READ`] bytes of data) and a payload must be used up exactly.
//! - A reply carries its request's `id`; requests are answered one at a time, in order.
//! - A reply must be the one its request asks for ([`check_reply`]): a `Data` of exactly the
//!   length asked, a `HashList` of exactly the count asked. Anything else ends the session.
//!
//! ## Starting a session
//!
//! The port is a byte stream that may hold what an earlier session left (a reply nobody read).
//! The host sends `Hello` with a fresh random nonce and skips bytes ([`resync`]) until a frame
//! parses as a `HelloReply` echoing that nonce: what came before is stale. This is qemu-guest-agent's
//! `guest-sync-delimited` idea, with a frame instead of a sentinel byte.
//!
//! ## What the host trusts
//!
//! Nothing the agent says reaches the repository unchecked: the host hashes every byte it
//! stores, so an agent that lies can make a point wrong about its own guest's disk, never about
//! anything else. Hashes from the agent only tell the host which blocks it may skip (against a
//! list the host computed itself). Bounds here keep a lying agent from making the host allocate
//! or wait without limit; deadlines are the caller's.

use std::io::{Read, Write};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CAG1";
/// magic, kind, flags, id, len.
pub const HEADER_LEN: usize = 16;
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// The most bytes one `Read` asks for (and one `Data` carries).
pub const MAX_READ: u32 = 1 << 20;
/// A frame's payload: a `Data` of [`MAX_READ`] bytes and its small header.
pub const MAX_PAYLOAD: u32 = MAX_READ + 64;
/// A disk's name (the agent's, e.g. `nbd0`, `sdb`, `lun0`).
pub const MAX_NAME: usize = 64;
/// An error's or a reason's text.
pub const MAX_TEXT: usize = 1024;
pub const MAX_DISKS: usize = 64;
/// Hashes in one `HashList` (4096 blocks of 64 KiB: 256 MiB of disk per request).
pub const MAX_HASHES: u32 = 4096;
/// Versions offered in one `Hello`.
pub const MAX_VERSIONS: usize = 8;
/// The block hashes are of: 64 KiB.
pub const BLOCK: u64 = 64 * 1024;
/// The most bytes [`resync`] skips before it gives up.
pub const MAX_SKIPPED: usize = 4 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the agent's port: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a frame (bad magic)")]
    BadMagic,
    #[error("a frame of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("flags {0:#x} set (none are defined)")]
    Flags(u16),
    #[error("message {kind:?}: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("reply {got:?} to request {id} does not answer {asked:?}: {why}")]
    BadReply { id: u32, asked: Kind, got: Kind, why: String },
    #[error("no answer to the hello after {0} bytes")]
    NoHello(usize),
}

pub type Result<T> = std::result::Result<T, ProtoError>;

/// A message's kind, as its frame says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloReply = 2,
    ListDisks = 3,
    Disks = 4,
    Snapshot = 5,
    Hashes = 6,
    HashList = 7,
    Read = 8,
    Data = 9,
    Release = 10,
    Done = 11,
    Error = 12,
    Bye = 13,
    Prepare = 14,
    OpenWrite = 15,
    Write = 16,
    Zero = 17,
    CloseWrite = 18,
}

impl Kind {
    fn from_u16(k: u16) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            1 => Hello,
            2 => HelloReply,
            3 => ListDisks,
            4 => Disks,
            5 => Snapshot,
            6 => Hashes,
            7 => HashList,
            8 => Read,
            9 => Data,
            10 => Release,
            11 => Done,
            12 => Error,
            13 => Bye,
            14 => Prepare,
            15 => OpenWrite,
            16 => Write,
            17 => Zero,
            18 => CloseWrite,
            _ => return None,
        })
    }
}

/// A disk the agent sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// The agent's name for it ([`safe_name`]).
    pub name: String,
    pub size: u64,
    /// How the guest reaches it: `nbd`, `iscsi`, `scsi`, `virtio`, `nvme`, ...
    pub transport: String,
    /// Its serial or WWN, if it has one (how an operator knows which LUN it is).
    pub serial: String,
    /// Whether a point-in-time view of it can be taken (it sits on a device-mapper device).
    pub snapshot_ready: bool,
    /// Why not, when it cannot.
    pub reason: String,
}

/// A block's hash, or that it is all zeros (never stored, nothing to hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockHash {
    Zero,
    Blake3([u8; 32]),
}

/// Everything either side may say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Host: the versions it speaks, and a nonce the reply must echo.
    Hello {
        versions: Vec<u16>,
        nonce: [u8; 16],
    },
    /// Agent: the version chosen, the nonce, and its own version text.
    HelloReply {
        version: u16,
        nonce: [u8; 16],
        agent: String,
    },
    /// Host: which disks do you see?
    ListDisks,
    Disks(Vec<DiskInfo>),
    /// Host, before the freeze: make ready what a view of these disks needs (its copy-on-write
    /// space, its devices), so that the frozen instant only switches tables. `Done`, or an
    /// `Error` that leaves nothing prepared.
    Prepare {
        disks: Vec<String>,
    },
    /// Host, while the guest is frozen: take a point-in-time view of these (prepared) disks.
    /// `Done` when all are taken; an `Error` leaves none.
    Snapshot {
        disks: Vec<String>,
    },
    /// Host: the hashes of blocks `first_block..first_block + count` of a disk's view.
    Hashes {
        disk: String,
        first_block: u64,
        count: u32,
    },
    HashList(Vec<BlockHash>),
    /// Host: `len` bytes at `offset` of a disk's view (both multiples of [`BLOCK`], or `len`
    /// reaching the disk's end).
    Read {
        disk: String,
        offset: u64,
        len: u32,
    },
    Data(Vec<u8>),
    /// Host: drop every view (the point is committed, or given up).
    Release,
    Done,
    Error {
        code: u16,
        message: String,
    },
    /// Either side: the session ends.
    Bye,
    /// Host: open this disk to write it whole (a restore onto it); refused while the disk is
    /// mounted or open elsewhere, or has a view. `Done`.
    OpenWrite {
        disk: String,
    },
    /// Host: these bytes at `offset` of the disk open for writing. `Done`.
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Host: zeros over `len` bytes at `offset` (at most [`MAX_ZERO`]). `Done`.
    Zero {
        offset: u64,
        len: u64,
    },
    /// Host: flush the disk open for writing to stable storage and close it. `Done`.
    CloseWrite,
}

/// The most bytes one `Zero` request covers (as a `Write`: one buffer, one deadline).
pub const MAX_ZERO: u64 = MAX_READ as u64;

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::HelloReply { .. } => Kind::HelloReply,
            Message::ListDisks => Kind::ListDisks,
            Message::Disks(_) => Kind::Disks,
            Message::Prepare { .. } => Kind::Prepare,
            Message::Snapshot { .. } => Kind::Snapshot,
            Message::Hashes { .. } => Kind::Hashes,
            Message::HashList(_) => Kind::HashList,
            Message::Read { .. } => Kind::Read,
            Message::Data(_) => Kind::Data,
            Message::Release => Kind::Release,
            Message::Done => Kind::Done,
            Message::Error { .. } => Kind::Error,
            Message::Bye => Kind::Bye,
            Message::OpenWrite { .. } => Kind::OpenWrite,
            Message::Write { .. } => Kind::Write,
            Message::Zero { .. } => Kind::Zero,
            Message::CloseWrite => Kind::CloseWrite,
        }
    }

    /// The payload, its fields checked against their bounds (a message that breaks one is a bug
    /// of the sender: refused here rather than by the peer).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut w = Vec::new();
        let bad = |why: &str| ProtoError::Malformed { kind: self.kind(), why: why.to_string() };
        match self {
            Message::Hello { versions, nonce } => {
                if versions.is_empty() || versions.len() > MAX_VERSIONS {
                    return Err(bad("1 to 8 versions"));
                }
                w.push(versions.len() as u8);
                versions.iter().for_each(|v| w.extend_from_slice(&v.to_le_bytes()));
                w.extend_from_slice(nonce);
            }
            Message::HelloReply { version, nonce, agent } => {
                w.extend_from_slice(&version.to_le_bytes());
                w.extend_from_slice(nonce);
                put_text(&mut w, agent, MAX_NAME).map_err(|e| bad(&e))?;
            }
            Message::ListDisks | Message::Release | Message::Done | Message::Bye | Message::CloseWrite => {}
            Message::OpenWrite { disk } => put_name(&mut w, disk).map_err(|e| bad(&e))?,
            Message::Write { offset, data } => {
                if data.is_empty() || data.len() > MAX_READ as usize {
                    return Err(bad("1 byte to 1 MiB"));
                }
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&(data.len() as u32).to_le_bytes());
                w.extend_from_slice(data);
            }
            Message::Zero { offset, len } => {
                if *len == 0 || *len > MAX_ZERO {
                    return Err(bad("1 byte to 1 MiB"));
                }
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&len.to_le_bytes());
            }
            Message::Disks(disks) => {
                if disks.len() > MAX_DISKS {
                    return Err(bad("at most 64 disks"));
                }
                w.push(disks.len() as u8);
                for d in disks {
                    put_name(&mut w, &d.name).map_err(|e| bad(&e))?;
                    w.extend_from_slice(&d.size.to_le_bytes());
                    put_text(&mut w, &d.transport, 16).map_err(|e| bad(&e))?;
                    put_text(&mut w, &d.serial, MAX_NAME).map_err(|e| bad(&e))?;
                    w.push(u8::from(d.snapshot_ready));
                    put_text(&mut w, &d.reason, MAX_TEXT).map_err(|e| bad(&e))?;
                }
            }
            Message::Prepare { disks } | Message::Snapshot { disks } => {
                if disks.is_empty() || disks.len() > MAX_DISKS {
                    return Err(bad("1 to 64 disks"));
                }
                w.push(disks.len() as u8);
                for d in disks {
                    put_name(&mut w, d).map_err(|e| bad(&e))?;
                }
            }
            Message::Hashes { disk, first_block, count } => {
                if *count == 0 || *count > MAX_HASHES {
                    return Err(bad("1 to 4096 hashes"));
                }
                put_name(&mut w, disk).map_err(|e| bad(&e))?;
                w.extend_from_slice(&first_block.to_le_bytes());
                w.extend_from_slice(&count.to_le_bytes());
            }
            Message::HashList(hashes) => {
                if hashes.len() > MAX_HASHES as usize {
                    return Err(bad("at most 4096 hashes"));
                }
                w.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                for h in hashes {
                    match h {
                        BlockHash::Zero => w.push(0),
                        BlockHash::Blake3(b) => {
                            w.push(1);
                            w.extend_from_slice(b);
                        }
                    }
                }
            }
            Message::Read { disk, offset, len } => {
                if *len == 0 || *len > MAX_READ {
                    return Err(bad("1 byte to 1 MiB"));
                }
                put_name(&mut w, disk).map_err(|e| bad(&e))?;
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&len.to_le_bytes());
            }
            Message::Data(bytes) => {
                if bytes.len() > MAX_READ as usize {
                    return Err(bad("at most 1 MiB"));
                }
                w.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                w.extend_from_slice(bytes);
            }
            Message::Error { code, message } => {
                w.extend_from_slice(&code.to_le_bytes());
                put_text(&mut w, message, MAX_TEXT).map_err(|e| bad(&e))?;
            }
        }
        Ok(w)
    }

    /// A message from its kind and payload; every length bounded, the payload used up.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message> {
        let mut r = Cursor { bytes: payload, at: 0, kind };
        let m = match kind {
            Kind::Hello => {
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_VERSIONS {
                    return Err(r.bad("1 to 8 versions"));
                }
                let versions = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>>>()?;
                Message::Hello { versions, nonce: r.array()? }
            }
            Kind::HelloReply => Message::HelloReply { version: r.u16()?, nonce: r.array()?, agent: r.text(MAX_NAME)? },
            Kind::ListDisks => Message::ListDisks,
            Kind::Release => Message::Release,
            Kind::Done => Message::Done,
            Kind::Bye => Message::Bye,
            Kind::CloseWrite => Message::CloseWrite,
            Kind::OpenWrite => Message::OpenWrite { disk: r.name()? },
            Kind::Write => {
                let offset = r.u64()?;
                let n = r.u32()?;
                if n == 0 || n > MAX_READ {
                    return Err(r.bad("1 byte to 1 MiB"));
                }
                Message::Write { offset, data: r.take(n as usize)?.to_vec() }
            }
            Kind::Zero => {
                let (offset, len) = (r.u64()?, r.u64()?);
                if len == 0 || len > MAX_ZERO {
                    return Err(r.bad("1 byte to 1 MiB"));
                }
                Message::Zero { offset, len }
            }
            Kind::Disks => {
                let n = r.u8()? as usize;
                if n > MAX_DISKS {
                    return Err(r.bad("at most 64 disks"));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(DiskInfo {
                        name: r.name()?,
                        size: r.u64()?,
                        transport: r.text(16)?,
                        serial: r.text(MAX_NAME)?,
                        snapshot_ready: r.flag()?,
                        reason: r.text(MAX_TEXT)?,
                    });
                }
                Message::Disks(disks)
            }
            Kind::Prepare | Kind::Snapshot => {
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_DISKS {
                    return Err(r.bad("1 to 64 disks"));
                }
                let disks = (0..n).map(|_| r.name()).collect::<Result<_>>()?;
                if kind == Kind::Prepare {
                    Message::Prepare { disks }
                } else {
                    Message::Snapshot { disks }
                }
            }
            Kind::Hashes => {
                let (disk, first_block, count) = (r.name()?, r.u64()?, r.u32()?);
                if count == 0 || count > MAX_HASHES {
                    return Err(r.bad("1 to 4096 hashes"));
                }
                Message::Hashes { disk, first_block, count }
            }
            Kind::HashList => {
                let n = r.u32()?;
                if n > MAX_HASHES {
                    return Err(r.bad("at most 4096 hashes"));
                }
                let mut hashes = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    hashes.push(match r.u8()? {
                        0 => BlockHash::Zero,
                        1 => BlockHash::Blake3(r.array()?),
                        _ => return Err(r.bad("a hash's flag is 0 or 1")),
                    });
                }
                Message::HashList(hashes)
            }
            Kind::Read => {
                let (disk, offset, len) = (r.name()?, r.u64()?, r.u32()?);
                if len == 0 || len > MAX_READ {
                    return Err(r.bad("1 byte to 1 MiB"));
                }
                Message::Read { disk, offset, len }
            }
            Kind::Data => {
                let n = r.u32()?;
                if n > MAX_READ {
                    return Err(r.bad("at most 1 MiB"));
                }
                Message::Data(r.take(n as usize)?.to_vec())
            }
            Kind::Error => Message::Error { code: r.u16()?, message: r.text(MAX_TEXT)? },
        };
        if r.at != payload.len() {
            return Err(r.bad(&format!("{} bytes left over", payload.len() - r.at)));
        }
        Ok(m)
    }
}

/// Whether the host sees disks of this transport through the hypervisor (and backs them up
/// itself): the agent's `DiskInfo::transport` for virtio disks and QEMU's emulated SCSI, NVMe
/// and ATA disks. The guest sees the others itself (network LUNs, iSCSI, pass-through).
pub fn host_visible(transport: &str) -> bool {
    matches!(transport, "virtio" | "qemu-scsi" | "qemu-nvme" | "qemu-ata")
}

/// Whether `name` may name a disk: 1 to [`MAX_NAME`] bytes of `A-Za-z0-9._-`, not starting
/// with a dot (it becomes part of a file name on restore).
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn put_name(w: &mut Vec<u8>, name: &str) -> std::result::Result<(), String> {
    if !safe_name(name) {
        return Err(format!("{name:?} is not a disk name"));
    }
    put_text(w, name, MAX_NAME)
}

fn put_text(w: &mut Vec<u8>, text: &str, max: usize) -> std::result::Result<(), String> {
    if text.len() > max {
        return Err(format!("a text of {} bytes (at most {max})", text.len()));
    }
    w.extend_from_slice(&(text.len() as u16).to_le_bytes());
    w.extend_from_slice(text.as_bytes());
    Ok(())
}

/// Reads a payload, every read bounded by what is left.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    kind: Kind,
}

impl Cursor<'_> {
    fn bad(&self, why: &str) -> ProtoError {
        ProtoError::Malformed { kind: self.kind, why: why.to_string() }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.bytes.len() - self.at < n {
            return Err(self.bad(&format!("{n} bytes wanted at {}, {} left", self.at, self.bytes.len() - self.at)));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.bad("a flag is 0 or 1")),
        }
    }

    fn text(&mut self, max: usize) -> Result<String> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(self.bad(&format!("a text of {n} bytes (at most {max})")));
        }
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad("a text that is not UTF-8"))
    }

    fn name(&mut self) -> Result<String> {
        let name = self.text(MAX_NAME)?;
        if !safe_name(&name) {
            return Err(self.bad(&format!("{name:?} is not a disk name")));
        }
        Ok(name)
    }
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub id: u32,
    pub len: u32,
}

impl Header {
    /// Parses a header: the magic, a known kind, no flags, a bounded length.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header> {
        if b[..4] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let kind = u16::from_le_bytes([b[4], b[5]]);
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let id = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let kind = Kind::from_u16(kind).ok_or(ProtoError::UnknownKind(kind))?;
        if flags != 0 {
            return Err(ProtoError::Flags(flags));
        }
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLong(len));
        }
        Ok(Header { kind, id, len })
    }
}

/// Writes message `m` as one frame with request id `id`.
pub fn write_frame(w: &mut dyn Write, id: u32, m: &Message) -> Result<()> {
    let payload = m.encode()?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&(m.kind() as u16).to_le_bytes());
    frame.extend_from_slice(&0u16.to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame: (its id, its message). Blocks until it is whole (the caller's port has a
/// deadline).
pub fn read_frame(r: &mut dyn Read) -> Result<(u32, Message)> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let h = Header::parse(&head)?;
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok((h.id, Message::decode(h.kind, &payload)?))
}

/// After sending `Hello` with `nonce`: skips what the port holds from before (at most
/// [`MAX_SKIPPED`] bytes) until a `HelloReply` echoing `nonce`; returns it.
pub fn resync(r: &mut dyn Read, nonce: &[u8; 16]) -> Result<Message> {
    let wanted = |h: &Header| h.kind == Kind::HelloReply && h.len as usize <= 2 + 16 + 2 + MAX_NAME;
    // An older session's reply is stale, like everything before it.
    let fresh = |m: &Message| matches!(m, Message::HelloReply { nonce: echoed, .. } if echoed == nonce);
    scan(r, wanted, fresh).map(|(_, m)| m)
}

/// Skips bytes (at most [`MAX_SKIPPED`]) until a frame whose header `wanted` accepts and whose
/// message `accept` does; returns its id and message. A header is tried wherever the magic
/// starts, so a frame is found after any bytes that are not one.
pub fn scan(
    r: &mut dyn Read,
    wanted: impl Fn(&Header) -> bool,
    accept: impl Fn(&Message) -> bool,
) -> Result<(u32, Message)> {
    // A window of the last HEADER_LEN bytes read.
    let mut window: Vec<u8> = Vec::with_capacity(HEADER_LEN);
    let mut skipped = 0usize;
    let mut byte = [0u8; 1];
    loop {
        r.read_exact(&mut byte)?;
        window.push(byte[0]);
        if window.len() > HEADER_LEN {
            window.remove(0);
            skipped += 1;
        }
        if skipped > MAX_SKIPPED {
            return Err(ProtoError::NoHello(skipped));
        }
        if window.len() < HEADER_LEN || window[..4] != MAGIC {
            continue;
        }
        let head: [u8; HEADER_LEN] = window[..].try_into().expect("a header's length");
        let Ok(h) = Header::parse(&head) else { continue };
        if !wanted(&h) {
            continue;
        }
        let mut payload = vec![0u8; h.len as usize];
        r.read_exact(&mut payload)?;
        skipped += HEADER_LEN + payload.len();
        match Message::decode(h.kind, &payload) {
            Ok(m) if accept(&m) => return Ok((h.id, m)),
            _ => window.clear(),
        }
    }
}

/// Checks that `reply` (with id `id`) answers `request` (sent with `asked_id`): the same id,
/// the kind the request calls for, and the exact size asked (`Data` of the length read,
/// `HashList` of the count asked). An `Error` answers anything.
pub fn check_reply(asked_id: u32, request: &Message, id: u32, reply: &Message) -> Result<()> {
    let wrong = |why: String| ProtoError::BadReply { id: asked_id, asked: request.kind(), got: reply.kind(), why };
    if id != asked_id {
        return Err(wrong(format!("it answers request {id}")));
    }
    match (request, reply) {
        (_, Message::Error { .. }) => Ok(()),
        (Message::Hello { versions, nonce }, Message::HelloReply { version, nonce: echoed, .. }) => {
            if echoed != nonce {
                return Err(wrong("another nonce".into()));
            }
            if !versions.contains(version) {
                return Err(wrong(format!("version {version}, not one offered")));
            }
            Ok(())
        }
        (Message::ListDisks, Message::Disks(_)) => Ok(()),
        (
            Message::Prepare { .. }
            | Message::Snapshot { .. }
            | Message::Release
            | Message::OpenWrite { .. }
            | Message::Write { .. }
            | Message::Zero { .. }
            | Message::CloseWrite,
            Message::Done,
        ) => Ok(()),
        (Message::Hashes { count, .. }, Message::HashList(h)) if h.len() == *count as usize => Ok(()),
        (Message::Hashes { count, .. }, Message::HashList(h)) => {
            Err(wrong(format!("{} hashes for {count} blocks", h.len())))
        }
        (Message::Read { len, .. }, Message::Data(d)) if d.len() == *len as usize => Ok(()),
        (Message::Read { len, .. }, Message::Data(d)) => Err(wrong(format!("{} bytes for {len}", d.len()))),
        _ => Err(wrong("not its answer".into())),
    }
}

#[cfg(test)]
mod tests;
