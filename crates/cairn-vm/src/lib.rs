//! # cairn-vm: VM jobs over the hypervisor boundary
//!
//! - [`backup`]: the backup of a VM (running or not): method (app-consistent, saved state,
//!   crash-consistent), the point in time, checkpoints and whether they can be trusted, the
//!   configuration and the files it names, one restore point;
//! - [`recover`]: a VM restore point back into a VM on this host and a storage folder, whole or
//!   instant (running from the repository while its disks move);
//! - [`boot`]: boot verification of a restore point in a network-less sandbox, with a screenshot;
//! - [`host`]: where the host's side of a job happens (this machine, or [`ssh`]: a hypervisor
//!   host over SSH, with cairn installed there);
//! - [`Refusal`]: the requests these jobs refuse, typed, for callers to act on.
//!
//! Everything here talks to the hypervisor through `cairn_hypervisor::Hypervisor` only, moves
//! bytes through `cairn-engine`, and reads guest disks through `cairn-disk`.

pub mod backup;
pub mod boot;
mod error;
pub mod guest_disks;
pub mod host;
mod process;
pub mod recover;
pub mod ssh;

pub use error::Refusal;
