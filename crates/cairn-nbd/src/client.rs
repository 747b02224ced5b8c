use crate::proto::*;
use crate::uri::{NbdAddress, Transport};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
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
    TimedOut(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, NbdError>;

/// What the client allows a server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How long connecting, the handshake, and each request may wait for the server. A server
    /// that stalls longer fails the whole connection: a backup then fails instead of waiting
    /// forever while the hypervisor's fleecing scratch grows.
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        // Generous: a loaded host or a slow storage under the export can take seconds per
        // request, never minutes.
        ClientOptions { request_timeout: Duration::from_secs(300) }
    }
}

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

/// Largest block-status chunk accepted: 128 Ki descriptors (what QEMU's server sends at most).
const MAX_STATUS_CHUNK: u32 = 4 + 8 * (128 << 10);
/// Largest error chunk accepted (the message is for humans; the spec suggests at most 4 KiB).
const MAX_ERROR_CHUNK: u32 = 64 << 10;
/// Most separate pieces a read reply may come in before it is refused as absurd (a server
/// sends one chunk per data or hole run, in order, and in-order pieces merge into one).
const MAX_READ_PIECES: usize = 64 << 10;
/// Most informational replies accepted during NBD_OPT_GO.
const MAX_INFO_REPLIES: usize = 256;
/// Largest minimum block size the NBD specification allows.
const MAX_MIN_BLOCK: u32 = 64 << 10;

/// The bytes of a read request that reply chunks have written so far. Overlapping chunks are
/// refused, so a read completes only when every byte was written exactly once (buffers are
/// recycled unzeroed: a byte written by no chunk would leak stale data into a backup).
#[derive(Default)]
struct Coverage {
    /// Written spans, start -> end, disjoint; touching spans are merged.
    spans: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Marks `[start, end)` as written; false when any byte of it already was.
    fn add(&mut self, start: u64, end: u64) -> bool {
        let before = self.spans.range(..=start).next_back().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > start) || self.spans.range(start..end).next().is_some() {
            return false;
        }
        let (mut from, mut to) = (start, end);
        if let Some((s, e)) = before.filter(|&(_, e)| e == start) {
            self.spans.remove(&s);
            from = s;
            debug_assert_eq!(e, start);
        }
        if let Some(e) = self.spans.remove(&end) {
            to = e;
        }
        self.spans.insert(from, to);
        self.total += end - start;
        true
    }
}

/// Block status chunks of one reply: (meta context ID, (length, flags) descriptors).
type StatusChunks = Vec<(u32, Vec<(u32, u32)>)>;

enum Pending {
    Read { offset: u64, buf: Vec<u8>, written: Coverage, error: Option<NbdError>, tx: oneshot::Sender<Result<Vec<u8>>> },
    Status { extents: StatusChunks, error: Option<NbdError>, tx: oneshot::Sender<Result<StatusChunks>> },
    Simple { tx: oneshot::Sender<Result<()>> },
}

impl Pending {
    fn fail(self, e: NbdError) {
        match self {
            Pending::Read { tx, .. } => drop(tx.send(Err(e))),
            Pending::Status { tx, .. } => drop(tx.send(Err(e))),
            Pending::Simple { tx } => drop(tx.send(Err(e))),
        }
    }
}

#[derive(Default)]
struct Inflight {
    map: HashMap<u64, Pending>,
    /// Set once the connection is gone; no request may register after that.
    dead: Option<String>,
}

/// Locks the request table; a panic elsewhere never makes it unusable, since failing the
/// pending requests is exactly what must still work then.
fn lock(inflight: &Mutex<Inflight>) -> MutexGuard<'_, Inflight> {
    inflight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks the connection dead and fails every pending request with `why`; later requests fail
/// at registration.
fn fail_all(inflight: &Mutex<Inflight>, why: &str) {
    let pending: Vec<Pending> = {
        let mut inf = lock(inflight);
        inf.dead.get_or_insert_with(|| why.to_string());
        inf.map.drain().map(|(_, p)| p).collect()
    };
    for p in pending {
        p.fail(NbdError::Disconnected(why.to_string()));
    }
}

