//! The read-only server against our own client: reads in bounded pieces, a failure half-way
//! through a read.

use cairn_nbd::server::{serve_unix, Export, Exports, Limits};
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
