//! An async NBD client, written for cairn's backup engine.
//!
//! It speaks the fixed newstyle handshake with `NBD_OPT_GO`, negotiates structured replies
//! and meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`), and keeps many requests in
//! flight on one connection: every request gets a handle, and a reader task routes each reply
//! chunk to its request. Reads land directly in the caller's buffer.
//!
//! [`server`] is the other side: a small read-only NBD server for restore points.
//!
//! Tested against QEMU's `qemu-nbd` (see `tests/`).

mod client;
pub mod proto;
pub mod server;
mod uri;

pub use client::{ClientOptions, ExportInfo, Extent, NbdClient, NbdError};
pub use uri::{NbdAddress, Transport};
