//! The NBD client against the real `qemu-nbd`.

mod common;

use cairn_nbd::proto::{dirty_bitmap_context, CONTEXT_BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use cairn_nbd::{NbdAddress, NbdClient, NbdError};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_nbd(dir: &Path, image: &Path, args: &[&str]) -> Server {
    let socket = dir.join(format!("nbd-{}.sock", rand_suffix()));
    let child = Command::new("qemu-nbd")
        .arg("--persistent")
        .arg("--shared=8")
        .arg(format!("--socket={}", socket.display()))
        .args(args)
        .arg(image)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd (Debian package qemu-utils) must be installed");
    // The socket file appears at bind(), before listen(): wait until a connection is accepted.
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Server { child, socket }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        ^ std::process::id() as u64
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?} failed");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A 16 MiB qcow2 with two written regions and the rest unallocated.
fn make_qcow2(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("16M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 1M 1M", "-c", "write -P 0x22 8M 64k"])
        .arg(&img)
        .stdout(Stdio::null()));
    img
}

#[test]
fn reads_extents_and_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path());
    let srv = qemu_nbd(dir.path(), &img, &["--read-only", "--format=qcow2"]);
    rt().block_on(async {
        let addr = NbdAddress::unix(&srv.socket, "");
        let c = NbdClient::connect(&addr, &[CONTEXT_BASE_ALLOCATION.to_string()]).await.unwrap();
        assert_eq!(c.size(), 16 << 20);
        assert!(c.info().read_only());
        assert!(c.info().structured_replies);
        let ext = c.extents(CONTEXT_BASE_ALLOCATION, 0, 16 << 20).await.unwrap();
        let data: Vec<_> = ext.iter().filter(|e| e.flags & STATE_ZERO == 0).map(|e| (e.offset, e.length)).collect();
        assert_eq!(data, vec![(1 << 20, 1 << 20), (8 << 20, 65536)], "{ext:?}");
        assert!(ext.iter().any(|e| e.flags & STATE_HOLE != 0));
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 16 << 20);

        // 64 reads of 256 KiB in flight at once, answered in any order.
        let reads: Vec<_> = (0..64u64).map(|i| c.read(i * 262144, 262144)).collect();
        let mut whole = Vec::new();
        for r in futures_join(reads).await {
            whole.extend_from_slice(&r.unwrap());
        }
        assert_eq!(whole.len(), 16 << 20);
        assert!(whole[..1 << 20].iter().all(|&b| b == 0));
        assert!(whole[1 << 20..2 << 20].iter().all(|&b| b == 0x11));
        assert!(whole[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0x22));
        assert!(whole[(8 << 20) + 65536..].iter().all(|&b| b == 0));

        // Errors are reported, not panicked on.
        assert!(c.read(16 << 20, 512).await.is_err());
        assert!(c.write(0, b"x").await.is_err(), "read-only export must refuse writes");
        c.disconnect().await.unwrap();

        let missing = NbdClient::connect(&NbdAddress::unix(&srv.socket, "nope"), &[]).await.err().unwrap();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let no_bitmap = NbdClient::connect(&addr, &[dirty_bitmap_context("nope")]).await.err().unwrap();
        assert!(matches!(no_bitmap, NbdError::Unsupported(_)), "{no_bitmap}");
    });
}

/// Awaits futures concurrently on the current-thread runtime (all requests are sent before
/// the first reply is awaited).
async fn futures_join<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let mut pinned: Vec<_> = fs.into_iter().map(Box::pin).collect();
    // Poll all once so every request is on the wire, then await in order.
    for f in pinned.iter_mut() {
        let w = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(w);
        let _ = f.as_mut().poll(&mut cx);
    }
    for f in pinned {
        out.push(f.await);
    }
    out
}

#[test]
fn dirty_bitmap_context_shows_exact_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path());
    run(Command::new("qemu-img").args(["bitmap", "--add", "-f", "qcow2"]).arg(&img).arg("bm0"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x33 3M 64k", "-c", "write -P 0x44 12M 128k"])
        .arg(&img)
        .stdout(Stdio::null()));
    let srv = qemu_nbd(dir.path(), &img, &["--read-only", "--format=qcow2", "--bitmap=bm0"]);
    rt().block_on(async {
        let ctx = dirty_bitmap_context("bm0");
        let c =
            NbdClient::connect(&NbdAddress::unix(&srv.socket, ""), &[CONTEXT_BASE_ALLOCATION.to_string(), ctx.clone()])
                .await
                .unwrap();
        let ext = c.extents(&ctx, 0, c.size()).await.unwrap();
        let dirty: Vec<_> = ext.iter().filter(|e| e.flags & STATE_DIRTY != 0).map(|e| (e.offset, e.length)).collect();
        assert_eq!(dirty, vec![(3 << 20, 65536), (12 << 20, 131072)]);
    });
}

#[test]
fn writes_flush_and_a_dying_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("8M"));
    let mut srv = qemu_nbd(dir.path(), &img, &["--format=qcow2"]);
    rt().block_on(async {
        let c = NbdClient::connect(&NbdAddress::unix(&srv.socket, ""), &[]).await.unwrap();
        c.write(4096, &[0x5a; 8192]).await.unwrap();
        c.write_zeroes(1 << 20, 65536).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.read(4096, 8192).await.unwrap(), vec![0x5a; 8192]);
        // The server dies: outstanding and later requests fail with a clear error.
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
        let mut failed = None;
        for _ in 0..50 {
            if let Err(e) = c.read(0, 4096).await {
                failed = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = failed.expect("reads must fail once the server is gone");
        assert!(matches!(e, NbdError::Disconnected(_) | NbdError::Io(_)), "{e}");
    });
    let out =
        Command::new("qemu-io").args(["-f", "qcow2", "-r", "-c", "read -P 0x5a 4096 8192"]).arg(&img).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 8192/8192"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Sessions with qemu-nbd, recorded by a proxy, replay through a client fed from memory with the
/// same results; they are the `nbd_client` fuzz target's seeds (fuzz/seeds/nbd_client.sh).
#[test]
fn recorded_qemu_nbd_sessions_replay_identically() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path());
    let srv = qemu_nbd(dir.path(), &img, &["--read-only", "--format=qcow2"]);
    let rec = common::Recorder::start(dir.path(), &srv.socket);
    let cases: [(&str, bool, Vec<common::Op>); 2] = [
        (
            "qemu-nbd-status-reads",
            true,
            // Block status, a hole, a read across a hole and data, data, the whole map.
            vec![(1, 0, 16 << 20), (0, 0, 16384), (0, (1 << 20) - 4096, 8192), (0, 8 << 20, 16384), (2, 0, 16 << 20)],
        ),
        ("qemu-nbd-reads", false, vec![(0, (1 << 20) + 4096, 4096), (0, (16 << 20) - 4096, 4096), (0, 12 << 20, 512)]),
    ];
    for (i, (name, contexts, ops)) in cases.iter().enumerate() {
        let live = rt().block_on(async {
            let ctx = if *contexts { vec![CONTEXT_BASE_ALLOCATION.to_string()] } else { vec![] };
            let c = NbdClient::connect(&NbdAddress::unix(&rec.front, ""), &ctx).await.unwrap();
            common::run_ops(std::sync::Arc::new(c), ops).await
        });
        assert!(live.iter().all(|r| r.starts_with("Ok")), "{live:?}");
        let pieces = rec.sessions(i + 1).pop().unwrap().server_pieces();
        assert_eq!(common::replay(*contexts, ops, pieces.clone()), live, "{name}");
        common::save_seed("nbd_client", name, &common::client_case(*contexts, ops, &pieces));
    }
}
