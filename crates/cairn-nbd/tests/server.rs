//! The read-only server against our own client and QEMU's tools: reads in bounded pieces, a
//! failure half-way through a read, and recorded sessions that replay byte for byte (the NBD
//! fuzz targets' seeds).

mod common;

use cairn_nbd::server::{serve_connection, serve_unix, Export, Exports, Limits, Socket};
use cairn_nbd::{NbdAddress, NbdClient, NbdError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const SIZE: u64 = 8 << 20;

/// 8 MiB of a pattern; reads touching `bad` fail. Records the largest read asked of it.
struct Pattern {
    bad: std::ops::Range<u64>,
    largest: AtomicUsize,
}

fn byte(at: u64) -> u8 {
    (at % 251) as u8
}

impl Export for Pattern {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.largest.fetch_max(buf.len(), Ordering::Relaxed);
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(std::io::Error::other("damaged block"));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte(offset + i as u64);
        }
        Ok(())
    }
}

fn serve(export: Arc<Pattern>) -> (tempfile::TempDir, NbdAddress) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let exports = Exports(vec![("disk0".into(), export as Arc<dyn Export>)]);
    std::thread::spawn(move || serve_unix(listener, exports, None, Limits::default()));
    (dir, NbdAddress::unix(path, "disk0"))
}

#[tokio::test]
async fn large_reads_are_answered_in_pieces_of_at_most_one_mib() {
    let export = Arc::new(Pattern { bad: 0..0, largest: AtomicUsize::new(0) });
    let (_dir, addr) = serve(export.clone());
    let c = NbdClient::connect(&addr, &[]).await.unwrap();
    let got = c.read(100, 5 << 20).await.unwrap();
    assert!(got.iter().enumerate().all(|(i, &b)| b == byte(100 + i as u64)));
    assert_eq!(export.largest.load(Ordering::Relaxed), 1 << 20);
    let zero = c.read(0, 0).await;
    assert!(matches!(zero, Err(NbdError::Server { errno: 22, .. })), "{zero:?}");
}

#[tokio::test]
async fn a_read_failing_half_way_fails_that_read_and_the_connection_goes_on() {
    let export = Arc::new(Pattern { bad: (3 << 20)..(3 << 20) + 1, largest: AtomicUsize::new(0) });
    let (_dir, addr) = serve(export);
    let c = NbdClient::connect(&addr, &[]).await.unwrap();
    let r = c.read(2 << 20, 4 << 20).await;
    match r {
        Err(NbdError::Server { errno: 5, message }) => assert!(message.contains("damaged block"), "{message}"),
        other => panic!("expected EIO, got {:?}", other.map(|v| v.len())),
    }
    let after = c.read(0, 4096).await.unwrap();
    assert!(after.iter().enumerate().all(|(i, &b)| b == byte(i as u64)));
}

/// The disk the `nbd_server` fuzz target serves: 4 MiB of alternating 64 KiB runs of data and
/// zeros, reads touching [3 MiB, 3 MiB + 4 KiB) failing.
struct FuzzDisk;

impl Export for FuzzDisk {
    fn size(&self) -> u64 {
        4 << 20
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < (3 << 20) + 4096 && end > 3 << 20 {
            return Err(std::io::Error::other("damaged block"));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if (at >> 16).is_multiple_of(2) { at as u8 } else { 0 };
        }
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        let next = ((offset >> 16) + 1) << 16;
        Ok(vec![((next - offset).min(len), (offset >> 16) % 2 == 1)])
    }
}

/// A client fed from memory, its output kept.
struct Scripted {
    input: std::io::Cursor<Vec<u8>>,
    output: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
}

