use crate::proto::*;
use crate::uri::{NbdAddress, Transport};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to NBD server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("NBD connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused: {0}")]
    Refused(String),
    #[error("NBD server error {errno} {}{}", errno_name(*.errno), if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server { errno: u32, message: String },
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, NbdError>;

/// What the server told us about the export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// Largest request the server accepts (32 MiB when the server does not say).
    pub max_block: u32,
    pub structured_replies: bool,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
}

/// One extent of a block status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

enum Pending {
    /// `covered` counts the bytes data and hole chunks have filled: a reply that leaves part
    /// of the buffer unfilled is a protocol error, so recycled buffers need no zeroing.
    Read {
        offset: u64,
        buf: Vec<u8>,
        covered: usize,
        error: Option<NbdError>,
        tx: oneshot::Sender<Result<Vec<u8>>>,
    },
    Status {
        extents: Vec<(u32, Vec<(u32, u32)>)>,
        error: Option<NbdError>,
        tx: oneshot::Sender<Result<Vec<(u32, Vec<(u32, u32)>)>>>,
    },
    Simple {
        tx: oneshot::Sender<Result<()>>,
    },
}

#[derive(Default)]
struct Inflight {
    map: HashMap<u64, Pending>,
    /// Set once the connection is gone; no request may register after that.
    dead: Option<String>,
}

pub struct NbdClient {
    writer: tokio::sync::Mutex<BoxWrite>,
    inflight: Arc<Mutex<Inflight>>,
    next_handle: AtomicU64,
    info: ExportInfo,
    contexts: HashMap<String, u32>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connects, negotiates, and selects the export. `contexts` are meta contexts to
    /// negotiate; each must be granted by the server or connecting fails.
    pub async fn connect(addr: &NbdAddress, contexts: &[String]) -> Result<NbdClient> {
        let (r, w): (BoxRead, BoxWrite) = match &addr.transport {
            Transport::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| NbdError::Connect { addr: addr.to_string(), source: e })?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Transport::Unix { socket } => {
                let s = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|e| NbdError::Connect { addr: addr.to_string(), source: e })?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let mut w = w;
        let (info, granted) = handshake(&mut r, &mut w, &addr.export, contexts).await?;
        for c in contexts {
            if !granted.contains_key(c) {
                let _ = send_option(&mut w, OPT_ABORT, &[]).await;
                return Err(NbdError::Unsupported(format!(
                    "NBD server did not grant meta context {c:?} (no such bitmap, or not exported)"
                )));
            }
        }
        let inflight = Arc::new(Mutex::new(Inflight::default()));
        let reader = tokio::spawn(reply_loop(r, inflight.clone()));
        Ok(NbdClient {
            writer: tokio::sync::Mutex::new(w),
            inflight,
            next_handle: AtomicU64::new(1),
            info,
            contexts: granted,
            reader,
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    /// Largest request size we use: the server's maximum, capped at 32 MiB.
    pub fn max_request(&self) -> u32 {
        self.info.max_block.min(32 << 20)
    }

    fn register(&self, p: Pending) -> Result<u64> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut inf = self.inflight.lock().unwrap();
        if let Some(why) = &inf.dead {
            return Err(NbdError::Disconnected(why.clone()));
        }
        inf.map.insert(handle, p);
        Ok(handle)
    }

    async fn send(&self, handle: u64, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[4..6].copy_from_slice(&flags.to_be_bytes());
        hdr[6..8].copy_from_slice(&cmd.to_be_bytes());
        hdr[8..16].copy_from_slice(&handle.to_be_bytes());
        hdr[16..24].copy_from_slice(&offset.to_be_bytes());
        hdr[24..28].copy_from_slice(&len.to_be_bytes());
        let mut w = self.writer.lock().await;
        let r = async {
            w.write_all(&hdr).await?;
            if !data.is_empty() {
                w.write_all(data).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = r {
            self.inflight.lock().unwrap().map.remove(&handle);
            return Err(NbdError::Io(e));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.info.size) {
            return Err(NbdError::Unsupported(format!(
                "request {offset}+{len} is beyond the end of the export ({} bytes)",
                self.info.size
            )));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (at most [`NbdClient::max_request`]).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.read_into(offset, len, Vec::new()).await
    }

    /// Like [`NbdClient::read`], filling (and returning) a recycled buffer.
    pub async fn read_into(&self, offset: u64, len: u32, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        self.check_range(offset, len as u64)?;
        // Not zeroed: data and hole chunks fill every byte, and `covered` checks that they do.
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        buf.truncate(len as usize);
        let (tx, rx) = oneshot::channel();
        let handle = self.register(Pending::Read { offset, buf, covered: 0, error: None, tx })?;
        self.send(handle, CMD_READ, 0, offset, len, &[]).await?;
        rx.await.map_err(|_| NbdError::Disconnected("reply never arrived".into()))?
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if self.info.read_only() {
            return Err(NbdError::Unsupported("the NBD export is read-only".into()));
        }
        self.simple(CMD_WRITE, 0, offset, data.len() as u32, data).await
    }

    /// Zeroes a range (the server may punch a hole).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<()> {
        self.check_range(offset, len as u64)?;
        if self.info.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return self.write(offset, &vec![0u8; len as usize]).await;
        }
        self.simple(CMD_WRITE_ZEROES, 0, offset, len, &[]).await
    }

    /// Asks the server to make completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        if self.info.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.simple(CMD_FLUSH, 0, 0, 0, &[]).await
    }

    async fn simple(&self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let handle = self.register(Pending::Simple { tx })?;
        self.send(handle, cmd, flags, offset, len, data).await?;
        rx.await.map_err(|_| NbdError::Disconnected("reply never arrived".into()))?
    }

    /// One block status request for `context`; the server may describe less than asked.
    pub async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        self.check_range(offset, len as u64)?;
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| NbdError::Unsupported(format!("meta context {context:?} was not negotiated")))?;
        let (tx, rx) = oneshot::channel();
        let handle = self.register(Pending::Status { extents: vec![], error: None, tx })?;
        self.send(handle, CMD_BLOCK_STATUS, 0, offset, len, &[]).await?;
        let all = rx.await.map_err(|_| NbdError::Disconnected("reply never arrived".into()))??;
        let mut out = Vec::new();
        let mut pos = offset;
        for (ctx, descs) in all {
            if ctx != id {
                continue;
            }
            for (l, f) in descs {
                let l = (l as u64).min(offset + len as u64 - pos);
                if l == 0 {
                    break;
                }
                out.push(Extent { offset: pos, length: l, flags: f });
                pos += l;
            }
        }
        if out.is_empty() {
            return Err(NbdError::Protocol(format!("block status for {context} at {offset} returned no extents")));
        }
        Ok(out)
    }

