//! A small read-only NBD server: the fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`) and simple replies. It serves restore points to any NBD
//! client (QEMU, qemu-img, nbdcopy, the kernel's nbd driver). One thread per connection; the
//! export does the caching.
//!
//! With a TLS configuration ([`tls_config`]), TLS is required, as the NBD protocol specifies
//! it: before `NBD_OPT_STARTTLS` every option but `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD`;
//! after it, the handshake and then everything else runs inside TLS (rustls). Given a client
//! CA, clients must present a certificate it signed: NBD itself authenticates nobody.
//!
//! Every client is bounded ([`Limits`]): a number of connections (hence threads), a time to
//! finish the handshake, an idle time, a time to take in each reply, and about 1 MiB of buffer
//! (reads are answered in pieces). TCP connections use keepalives, so a client whose host
//! vanished (a half-open connection) is noticed within minutes even when no idle time is set.

use crate::proto::*;
use std::cell::{Cell, RefCell};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an export serves: a read-only disk.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (never past the end: the server checks).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Allocation from `offset` on, for at most `len` bytes: (length, reads as zeros) runs that
    /// cover at least the first byte. Lets clients skip holes (`base:allocation`).
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let _ = offset;
        Ok(vec![(len, false)])
    }
}

/// Named exports; the first one is also the default export (empty name).
#[derive(Clone)]
pub struct Exports(pub Vec<(String, Arc<dyn Export>)>);

impl Exports {
    fn find(&self, name: &str) -> Option<&Arc<dyn Export>> {
        if name.is_empty() {
            return self.0.first().map(|(_, e)| e);
        }
        self.0.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }
}

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_LIST_META_CONTEXT: u32 = 9;
/// The one meta context we serve.
const BASE_ALLOCATION_ID: u32 = 1;
const REP_SERVER: u32 = 2;
const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
/// Largest read we serve, as advertised in the block size info.
const MAX_REQUEST: u32 = 32 << 20;
/// Reads are answered in structured data chunks of at most this much, so a connection holds
/// one such buffer whatever the request size.
const READ_PIECE: usize = 1 << 20;

/// What one server grants its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Clients served at once (one thread each); more are refused when they connect.
    pub max_connections: usize,
    /// Time from connecting to choosing an export (TLS included), as QEMU's own server limits
    /// it: a client that says nothing cannot hold a connection slot for long.
    pub handshake_timeout: Duration,
    /// A client silent for this long once serving (no request) is disconnected; `None` keeps it.
    pub idle_timeout: Option<Duration>,
    /// A client that takes in nothing of a reply for this long (it stopped reading, or its
    /// host is gone) is disconnected once serving, whatever the idle time: it would otherwise
    /// hold its slot and thread for good.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            write_timeout: Duration::from_secs(300),
        }
    }
}

/// A connection whose reads and writes can be given time limits (a socket).
pub trait Socket {
    /// Limits each read and each write to these times (`None`: no limit).
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
}

impl Socket for std::net::TcpStream {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

impl Socket for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

/// TCP keepalive probes after a minute without traffic, every 10 s, 6 unanswered probes
/// ending the connection: a client whose host vanished is noticed in about two minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// Sets a served TCP connection's options: no Nagle delay, and keepalives.
fn tune_tcp(c: &std::net::TcpStream) -> io::Result<()> {
    c.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(c).set_tcp_keepalive(&keepalive)
}

/// Which time limits a connection is under: the handshake's deadline, then the idle time for
/// reads and the write time for writes.
struct Clock {
    handshake_until: Cell<Option<Instant>>,
    idle: Option<Duration>,
    write: Duration,
    /// The limits last given to the socket (a system call only when they change).
    armed: Cell<Option<(Option<Duration>, Option<Duration>)>>,
}

impl Clock {
    fn handshake_done(&self) {
        self.handshake_until.set(None);
    }

    /// Sets the socket's limits for the next read or write; fails once the handshake is late.
    fn arm(&self, sock: &impl Socket) -> io::Result<()> {
        let limits = match self.handshake_until.get() {
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not finish the handshake in time",
                    ));
                }
                (Some(left), Some(left))
            }
            None => (self.idle, Some(self.write)),
        };
        if self.armed.get() != Some(limits) {
            sock.set_timeouts(limits.0, limits.1)?;
            self.armed.set(Some(limits));
        }
        Ok(())
    }

    /// Says which limit a timed-out read or write (`writing`) ran into.
    fn explain(&self, e: io::Error, writing: bool) -> io::Error {
        if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            return e;
        }
        let why = match (self.handshake_until.get(), self.idle) {
            (Some(_), _) => "the client did not finish the handshake in time".to_string(),
            (None, _) if writing => {
                format!("the client took in nothing of a reply for {} s (it stopped reading)", self.write.as_secs())
            }
            (None, Some(idle)) => format!("the client was idle for {} s", idle.as_secs()),
            (None, None) => return e,
        };
        io::Error::new(io::ErrorKind::TimedOut, why)
    }
}

