//! Opening, creating and reading a repository.

use crate::catalog::Quarantine;
use crate::config::{Config, DEFAULT_BLOCK_SIZE, FORMAT_VERSION};
use crate::crypto::{self, Crypto, KeyFile};
use crate::index::{decode_index, pack_id_from_name, BlobLocation, Index};
use crate::map;
use crate::pack::open_frame_into;
use crate::point::{DiskImage, RestorePoint};
use crate::{BlockId, Error, PointId, Result};
use cairn_storage::{Backend, Kind, StorageError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    crypto: Crypto,
    /// Replaced or copied on write, never locked while in use: a reader keeps the snapshot it
    /// took, and a refresh never waits for it.
    index: RwLock<Arc<Index>>,
    /// The index files the in-memory index was built from (sound or damaged), so a refresh
    /// reads only new ones; `None` until the index is first loaded.
    index_files: std::sync::Mutex<Option<std::collections::HashSet<String>>>,
    damaged_index_files: RwLock<Vec<(String, String)>>,
    /// Where a large index keeps its entries (none: in memory, whatever the size).
    index_spill: std::sync::Mutex<Option<crate::index::SpillConfig>>,
    damaged_records: std::sync::Mutex<Vec<(String, String)>>,
    hostname: String,
    /// The locks this process took through [`Repository::lock`] (file name, health), checked
    /// before a restore point is made visible.
    locks: std::sync::Mutex<Vec<(String, std::sync::Weak<crate::lock::LockHealth>)>>,
    /// Pack locks this process has written into `object-locks` records (immutability.rs).
    pub(crate) locks_recorded: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// How [`Repository::init_with`] makes a repository.
#[derive(Default)]
pub struct InitOptions<'a> {
    /// Receives copies of this repository (`init --copy-from`): the same block IDs and block
    /// size, its own password and data key.
    pub copy_of: Option<&'a Repository>,
    /// Immutable (`init --immutable DAYS`): the store (S3 with Object Lock or Azure Blob with
    /// version-level immutability, checked first)
    /// keeps every object a point needs for at least that long.
    pub immutable: Option<cairn_storage::LockPolicy>,
}

/// The restore points of a repository, and any point documents that could not be read.
pub struct PointList {
    /// (id, point), oldest first.
    pub points: Vec<(PointId, RestorePoint)>,
    pub damaged: Vec<(String, String)>,
}

impl Repository {
    /// Creates a repository at an empty location. With a password, it is encrypted.
    pub fn init(backend: Arc<dyn Backend>, password: Option<&str>) -> Result<Repository> {
        Self::init_with(backend, password, InitOptions::default())
    }

    /// Creates a repository with options: one that receives copies of another, an immutable
    /// one. See [`Repository::init_copying`] and [`InitOptions::immutable`].
    pub fn init_with(backend: Arc<dyn Backend>, password: Option<&str>, opts: InitOptions) -> Result<Repository> {
        // Locks protect against whoever holds the storage keys; in a plain repository that
        // someone could also forge the points and records cairn trusts when it extends them.
        if opts.immutable.is_some() && opts.copy_of.is_some_and(|s| s.crypto().id_key().is_none()) {
            return Err(Error::Incompatible(
                "an immutable repository must be encrypted, and a copy of a plain repository cannot be (it \
                 names blocks by their plain hash): make the immutable copy from an encrypted repository"
                    .into(),
            ));
        }
        if opts.immutable.is_some() && password.is_none() {
            return Err(Error::Invalid(
                "an immutable repository must be encrypted: its points and lock records are then \
                 authenticated, so no one holding the storage keys can make cairn skip an extension"
                    .into(),
            ));
        }
        let like = match opts.copy_of {
            None => None,
            Some(source) => match (source.crypto().id_key(), password) {
                (None, Some(_)) => {
                    return Err(Error::Incompatible(
                        "the source is not encrypted, so a copy of it cannot be: its blocks are named by their \
                         plain hash (give no password for the copy)"
                            .into(),
                    ))
                }
                (Some(_), None) => {
                    return Err(Error::Incompatible(
                        "the source is encrypted: its copy must be too (give a password for the copy)".into(),
                    ))
                }
                (id_key, _) => Some((id_key, source.config().block_size)),
            },
        };
        if let Some(policy) = opts.immutable {
            crate::config::check_lock_policy(policy).map_err(Error::Invalid)?;
            let Some(locks) = backend.object_lock() else {
                return Err(Error::Incompatible(format!(
                    "{} cannot hold an immutable repository: immutability needs S3 with Object Lock or Azure Blob with version-level immutability",
                    backend.location()
                )));
            };
            locks.check_bucket()?;
        }
        Self::init_sharing_ids(backend, password, like, opts.immutable)
    }

    /// Like [`Repository::init`], for a repository that receives copies from `source`
    /// (`init --copy-from`): the same block IDs and block size, so `cairn copy` sends only
    /// what it lacks; its own password and data key. Both are encrypted or neither: an
    /// encrypted copy of a plain repository would name blocks by their plain hash.
    pub fn init_copying(backend: Arc<dyn Backend>, password: Option<&str>, source: &Repository) -> Result<Repository> {
        Self::init_with(backend, password, InitOptions { copy_of: Some(source), ..Default::default() })
    }

