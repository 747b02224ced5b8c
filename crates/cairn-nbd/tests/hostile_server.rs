//! The NBD client against servers that lie: each test scripts an in-process server (tokio, on
//! a Unix socket or an in-memory stream) that does the handshake right and then misbehaves.
//! Every request must end promptly, in an error when the server broke the protocol.

use cairn_nbd::proto::*;
use cairn_nbd::{ClientOptions, NbdAddress, NbdClient, NbdError};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

/// Block sizes the fake server announces (minimum, preferred, maximum); None sends none.
type BlockSizes = Option<(u32, u32, u32)>;

/// The server's half of a correct handshake: one export of [`SIZE`] bytes, structured
/// replies, `base:allocation` (context ID 1) when asked.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, sizes: BlockSizes) -> std::io::Result<()> {
    handshake_with_flags(s, sizes, TFLAG_READ_ONLY | 1).await
}

/// [`handshake`] announcing transmission flags `flags`.
async fn handshake_with_flags<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sizes: BlockSizes,
    flags: u16,
) -> std::io::Result<()> {
    s.write_u64(NBDMAGIC).await?;
    s.write_u64(IHAVEOPT).await?;
    s.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    s.read_u32().await?;
    loop {
        assert_eq!(s.read_u64().await?, IHAVEOPT);
        let option = s.read_u32().await?;
        let mut data = vec![0u8; s.read_u32().await? as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_STRUCTURED_REPLY => option_reply(s, option, REP_ACK, &[]).await?,
            OPT_SET_META_CONTEXT => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                option_reply(s, option, REP_META_CONTEXT, &d).await?;
                option_reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                option_reply(s, option, REP_INFO, &d).await?;
                if let Some((min, pref, max)) = sizes {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [min, pref, max] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(s, option, REP_INFO, &d).await?;
                }
                return option_reply(s, option, REP_ACK, &[]).await;
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

async fn option_reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_u64(OPT_REPLY_MAGIC).await?;
    s.write_u32(option).await?;
    s.write_u32(kind).await?;
    s.write_u32(data.len() as u32).await?;
    s.write_all(data).await
}

/// One request: (command, handle, offset, length).
async fn request<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u16, u64, u64, u32)> {
    assert_eq!(s.read_u32().await?, REQUEST_MAGIC);
    let _flags = s.read_u16().await?;
    let cmd = s.read_u16().await?;
    Ok((cmd, s.read_u64().await?, s.read_u64().await?, s.read_u32().await?))
}

/// A structured chunk header; the payload follows.
async fn chunk<S: AsyncWrite + Unpin>(s: &mut S, done: bool, kind: u16, handle: u64, len: u32) -> std::io::Result<()> {
    s.write_u32(STRUCTURED_REPLY_MAGIC).await?;
    s.write_u16(if done { REPLY_FLAG_DONE } else { 0 }).await?;
    s.write_u16(kind).await?;
    s.write_u64(handle).await?;
    s.write_u32(len).await
}

async fn data<S: AsyncWrite + Unpin>(s: &mut S, done: bool, handle: u64, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    chunk(s, done, REPLY_TYPE_OFFSET_DATA, handle, 8 + bytes.len() as u32).await?;
    s.write_u64(at).await?;
    s.write_all(bytes).await
}

/// A server on a Unix socket in a fresh folder: `script` runs on its first client once the
/// handshake is done.
fn serve<F, Fut>(sizes: BlockSizes, script: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send,
{
    serve_with_flags(sizes, TFLAG_READ_ONLY | 1, script)
}

/// [`serve`] of an export with transmission flags `flags` (writable without TFLAG_READ_ONLY).
fn serve_with_flags<F, Fut>(sizes: BlockSizes, flags: u16, script: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        if handshake_with_flags(&mut s, sizes, flags).await.is_ok() {
            let _ = script(s).await;
        }
    });
    (dir, path)
}

/// Runs `f` and fails the test if it takes more than `secs` seconds (a hang).
async fn promptly<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("the client hung")
}

fn protocol_error<T>(r: Result<T, NbdError>) -> String {
    match r {
        Err(NbdError::Protocol(why)) => why,
        Err(e) => panic!("expected a protocol error, got {e:?}"),
        Ok(_) => panic!("expected a protocol error, got success"),
    }
}

