//! # cairn-disk: what is inside a guest's disk
//!
//! Parsers of bytes written by a guest, all bounded (a guest's disk is untrusted input; each has
//! a fuzz target):
//! - [`partitions`]: MBR and GPT tables, and which filesystem a volume holds;
//! - [`lvm`]: LVM2 physical volumes and the logical volumes they map;
//! - [`swap`]: Linux swap areas and Windows page files, which a backup skips;
//! - [`files`]: volumes (partitions, logical volumes) and their ext4, NTFS and FAT filesystems,
//!   browsed straight from a restore point.
//!
//! Everything reads through `cairn_engine`'s [`Source`](cairn_engine::source::Source) or
//! [`PointDisk`](cairn_engine::serve::PointDisk); nothing here knows a hypervisor.

pub mod files;
pub mod lvm;
pub mod partitions;
pub mod swap;