pub struct NbdClient {
    writer: tokio::sync::Mutex<BoxWrite>,
    inflight: Arc<Mutex<Inflight>>,
    next_handle: AtomicU64,
    info: ExportInfo,
    contexts: HashMap<String, u32>,
    reader: tokio::task::JoinHandle<()>,
    timeout: Duration,
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
        Self::connect_with(addr, contexts, &ClientOptions::default()).await
    }

    /// [`NbdClient::connect`] with limits of the caller's choosing.
    pub async fn connect_with(addr: &NbdAddress, contexts: &[String], opts: &ClientOptions) -> Result<NbdClient> {
        let failed = |source| NbdError::Connect { addr: addr.to_string(), source };
        let connecting = async {
            let (r, w): (BoxRead, BoxWrite) = match &addr.transport {
                Transport::Tcp { host, port } => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(failed)?;
                    s.set_nodelay(true)?;
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Transport::Unix { socket } => {
                    let (r, w) = tokio::net::UnixStream::connect(socket).await.map_err(failed)?.into_split();
                    (Box::new(r), Box::new(w))
                }
            };
            Ok::<_, NbdError>((r, w))
        };
        let (r, w) = tokio::time::timeout(opts.request_timeout, connecting).await.map_err(|_| {
            failed(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within the request timeout"))
        })??;
        Self::negotiate(r, w, &addr.export, contexts, opts).await
    }

    /// Negotiates export `export` over an already connected stream (any transport, or an
    /// in-memory one for tests and fuzzing).
    pub async fn connect_stream<S>(
        stream: S,
        export: &str,
        contexts: &[String],
        opts: &ClientOptions,
    ) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::negotiate(Box::new(r), Box::new(w), export, contexts, opts).await
    }

    async fn negotiate(
        r: BoxRead,
        mut w: BoxWrite,
        export: &str,
        contexts: &[String],
        opts: &ClientOptions,
    ) -> Result<NbdClient> {
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let (info, granted) = tokio::time::timeout(opts.request_timeout, handshake(&mut r, &mut w, export, contexts))
            .await
            .map_err(|_| {
                NbdError::TimedOut(format!(
                    "the NBD server did not finish the handshake within {} s",
                    opts.request_timeout.as_secs_f64()
                ))
            })??;
        for c in contexts {
            if !granted.contains_key(c) {
                let _ = tokio::time::timeout(opts.request_timeout, send_option(&mut w, OPT_ABORT, &[])).await;
                return Err(NbdError::Unsupported(format!(
                    "NBD server did not grant meta context {c:?} (no such bitmap, or not exported)"
                )));
            }
        }
        let inflight = Arc::new(Mutex::new(Inflight::default()));
        let reader = tokio::spawn(reply_loop(r, inflight.clone(), granted.values().copied().collect()));
        Ok(NbdClient {
            writer: tokio::sync::Mutex::new(w),
            inflight,
            next_handle: AtomicU64::new(1),
            info,
            contexts: granted,
            reader,
            timeout: opts.request_timeout,
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
        let mut inf = lock(&self.inflight);
        if let Some(why) = &inf.dead {
            return Err(NbdError::Disconnected(why.clone()));
        }
        inf.map.insert(handle, p);
        Ok(handle)
    }

    /// The connection cannot be trusted any more: every request fails, now and later.
    fn kill(&self, why: &str) {
        fail_all(&self.inflight, why);
        self.reader.abort();
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
            // A request may be half on the wire: nothing sent after it could be understood.
            self.kill(&format!("sending a request failed: {e}"));
            return Err(NbdError::Io(e));
        }
        Ok(())
    }

    /// Sends one request and waits for its reply, within the request timeout. The reply (or
    /// the connection's failure) may come while the request is still being written, when the
    /// server stopped reading: then it is not waited for.
    async fn exchange<T>(
        &self,
        pending: impl FnOnce(oneshot::Sender<Result<T>>) -> Pending,
        request: (u16, u64, u32),
        data: &[u8],
    ) -> Result<T> {
        let (cmd, offset, len) = request;
        let (tx, mut rx) = oneshot::channel();
        let handle = self.register(pending(tx))?;
        let lost = |_| NbdError::Disconnected("the reply reader stopped".into());
        let work = async {
            let sent = self.send(handle, cmd, 0, offset, len, data);
            tokio::pin!(sent);
            tokio::select! {
                // Polled first: a send that finished counts as finished, whatever else is ready.
                biased;
                r = &mut sent => r?,
                reply = &mut rx => return self.replied_before_sent(reply.map_err(lost)?),
            }
            rx.await.map_err(lost)?
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                let why = format!(
                    "the NBD server sent no reply within {} s (the export stalled); the connection was closed",
                    self.timeout.as_secs_f64()
                );
                self.kill(&why);
                Err(NbdError::TimedOut(why))
            }
        }
    }

    /// A reply came while its request was still being written (the server stopped reading
    /// it). Dropping the send leaves part of the request on the wire, which the next request
    /// would follow: the connection is closed. A success cannot stand either: the server
    /// cannot have received all of a write's data.
    fn replied_before_sent<T>(&self, reply: Result<T>) -> Result<T> {
        let why = "the NBD server replied to a request before it was completely sent; the connection was closed";
        self.kill(why);
        match reply {
            Ok(_) => Err(NbdError::Protocol(why.into())),
            Err(e) => Err(e),
        }
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
        // Not zeroed: the reply must write every byte exactly once, and `written` checks it.
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        buf.truncate(len as usize);
        let pending = |tx| Pending::Read { offset, buf, written: Coverage::default(), error: None, tx };
        self.exchange(pending, (CMD_READ, offset, len), &[]).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Unsupported(format!("a write of {} bytes is too large", data.len())))?;
        self.check_range(offset, len as u64)?;
        if self.info.read_only() {
            return Err(NbdError::Unsupported("the NBD export is read-only".into()));
        }
        self.exchange(|tx| Pending::Simple { tx }, (CMD_WRITE, offset, len), data).await
    }

    /// Zeroes a range (the server may punch a hole).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<()> {
        self.check_range(offset, len as u64)?;
        if self.info.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return self.write(offset, &vec![0u8; len as usize]).await;
        }
        self.exchange(|tx| Pending::Simple { tx }, (CMD_WRITE_ZEROES, offset, len), &[]).await
    }

    /// Asks the server to make completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        if self.info.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.exchange(|tx| Pending::Simple { tx }, (CMD_FLUSH, 0, 0), &[]).await
    }

    /// One block status request for `context`; the server may describe less than asked.
    pub async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        self.check_range(offset, len as u64)?;
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| NbdError::Unsupported(format!("meta context {context:?} was not negotiated")))?;
        let pending = |tx| Pending::Status { extents: vec![], error: None, tx };
        let all = self.exchange(pending, (CMD_BLOCK_STATUS, offset, len), &[]).await?;
        // Within the request: check_range made `offset + len` safe.
        let end = offset + len as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        for (_, descs) in all.into_iter().filter(|(ctx, _)| *ctx == id) {
            for (l, f) in descs {
                // The last extent may reach past the request; it is cut there.
                let l = (l as u64).min(end - pos);
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
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        // Requests of up to 1 GiB keep answers bounded; align so servers need not split.
        // (The handshake refused a minimum block above 64 KiB.)
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
        let bye = async {
            let mut w = self.writer.lock().await;
            let _ = w.write_all(&hdr).await;
            let _ = w.shutdown().await;
        };
        let _ = tokio::time::timeout(self.timeout, bye).await;
        Ok(())
    }
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> std::io::Result<()> {
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

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The block sizes a server announced, checked as QEMU's client checks them, and refused when
/// a request could not be sized from them (a maximum of 0 would make every write loop forever).
fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<()> {
    let bad = |what: &str| {
        Err(NbdError::Protocol(format!(
            "unusable block sizes (minimum {min}, preferred {preferred}, maximum {max}): {what}"
        )))
    };
    if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
        return bad("the minimum must be a power of two of at most 64 KiB");
    }
    if !preferred.is_power_of_two() || preferred < min {
        return bad("the preferred size must be a power of two, at least the minimum");
    }
    if max < min {
        return bad("the maximum is below the minimum");
    }
    Ok(())
}

async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
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
                    let id = be_u32(&rep.data);
                    let name = String::from_utf8_lossy(&rep.data[4..]).into_owned();
                    // Only what we asked for, once each: the table stays as small as our list.
                    if !contexts.contains(&name) || granted.insert(name.clone(), id).is_some() {
                        return Err(NbdError::Protocol(format!("meta context {name:?} was not asked for")));
                    }
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
    for _ in 0..MAX_INFO_REPLIES {
        let rep = read_opt_reply(r, OPT_GO).await?;
        match rep.kind {
            REP_INFO if rep.data.len() >= 2 => {
                let t = u16::from_be_bytes([rep.data[0], rep.data[1]]);
                let d = &rep.data[2..];
                match t {
                    INFO_EXPORT if d.len() == 10 => {
                        info.size = u64::from_be_bytes(d[..8].try_into().unwrap());
                        info.flags = u16::from_be_bytes([d[8], d[9]]);
                        // Sizes and offsets are signed 64-bit in every NBD implementation.
                        if info.size > i64::MAX as u64 {
                            return Err(NbdError::Protocol(format!("export size {} is absurd", info.size)));
                        }
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE if d.len() == 12 => {
                        info.min_block = be_u32(d);
                        info.preferred_block = be_u32(&d[4..]);
                        info.max_block = be_u32(&d[8..]);
                        check_block_sizes(info.min_block, info.preferred_block, info.max_block)?;
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(NbdError::Protocol(format!("export information {t} of {} bytes", d.len())));
                    }
                    _ => {} // unknown informational replies are ignored, as the spec asks
                }
            }
            REP_ACK if have_export => return Ok((info, granted)),
            REP_ACK => return Err(NbdError::Protocol("NBD_OPT_GO finished without export information".into())),
            k if k & REP_FLAG_ERROR != 0 => return Err(refusal("NBD_OPT_GO", &rep, export)),
            _ => {} // unknown informational replies are ignored, as the spec asks
        }
    }
    Err(NbdError::Protocol(format!("NBD_OPT_GO sent more than {MAX_INFO_REPLIES} replies")))
}

/// Owned by the reply task: whatever ends it (the server closing, a protocol error, a panic,
/// the client dropping the task), every pending and every later request fails at once.
struct Replies {
    inflight: Arc<Mutex<Inflight>>,
    /// The meta context IDs the server granted.
    contexts: Vec<u32>,
    /// The request whose reply is being read, out of the table while its bytes arrive.
    current: Option<(u64, Pending)>,
    why: String,
}

impl Drop for Replies {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.why = "the NBD reply reader failed (a bug); the connection was closed".into();
        }
        if let Some((_, p)) = self.current.take() {
            p.fail(NbdError::Disconnected(self.why.clone()));
        }
        fail_all(&self.inflight, &self.why);
    }
}