    /// Block status for a whole range, looping over partial answers and merging neighbours
    /// with equal flags.
    pub async fn extents(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        // Requests of up to 1 GiB keep answers bounded; align so servers need not split.
        let step: u64 = (1 << 30) - (self.info.min_block.max(512) as u64);
        while pos < end {
            let want = (end - pos).min(step) as u32;
            for e in self.block_status(context, pos, want).await? {
                pos = e.offset + e.length;
                match out.last_mut() {
                    Some(l) if l.flags == e.flags && l.offset + l.length == e.offset => l.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Politely ends the session.
    pub async fn disconnect(self) -> Result<()> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        hdr[8..16].copy_from_slice(&handle.to_be_bytes());
        let mut w = self.writer.lock().await;
        let _ = w.write_all(&hdr).await;
        let _ = w.shutdown().await;
        Ok(())
    }
}

async fn send_option(w: &mut BoxWrite, opt: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

async fn read_opt_reply<R: AsyncRead + Unpin>(r: &mut R, opt: u32) -> Result<OptReply> {
    let magic = r.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("bad option reply magic {magic:#x}")));
    }
    let got_opt = r.read_u32().await?;
    let kind = r.read_u32().await?;
    let len = r.read_u32().await?;
    if got_opt != opt {
        return Err(NbdError::Protocol(format!("reply for option {got_opt}, expected {opt}")));
    }
    if len > 1 << 20 {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok(OptReply { kind, data })
}

fn refusal(opt: &str, rep: &OptReply, export: &str) -> NbdError {
    let msg = String::from_utf8_lossy(&rep.data).into_owned();
    let why = match rep.kind {
        REP_ERR_UNKNOWN => format!("export {export:?} does not exist on this server"),
        REP_ERR_TLS_REQD => "the server requires TLS, which cairn does not speak yet".into(),
        REP_ERR_POLICY => "forbidden by server policy".into(),
        REP_ERR_UNSUP => format!("{opt} is not supported"),
        REP_ERR_INVALID => format!("{opt} was rejected as invalid"),
        k => format!("{opt} failed with reply {:#x}", k),
    };
    NbdError::Refused(if msg.is_empty() { why } else { format!("{why} ({msg})") })
}

async fn handshake<R: AsyncRead + Unpin>(
    r: &mut R,
    w: &mut BoxWrite,
    export: &str,
    contexts: &[String],
) -> Result<(ExportInfo, HashMap<String, u32>)> {
    if r.read_u64().await? != NBDMAGIC {
        return Err(NbdError::Protocol("not an NBD server (no NBDMAGIC)".into()));
    }
    if r.read_u64().await? != IHAVEOPT {
        return Err(NbdError::Protocol("the server speaks the old NBD handshake; newstyle is required".into()));
    }
    let server_flags = r.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("the server does not support fixed newstyle negotiation".into()));
    }
    let client_flags = (FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)) as u32;
    w.write_all(&client_flags.to_be_bytes()).await?;

    // Structured replies: needed for block status; reads also work without.
    send_option(w, OPT_STRUCTURED_REPLY, &[]).await?;
    let rep = read_opt_reply(r, OPT_STRUCTURED_REPLY).await?;
    let structured = rep.kind == REP_ACK;

    let mut granted = HashMap::new();
    if !contexts.is_empty() {
        if !structured {
            return Err(NbdError::Unsupported("the server has no structured replies, so no block status".into()));
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            d.extend_from_slice(&(c.len() as u32).to_be_bytes());
            d.extend_from_slice(c.as_bytes());
        }
        send_option(w, OPT_SET_META_CONTEXT, &d).await?;
        loop {
            let rep = read_opt_reply(r, OPT_SET_META_CONTEXT).await?;
            match rep.kind {
                REP_META_CONTEXT if rep.data.len() >= 4 => {
                    let id = u32::from_be_bytes(rep.data[..4].try_into().unwrap());
                    granted.insert(String::from_utf8_lossy(&rep.data[4..]).into_owned(), id);
                }
                REP_ACK => break,
                k if k & REP_FLAG_ERROR != 0 => return Err(refusal("NBD_OPT_SET_META_CONTEXT", &rep, export)),
                k => return Err(NbdError::Protocol(format!("unexpected reply {k} to SET_META_CONTEXT"))),
            }
        }
    }

    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &d).await?;
    let mut info = ExportInfo {
        name: export.to_string(),
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
        structured_replies: structured,
    };
    let mut have_export = false;
    loop {
        let rep = read_opt_reply(r, OPT_GO).await?;
        match rep.kind {
            REP_INFO if rep.data.len() >= 2 => {
                let t = u16::from_be_bytes([rep.data[0], rep.data[1]]);
                let d = &rep.data[2..];
                if t == INFO_EXPORT && d.len() >= 10 {
                    info.size = u64::from_be_bytes(d[..8].try_into().unwrap());
                    info.flags = u16::from_be_bytes([d[8], d[9]]);
                    have_export = true;
                } else if t == INFO_BLOCK_SIZE && d.len() >= 12 {
                    info.min_block = u32::from_be_bytes(d[..4].try_into().unwrap());
                    info.preferred_block = u32::from_be_bytes(d[4..8].try_into().unwrap());
                    info.max_block = u32::from_be_bytes(d[8..12].try_into().unwrap());
                }
            }
            REP_ACK => break,
            k if k & REP_FLAG_ERROR != 0 => return Err(refusal("NBD_OPT_GO", &rep, export)),
            _ => {} // unknown informational replies are ignored, as the spec asks
        }
    }
    if !have_export {
        return Err(NbdError::Protocol("NBD_OPT_GO finished without export information".into()));
    }
    Ok((info, granted))
}

