//! # cairn-engine: from a disk to a restore point and back
//!
//! - [`source`]: where disk data comes from (raw files, block devices, NBD, qemu-nbd);
//! - [`backup`]: the block pipeline that turns sources into a restore point;
//! - [`restore`] and [`target`]: restore points back into images, hash-checked;
//! - [`recover`]: a VM restore point back into a running VM on any host and storage;
//! - [`boot`]: boot verification of a restore point in a network-less sandbox, with a screenshot;
//! - [`serve`]: restore points as read-only NBD exports, read straight from the repository;
//! - [`verify`]: re-read and re-hash the whole repository; [`repair`]: rebuild the index from packs;
//! - [`ranges`]: changed-range lists (from a file or a dirty bitmap);
//! - [`vm`]: the VM backup job (method, point in time, checkpoints, files) over a hypervisor;
//! - [`swap`]: Linux swap areas a backup skips; [`partitions`]: MBR and GPT tables;
//! - [`files`]: partitions and ext4 filesystems browsed straight from restore points.

pub mod backup;
pub mod boot;
pub mod files;
pub mod lvm;
pub mod partitions;
mod pool;
pub mod progress;
pub mod ranges;
pub mod recover;
pub mod repair;
pub mod restore;
pub mod serve;
pub mod source;
pub mod swap;
pub mod target;
pub mod verify;
pub mod vm;

pub use progress::{NoProgress, Progress};