/// Reads replies until the connection ends, routing each to its request.
async fn reply_loop<R: AsyncRead + Unpin>(mut r: BufReader<R>, inflight: Arc<Mutex<Inflight>>, contexts: Vec<u32>) {
    let mut replies = Replies { inflight, contexts, current: None, why: "the reply reader stopped".into() };
    match replies.read_all(&mut r).await {
        Ok(()) => replies.why = "the server closed the connection".to_string(),
        Err(e) => {
            replies.why = e.to_string();
            // The request whose reply broke the protocol gets the error itself.
            if let Some((_, p)) = replies.current.take() {
                p.fail(e);
            }
        }
    }
}

fn finish(p: Pending, simple_error: Option<NbdError>) {
    match p {
        Pending::Read { buf, written, error, tx, .. } => drop(tx.send(match simple_error.or(error) {
            Some(e) => Err(e),
            None if written.total != buf.len() as u64 => {
                Err(NbdError::Protocol(format!("read reply covered {} of {} bytes", written.total, buf.len())))
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

fn protocol<T>(why: String) -> Result<T> {
    Err(NbdError::Protocol(why))
}

/// Takes request `handle` out of the table as the one being answered (`current`).
fn take<'a>(
    inflight: &Mutex<Inflight>,
    current: &'a mut Option<(u64, Pending)>,
    handle: u64,
) -> Result<&'a mut Pending> {
    let p = lock(inflight)
        .map
        .remove(&handle)
        .ok_or_else(|| NbdError::Protocol(format!("reply for unknown handle {handle}")))?;
    Ok(&mut current.insert((handle, p)).1)
}

impl Replies {
    /// The request being answered is complete (`done`) or waits for more chunks.
    fn settle(&mut self, done: bool, error: Option<NbdError>) {
        let Some((handle, p)) = self.current.take() else { return };
        if done {
            finish(p, error);
        } else {
            lock(&self.inflight).map.insert(handle, p);
        }
    }

    async fn read_all<R: AsyncRead + Unpin>(&mut self, r: &mut BufReader<R>) -> Result<()> {
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
                    let err = (errno != 0).then(|| NbdError::Server { errno, message: String::new() });
                    let p = take(&self.inflight, &mut self.current, handle)?;
                    if let (Pending::Read { buf, written, .. }, None) = (p, &err) {
                        // A simple reply carries exactly the request's length, and is the only reply.
                        if !written.add(0, buf.len() as u64) {
                            return protocol(format!("a simple reply after structured chunks for handle {handle}"));
                        }
                        r.read_exact(buf).await?;
                    }
                    self.settle(true, err);
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = r.read_u16().await?;
                    let kind = r.read_u16().await?;
                    let handle = r.read_u64().await?;
                    let len = r.read_u32().await?;
                    let done = flags & REPLY_FLAG_DONE != 0;
                    let contexts = &self.contexts;
                    let p = take(&self.inflight, &mut self.current, handle)?;
                    let error = match (kind, p) {
                        (REPLY_TYPE_NONE, _) if len == 0 && done => None,
                        (REPLY_TYPE_OFFSET_DATA, Pending::Read { offset, buf, written, .. }) if len > 8 => {
                            let at = r.read_u64().await?;
                            let (s, e) = piece(*offset, buf.len(), at, len as u64 - 8, "data")?;
                            add_piece(written, s, e)?;
                            r.read_exact(&mut buf[s as usize..e as usize]).await?;
                            None
                        }
                        (REPLY_TYPE_OFFSET_HOLE, Pending::Read { offset, buf, written, .. }) if len == 12 => {
                            let at = r.read_u64().await?;
                            let n = r.read_u32().await?;
                            let (s, e) = piece(*offset, buf.len(), at, n as u64, "hole")?;
                            add_piece(written, s, e)?;
                            buf[s as usize..e as usize].fill(0);
                            None
                        }
                        (REPLY_TYPE_BLOCK_STATUS, Pending::Status { extents, .. })
                            if (12..=MAX_STATUS_CHUNK).contains(&len) && (len - 4).is_multiple_of(8) =>
                        {
                            let mut d = vec![0u8; len as usize];
                            r.read_exact(&mut d).await?;
                            let ctx = be_u32(&d);
                            if !contexts.contains(&ctx) || extents.iter().any(|(c, _)| *c == ctx) {
                                return protocol(format!("block status for meta context {ctx}, not asked or twice"));
                            }
                            let descs: Vec<(u32, u32)> =
                                d[4..].chunks_exact(8).map(|c| (be_u32(c), be_u32(&c[4..]))).collect();
                            if descs.iter().any(|&(l, _)| l == 0) {
                                return protocol("block status with an extent of length 0".into());
                            }
                            extents.push((ctx, descs));
                            None
                        }
                        (k, pending) if k & (1 << 15) != 0 && (6..=MAX_ERROR_CHUNK).contains(&len) => {
                            let mut d = vec![0u8; len as usize];
                            r.read_exact(&mut d).await?;
                            let errno = be_u32(&d);
                            let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
                            let Some(message) = d.get(6..6 + mlen) else {
                                return protocol(format!("error chunk message of {mlen} bytes in {len}"));
                            };
                            // A server error must say what went wrong: errno 0 would read as success.
                            let errno = if errno == 0 { 5 } else { errno };
                            let e = NbdError::Server { errno, message: String::from_utf8_lossy(message).into_owned() };
                            match pending {
                                Pending::Read { error, .. } | Pending::Status { error, .. } => {
                                    error.get_or_insert(e);
                                    None
                                }
                                Pending::Simple { .. } if done => Some(e),
                                Pending::Simple { .. } => {
                                    return protocol("multi-chunk error for a simple command".into())
                                }
                            }
                        }
                        _ => return protocol(format!("unexpected reply chunk type {kind} ({len} bytes)")),
                    };
                    self.settle(done, error);
                }
                m => return protocol(format!("bad reply magic {m:#x}")),
            }
        }
    }
}

/// Where a data or hole chunk at `at` of `n` bytes lands in a read of `len` bytes at `offset`:
/// a non-empty span inside the request, or a protocol error.
fn piece(offset: u64, len: usize, at: u64, n: u64, what: &str) -> Result<(u64, u64)> {
    match at.checked_sub(offset).and_then(|s| Some((s, s.checked_add(n)?))) {
        Some((s, e)) if n > 0 && e <= len as u64 => Ok((s, e)),
        _ => protocol(format!("read {what} at {at}+{n} outside the request {offset}+{len}")),
    }
}

fn add_piece(written: &mut Coverage, s: u64, e: u64) -> Result<()> {
    if !written.add(s, e) {
        return protocol(format!("read reply chunks overlap at request bytes {s}..{e}"));
    }
    if written.spans.len() > MAX_READ_PIECES {
        return protocol(format!("read reply in more than {MAX_READ_PIECES} separate pieces"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_refuses_overlaps_and_merges_neighbours() {
        let mut c = Coverage::default();
        assert!(c.add(10, 20));
        assert!(c.add(30, 40));
        assert!(!c.add(15, 16), "inside a span");
        assert!(!c.add(5, 11), "overlapping a start");
        assert!(!c.add(19, 31), "bridging two spans");
        assert!(!c.add(0, 100), "covering spans");
        assert!(!c.add(10, 20), "the same span twice");
        assert!(c.add(20, 30));
        assert_eq!(c.spans.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), vec![(10, 40)]);
        assert!(c.add(0, 10));
        assert!(c.add(40, 41));
        assert_eq!(c.spans.len(), 1);
        assert_eq!(c.total, 41);
    }

    #[test]
    fn pieces_outside_the_request_are_refused_without_overflow() {
        assert_eq!(piece(100, 50, 100, 50, "data").unwrap(), (0, 50));
        assert!(piece(100, 50, 99, 1, "data").is_err());
        assert!(piece(100, 50, 140, 11, "data").is_err());
        assert!(piece(100, 50, 120, 0, "hole").is_err());
        assert!(piece(0, 50, u64::MAX, u64::MAX, "data").is_err());
        assert!(piece(0, 50, 10, u64::MAX - 5, "hole").is_err());
    }

    #[test]
    fn block_sizes_a_request_cannot_be_cut_by_are_refused() {
        assert!(check_block_sizes(1, 4096, 32 << 20).is_ok());
        assert!(check_block_sizes(512, 65536, u32::MAX).is_ok());
        assert!(check_block_sizes(1, 4096, 0).is_err());
        assert!(check_block_sizes(0, 4096, 1 << 20).is_err());
        assert!(check_block_sizes(3, 4096, 1 << 20).is_err());
        assert!(check_block_sizes(1 << 20, 1 << 20, 1 << 25).is_err());
        assert!(check_block_sizes(4096, 512, 1 << 20).is_err());
    }
}
