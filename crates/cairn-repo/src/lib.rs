//! # cairn-repo: the deduplicating block store
//!
//! A repository stores disk images as 64 KiB blocks, each identified by its BLAKE3 hash
//! (keyed when encrypted), deduplicated across every image and every restore point. Every
//! restore point is a complete image map ("synthetic full"); the store underneath is shared.
//!
//! ## Objects (see `docs/FORMAT.md` for byte layouts)
//! - `config`: plain JSON; its presence makes a location a repository.
//! - `keys/*`: the master keys wrapped by a password (Argon2id + AES-256-GCM).
//! - `packs/*/*`: sealed frames (up to 16 blocks compressed together) + a sealed trailer.
//! - `index/*`: which pack and frame holds each block.
//! - `points/*`: restore point documents; each disk lists its map pages (themselves blobs).
//! - `locks/*`: who is working on the repository.
//!
//! All objects but locks are immutable and named by the BLAKE3 hash of their stored bytes:
//! writers never modify a file, so concurrent writers cannot conflict.
//!
//! ## Write ordering (what makes a restore point visible)
//! 1. A pack is stored durably before any index file lists it.
//! 2. Index files listing every block a point references, including its map pages, are
//!    stored durably before the point document.
//! 3. The point document is stored last; from that moment the point exists.
//! 4. Each of these objects is confirmed present before the next relies on it
//!    ([`Repository::store`]), and no point is written once the writer's lock is lost.
//!
//! A crash at any moment therefore leaves only unreferenced packs or index entries, which
//! readers ignore and the next backup reuses (index files are written every few seconds).
//! Readers list points *after* loading the index, and [`Repository::list_points`] then reads
//! the index files written meanwhile, so a reader never sees a just-committed point's blocks as
//! missing.
//!
//! ## Lock table
//! | operation                        | lock        | may run alongside                    |
//! |----------------------------------|-------------|--------------------------------------|
//! | backup                           | shared      | everything but exclusive             |
//! | restore, points, files, verify   | shared      | everything but exclusive             |
//! | forget, protect, stats           | shared      | everything but exclusive             |
//! | prune                            | maintenance | shared locks (backups go on)         |
//! | repair index                     | exclusive   | nothing                              |
//!
//! Backups need no exclusion from each other: both may store the same block (two copies,
//! harmless) and each only deletes the partial index files it wrote itself, after merging
//! them into one durable file. A lock is taken before the index is loaded, and records when it
//! was created: prune's deletion rule depends on both.
//!
//! ## Trust in what is read
//! Every object is checked before use: names against hashes, seals against their tags, the
//! config against the keys (an edited config, or one turned to "none", is refused), restore
//! points against FORMAT.md §7 (safe names, sizes, exact map pages). A block has every copy the
//! index files list; a damaged copy makes readers try the others, quarantined ones last.
//!
//! ## Deletion rules (prune, [`prune`]; forget, [`forget`])
//! Points are removed by `forget` (documents only). Packs go only through `prune`, in two
//! steps, because a backup that loaded the index a moment ago may reference any block in it:
//! 1. **mark**: packs no point needs are named in a `prune-marks` catalog record, durable first;
//!    a marked pack stays readable, but new points never rely on it ([`index::Index::reusable`]);
//! 2. **delete**, in a later check: the mark is past its grace period, every live lock was
//!    created after the mark (plus a clock margin), and points listed after those locks need
//!    nothing only it holds (if one does, the mark is taken back).
//!
//! Deletion runs the write ordering backwards: index files rewritten without the pack (durable)
//! before the old ones go, before the pack goes. A prune stops, deleting nothing, when any
//! point, map page or index file cannot be read. Full rules: FORMAT.md §12.

pub mod catalog;
mod config;
pub mod copy;
pub mod crypto;
mod error;
pub mod forget;
mod id;
pub mod immutability;
pub mod index;
pub mod lock;
pub mod map;
pub mod pack;
mod point;
pub mod prune;
mod repo;
pub mod retention;
mod session;
pub mod vm_record;
mod wire;

pub use catalog::RecordKind;
pub use config::{Config, DEFAULT_BLOCK_SIZE, FORMAT_VERSION};
pub use error::{Error, Result};
pub use id::{is_all_zero, BlockId, PointId};
pub use index::BlobLocation;
pub use lock::Lock;
pub use pack::PACK_TARGET;
pub use point::{safe_name, DiskImage, DiskStats, PointStats, RestorePoint, MAX_DISK_SIZE};
pub use repo::{hostname, quarantine_copies, InitOptions, PointList, Repository};
pub use session::{Claims, Session};

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