    fn init_sharing_ids(
        backend: Arc<dyn Backend>,
        password: Option<&str>,
        like: Option<(Option<[u8; 32]>, u32)>,
        immutable: Option<cairn_storage::LockPolicy>,
    ) -> Result<Repository> {
        if backend.exists(Kind::Config, "")? {
            return Err(Error::AlreadyExists(backend.location()));
        }
        backend.create()?;
        // Data without a config is a repository that lost its config, not an empty place: its
        // key files are the only way to its data, so nothing here may touch them.
        for kind in [Kind::Pack, Kind::Index, Kind::Point] {
            if !backend.list(kind)?.is_empty() {
                return Err(Error::Corrupt(format!(
                    "{} holds repository data ({kind}) but no config: it is not an empty place for a new \
                     repository (restore its config from a copy instead)",
                    backend.location()
                )));
            }
        }
        // Key files with no data and no config are what an interrupted init left: they open
        // nothing, and a plain repository must hold none (see `open`).
        // From here on, the store writes the key file, the config and everything after them
        // locked, and deletes versions (no delete markers that `repair undelete` would undo).
        if let (Some(policy), Some(locks)) = (immutable, backend.object_lock()) {
            locks.lock_writes(policy);
        }
        for orphan in backend.list(Kind::Key)? {
            match backend.delete(Kind::Key, &orphan.name) {
                // A key an interrupted immutable init locked: it authenticates no config of
                // ours (immutable repositories are encrypted), so it opens nothing.
                Err(StorageError::Locked { .. }) => {}
                other => other?,
            }
        }
        let hostname = hostname();
        let mut id = [0u8; 16];
        crypto::fill_random(&mut id);
        let config = Config {
            version: if immutable.is_some() { crate::config::IMMUTABLE_FORMAT_VERSION } else { FORMAT_VERSION },
            id: hex::encode(id),
            created: crate::now_rfc3339(),
            block_size: like.map_or(DEFAULT_BLOCK_SIZE, |(_, size)| size),
            encryption: if password.is_some() { "aes-256-gcm" } else { "none" }.into(),
            compression: "zstd".into(),
            immutability: immutable,
        };
        let config_bytes = serde_json::to_vec_pretty(&config).unwrap();
        let (crypto, key) = match password {
            Some(pw) => {
                // The key authenticates this exact config (FORMAT.md §3).
                let id_key = like.and_then(|(id, _)| id);
                let (keys, file) = crypto::new_keys_sharing_ids(pw, &hostname, &config_bytes, id_key)?;
                let bytes = serde_json::to_vec_pretty(&file).unwrap();
                let name = blake3::hash(&bytes).to_hex().to_string();
                // Confirmed before the config exists: a config without its key is a lost repository.
                Self::store_in(backend.as_ref(), Kind::Key, &name, &bytes)?;
                cairn_storage::crash_point("init.key_written");
                (Crypto::from_keys(&keys), Some((name, bytes)))
            }
            None => (Crypto::Plain, None),
        };
        // The config goes last: it is what makes the location a repository.
        let stored = match backend.put_new(Kind::Config, "", &config_bytes) {
            // A create whose answer was lost may have been ours: the config holds a random ID,
            // so the same bytes read back mean it is.
            Err(e) if backend.get(Kind::Config, "").is_ok_and(|b| b == config_bytes) => {
                let _ = e;
                Ok(())
            }
            other => other,
        };
        if let Err(e) = stored {
            // Our key goes only when the config is surely not ours (absent, or another init's):
            // a config without its key would be a repository nobody can open, while a stray
            // key opens nothing (it authenticates another config) and the next init removes it.
            let theirs = match backend.get(Kind::Config, "") {
                Ok(b) => b != config_bytes,
                Err(e) => e.is_not_found(),
            };
            if let (true, Some((name, _))) = (theirs, &key) {
                let _ = backend.delete(Kind::Key, name);
            }
            return Err(match e {
                StorageError::AlreadyExists { .. } => Error::AlreadyExists(backend.location()),
                e => e.into(),
            });
        }
        cairn_storage::crash_point("init.config_written");
        if !backend.exists(Kind::Config, "")? {
            return Err(Error::Corrupt(format!(
                "storage at {} acknowledged the config but does not show it yet; run `init` again later",
                backend.location()
            )));
        }
        // An init racing ours may have taken our key for an orphan before our config existed:
        // the config is ours now, so the key must be there.
        if let Some((name, bytes)) = &key {
            if !backend.exists(Kind::Key, name)? {
                Self::store_in(backend.as_ref(), Kind::Key, name, bytes)?;
            }
        }
        Ok(Repository::assemble(backend, config, crypto, hostname))
    }

    /// Opens a repository. `password` is asked only if the repository is encrypted.
    ///
    /// The config is plain JSON, so it is checked before anything relies on it: in an
    /// encrypted repository the key that opens must authenticate the config's exact bytes; a
    /// config that says "none" while key files exist is refused (it would make cairn read
    /// unauthenticated data and write plaintext into an encrypted repository).
    pub fn open(backend: Arc<dyn Backend>, password: impl FnOnce() -> Option<String>) -> Result<Repository> {
        let raw = match backend.get(Kind::Config, "") {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Err(Error::NotARepository(backend.location())),
            Err(e) => return Err(e.into()),
        };
        let config = Config::parse(&raw, &backend.location())?;
        let key_files = backend.list(Kind::Key)?;
        let crypto = if !config.is_encrypted() {
            if !key_files.is_empty() {
                return Err(Error::Corrupt(format!(
                    "the config at {} says the repository is not encrypted, but it holds {} key file(s): \
                     the config was altered; refusing to read or write this repository",
                    backend.location(),
                    key_files.len()
                )));
            }
            Crypto::Plain
        } else {
            if key_files.is_empty() {
                return Err(Error::Corrupt("encrypted repository has no key files".into()));
            }
            let pw = password().ok_or(Error::PasswordRequired)?;
            open_keys(backend.as_ref(), &key_files, &pw, &raw)?
        };
        // An immutable repository is written locked, by every process (FORMAT.md §13).
        if let Some(policy) = config.immutability {
            crate::config::store_locks(backend.as_ref(), policy)?.lock_writes(policy);
        }
        Ok(Repository::assemble(backend, config, crypto, hostname()))
    }