/// Reads replies until the connection ends, routing each to its request.
async fn reply_loop<R: AsyncRead + Unpin>(mut r: BufReader<R>, inflight: Arc<Mutex<Inflight>>) {
    let err = match read_replies(&mut r, &inflight).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    let pending: Vec<Pending> = {
        let mut inf = inflight.lock().unwrap();
        inf.dead = Some(err.clone());
        inf.map.drain().map(|(_, p)| p).collect()
    };
    for p in pending {
        let e = || NbdError::Disconnected(err.clone());
        match p {
            Pending::Read { tx, .. } => drop(tx.send(Err(e()))),
            Pending::Status { tx, .. } => drop(tx.send(Err(e()))),
            Pending::Simple { tx } => drop(tx.send(Err(e()))),
        }
    }
}

fn take(inflight: &Mutex<Inflight>, handle: u64) -> Result<Pending> {
    inflight
        .lock()
        .unwrap()
        .map
        .remove(&handle)
        .ok_or_else(|| NbdError::Protocol(format!("reply for unknown handle {handle}")))
}

fn finish(p: Pending, simple_error: Option<NbdError>) {
    match p {
        Pending::Read { buf, covered, error, tx, .. } => drop(tx.send(match simple_error.or(error) {
            Some(e) => Err(e),
            None if covered != buf.len() => {
                Err(NbdError::Protocol(format!("read reply covered {covered} of {} bytes", buf.len())))
            }
            None => Ok(buf),
        })),
        Pending::Status { extents, error, tx } => drop(tx.send(match simple_error.or(error) {
            Some(e) => Err(e),
            None => Ok(extents),
        })),
        Pending::Simple { tx } => drop(tx.send(match simple_error {
            Some(e) => Err(e),
            None => Ok(()),
        })),
    }
}