#[tokio::test]
async fn a_chunk_written_twice_is_refused_not_taken_for_the_missing_half() {
    // Two chunks for the first half add up to the request's length; the second half was never
    // written, and a recycled buffer would hand back its old bytes as disk data.
    let (_dir, path) = serve(None, |mut s| async move {
        let (_, h, _, _) = request(&mut s).await?;
        data(&mut s, false, h, 0, &[1u8; 2048]).await?;
        data(&mut s, true, h, 0, &[1u8; 2048]).await?;
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    let why = protocol_error(promptly(5, c.read_into(0, 4096, vec![0xee; 4096])).await);
    assert!(why.contains("overlap"), "{why}");
}

#[tokio::test]
async fn overlapping_chunks_are_refused() {
    let (_dir, path) = serve(None, |mut s| async move {
        let (_, h, _, _) = request(&mut s).await?;
        data(&mut s, false, h, 0, &[1u8; 3000]).await?;
        data(&mut s, true, h, 1096, &[2u8; 3000]).await?;
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    protocol_error(promptly(5, c.read(0, 4096)).await);
}

#[tokio::test]
async fn pieces_in_any_order_that_tile_the_request_are_accepted() {
    let (_dir, path) = serve(None, |mut s| async move {
        let (_, h, off, _) = request(&mut s).await?;
        data(&mut s, false, h, off + 3000, &[3u8; 1096]).await?;
        chunk(&mut s, false, REPLY_TYPE_OFFSET_HOLE, h, 12).await?;
        s.write_u64(off + 1000).await?;
        s.write_u32(2000).await?;
        data(&mut s, true, h, off, &[1u8; 1000]).await?;
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    let got = promptly(5, c.read_into(8192, 4096, vec![0xee; 4096])).await.unwrap();
    let mut want = vec![1u8; 1000];
    want.extend_from_slice(&[0u8; 2000]);
    want.extend_from_slice(&[3u8; 1096]);
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_chunk_far_past_the_request_is_an_error_not_a_hang() {
    // `offset - request` plus the length overflows: once a panic in the reply reader, which
    // then never answered any request.
    let (_dir, path) = serve(None, |mut s| async move {
        let (_, h, _, _) = request(&mut s).await?;
        data(&mut s, true, h, u64::MAX - 4, &[0u8; 100]).await?;
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    let why = protocol_error(promptly(5, c.read(0, 4096)).await);
    assert!(why.contains("outside the request"), "{why}");
    let hole = serve(None, |mut s| async move {
        let (_, h, _, _) = request(&mut s).await?;
        chunk(&mut s, true, REPLY_TYPE_OFFSET_HOLE, h, 12).await?;
        s.write_u64(4000).await?;
        s.write_u32(u32::MAX).await?;
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&hole.1, ""), &[]).await.unwrap();
    protocol_error(promptly(5, c.read(0, 4096)).await);
}

#[tokio::test]
async fn chunk_lengths_of_u32_max_are_refused_before_anything_is_allocated() {
    for kind in [REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_OFFSET_DATA] {
        let (_dir, path) = serve(None, move |mut s| async move {
            let (_, h, _, _) = request(&mut s).await?;
            chunk(&mut s, true, kind, h, u32::MAX).await?;
            s.write_all(&[0u8; 64]).await?;
            std::future::pending().await
        });
        let ctx = [CONTEXT_BASE_ALLOCATION.to_string()];
        let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &ctx).await.unwrap();
        let r = if kind == REPLY_TYPE_OFFSET_DATA {
            promptly(5, c.read(0, 4096)).await.map(|_| ())
        } else {
            promptly(5, c.block_status(CONTEXT_BASE_ALLOCATION, 0, 4096)).await.map(|_| ())
        };
        protocol_error(r);
    }
}

#[tokio::test]
async fn a_server_dying_with_three_requests_in_flight_fails_all_three_and_every_later_one() {
    let (_dir, path) = serve(None, |mut s| async move {
        for _ in 0..3 {
            request(&mut s).await?;
        }
        Ok(()) // dropping the stream closes the connection
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    let (a, b, d) = promptly(5, async { tokio::join!(c.read(0, 4096), c.read(4096, 4096), c.read(8192, 512)) }).await;
    for r in [a, b, d] {
        assert!(matches!(r, Err(NbdError::Disconnected(_))), "{r:?}");
    }
    let later = promptly(5, c.read(0, 512)).await;
    assert!(matches!(later, Err(NbdError::Disconnected(_))), "{later:?}");
}

#[tokio::test]
async fn a_protocol_error_fails_the_other_requests_in_flight_too() {
    let (_dir, path) = serve(None, |mut s| async move {
        let (_, h1, _, _) = request(&mut s).await?;
        request(&mut s).await?;
        request(&mut s).await?;
        data(&mut s, true, h1, 0, &[0u8; 8192]).await?; // twice the request
        std::future::pending().await
    });
    let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
    let (a, b, d) = promptly(5, async { tokio::join!(c.read(0, 4096), c.read(4096, 4096), c.read(8192, 512)) }).await;
    protocol_error(a);
    for r in [b, d] {
        assert!(matches!(r, Err(NbdError::Disconnected(ref why)) if why.contains("protocol")), "{r:?}");
    }
}

#[tokio::test]
async fn a_stalled_server_times_out_and_the_connection_is_closed() {
    let (_dir, path) = serve(None, |mut s| async move {
        request(&mut s).await?;
        request(&mut s).await?;
        std::future::pending().await // reads the requests, never answers
    });
    let opts = ClientOptions { request_timeout: Duration::from_millis(300) };
    let c = NbdClient::connect_with(&NbdAddress::unix(&path, ""), &[], &opts).await.unwrap();
    let started = std::time::Instant::now();
    let (a, b) = promptly(5, async { tokio::join!(c.read(0, 4096), c.read(4096, 4096)) }).await;
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    for r in [a, b] {
        assert!(matches!(r, Err(NbdError::TimedOut(_) | NbdError::Disconnected(_))), "{r:?}");
    }
    let later = promptly(5, c.read(0, 512)).await;
    assert!(matches!(later, Err(NbdError::Disconnected(ref why)) if why.contains("no reply within")), "{later:?}");
}

#[tokio::test]
async fn a_server_silent_in_the_handshake_times_out() {
    let (client, _server) = tokio::io::duplex(4096);
    let opts = ClientOptions { request_timeout: Duration::from_millis(300) };
    let r = promptly(5, NbdClient::connect_stream(client, "", &[], &opts)).await;
    assert!(matches!(r, Err(NbdError::TimedOut(_))), "{:?}", r.err());
}

#[tokio::test]
async fn a_maximum_block_size_of_zero_is_refused_at_the_handshake() {
    for sizes in [(1, 4096, 0), (0, 4096, 1 << 20), (1 << 20, 1 << 20, 1 << 25)] {
        let (_dir, path) = serve(Some(sizes), |_| async { Ok(()) });
        let why = protocol_error(promptly(5, NbdClient::connect(&NbdAddress::unix(&path, ""), &[])).await);
        assert!(why.contains("block sizes"), "{why}");
    }
    let (_dir, path) = serve(Some((512, 4096, 1 << 20)), |_| async { Ok(()) });
    let c = promptly(5, NbdClient::connect(&NbdAddress::unix(&path, ""), &[])).await.unwrap();
    assert_eq!(c.max_request(), 1 << 20);
}

/// A stream that panics when read once `armed` is set: a stand-in for a bug in the reply
/// reader.
struct PanicOnRead<S> {
    inner: S,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for PanicOnRead<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("test: the reply reader fails");
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PanicOnRead<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_panic_in_the_reply_reader_fails_every_request_instead_of_hanging() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = PanicOnRead { inner: client, armed: armed.clone() };
    let serving = tokio::spawn(async move {
        handshake(&mut server, None).await.unwrap();
        for _ in 0..3 {
            request(&mut server).await.unwrap();
        }
        server.write_all(&[0u8; 4]).await.unwrap(); // wakes the reader, which then panics
        std::future::pending::<()>().await
    });
    let c = NbdClient::connect_stream(stream, "", &[], &ClientOptions::default()).await.unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, b, d) = promptly(5, async { tokio::join!(c.read(0, 4096), c.read(4096, 4096), c.read(8192, 512)) }).await;
    for r in [a, b, d] {
        assert!(matches!(r, Err(NbdError::Disconnected(ref why)) if why.contains("reply reader")), "{r:?}");
    }
    assert!(matches!(c.read(0, 512).await, Err(NbdError::Disconnected(_))));
    serving.abort();
}

/// A server that answers a write before reading its data: the client is still sending it, and
/// dropping that send would leave part of the write on the wire for the next request to follow.
/// The write fails (a success cannot be: the data did not all arrive) and the connection is
/// closed, so the next request fails at once instead of being read as write data.
#[tokio::test]
async fn a_reply_to_a_request_still_being_sent_closes_the_connection() {
    for (answer, errno) in [("success", 0u32), ("an error", 1)] {
        let (_dir, path) = serve_with_flags(None, 1, move |mut s| async move {
            let (cmd, h, _, len) = request(&mut s).await?;
            assert_eq!((cmd, len), (CMD_WRITE, SIZE as u32));
            s.write_u32(SIMPLE_REPLY_MAGIC).await?;
            s.write_u32(errno).await?;
            s.write_u64(h).await?;
            // Then read on, as a server would: whatever comes is taken as the write's data.
            let mut sink = vec![0u8; 1 << 16];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        });
        let c = NbdClient::connect(&NbdAddress::unix(&path, ""), &[]).await.unwrap();
        // 1 MiB: more than the socket holds, so the send is still going when the reply comes.
        let r = promptly(5, c.write(0, &vec![7u8; SIZE as usize])).await;
        match (errno, &r) {
            (0, Err(NbdError::Protocol(why))) => assert!(why.contains("before it was completely sent"), "{why}"),
            (1, Err(NbdError::Server { errno: 1, .. })) => {}
            _ => panic!("{answer}: the write gave {r:?}"),
        }
        let later = promptly(5, c.read(0, 4096)).await;
        assert!(
            matches!(later, Err(NbdError::Disconnected(ref why)) if why.contains("completely sent")),
            "{answer}: {later:?}"
        );
    }
}