    fn assemble(backend: Arc<dyn Backend>, config: Config, crypto: Crypto, hostname: String) -> Repository {
        Repository {
            backend,
            config,
            crypto,
            index: RwLock::new(Arc::new(Index::default())),
            index_files: std::sync::Mutex::new(None),
            damaged_index_files: RwLock::new(Vec::new()),
            index_spill: std::sync::Mutex::new(Some(crate::index::SpillConfig::from_env())),
            damaged_records: std::sync::Mutex::new(Vec::new()),
            hostname,
            locks: std::sync::Mutex::new(Vec::new()),
            locks_recorded: Default::default(),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }
    pub fn hostname(&self) -> &str {
        &self.hostname
    }
    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    /// Takes a shared (backup, restore, verify, forget) or exclusive (repair) lock.
    pub fn lock(&self, exclusive: bool, purpose: &str, wait: Duration) -> Result<crate::Lock> {
        let mode = if exclusive { crate::lock::LockMode::Exclusive } else { crate::lock::LockMode::Shared };
        self.lock_mode(mode, purpose, wait)
    }

    /// Takes a lock of any mode (see [`crate::lock::LockMode`]).
    pub fn lock_mode(&self, mode: crate::lock::LockMode, purpose: &str, wait: Duration) -> Result<crate::Lock> {
        let lock = crate::lock::acquire(&self.backend, &self.hostname, mode, purpose, wait)?;
        let mut held = self.locks.lock().unwrap();
        held.retain(|(_, h)| h.strong_count() > 0);
        held.push((lock.name().to_string(), Arc::downgrade(&lock.health())));
        Ok(lock)
    }

    /// Fails if a lock this process holds on the repository was lost (its file removed by
    /// someone who judged it stale, or not refreshed in time): nothing may become visible
    /// then, since maintenance may be deleting what it references (as restic does).
    pub fn check_locks(&self) -> Result<()> {
        let held: Vec<_> =
            self.locks.lock().unwrap().iter().filter_map(|(n, h)| Some((n.clone(), h.upgrade()?))).collect();
        for (name, health) in held {
            crate::lock::check_held(self.backend.as_ref(), &name, &health)?;
        }
        Ok(())
    }

    /// Loads every index file. Damaged index files are skipped and remembered (see
    /// [`Repository::damaged_index_files`]): backups then simply store those blocks again.
    pub fn load_index(&self) -> Result<()> {
        let mut files = self.index_files.lock().unwrap();
        let mut idx = crate::index::IndexBuilder::new(self.index_spill.lock().unwrap().clone());
        let records = self.load_records()?;
        let quarantines: Vec<(String, Quarantine)> = crate::catalog::typed(&records)?;
        idx.set_quarantine(quarantines.iter().flat_map(|(_, q)| quarantine_copies(q)).collect());
        idx.set_marked(crate::catalog::marks_in(&crate::catalog::typed(&records)?).into_keys().collect());
        let mut seen = std::collections::HashSet::new();
        let mut damaged = Vec::new();
        self.read_listed_index_files(
            &mut seen,
            &mut damaged,
            |_| true,
            |packs| packs.into_iter().try_for_each(|(pack, frames)| idx.add_pack(pack, &frames)),
        )?;
        *self.index.write().unwrap() = Arc::new(idx.finish()?);
        *self.damaged_index_files.write().unwrap() = damaged;
        *files = Some(seen);
        Ok(())
    }

    /// Tells the loaded index what a prune did: the packs it deleted, the packs marked now.
    pub(crate) fn after_prune(
        &self,
        deleted: &std::collections::HashSet<crate::index::PackId>,
        marked: &std::collections::HashSet<crate::index::PackId>,
    ) {
        let mut current = self.index.write().unwrap();
        let idx = Arc::make_mut(&mut current);
        idx.drop_packs(deleted);
        idx.set_marked(marked.clone());
    }

    /// Adds the index files written since the index was loaded (a no-op before the first
    /// load). Readers list restore points *after* loading the index, so a point committed in
    /// between may reference blocks only newer index files list; by the write ordering
    /// (FORMAT.md §8) a listing made after the point was seen covers them all. `list_points`
    /// calls this, so every reader sees an index that covers the points it lists. Files known
    /// to be damaged are not read again here (see [`Repository::add_index_files`]).
    pub fn refresh_index(&self) -> Result<()> {
        let known_damaged: std::collections::HashSet<String> =
            self.damaged_index_files.read().unwrap().iter().map(|(n, _)| n.clone()).collect();
        self.add_new_index_files(|name| !known_damaged.contains(name))
    }

    /// Adds these index files (a session's own, just written) to the loaded index, even under
    /// a name once found damaged: names are content hashes, so a sound file may have replaced
    /// a damaged one.
    pub fn add_index_files(&self, names: &[String]) -> Result<()> {
        let wanted: std::collections::HashSet<&str> = names.iter().map(|n| n.as_str()).collect();
        self.add_new_index_files(|name| wanted.contains(name))
    }

    /// Reads the listed index files not yet in the index that `pick` wants, and adds their
    /// packs: copy-on-write, so readers holding a snapshot keep theirs, and only when there
    /// is something to add.
    fn add_new_index_files(&self, pick: impl Fn(&str) -> bool) -> Result<()> {
        let mut files = self.index_files.lock().unwrap();
        let Some(seen) = files.as_mut() else { return Ok(()) };
        let mut damaged = Vec::new();
        // Added in batches: decoded index files take more memory than the index's entries
        // (a large repack writes millions of them).
        let mut batch = Vec::new();
        let mut batch_entries = 0usize;
        // Built on a copy, then swapped in: sealing may write a run to disk or merge runs
        // (seconds), and readers (every block of a backup asks the index) must not wait. The
        // `index_files` lock held here keeps refreshes one at a time.
        let add = |batch: &mut Vec<Vec<([u8; 32], Vec<crate::pack::FrameEntry>)>>| {
            if batch.is_empty() {
                return;
            }
            let mut idx = Index::clone(&self.index());
            for (pack, frames) in batch.drain(..).flatten() {
                idx.add_pack(pack, &frames);
            }
            idx.seal();
            *self.index.write().unwrap() = Arc::new(idx);
        };
        let read = self.read_listed_index_files(seen, &mut damaged, pick, |packs| {
            batch_entries += packs.iter().flat_map(|(_, f)| f).map(|f| f.blobs.len()).sum::<usize>();
            batch.push(packs);
            if batch_entries >= 256 << 10 {
                add(&mut batch);
                batch_entries = 0;
            }
            Ok(())
        });
        // What was read is added even if a later file failed: it is marked seen.
        add(&mut batch);
        read?;
        let mut known = self.damaged_index_files.write().unwrap();
        known.retain(|(n, _)| !seen.contains(n));
        for d in damaged {
            if !known.iter().any(|(n, _)| *n == d.0) {
                known.push(d);
            }
        }
        Ok(())
    }

    /// Reads every listed index file not in `seen` that `pick` wants, hands each sound one's
    /// packs to `add` (one at a time: a large index is never whole in memory), and marks it
    /// seen. A file can vanish between the listing and the read (a session merged it into
    /// one file and deleted it): the merged file is durable before the deletion, so listing
    /// again finds it. Damaged files are not marked seen (a sound file of the same name may
    /// come: names are content hashes).
    #[allow(clippy::type_complexity)]
    fn read_listed_index_files(
        &self,
        seen: &mut std::collections::HashSet<String>,
        damaged: &mut Vec<(String, String)>,
        pick: impl Fn(&str) -> bool,
        mut add: impl FnMut(Vec<([u8; 32], Vec<crate::pack::FrameEntry>)>) -> Result<()>,
    ) -> Result<()> {
        for _attempt in 0..8 {
            let mut vanished = false;
            for l in self.backend.list(Kind::Index)? {
                if seen.contains(&l.name) || !pick(&l.name) || damaged.iter().any(|(n, _)| *n == l.name) {
                    continue;
                }
                match self.read_index_file(&l.name) {
                    Ok(packs) => add(packs)?,
                    Err(Error::Storage(e)) if e.is_not_found() => {
                        vanished = true;
                        continue;
                    }
                    Err(e @ (Error::Corrupt(_) | Error::Format(_))) => {
                        damaged.push((l.name.clone(), e.to_string()));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                seen.insert(l.name);
            }
            if !vanished {
                return Ok(());
            }
        }
        Err(Error::Corrupt("index files keep vanishing while being read; try again".into()))
    }

    pub fn read_index_file(&self, name: &str) -> Result<Vec<([u8; 32], Vec<crate::pack::FrameEntry>)>> {
        let bytes = self.backend.get(Kind::Index, name)?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            return Err(Error::Corrupt(format!("index file {name} does not match its name (bytes changed)")));
        }
        let raw = self.crypto.open(&bytes, &format!("index file {name}"))?;
        decode_index(&raw).map_err(|e| Error::Corrupt(format!("index file {name}: {e}")))
    }

    /// Where [`Repository::load_index`] puts a large index's entries; `None` keeps them all in
    /// memory. Default: [`crate::index::SpillConfig::from_env`].
    pub fn set_index_spill(&self, config: Option<crate::index::SpillConfig>) {
        *self.index_spill.lock().unwrap() = config;
    }

    /// The current index (a snapshot: cheap to take, never blocks a refresh).
    pub fn index(&self) -> Arc<Index> {
        self.index.read().unwrap().clone()
    }

    pub fn damaged_index_files(&self) -> Vec<(String, String)> {
        self.damaged_index_files.read().unwrap().clone()
    }

    /// Reads and decodes the frame holding a blob (not yet checked against any block ID).
    pub fn read_frame(&self, loc: &BlobLocation) -> Result<Vec<u8>> {
        let (mut stored, mut out) = (Vec::new(), Vec::new());
        self.read_frame_into(loc, &mut stored, &mut out)?;
        Ok(out)
    }

    /// Like [`Repository::read_frame`] with reused buffers: `stored` receives the bytes as
    /// stored, `out` the decoded frame.
    pub fn read_frame_into(&self, loc: &BlobLocation, stored: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<()> {
        let name = loc.pack_name();
        self.backend.get_range_into(Kind::Pack, &name, loc.frame_offset as u64, loc.frame_stored_len as u64, stored)?;
        if stored.len() != loc.frame_stored_len as usize {
            return Err(Error::Storage(StorageError::ShortRead {
                kind: Kind::Pack,
                name,
                offset: loc.frame_offset as u64,
                end: loc.frame_offset as u64 + loc.frame_stored_len as u64,
                size: loc.frame_offset as u64 + stored.len() as u64,
            }));
        }
        self.decode_frame_into(loc, stored, out)
    }

    /// Decodes the stored bytes of the frame at `loc` (read by the caller, e.g. as part of a
    /// larger span of its pack) into `out`.
    pub fn decode_frame_into(&self, loc: &BlobLocation, stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let what = format!("pack {} frame at {}", &loc.pack_name()[..8], loc.frame_offset);
        open_frame_into(&self.crypto, stored, loc.frame_raw_len, &what, out)
    }

    /// Reads one blob and checks it against its ID. When a copy is damaged (unreadable, or not
    /// matching its hash), the other copies are tried, quarantined ones last; the first copy's
    /// problem is reported if none is sound.
    pub fn read_blob(&self, id: &BlockId, context: &str) -> Result<Vec<u8>> {
        let index = self.index();
        let copies: Vec<BlobLocation> = index.copies(id).chain(index.quarantined_copies(id)).collect();
        if copies.is_empty() {
            return Err(Error::MissingBlock { id: *id, context: context.into() });
        }
        let mut first_error = None;
        for loc in copies {
            match self.read_copy(id, &loc) {
                Ok(blob) => return Ok(blob),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("at least one copy was tried"))
    }

    /// A sound copy of a block other than the one in `pack` (restore falls back to it when that
    /// copy is damaged; quarantined copies last); `None` when there is none.
    pub fn read_other_copy(&self, id: &BlockId, pack: &crate::index::PackId) -> Option<Vec<u8>> {
        let index = self.index();
        let copies: Vec<BlobLocation> =
            index.copies(id).chain(index.quarantined_copies(id)).filter(|l| l.pack != *pack).collect();
        copies.iter().find_map(|loc| self.read_copy(id, loc).ok())
    }

    /// Reads the copy of a block at `loc` and checks it against its ID.
    pub(crate) fn read_copy(&self, id: &BlockId, loc: &BlobLocation) -> Result<Vec<u8>> {
        let frame = self.read_frame(loc).map_err(|e| damaged(id, loc, e))?;
        let end = loc.raw_offset as usize + loc.len as usize;
        match frame.get(loc.raw_offset as usize..end) {
            Some(blob) if self.crypto.block_id(blob) == *id => Ok(blob.to_vec()),
            _ => Err(Error::DamagedBlock {
                id: *id,
                pack: loc.pack_name(),
                detail: "content does not match its hash".into(),
            }),
        }
    }

    /// Reads a disk's map, page by page (each page checked against its ID, and holding
    /// exactly the block IDs its position needs: callers index it without further checks).
    pub fn read_map_page(&self, disk: &DiskImage, page: usize) -> Result<Vec<BlockId>> {
        let id = disk
            .map
            .get(page)
            .and_then(|h| BlockId::from_hex(h))
            .ok_or_else(|| Error::Corrupt(format!("disk {} has no valid map page {page}", disk.name)))?;
        let raw = self.read_blob(&id, &format!("map page {page} of disk {}", disk.name))?;
        let ids =
            map::decode_page(&raw).ok_or_else(|| Error::Corrupt(format!("map page {} is malformed", id.short())))?;
        if ids.len() != disk.page_len(page) {
            return Err(Error::Corrupt(format!(
                "map page {page} of disk {} holds {} block IDs where {} are needed",
                disk.name,
                ids.len(),
                disk.page_len(page)
            )));
        }
        Ok(ids)
    }

    /// Saves a restore point document; from this moment the point is visible. Refused when a
    /// lock this process took was lost.
    pub fn save_point(&self, point: &RestorePoint) -> Result<PointId> {
        self.check_locks()?;
        let sealed = self.crypto.seal(&serde_json::to_vec(point).unwrap(), 3);
        let id = PointId::of_sealed(&sealed);
        self.store(Kind::Point, id.as_str(), &sealed)?;
        Ok(id)
    }

    pub fn load_point(&self, id: &PointId) -> Result<RestorePoint> {
        let short = id.short();
        let bytes = self.backend.get(Kind::Point, id.as_str())?;
        if PointId::of_sealed(&bytes) != *id {
            return Err(Error::Corrupt(format!("restore point {short} does not match its name (bytes changed)")));
        }
        let raw = self.crypto.open(&bytes, &format!("restore point {short}"))?;
        let point: RestorePoint =
            serde_json::from_slice(&raw).map_err(|e| Error::Corrupt(format!("restore point {short}: {e}")))?;
        point.check().map_err(|e| Error::Corrupt(format!("restore point {short}: {e}")))?;
        Ok(point)
    }

    /// Stores a catalog record (boot verification results and the like), sealed like a point.
    ///
    /// The record is read back and checked against its name before this returns: records
    /// decide what may be deleted or reused (prune marks, quarantine, protections), and one a
    /// medium tore (a partial object under its final name) would make every later prune refuse.
    /// A torn record is deleted again and the call fails.
    pub fn save_record(&self, record: &serde_json::Value) -> Result<String> {
        let sealed = self.crypto.seal(&serde_json::to_vec(record).unwrap(), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        if let Err(e) = self.backend.put(Kind::Catalog, &name, &sealed) {
            // A failed write may still have left part of the object under its name.
            let _ = self.backend.delete(Kind::Catalog, &name);
            return Err(e.into());
        }
        let back = self.backend.get(Kind::Catalog, &name)?;
        if back != sealed {
            let _ = self.backend.delete(Kind::Catalog, &name);
            return Err(Error::Corrupt(format!(
                "storage at {} did not keep catalog record {} as written; it was removed",
                self.backend.location(),
                short(&name)
            )));
        }
        Ok(name)
    }

    /// The block copies verify found damaged (pack, block): the index leaves them out, so the
    /// next backup that reads those blocks stores them again (self-healing).
    pub fn quarantine(&self) -> Result<std::collections::HashSet<(crate::index::PackId, BlockId)>> {
        let mut out = std::collections::HashSet::new();
        for (_, q) in self.typed_records::<Quarantine>()? {
            out.extend(quarantine_copies(&q));
        }
        Ok(out)
    }

    /// Adds damaged copies to the quarantine and releases copies that read back sound, as
    /// `(pack name, block ID)` pairs. One record holds the whole quarantine: the new one is
    /// durable before the older ones go, and readers take the union of what they find.
    pub fn update_quarantine(&self, add: &[(String, String)], release: &[(String, String)]) -> Result<()> {
        if add.is_empty() && release.is_empty() {
            return Ok(());
        }
        let old = self.typed_records::<Quarantine>()?;
        let mut all: std::collections::BTreeSet<(String, String)> = add.iter().cloned().collect();
        for (_, q) in &old {
            all.extend(quarantine_copies(q).into_iter().map(|(p, b)| (hex::encode(p), b.to_hex())));
        }
        for r in release {
            all.remove(r);
        }
        let name = self.save_typed(&Quarantine { time: crate::now_rfc3339(), copies: all.into_iter().collect() })?;
        cairn_storage::crash_point("quarantine.saved");
        for (n, _) in old {
            if n != name {
                self.delete_record(&n)?;
                cairn_storage::crash_point("quarantine.old_deleted");
            }
        }
        // What this process reads next (a backup that heals, a restore) must see the change.
        if self.index_files.lock().unwrap().is_some() {
            self.load_index()?;
        }
        Ok(())
    }

    /// Removes a catalog record (superseded state).
    pub fn delete_record(&self, name: &str) -> Result<()> {
        Ok(self.backend.delete(Kind::Catalog, name)?)
    }

    /// Every catalog record, with its name. A record that vanished between the listing and
    /// its read was superseded (its replacement is durable before it goes): the catalog is
    /// listed again. Any other storage error fails the call: callers decide what may be
    /// deleted or reused from these records (prune marks, quarantine, protections), so they
    /// must not go on without one. A record read twice as damaged (hash, seal or JSON) is
    /// skipped and named by [`Repository::damaged_records`].
    pub fn load_records(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        let mut done = std::collections::HashSet::new();
        let mut damaged = Vec::new();
        for _attempt in 0..8 {
            let mut vanished = false;
            for l in self.backend.list(Kind::Catalog)? {
                if done.contains(&l.name) {
                    continue;
                }
                let mut result = self.read_record(&l.name);
                if matches!(result, Err(Error::Corrupt(_))) {
                    result = self.read_record(&l.name); // a misread, or damage: read again
                }
                match result {
                    // A body that does not fit its kind is as unusable as one that cannot be read.
                    Ok(v) => match crate::RecordKind::of(&v).and_then(|k| k.misfit(&v)) {
                        Some(why) => damaged.push((l.name.clone(), why)),
                        None => out.push((l.name.clone(), v)),
                    },
                    Err(Error::Storage(e)) if e.is_not_found() => {
                        vanished = true;
                        continue;
                    }
                    Err(Error::Corrupt(why)) => damaged.push((l.name.clone(), why)),
                    Err(e) => return Err(e),
                }
                done.insert(l.name);
            }
            if !vanished {
                *self.damaged_records.lock().unwrap() = damaged;
                return Ok(out);
            }
        }
        Err(Error::Corrupt("catalog records keep vanishing while being read; try again".into()))
    }

    /// The catalog records of one kind, with their names (see [`Repository::load_records`]).
    pub fn records_of(&self, kind: crate::RecordKind) -> Result<Vec<(String, serde_json::Value)>> {
        Ok(self.load_records()?.into_iter().filter(|(_, r)| crate::RecordKind::of(r) == Some(kind)).collect())
    }

    /// The records of `R`'s kind, typed, with their names.
    pub fn typed_records<R: crate::catalog::CatalogRecord>(&self) -> Result<Vec<(String, R)>> {
        crate::catalog::typed(&self.records_of(R::KIND)?)
    }

    /// Stores `body` as a catalog record of its kind (see [`Repository::save_record`]).
    pub fn save_typed<R: crate::catalog::CatalogRecord>(&self, body: &R) -> Result<String> {
        self.save_record(&crate::catalog::to_record(body))
    }

    fn read_record(&self, name: &str) -> Result<serde_json::Value> {
        let bytes = self.backend.get(Kind::Catalog, name)?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            return Err(Error::Corrupt(format!("catalog record {} does not match its name", short(name))));
        }
        let raw = self.crypto.open(&bytes, "catalog record").map_err(|e| Error::Corrupt(e.to_string()))?;
        serde_json::from_slice(&raw).map_err(|e| Error::Corrupt(format!("catalog record {}: {e}", short(name))))
    }

    /// Catalog records the last [`Repository::load_records`] found damaged (name, problem).
    pub fn damaged_records(&self) -> Vec<(String, String)> {
        self.damaged_records.lock().unwrap().clone()
    }

    /// Every restore point, oldest first. Once the index is loaded, it is refreshed after the
    /// listing, so it covers every point listed (see [`Repository::refresh_index`]).
    pub fn list_points(&self) -> Result<PointList> {
        let mut points = Vec::new();
        let mut damaged = Vec::new();
        for l in self.backend.list(Kind::Point)? {
            let Some(id) = PointId::parse(&l.name) else {
                damaged.push((l.name, "not a restore point's name (64 hex digits)".to_string()));
                continue;
            };
            match self.load_point(&id) {
                Ok(p) => points.push((id, p)),
                Err(Error::Storage(e)) if e.is_not_found() => {}
                Err(e) => damaged.push((l.name, e.to_string())),
            }
        }
        points.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        self.refresh_index()?;
        Ok(PointList { points, damaged })
    }

    /// Finds a point from `NAME`, `NAME@latest`, `NAME@<id prefix>` or `NAME@<time prefix>`.
    pub fn select_point(&self, spec: &str) -> Result<(PointId, RestorePoint)> {
        let (name, sel) = spec.split_once('@').unwrap_or((spec, "latest"));
        // A whole ID names one object: read it, not every point (a listing of thousands on an
        // object store, for each file a console asks about).
        if let Some(id) = PointId::parse(sel) {
            let point = match self.load_point(&id) {
                Ok(p) if p.name == name => p,
                Ok(_) => return Err(Error::NotFound(format!("{name} has no restore point matching {sel:?}"))),
                Err(Error::Storage(e)) if e.is_not_found() => {
                    return Err(Error::NotFound(format!("{name} has no restore point matching {sel:?}")))
                }
                Err(e) => return Err(e),
            };
            // As a listing does: index files written since (by the backup that made this
            // point, say) are read, so the point's blocks are found.
            self.refresh_index()?;
            return Ok((id, point));
        }
        let all = self.list_points()?.points;
        let mine: Vec<_> = all.into_iter().filter(|(_, p)| p.name == name).collect();
        if mine.is_empty() {
            return Err(Error::NoSuchPoint(name.to_string()));
        }
        if sel == "latest" || sel.is_empty() {
            return Ok(mine.into_iter().last().unwrap());
        }
        let matches: Vec<_> =
            mine.into_iter().filter(|(id, p)| id.as_str().starts_with(sel) || p.time.starts_with(sel)).collect();
        match matches.len() {
            0 => Err(Error::NotFound(format!("{name} has no restore point matching {sel:?}"))),
            1 => Ok(matches.into_iter().next().unwrap()),
            n => Err(Error::NotFound(format!("{sel:?} matches {n} restore points of {name}; give more of the ID"))),
        }
    }

    /// Whether a pack is in storage (asked of the object itself, not a listing).
    pub fn pack_exists(&self, name: &str) -> Result<bool> {
        Ok(self.backend.exists(Kind::Pack, name)?)
    }

    /// Reads `[offset, offset + len)` of a pack into `buf` (reused), around the page cache
    /// where the backend can (restores); returns where in `buf` the bytes are. A backend that
    /// answers with fewer bytes than asked is an error here, never a short slice later.
    pub fn read_pack_span(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>> {
        let range = self.backend.get_span(Kind::Pack, name, offset, len, buf)?;
        if range.len() as u64 != len || range.end > buf.len() {
            return Err(Error::Storage(StorageError::ShortRead {
                kind: Kind::Pack,
                name: name.to_string(),
                offset,
                end: offset + len,
                size: offset + range.len() as u64,
            }));
        }
        Ok(range)
    }

    /// Reads a whole pack (verify, repair).
    pub fn read_pack(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self.backend.get(Kind::Pack, name)?)
    }

    /// Stores an object of the write-ordering chain (pack, index file, point) and confirms
    /// that storage shows it: what comes next in the chain relies on it, so a write the
    /// medium acknowledged but lost (an eventually consistent store, a lying disk) must fail
    /// the operation here rather than leave a point referencing nothing.
    pub fn store(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        Self::store_in(self.backend.as_ref(), kind, name, data)
    }

    fn store_in(backend: &dyn Backend, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        backend.put(kind, name, data)?;
        if !backend.exists(kind, name)? {
            return Err(Error::Corrupt(format!(
                "storage at {} acknowledged {kind} {} but does not hold it",
                backend.location(),
                short(name)
            )));
        }
        Ok(())
    }

    /// Stores an index file listing `packs` (durably, before returning); returns its name and
    /// stored size.
    pub fn write_index_file(
        &self,
        packs: &[(crate::index::PackId, Vec<crate::pack::FrameEntry>)],
    ) -> Result<(String, u64)> {
        let sealed = self.crypto.seal(&crate::index::encode_index(packs), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        // Read back: callers delete what the file replaces (old index files, repacked packs)
        // as soon as this returns, so a file storage tore would leave blocks in no index. A
        // torn file is written once more; never deleted (it may replace a good one of the
        // same name, and `repair index` recovers from a damaged one, not from a missing one).
        for _ in 0..2 {
            self.store(Kind::Index, &name, &sealed)?;
            let back = self.backend.get(Kind::Index, &name).or_else(|_| self.backend.get(Kind::Index, &name))?;
            if blake3::hash(&back).to_hex().as_str() == name {
                return Ok((name, sealed.len() as u64));
            }
        }
        Err(Error::Corrupt(format!(
            "storage at {} tore index file {} twice (it does not match its name when read back)",
            self.backend.location(),
            short(&name)
        )))
    }

    /// The names of every index file in storage.
    pub fn index_file_names(&self) -> Result<Vec<String>> {
        Ok(self.backend.list(Kind::Index)?.into_iter().map(|l| l.name).collect())
    }

    /// Deletes an index file (only once what it lists is durable in others: FORMAT.md §8).
    pub fn delete_index_file(&self, name: &str) -> Result<()> {
        Ok(self.backend.delete(Kind::Index, name)?)
    }

    /// Deletes a restore point document (forget). Its blocks stay until a prune.
    pub fn delete_point(&self, id: &PointId) -> Result<()> {
        Ok(self.backend.delete(Kind::Point, id.as_str())?)
    }

    /// Deletes a pack (prune only, once no index file lists it: FORMAT.md §12).
    pub(crate) fn delete_pack(&self, name: &str) -> Result<()> {
        Ok(self.backend.delete(Kind::Pack, name)?)
    }

    /// The pack IDs present in storage.
    pub fn stored_packs(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .backend
            .list(Kind::Pack)?
            .into_iter()
            .filter(|l| pack_id_from_name(&l.name).is_some())
            .map(|l| (l.name, l.size))
            .collect())
    }
}

/// The copies a quarantine record lists (FORMAT.md §11: `copies` as `[pack name, block ID]`
/// pairs); entries that are not two valid hex names are skipped.
pub fn quarantine_copies(record: &Quarantine) -> Vec<(crate::index::PackId, BlockId)> {
    record
        .copies
        .iter()
        .filter_map(|(pack, block)| Some((crate::index::pack_id_from_name(pack)?, BlockId::from_hex(block)?)))
        .collect()
}

/// Finds the key file `password` opens and checks that it authenticates `config`. Key files
/// that cannot be read or parsed, or that ask for absurd costs, are skipped (another may open);
/// the cheapest are tried first, so planted expensive ones cost nothing once the real one opens.
fn open_keys(
    backend: &dyn Backend,
    key_files: &[cairn_storage::Listed],
    password: &str,
    config: &[u8],
) -> Result<Crypto> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for k in key_files {
        match backend.get(Kind::Key, &k.name).map(|b| serde_json::from_slice::<KeyFile>(&b)) {
            Ok(Ok(f)) => match f.check_costs() {
                Ok(()) => files.push((k.name.clone(), f)),
                Err(e) => problems.push(format!("key file {}: {e}", short(&k.name))),
            },
            Ok(Err(e)) => problems.push(format!("key file {}: {e}", short(&k.name))),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    files.sort_by_key(|(_, f)| f.cost());
    let mut foreign = 0;
    let mut tried = 0;
    for (name, file) in &files {
        let opened = match crypto::unwrap_keys(file, password) {
            Ok(Some(opened)) => opened,
            Ok(None) => {
                tried += 1;
                continue;
            }
            Err(e) => {
                problems.push(format!("key file {}: {e}", short(name)));
                continue;
            }
        };
        match opened.authenticates(config) {
            // Written before configs were authenticated: the sanity checks are all we have.
            None | Some(true) => return Ok(Crypto::from_keys(&opened.keys)),
            // Opens, but belongs to another config: an interrupted init's key, or the config
            // was changed. Another key file may still match.
            Some(false) => foreign += 1,
        }
    }
    if foreign > 0 {
        return Err(Error::Corrupt(format!(
            "the password opens {foreign} key file(s), but none of them authenticates the repository config: \
             the config was altered (or replaced by another repository's); refusing to use it"
        )));
    }
    if tried == 0 && !problems.is_empty() {
        return Err(Error::Corrupt(format!(
            "no key file opens with this password; unusable key files: {}",
            problems.join("; ")
        )));
    }
    Err(Error::WrongPassword)
}

fn short(name: &str) -> &str {
    &name[..name.len().min(8)]
}

fn damaged(id: &BlockId, loc: &BlobLocation, e: Error) -> Error {
    match e {
        Error::Storage(s) if s.is_not_found() => {
            Error::DamagedBlock { id: *id, pack: loc.pack_name(), detail: "its pack file is missing".into() }
        }
        Error::Storage(StorageError::ShortRead { .. }) => {
            Error::DamagedBlock { id: *id, pack: loc.pack_name(), detail: "its pack file is truncated".into() }
        }
        Error::Corrupt(d) => Error::DamagedBlock { id: *id, pack: loc.pack_name(), detail: d },
        other => other,
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
