//! # cairn-engine: the data movers, from a disk to a restore point and back
//!
//! - [`source`]: where disk data comes from (raw files, block devices, NBD, qemu-nbd);
//! - [`backup`]: the block pipeline that turns sources into a restore point;
//! - [`restore`] and [`target`]: restore points back into images, hash-checked;
//! - [`serve`]: [`serve::PointDisk`], random access to a point's disk straight from the
//!   repository (NBD exports, file browsing, mounts);
//! - [`verify`]: re-read and re-hash the whole repository; [`repair`]: rebuild the index from packs;
//! - [`ranges`]: changed-range lists (from a file or a dirty bitmap).
//!
//! The engine knows no hypervisor and no guest filesystem: VM jobs live in `cairn-vm`, partition
//! tables, LVM, swap and filesystems in `cairn-disk`, both above it.

pub mod backup;
mod pool;
pub mod progress;
pub mod ranges;
pub mod repair;
pub mod restore;
pub mod serve;
pub mod source;
pub mod target;
pub mod verify;

pub use progress::{check_cancelled, Cancelled, NoProgress, Progress};
