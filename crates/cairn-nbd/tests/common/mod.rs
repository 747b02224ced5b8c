//! Test helpers: a recording proxy between an NBD client and server (real sessions become fuzz
//! seeds and replay checks).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One relayed session, in the order the proxy saw it: (from the client?, bytes).
#[derive(Clone, Default)]
pub struct Session(pub Vec<(bool, Vec<u8>)>);

impl Session {
    /// Everything the client sent.
    pub fn client_bytes(&self) -> Vec<u8> {
        self.0.iter().filter(|(c, _)| *c).flat_map(|(_, b)| b.clone()).collect()
    }

    /// What the server sent, cut where the client spoke in between: each piece answers what
    /// the client had sent before it.
    pub fn server_pieces(&self) -> Vec<Vec<u8>> {
        let mut pieces: Vec<Vec<u8>> = vec![];
        let mut client_spoke = true;
        for (from_client, b) in &self.0 {
            if *from_client {
                client_spoke = true;
            } else if client_spoke || pieces.is_empty() {
                pieces.push(b.clone());
                client_spoke = false;
            } else {
                pieces.last_mut().unwrap().extend_from_slice(b);
            }
        }
        pieces
    }
}

/// Clients connecting to `front` are relayed to the server at `back`; every session is kept.
pub struct Recorder {
    pub front: PathBuf,
    sessions: Arc<Mutex<Vec<Session>>>,
}

/// Copies `from` to `to`, noting each piece in `timeline` before passing it on (so a reply is
/// always noted after the request it answers).
fn relay(mut from: UnixStream, mut to: UnixStream, from_client: bool, timeline: &Mutex<Session>) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        timeline.lock().unwrap().0.push((from_client, buf[..n].to_vec()));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Recorder {
    pub fn start(dir: &Path, back: &Path) -> Recorder {
        let front = dir.join("recorder.sock");
        let listener = UnixListener::bind(&front).unwrap();
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let (kept, back) = (sessions.clone(), back.to_path_buf());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = UnixStream::connect(&back).unwrap();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let timeline = Arc::new(Mutex::new(Session::default()));
                let t = timeline.clone();
                let up = std::thread::spawn(move || relay(client, server, true, &t));
                relay(s2, c2, false, &timeline);
                up.join().unwrap();
                let session = timeline.lock().unwrap().clone();
                kept.lock().unwrap().push(session);
            }
        });
        Recorder { front, sessions }
    }

    /// The first `n` sessions, once they have ended.
    pub fn sessions(&self, n: usize) -> Vec<Session> {
        let t = Instant::now();
        loop {
            {
                let s = self.sessions.lock().unwrap();
                if s.len() >= n {
                    return s[..n].to_vec();
                }
            }
            assert!(t.elapsed() < Duration::from_secs(20), "the recorded sessions did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes `bytes` as fuzz seed `name` of `target` when CAIRN_FUZZ_SEEDS names the corpus root
/// (fuzz/corpus); the seed scripts in fuzz/seeds/ set it.
pub fn save_seed(target: &str, name: &str, bytes: &[u8]) {
    if let Some(root) = std::env::var_os("CAIRN_FUZZ_SEEDS") {
        let dir = PathBuf::from(root).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// An operation of the `nbd_client` fuzz target: (0 read, 1 block status, 2 extents; offset;
/// length).
pub type Op = (u8, u64, u32);

/// The `nbd_client` fuzz target's input: flags (bit 0: `base:allocation`), the operations,
/// then the server's pieces, each after its length (u32).
pub fn client_case(contexts: bool, ops: &[Op], server: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![contexts as u8, ops.len() as u8];
    for &(kind, offset, len) in ops {
        out.push(kind);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    for piece in server {
        out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

/// Runs `ops` at once on `c`, one task each in order (so handles are given in that order, as in
/// the fuzz target); describes each outcome.
pub async fn run_ops(c: std::sync::Arc<cairn_nbd::NbdClient>, ops: &[Op]) -> Vec<String> {
    use cairn_nbd::proto::CONTEXT_BASE_ALLOCATION as CTX;
    let tasks: Vec<_> = ops
        .iter()
        .map(|&(kind, offset, len)| {
            let c = c.clone();
            tokio::spawn(async move {
                match kind {
                    0 => format!(
                        "{:?}",
                        c.read(offset, len)
                            .await
                            .map(|v| (v.len(), v.iter().fold(0u64, |h, &b| h.rotate_left(5) ^ b as u64)))
                    ),
                    1 => format!("{:?}", c.block_status(CTX, offset, len).await),
                    _ => format!("{:?}", c.extents(CTX, offset, len as u64).await),
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The same operations on a client fed the server's `pieces` from memory, each once the client
/// has nothing more to send, as the fuzz target does (on a paused clock: "nothing more" is the
/// runtime going idle).
pub fn replay(contexts: bool, ops: &[Op], pieces: Vec<Vec<u8>>) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async {
        let (client, peer) = tokio::io::duplex(64 << 10);
        let (mut from_client, mut to_client) = tokio::io::split(peer);
        let feed = tokio::spawn(async move {
            let mut b = vec![0u8; 64 << 10];
            for piece in pieces {
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), from_client.read(&mut b)).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = to_client.write_all(&piece).await;
            }
            let _ = to_client.shutdown().await;
            while from_client.read(&mut b).await.is_ok_and(|n| n > 0) {}
        });
        let ctx = if contexts { vec![cairn_nbd::proto::CONTEXT_BASE_ALLOCATION.to_string()] } else { vec![] };
        let c = cairn_nbd::NbdClient::connect_stream(client, "", &ctx, &Default::default()).await.unwrap();
        let out = run_ops(std::sync::Arc::new(c), ops).await;
        feed.abort();
        out
    })
}
