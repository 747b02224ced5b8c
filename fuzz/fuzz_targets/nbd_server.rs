//! The read-only NBD server (`cairn_nbd::server::serve_connection`, without TLS) with the
//! fuzzer as the client: whatever the client sends, the connection ends when its bytes do, the
//! export is only asked for ranges inside it, and no read is larger than the server's maximum
//! (run with -malloc_limit_mb, see fuzz/options/nbd_server).
#![no_main]
use cairn_nbd::server::{serve_connection, Export, Exports, Limits, Socket};
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 4 << 20;

/// 4 MiB alternating 64 KiB runs of data and zeros; reads touching [3 MiB, 3 MiB + 4 KiB) fail.
struct Disk;

impl Export for Disk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).expect("read range overflows");
        assert!(end <= SIZE, "read of {}+{} past the export", offset, buf.len());
        assert!(buf.len() <= 32 << 20, "read of {} bytes", buf.len());
        if offset < (3 << 20) + 4096 && end > 3 << 20 {
            return Err(io::Error::other("damaged block"));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if (at >> 16).is_multiple_of(2) { at as u8 } else { 0 };
        }
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        assert!(len > 0 && offset < SIZE && offset + len <= SIZE, "extents of {offset}+{len}");
        let next = ((offset >> 16) + 1) << 16;
        Ok(vec![((next - offset).min(len), (offset >> 16) % 2 == 1)])
    }
}

/// The client: the fuzz input, then end of file; what the server writes goes nowhere.
struct Client<'a> {
    input: &'a [u8],
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Socket for Client<'_> {
    fn set_timeouts(&self, _: Option<Duration>, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = Exports(vec![("disk0".into(), Arc::new(Disk) as Arc<dyn Export>)]);
    let _ = serve_connection(Client { input: data }, &exports, None, &Limits::default());
});