impl std::io::Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Socket for Scripted {
    fn set_timeouts(&self, _: Option<std::time::Duration>, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (qemu-utils must be installed)"));
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// What QEMU's tools and our client send our server, recorded, replays through
/// `serve_connection` on an in-memory stream with the very same answer; these sessions are the
/// `nbd_server` fuzz target's seeds, and the server's side of our client's session one of the
/// `nbd_client` target's (fuzz/seeds/nbd_server.sh, nbd_client.sh).
#[test]
fn recorded_client_sessions_replay_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let exports = Exports(vec![("disk0".into(), Arc::new(FuzzDisk) as Arc<dyn Export>)]);
    let served = exports.clone();
    std::thread::spawn(move || serve_unix(listener, served, None, Limits::default()));
    let rec = common::Recorder::start(dir.path(), &path);
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", rec.front.display());
    let img = |args: &[&str]| run(std::process::Command::new("qemu-img").args(args));
    let io = |cmds: &[&str]| {
        let mut c = std::process::Command::new("qemu-io");
        c.args(["-r", "-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run(c.arg(uri("disk0")))
    };
    let copy = dir.path().join("copy.raw");
    let sessions: Vec<(&str, String)> = vec![
        ("qemu-img-info", img(&["info", "-f", "raw", &uri("disk0")])),
        ("qemu-img-map", img(&["map", "-f", "raw", "--output=json", &uri("disk0")])),
        ("qemu-io-reads", io(&["read -P 0 65536 4096", "read 0 128k", "read 3M 8k", "readv 1M 4k 4k"])),
        ("qemu-img-convert", img(&["convert", "-f", "raw", "-O", "raw", &uri("disk0"), copy.to_str().unwrap()])),
        ("qemu-img-no-export", img(&["info", "-f", "raw", &uri("nope")])),
        (
            "qemu-nbd-list",
            run(std::process::Command::new("qemu-nbd").arg("--list").arg(format!("--socket={}", rec.front.display()))),
        ),
    ];
    assert!(sessions[0].1.contains("virtual size: 4 MiB"), "{}", sessions[0].1);
    assert!(sessions[2].1.contains("read failed"), "{}", sessions[2].1);
    assert!(sessions[4].1.contains("nope"), "{}", sessions[4].1);
    assert!(sessions[5].1.contains("disk0"), "{}", sessions[5].1);

    // Our own client, every kind of request at once.
    let ops: Vec<common::Op> =
        vec![(1, 0, 4 << 20), (0, 0, 16384), (0, (3 << 20) - 4096, 8192), (0, 65000, 1000), (2, 0, 4 << 20)];
    let live = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let ctx = [cairn_nbd::proto::CONTEXT_BASE_ALLOCATION.to_string()];
        let c = NbdClient::connect(&NbdAddress::unix(&rec.front, "disk0"), &ctx).await.unwrap();
        common::run_ops(Arc::new(c), &ops).await
    });
    assert!(live[2].contains("damaged block"), "{live:?}");

    let recorded = rec.sessions(sessions.len() + 1);
    for (i, s) in recorded.iter().enumerate() {
        let name = sessions.get(i).map_or("cairn-client", |(n, _)| n);
        let output = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let client = Scripted { input: std::io::Cursor::new(s.client_bytes()), output: output.clone() };
        let _ = serve_connection(client, &exports, None, &Limits::default());
        let answered: Vec<u8> = s.0.iter().filter(|(c, _)| !*c).flat_map(|(_, b)| b.clone()).collect();
        assert!(answered == *output.borrow(), "{name}: the replayed answer differs");
        common::save_seed("nbd_server", name, &s.client_bytes());
    }
    let pieces = recorded.last().unwrap().server_pieces();
    // The client asked for export disk0 here; the fuzz target asks for the default export.
    assert_eq!(common::replay(true, &ops, pieces.clone()), live);
    common::save_seed("nbd_client", "cairn-server", &common::client_case(true, &ops, &pieces));
}

/// A 64 MiB export of zeros.
struct Zeros;

impl Export for Zeros {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_at(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// Connects to `port`, takes the default export (NBD_OPT_EXPORT_NAME, simple replies) and
/// asks for `len` bytes at 0.
fn raw_read_request(port: u16, len: u32) -> std::net::TcpStream {
    use cairn_nbd::proto::*;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_FIXED_NEWSTYLE as u32 | FLAG_NO_ZEROES as u32).to_be_bytes()).unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap(); // NBD_OPT_EXPORT_NAME
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).unwrap();
    s
}

/// A client that asks for a large read and then stops reading would hold its slot and thread
/// for good (no idle time is set); the write time ends it and frees the slot.
#[test]
fn a_client_that_stops_reading_is_dropped_after_the_write_timeout_and_its_slot_freed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let exports = Exports(vec![("disk0".into(), Arc::new(Zeros) as Arc<dyn Export>)]);
    let limits = Limits { max_connections: 1, write_timeout: std::time::Duration::from_secs(1), ..Limits::default() };
    std::thread::spawn(move || cairn_nbd::server::serve_tcp(listener, exports, None, limits));

    // 32 MiB in one simple reply: far more than the socket buffers hold.
    let stuck = raw_read_request(port, 32 << 20);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let served = loop {
        // The only slot is the stuck client's until the server gives up on it.
        let addr = NbdAddress::parse(&format!("nbd://127.0.0.1:{port}/disk0")).unwrap();
        match rt.block_on(async { NbdClient::connect(&addr, &[]).await?.read(0, 4096).await }) {
            Ok(data) => break data,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(30) => {
                eprintln!("not served yet: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("the stuck client still holds the only slot after 30 s: {e}"),
        }
    };
    assert!(served.iter().all(|b| *b == 0));
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "{:?}", started.elapsed());
    // And the stuck client's connection was closed: after what the buffers held, it ends.
    let mut rest = Vec::new();
    let mut s = stuck;
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.len() < (32 << 20) + 16, "the whole reply arrived: {} bytes", rest.len());
}
