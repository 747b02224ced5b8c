//! # cairn-ops: the operations every interface calls
//!
//! The CLI (and the director after it) runs cairn through these operations. Each takes typed
//! inputs (a request struct where there are many) and returns a typed result; reports progress
//! through `cairn_engine::Progress`; fails with an [`OpError`] whose [`ErrorKind`] a caller acts
//! on (an exit code, an HTTP status). Operations made of several units of work (VMs) stop between
//! them when their [`Cancel`] is set. Operations never print, never prompt, and never name a
//! command-line flag: an interface words its own advice.
//!
//! Locks: an operation takes the repository's lock itself (and loads the index it needs),
//! except where the caller's session spans several calls: the VM operations (`backup_vms` with
//! its boot checks, a recovery's `plan` and `execute`, `boot_check`) and `files` (an interface
//! browses many paths) run under the lock the caller holds, with the index loaded.
//!
//! - [`files`]: volumes and files of a point, and copies of files out of it;
//! - [`points`]: the restore points of a repository, as interfaces list them;
//! - [`check`]: verify and repair index;
//! - [`offsite`]: copies between repositories, store-lock audits, undelete;
//! - [`maintenance`]: forget (retention), prune, protect;
//! - [`init`]: a new repository (encrypted, immutable, a copy target);
//! - [`image`]: a disk image (file, device, NBD export) backed up as a point, and restored;
//! - [`hosts`]: the hosts of a host list opened for VM jobs (this machine, or over SSH), and
//!   which host a VM is on;
//! - [`vm_list`]: the VMs of a host, with the backup method each qualifies for;
//! - [`vm_backup`]: back up VMs (each under its watchdog), boot-check the new points;
//! - [`vm_recover`]: a VM restore point back into a VM on this host (plan, then execute);
//! - [`boot_check`]: boot a VM restore point in a sandbox, mail and store the verdict;
//! - [`helpers`]: the processes an operation starts (NBD server, watchdog), behind [`Helpers`];
//! - [`mail`]: reports by SMTP; [`host_config`]: the host configuration file.
//!
//! Below this crate: `cairn-vm` (VM jobs), `cairn-engine` (data movers), `cairn-repo` (the
//! repository), behind the hypervisor boundary `cairn-hypervisor`. Above it: interfaces only.

pub mod boot_check;
mod cancel;
pub mod check;
mod error;
pub mod files;
pub mod helpers;
pub mod host_config;
pub mod hosts;
pub mod image;
pub mod init;
pub mod mail;
pub mod maintenance;
pub mod offsite;
pub mod points;
pub mod vm_backup;
pub mod vm_list;
pub mod vm_recover;

pub use cairn_engine::{Cancelled, NoProgress, Progress};
pub use cancel::{Cancel, Watching};

/// Where VM backups and boot checks keep sockets, scratch files and sandboxes by default: root's
/// own folder, not the world-writable /var/tmp where another user could create it first.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/cairn/work";

pub use error::{kind_of, ErrorKind, OpError, OpResult};
pub use helpers::{ExeHelpers, Helpers};