/// A socket under a [`Clock`]: every read and write within the current limit.
struct Timed<'c, S> {
    sock: S,
    clock: &'c Clock,
}

impl<S: Socket + Read> Read for Timed<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.clock.arm(&self.sock)?;
        self.sock.read(buf).map_err(|e| self.clock.explain(e, false))
    }
}

impl<S: Socket + Write> Write for Timed<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.clock.arm(&self.sock)?;
        self.sock.write(buf).map_err(|e| self.clock.explain(e, true))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

/// A server TLS configuration from PEM files: the certificate chain (server first) and its
/// private key; with `client_ca`, clients must present a certificate signed by one of the
/// certificates in that file.
pub fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> io::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", what.display()))
    };
    let certs = |path: &Path| {
        let list = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(path, &e))?;
        if list.is_empty() {
            return Err(bad(path, &"no certificate in the file"));
        }
        Ok(list)
    };
    let chain = certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, &e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| bad(ca, &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| bad(cert, &e))?;
    Ok(Arc::new(config))
}

/// One owned stream used for reads and writes in turn (a TLS stream cannot be split).
struct Duplex<S>(RefCell<S>);

impl<S: Read> Read for &Duplex<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Write> Write for &Duplex<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Reads one option request: (option, data).
fn read_option(r: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
    let mut hdr = [0u8; 16];
    r.read_exact(&mut hdr)?;
    if u64_at(&hdr, 0) != IHAVEOPT {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad option magic"));
    }
    let (option, len) = (u32_at(&hdr, 8), u32_at(&hdr, 12));
    if len > 64 * 1024 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "option too long"));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((option, data))
}

/// Serves one client on `stream` until it disconnects; with `tls`, only over TLS. The
/// handshake, idle and write limits of `limits` apply (the connection count is the caller's).
pub fn serve_connection<S: Socket + Read + Write>(
    stream: S,
    exports: &Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
    limits: &Limits,
) -> io::Result<()> {
    let clock = Clock {
        handshake_until: Cell::new(Some(Instant::now() + limits.handshake_timeout)),
        idle: limits.idle_timeout,
        write: limits.write_timeout,
        armed: Cell::new(None),
    };
    let mut stream = Timed { sock: stream, clock: &clock };
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    let mut b4 = [0u8; 4];
    stream.read_exact(&mut b4)?;
    let no_zeroes = u32::from_be_bytes(b4) & FLAG_NO_ZEROES as u32 != 0;
    let Some(tls) = tls else {
        return haggle_and_serve(&Duplex(RefCell::new(stream)), exports, no_zeroes, &clock);
    };
    loop {
        let (option, _) = read_option(&mut stream)?;
        match option {
            OPT_STARTTLS => {
                option_reply(&mut stream, option, REP_ACK, &[])?;
                let conn = rustls::ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
                let secure = Duplex(RefCell::new(rustls::StreamOwned::new(conn, stream)));
                return haggle_and_serve(&secure, exports, no_zeroes, &clock);
            }
            OPT_ABORT => {
                let _ = option_reply(&mut stream, option, REP_ACK, &[]);
                return Ok(());
            }
            OPT_EXPORT_NAME => {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "client did not start TLS"));
            }
            _ => option_reply(&mut stream, option, REP_ERR_TLS_REQD, b"this server requires TLS")?,
        }
    }
}

