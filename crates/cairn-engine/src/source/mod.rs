//! Where disk data comes from. One trait, [`Source`]; implementations for files and block
//! devices ([`FileSource`]), NBD exports ([`NbdSource`]) and image formats QEMU knows, opened
//! through `qemu-nbd` ([`open_path`]).

mod file;
mod nbd;

pub use file::FileSource;
pub use nbd::{dies_with_us, nbd_runtime, NbdSource, QemuNbd};

use crate::ranges::Range;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Whether a stretch of a disk holds data or is known to read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    Data,
    /// Unallocated or known-zero: never read, restored as a hole.
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: Allocation,
}

/// A disk to back up. Used from a single thread; reads are submitted ahead and collected in
/// submission order, so a source may keep many in flight (NBD) or read on demand (files).
pub trait Source: Send {
    /// What is being read, for restore point records and messages.
    fn describe(&self) -> String;
    fn size(&self) -> u64;
    /// Allocation of `[offset, offset+len)`. Sources that cannot tell report Data.
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Dirty ranges recorded by the source itself (a QEMU dirty bitmap exported over NBD).
    fn dirty_ranges(&mut self, bitmap: &str) -> Result<Vec<Range>> {
        let _ = bitmap;
        bail!("{} cannot report dirty bitmaps (only NBD exports and qcow2 images can)", self.describe())
    }
    /// Queues a read of `len` bytes into `buf` (a recycled buffer; its contents do not matter).
    fn submit(&mut self, offset: u64, len: usize, buf: Vec<u8>) -> Result<()>;
    /// The oldest queued read's buffer, holding exactly its bytes.
    fn next(&mut self) -> Result<Vec<u8>>;
    /// Called once all reads are done: checks the source did not change size underneath us.
    fn finish(&mut self) -> Result<()>;
}

/// Image formats told apart by their first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vhdx,
    Vmdk,
    Vpc,
    Vdi,
}

impl ImageFormat {
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Vdi => "vdi",
        }
    }

    pub fn parse(s: &str) -> Result<ImageFormat> {
        Ok(match s {
            "raw" => ImageFormat::Raw,
            "qcow2" => ImageFormat::Qcow2,
            "vhdx" => ImageFormat::Vhdx,
            "vmdk" => ImageFormat::Vmdk,
            "vpc" | "vhd" => ImageFormat::Vpc,
            "vdi" => ImageFormat::Vdi,
            _ => bail!("unknown image format {s:?} (raw, qcow2, vhdx, vmdk, vpc, vdi)"),
        })
    }

    /// Detects the format from the file's magic numbers (raw when nothing matches).
    pub fn detect(path: &Path) -> Result<ImageFormat> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut head = [0u8; 64];
        let n = f.read(&mut head)?;
        let h = &head[..n];
        Ok(if h.starts_with(b"QFI\xfb") {
            ImageFormat::Qcow2
        } else if h.starts_with(b"vhdxfile") {
            ImageFormat::Vhdx
        } else if h.starts_with(b"KDMV") || h.starts_with(b"# Disk DescriptorFile") {
            ImageFormat::Vmdk
        } else if h.starts_with(b"conectix") {
            ImageFormat::Vpc
        } else if h.starts_with(b"<<< ") && h.windows(10).any(|w| w == b"Disk Image") {
            ImageFormat::Vdi
        } else {
            ImageFormat::Raw
        })
    }
}

/// Opens a path or NBD URI as a source: NBD URIs through our client, raw files and block
/// devices directly, any other image format through a private `qemu-nbd`. With `bitmap`, the
/// NBD export also carries that dirty bitmap (qcow2 images and NBD URIs only).
pub fn open_path(spec: &str, format: Option<ImageFormat>, bitmap: Option<&str>) -> Result<Box<dyn Source>> {
    if cairn_nbd::NbdAddress::is_uri(spec) {
        let addr = cairn_nbd::NbdAddress::parse(spec).map_err(anyhow::Error::msg)?;
        return Ok(Box::new(NbdSource::connect(addr, bitmap, None)?));
    }
    let path = Path::new(spec);
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {spec}"))?;
    if meta.is_dir() {
        bail!("{spec} is a folder; give a disk image file, a block device or an NBD URI");
    }
    let format = match format {
        Some(f) => f,
        None => ImageFormat::detect(path)?,
    };
    if format == ImageFormat::Raw && bitmap.is_none() {
        return Ok(Box::new(FileSource::open(path)?));
    }
    let server = QemuNbd::serve(path, format, true, bitmap)?;
    let addr = server.address();
    Ok(Box::new(NbdSource::connect(addr, bitmap, Some(server))?))
}