async fn read_replies<R: AsyncRead + Unpin>(r: &mut BufReader<R>, inflight: &Mutex<Inflight>) -> Result<()> {
    loop {
        let magic = match r.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = r.read_u32().await?;
                let handle = r.read_u64().await?;
                let mut p = take(inflight, handle)?;
                let err = (errno != 0).then(|| NbdError::Server { errno, message: String::new() });
                if let (Pending::Read { buf, covered, .. }, None) = (&mut p, &err) {
                    r.read_exact(buf).await?;
                    *covered = buf.len();
                }
                finish(p, err);
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = r.read_u16().await?;
                let kind = r.read_u16().await?;
                let handle = r.read_u64().await?;
                let len = r.read_u32().await? as usize;
                let mut p = take(inflight, handle)?;
                match (kind, &mut p) {
                    (REPLY_TYPE_NONE, _) if len == 0 => {}
                    (REPLY_TYPE_OFFSET_DATA, Pending::Read { offset, buf, covered, .. }) if len >= 8 => {
                        let at = r.read_u64().await?;
                        let n = len - 8;
                        let start = at.checked_sub(*offset).map(|s| s as usize);
                        match start {
                            Some(s) if s + n <= buf.len() => {
                                r.read_exact(&mut buf[s..s + n]).await?;
                                *covered += n;
                            }
                            _ => return Err(NbdError::Protocol(format!("read data at {at}+{n} outside the request"))),
                        }
                    }
                    (REPLY_TYPE_OFFSET_HOLE, Pending::Read { offset, buf, covered, .. }) if len == 12 => {
                        let at = r.read_u64().await?;
                        let n = r.read_u32().await? as usize;
                        match at.checked_sub(*offset).map(|s| s as usize) {
                            Some(s) if s + n <= buf.len() => {
                                buf[s..s + n].fill(0);
                                *covered += n;
                            }
                            _ => return Err(NbdError::Protocol(format!("hole at {at}+{n} outside the request"))),
                        }
                    }
                    (REPLY_TYPE_BLOCK_STATUS, Pending::Status { extents, .. })
                        if len >= 4 && (len - 4).is_multiple_of(8) =>
                    {
                        let mut d = vec![0u8; len];
                        r.read_exact(&mut d).await?;
                        let ctx = u32::from_be_bytes(d[..4].try_into().unwrap());
                        let descs = d[4..]
                            .chunks_exact(8)
                            .map(|c| {
                                (
                                    u32::from_be_bytes(c[..4].try_into().unwrap()),
                                    u32::from_be_bytes(c[4..].try_into().unwrap()),
                                )
                            })
                            .collect();
                        extents.push((ctx, descs));
                    }
                    (REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET, _) if len >= 6 => {
                        let mut d = vec![0u8; len];
                        r.read_exact(&mut d).await?;
                        let errno = u32::from_be_bytes(d[..4].try_into().unwrap());
                        let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
                        let message = String::from_utf8_lossy(&d[6..(6 + mlen).min(d.len())]).into_owned();
                        let e = NbdError::Server { errno, message };
                        match &mut p {
                            Pending::Read { error, .. } | Pending::Status { error, .. } => {
                                error.get_or_insert(e);
                            }
                            Pending::Simple { .. } => {
                                if flags & REPLY_FLAG_DONE != 0 {
                                    finish(p, Some(e));
                                    continue;
                                }
                                return Err(NbdError::Protocol("multi-chunk error for a simple command".into()));
                            }
                        }
                    }
                    _ => return Err(NbdError::Protocol(format!("unexpected reply chunk type {kind} ({len} bytes)"))),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    finish(p, None);
                } else {
                    inflight.lock().unwrap().map.insert(handle, p);
                }
            }
            m => return Err(NbdError::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }
}