/// Option haggling, then transmission, on a stream past the greeting.
fn haggle_and_serve<S: Read + Write>(
    stream: &Duplex<S>,
    exports: &Exports,
    no_zeroes: bool,
    clock: &Clock,
) -> io::Result<()> {
    let mut r = BufReader::new(stream);
    let mut w = BufWriter::new(stream);

    // Option haggling until an export is chosen.
    let mut structured = false;
    let mut base_allocation = false;
    let export = loop {
        let (option, data) = read_option(&mut r)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = exports.find(&name) else {
                    return Err(io::Error::new(io::ErrorKind::NotFound, format!("no export {name:?}")));
                };
                w.write_all(&e.size().to_be_bytes())?;
                w.write_all(&transmission_flags().to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                break e.clone();
            }
            OPT_GO | OPT_INFO => {
                if data.len() < 6 {
                    option_reply(&mut w, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                }
                let n = u32_at(&data, 0) as usize;
                let name = String::from_utf8_lossy(data.get(4..4 + n).unwrap_or_default()).into_owned();
                let Some(e) = exports.find(&name) else {
                    option_reply(&mut w, option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                    continue;
                };
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&e.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(&mut w, option, REP_INFO, &info)?;
                let mut bs = Vec::new();
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&65536u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(&mut w, option, REP_INFO, &bs)?;
                option_reply(&mut w, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    break e.clone();
                }
            }
            OPT_LIST => {
                for (name, _) in &exports.0 {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(&mut w, option, REP_SERVER, &d)?;
                }
                option_reply(&mut w, option, REP_ACK, &[])?;
            }
            OPT_ABORT => {
                let _ = option_reply(&mut w, option, REP_ACK, &[]);
                return Ok(());
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(&mut w, option, REP_ACK, &[])?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                if option == OPT_SET_META_CONTEXT && !structured {
                    option_reply(&mut w, option, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                let Some(queries) = meta_queries(&data) else {
                    option_reply(&mut w, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let wanted = queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION || q == "base:")
                    || (option == OPT_LIST_META_CONTEXT && queries.is_empty());
                if wanted {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    option_reply(&mut w, option, REP_META_CONTEXT, &d)?;
                    if option == OPT_SET_META_CONTEXT {
                        base_allocation = true;
                    }
                }
                option_reply(&mut w, option, REP_ACK, &[])?;
            }
            _ => option_reply(&mut w, option, REP_ERR_UNSUP, &[])?,
        }
    };

    // Transmission: one request at a time.
    clock.handshake_done();
    let size = export.size();
    let mut buf = Vec::new();
    loop {
        let mut req = [0u8; 28];
        match r.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if u32_at(&req, 0) != REQUEST_MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
        }
        let (cmd_flags, kind) = (u16_at(&req, 4), u16_at(&req, 6));
        let (handle, offset, len) = (u64_at(&req, 8), u64_at(&req, 16), u32_at(&req, 24));
        // NBD_CMD_FLAG_REQ_ONE: the client wants a single extent per context (QEMU always asks so).
        let max_extents = if cmd_flags & (1 << 3) != 0 { 1 } else { 4096 };
        let reply = |w: &mut BufWriter<&Duplex<S>>, error: u32| -> io::Result<()> {
            w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
            w.write_all(&error.to_be_bytes())?;
            w.write_all(&handle.to_be_bytes())
        };
        match kind {
            CMD_READ => {
                if len == 0 || len > MAX_REQUEST || offset.checked_add(len as u64).is_none_or(|end| end > size) {
                    reply(&mut w, EINVAL)?;
                } else if structured {
                    read_in_pieces(&mut w, &*export, handle, offset, len, &mut buf)?;
                } else {
                    // A simple reply cannot fail half-way: the whole read comes first.
                    buf.resize(len as usize, 0);
                    match export.read_at(offset, &mut buf) {
                        Ok(()) => {
                            reply(&mut w, 0)?;
                            w.write_all(&buf)?;
                        }
                        Err(e) => {
                            eprintln!("cairn nbd: read of {len} bytes at {offset} failed: {e}");
                            reply(&mut w, EIO)?;
                        }
                    }
                    if buf.capacity() > READ_PIECE {
                        buf = Vec::new();
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a write of {len} bytes")));
                }
                // Read and drop the payload: the export is read-only.
                io::copy(&mut (&mut r).take(len as u64), &mut io::sink())?;
                reply(&mut w, EPERM)?;
            }
            CMD_FLUSH => reply(&mut w, 0)?,
            CMD_DISC => {
                w.flush()?;
                return Ok(());
            }
            CMD_WRITE_ZEROES => reply(&mut w, EPERM)?,
            CMD_BLOCK_STATUS if base_allocation => {
                if offset >= size || len == 0 {
                    structured_error(&mut w, handle, EINVAL, "out of range", None)?;
                } else {
                    let want = (len as u64).min(size - offset);
                    match export.extents(offset, want) {
                        Ok(ext) => {
                            let mut body = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            let mut total = 0u64;
                            for (l, zero) in ext.into_iter().take(max_extents) {
                                let l = l.min(want - total).min(u32::MAX as u64 & !4095);
                                if l == 0 {
                                    break;
                                }
                                body.extend_from_slice(&(l as u32).to_be_bytes());
                                body.extend_from_slice(&(if zero { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
                                total += l;
                                if total >= want {
                                    break;
                                }
                            }
                            chunk(&mut w, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, body.len() as u32)?;
                            w.write_all(&body)?;
                        }
                        Err(e) => structured_error(&mut w, handle, EIO, &e.to_string(), None)?,
                    }
                }
            }
            _ => reply(&mut w, EINVAL)?,
        }
        w.flush()?;
    }
}

/// Answers a read with structured data chunks of at most [`READ_PIECE`] bytes, and an error
/// chunk at the first piece that cannot be read.
fn read_in_pieces(
    w: &mut impl Write,
    export: &dyn Export,
    handle: u64,
    offset: u64,
    len: u32,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let end = offset + len as u64;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(READ_PIECE as u64) as usize;
        buf.resize(n, 0);
        if let Err(e) = export.read_at(at, buf) {
            eprintln!("cairn nbd: read of {n} bytes at {at} failed: {e}");
            return structured_error(w, handle, EIO, &e.to_string(), Some(at));
        }
        let flags = if at + n as u64 == end { REPLY_FLAG_DONE } else { 0 };
        chunk(w, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + n as u32)?;
        w.write_all(&at.to_be_bytes())?;
        w.write_all(buf)?;
        at += n as u64;
    }
    Ok(())
}

/// Parses the export name and queries of a meta context option.
fn meta_queries(data: &[u8]) -> Option<Vec<String>> {
    let field = |at: usize, len: usize| data.get(at..at.checked_add(len)?);
    let u32_field = |at: usize| Some(u32::from_be_bytes(field(at, 4)?.try_into().ok()?) as usize);
    let mut at = 4usize.checked_add(u32_field(0)?)?;
    let count = u32_field(at)?;
    at += 4;
    let mut out = Vec::new();
    for _ in 0..count {
        let l = u32_field(at)?;
        out.push(String::from_utf8_lossy(field(at + 4, l)?).into_owned());
        at += 4 + l;
    }
    Some(out)
}

/// The header of a structured reply chunk.
fn chunk(w: &mut impl Write, flags: u16, kind: u16, handle: u64, len: u32) -> io::Result<()> {
    w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&flags.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&handle.to_be_bytes())?;
    w.write_all(&len.to_be_bytes())
}

/// A final error chunk; with `at`, the offset where a read failed.
fn structured_error(w: &mut impl Write, handle: u64, error: u32, msg: &str, at: Option<u64>) -> io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let (kind, extra) = if at.is_some() { (REPLY_TYPE_ERROR_OFFSET, 8) } else { (REPLY_TYPE_ERROR, 0) };
    chunk(w, REPLY_FLAG_DONE, kind, handle, 6 + msg.len() as u32 + extra)?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&(msg.len() as u16).to_be_bytes())?;
    w.write_all(msg)?;
    if let Some(at) = at {
        w.write_all(&at.to_be_bytes())?;
    }
    Ok(())
}

/// Serves every connection of `incoming` on a thread of its own, at most
/// `limits.max_connections` at once, until the listener fails.
fn serve_all<S>(
    incoming: impl Iterator<Item = io::Result<S>>,
    exports: Exports,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) -> io::Result<()>
where
    S: Socket + Read + Write + Send + 'static,
{
    let active = Arc::new(AtomicUsize::new(0));
    for conn in incoming {
        let conn = match conn {
            Ok(c) => c,
            // A client gone before it was accepted, or no file descriptor free for a moment.
            Err(e) if accept_error_passes(&e) => {
                eprintln!("cairn nbd: accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if active.load(Ordering::Acquire) >= limits.max_connections {
            eprintln!(
                "cairn nbd: refused a connection: {} clients are connected already (the limit)",
                limits.max_connections
            );
            continue; // dropping it closes it
        }
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(active.clone());
        let (exports, tls, limits) = (exports.clone(), tls.clone(), limits.clone());
        let started = std::thread::Builder::new().name("cairn-nbd-conn".into()).spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_connection(conn, &exports, tls.as_ref(), &limits) {
                if e.kind() != io::ErrorKind::UnexpectedEof && e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("cairn nbd: connection ended: {e}");
                }
            }
        });
        if let Err(e) = started {
            eprintln!("cairn nbd: refused a connection: no thread for it ({e})");
        }
    }
    Ok(())
}

/// A connection slot, given back when its thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Errors of `accept` that concern one client or a passing shortage, not the listener.
fn accept_error_passes(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Accepts clients on a Unix socket until the process ends, one thread each.
pub fn serve_unix(
    listener: std::os::unix::net::UnixListener,
    exports: Exports,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) -> io::Result<()> {
    serve_all(listener.incoming(), exports, tls, limits)
}

/// Accepts clients on a TCP socket until the process ends, one thread each.
pub fn serve_tcp(
    listener: std::net::TcpListener,
    exports: Exports,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) -> io::Result<()> {
    serve_all(
        listener.incoming().map(|c| {
            c.inspect(|c| {
                if let Err(e) = tune_tcp(c) {
                    eprintln!("cairn nbd: cannot set a connection's TCP options (keepalive): {e}");
                }
            })
        }),
        exports,
        tls,
        limits,
    )
}
