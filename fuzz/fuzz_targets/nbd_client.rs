//! The NBD client (`NbdClient::connect_stream`, reads, `block_status`, `extents`) with the
//! fuzzer as the server, over an in-memory stream on a paused clock.
//!
//! Input: a flags byte (bit 0: negotiate `base:allocation`; bit 1: the server stalls after its
//! bytes instead of closing), an operation count, that many operations of 13 bytes (kind: 0 read,
//! 1 block status, 2 extents; offset u64; length u32; big-endian), then the server's bytes in
//! pieces, each after its length (u32). The server sends a piece each time the client has nothing
//! more to send (the runtime going idle), as a real server answers what it was asked. The seeds
//! are real qemu-nbd and cairn sessions in this layout (fuzz/seeds/nbd_client.sh).
//!
//! Oracles: every operation ends within the 1 s request timeout (virtual time); a read that
//! succeeds has exactly the length asked and every byte written by the server (the same input
//! run with recycled buffers of 0x00 and of 0xff gives the same result); extents lie inside
//! the request, contiguous from its start.
#![no_main]
use cairn_nbd::proto::CONTEXT_BASE_ALLOCATION;
use cairn_nbd::{ClientOptions, Extent, NbdClient};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(1);
const MAX_OPS: usize = 16;
/// Pieces of server bytes at most (each costs 1 ms of virtual time); the rest goes as one.
const MAX_PIECES: usize = 256;
/// Reads are cut to this (the fuzzer's memory, not the client's limit).
const MAX_READ: u32 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u64, u32),
    Status(u64, u32),
    Extents(u64, u32),
}

struct Case<'a> {
    contexts: bool,
    stall: bool,
    ops: Vec<Op>,
    server: Vec<&'a [u8]>,
}

fn parse(data: &[u8]) -> Option<Case<'_>> {
    let (&flags, rest) = data.split_first()?;
    let (&n, mut rest) = rest.split_first()?;
    let mut ops = Vec::new();
    for _ in 0..(n as usize).min(MAX_OPS) {
        let (op, tail) = rest.split_at_checked(13)?;
        let offset = u64::from_be_bytes(op[1..9].try_into().unwrap());
        let len = u32::from_be_bytes(op[9..13].try_into().unwrap());
        ops.push(match op[0] % 3 {
            0 => Op::Read(offset, len.min(MAX_READ)),
            1 => Op::Status(offset, len),
            _ => Op::Extents(offset, len),
        });
        rest = tail;
    }
    let mut server = Vec::new();
    while !rest.is_empty() {
        let piece = match rest.split_at_checked(4) {
            Some((len, tail)) if server.len() < MAX_PIECES - 1 => {
                let len = (u32::from_be_bytes(len.try_into().unwrap()) as usize).min(tail.len());
                rest = &tail[len..];
                &tail[..len]
            }
            _ => std::mem::take(&mut rest),
        };
        server.push(piece);
    }
    Some(Case { contexts: flags & 1 != 0, stall: flags & 2 != 0, ops, server })
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Connect(String),
    Read(Result<Vec<u8>, String>),
    Extents(Result<Vec<Extent>, String>),
}

/// Extents of one answer: non-empty, contiguous from `offset`, within `offset + len`.
fn check_extents(ext: &[Extent], offset: u64, len: u64, whole: bool) {
    assert!(!ext.is_empty(), "no extents");
    let mut pos = offset;
    for e in ext {
        assert_eq!(e.offset, pos, "extents not contiguous: {ext:?}");
        assert!(e.length > 0, "empty extent: {ext:?}");
        pos += e.length;
    }
    assert!(pos <= offset + len, "extents past the request {offset}+{len}: {ext:?}");
    if whole {
        assert_eq!(pos, offset + len, "extents short of the request {offset}+{len}: {ext:?}");
        assert!(ext.windows(2).all(|w| w[0].flags != w[1].flags), "unmerged neighbours: {ext:?}");
    }
}

async fn run_op(c: &NbdClient, op: Op, canary: u8) -> Outcome {
    let err = |e: cairn_nbd::NbdError| e.to_string();
    match op {
        Op::Read(offset, len) => {
            let r = c.read_into(offset, len, vec![canary; len as usize]).await;
            if let Ok(v) = &r {
                assert_eq!(v.len(), len as usize, "read of {len} bytes returned {}", v.len());
            }
            Outcome::Read(r.map_err(err))
        }
        Op::Status(offset, len) => {
            let r = c.block_status(CONTEXT_BASE_ALLOCATION, offset, len).await;
            if let Ok(ext) = &r {
                check_extents(ext, offset, len as u64, false);
            }
            Outcome::Extents(r.map_err(err))
        }
        Op::Extents(offset, len) => {
            let r = c.extents(CONTEXT_BASE_ALLOCATION, offset, len as u64).await;
            if let Ok(ext) = &r {
                if len > 0 {
                    check_extents(ext, offset, len as u64, true);
                }
            }
            Outcome::Extents(r.map_err(err))
        }
    }
}

/// One session: the fake server writes its bytes (and reads whatever the client sends) while
/// the client connects and runs every operation at once.
fn session(case: &Case, canary: u8) -> Vec<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let (mut from_client, mut to_client) = tokio::io::split(server);
        let (pieces, stall): (Vec<Vec<u8>>, _) = (case.server.iter().map(|p| p.to_vec()).collect(), case.stall);
        let serve = tokio::spawn(async move {
            let mut b = vec![0u8; 64 << 10];
            for piece in pieces {
                // Read what the client sends until it waits for us, then answer.
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), from_client.read(&mut b)).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = to_client.write_all(&piece).await;
            }
            if !stall {
                let _ = to_client.shutdown().await;
            }
            while from_client.read(&mut b).await.is_ok_and(|n| n > 0) {}
            std::future::pending::<()>().await
        });
        let start = tokio::time::Instant::now();
        let opts = ClientOptions { request_timeout: TIMEOUT };
        let contexts = if case.contexts { vec![CONTEXT_BASE_ALLOCATION.to_string()] } else { vec![] };
        let mut out = Vec::new();
        match NbdClient::connect_stream(client, "", &contexts, &opts).await {
            Err(e) => out.push(Outcome::Connect(e.to_string())),
            Ok(c) => {
                let c = Arc::new(c);
                let tasks: Vec<_> = case
                    .ops
                    .iter()
                    .map(|&op| {
                        let c = c.clone();
                        tokio::spawn(async move { run_op(&c, op, canary).await })
                    })
                    .collect();
                for t in tasks {
                    out.push(t.await.expect("an operation panicked"));
                }
            }
        }
        // The pieces' pauses, then connecting and the first timeout at most: a timeout closes
        // the connection, so the requests still waiting fail at once.
        let took = start.elapsed();
        let limit = 3 * TIMEOUT + Duration::from_millis(case.server.len() as u64 + 1);
        assert!(took <= limit, "the session took {took:?} of virtual time");
        serve.abort();
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = parse(data) else { return };
    let zeros = session(&case, 0x00);
    let ones = session(&case, 0xff);
    assert_eq!(zeros, ones, "a read returned bytes the server never wrote");
});
