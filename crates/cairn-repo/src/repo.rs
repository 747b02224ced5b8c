//! Opening, creating and reading a repository.

use crate::config::{Config, DEFAULT_BLOCK_SIZE, FORMAT_VERSION};
use crate::crypto::{self, Crypto, KeyFile};
use crate::index::{decode_index, pack_id_from_name, BlobLocation, Index};
use crate::map;
use crate::pack::open_frame_into;
use crate::point::{DiskImage, RestorePoint};
use crate::{BlockId, Error, Result};
use cairn_storage::{Backend, Kind, StorageError};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    crypto: Crypto,
    index: RwLock<Index>,
    damaged_index_files: RwLock<Vec<(String, String)>>,
    hostname: String,
}

/// The restore points of a repository, and any point documents that could not be read.
pub struct PointList {
    /// (id, point), oldest first.
    pub points: Vec<(String, RestorePoint)>,
    pub damaged: Vec<(String, String)>,
}

impl Repository {
    /// Creates a repository at an empty location. With a password, it is encrypted.
    pub fn init(backend: Arc<dyn Backend>, password: Option<&str>) -> Result<Repository> {
        if backend.exists(Kind::Config, "")? {
            return Err(Error::AlreadyExists(backend.location()));
        }
        backend.create()?;
        let hostname = hostname();
        let crypto = match password {
            Some(pw) => {
                let (keys, file) = crypto::new_keys(pw, &hostname)?;
                let bytes = serde_json::to_vec_pretty(&file).unwrap();
                backend.put(Kind::Key, &blake3::hash(&bytes).to_hex(), &bytes)?;
                Crypto::from_keys(&keys)
            }
            None => Crypto::Plain,
        };
        let mut id = [0u8; 16];
        crypto::fill_random(&mut id);
        let config = Config {
            version: FORMAT_VERSION,
            id: hex::encode(id),
            created: crate::now_rfc3339(),
            block_size: DEFAULT_BLOCK_SIZE,
            encryption: if crypto.is_encrypted() { "aes-256-gcm" } else { "none" }.into(),
            compression: "zstd".into(),
        };
        // The config goes last: it is what makes the location a repository.
        match backend.put_new(Kind::Config, "", &serde_json::to_vec_pretty(&config).unwrap()) {
            Err(StorageError::AlreadyExists { .. }) => return Err(Error::AlreadyExists(backend.location())),
            r => r?,
        }
        Ok(Repository::assemble(backend, config, crypto, hostname))
    }

    /// Opens a repository. `password` is asked only if the repository is encrypted.
    pub fn open(backend: Arc<dyn Backend>, password: impl FnOnce() -> Option<String>) -> Result<Repository> {
        let raw = match backend.get(Kind::Config, "") {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Err(Error::NotARepository(backend.location())),
            Err(e) => return Err(e.into()),
        };
        let config: Config = serde_json::from_slice(&raw)
            .map_err(|e| Error::Corrupt(format!("the config file at {} is unreadable ({e})", backend.location())))?;
        if config.version > FORMAT_VERSION {
            return Err(Error::Format(format!(
                "repository format {} is newer than this cairn understands ({FORMAT_VERSION}); upgrade cairn",
                config.version
            )));
        }
        let crypto = match config.encryption.as_str() {
            "none" => Crypto::Plain,
            "aes-256-gcm" => {
                let pw = password().ok_or(Error::PasswordRequired)?;
                let mut found = None;
                let keys = backend.list(Kind::Key)?;
                if keys.is_empty() {
                    return Err(Error::Corrupt("encrypted repository has no key files".into()));
                }
                for k in keys {
                    let bytes = backend.get(Kind::Key, &k.name)?;
                    let Ok(file) = serde_json::from_slice::<KeyFile>(&bytes) else {
                        continue;
                    };
                    if let Some(mk) = crypto::unwrap_keys(&file, &pw)? {
                        found = Some(Crypto::from_keys(&mk));
                        break;
                    }
                }
                found.ok_or(Error::WrongPassword)?
            }
            other => return Err(Error::Format(format!("unknown encryption {other:?}"))),
        };
        Ok(Repository::assemble(backend, config, crypto, hostname()))
    }

    fn assemble(backend: Arc<dyn Backend>, config: Config, crypto: Crypto, hostname: String) -> Repository {
        Repository {
            backend,
            config,
            crypto,
            index: RwLock::new(Index::default()),
            damaged_index_files: RwLock::new(Vec::new()),
            hostname,
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

    /// Takes a shared (backup, restore, verify) or exclusive (maintenance) lock.
    pub fn lock(&self, exclusive: bool, purpose: &str, wait: Duration) -> Result<crate::Lock> {
        crate::lock::acquire(&self.backend, &self.hostname, exclusive, purpose, wait)
    }

    /// Loads every index file. Damaged index files are skipped and remembered (see
    /// [`Repository::damaged_index_files`]): backups then simply store those blocks again.
    pub fn load_index(&self) -> Result<()> {
        let mut idx = Index::default();
        idx.set_quarantine(self.quarantine()?);
        let mut damaged = Vec::new();
        for l in self.backend.list(Kind::Index)? {
            match self.read_index_file(&l.name) {
                Ok(packs) => {
                    for (pack, frames) in packs {
                        idx.add_pack(pack, &frames);
                    }
                }
                // Removed by a concurrent session after merging it into a file listed too.
                Err(Error::Storage(e)) if e.is_not_found() => {}
                Err(e @ (Error::Corrupt(_) | Error::Format(_))) => damaged.push((l.name.clone(), e.to_string())),
                Err(e) => return Err(e),
            }
        }
        idx.seal();
        *self.index.write().unwrap() = idx;
        *self.damaged_index_files.write().unwrap() = damaged;
        Ok(())
    }

    pub fn read_index_file(&self, name: &str) -> Result<Vec<([u8; 32], Vec<crate::pack::FrameEntry>)>> {
        let bytes = self.backend.get(Kind::Index, name)?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            return Err(Error::Corrupt(format!("index file {name} does not match its name (bytes changed)")));
        }
        let raw = self.crypto.open(&bytes, &format!("index file {name}"))?;
        decode_index(&raw).map_err(|e| Error::Corrupt(format!("index file {name}: {e}")))
    }

    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap()
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
        self.decode_frame_into(loc, stored, out)
    }

    /// Decodes the stored bytes of the frame at `loc` (read by the caller, e.g. as part of a
    /// larger span of its pack) into `out`.
    pub fn decode_frame_into(&self, loc: &BlobLocation, stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let what = format!("pack {} frame at {}", &loc.pack_name()[..8], loc.frame_offset);
        open_frame_into(&self.crypto, stored, loc.frame_raw_len, &what, out)
    }

    /// Reads one blob and checks it against its ID.
    pub fn read_blob(&self, id: &BlockId, context: &str) -> Result<Vec<u8>> {
        let loc = self.index().get(id).ok_or_else(|| Error::MissingBlock { id: *id, context: context.into() })?;
        let frame = self.read_frame(&loc).map_err(|e| damaged(id, &loc, e))?;
        let blob = &frame[loc.raw_offset as usize..(loc.raw_offset + loc.len) as usize];
        if self.crypto.block_id(blob) != *id {
            return Err(Error::DamagedBlock {
                id: *id,
                pack: loc.pack_name(),
                detail: "content does not match its hash".into(),
            });
        }
        Ok(blob.to_vec())
    }

    /// Reads a disk's map, page by page (each page checked against its ID).
    pub fn read_map_page(&self, disk: &DiskImage, page: usize) -> Result<Vec<BlockId>> {
        let id = disk
            .map
            .get(page)
            .and_then(|h| BlockId::from_hex(h))
            .ok_or_else(|| Error::Corrupt(format!("disk {} has no valid map page {page}", disk.name)))?;
        let raw = self.read_blob(&id, &format!("map page {page} of disk {}", disk.name))?;
        map::decode_page(&raw).ok_or_else(|| Error::Corrupt(format!("map page {} is malformed", id.short())))
    }

    /// Saves a restore point document; from this moment the point is visible.
    pub fn save_point(&self, point: &RestorePoint) -> Result<String> {
        let sealed = self.crypto.seal(&serde_json::to_vec(point).unwrap(), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.backend.put(Kind::Point, &name, &sealed)?;
        Ok(name)
    }

    pub fn load_point(&self, id: &str) -> Result<RestorePoint> {
        let bytes = self.backend.get(Kind::Point, id)?;
        if blake3::hash(&bytes).to_hex().as_str() != id {
            return Err(Error::Corrupt(format!("restore point {} does not match its name (bytes changed)", &id[..8])));
        }
        let raw = self.crypto.open(&bytes, &format!("restore point {}", &id[..8]))?;
        serde_json::from_slice(&raw).map_err(|e| Error::Corrupt(format!("restore point {}: {e}", &id[..8])))
    }

    /// Stores a catalog record (boot verification results and the like), sealed like a point.
    pub fn save_record(&self, record: &serde_json::Value) -> Result<String> {
        let sealed = self.crypto.seal(&serde_json::to_vec(record).unwrap(), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.backend.put(Kind::Catalog, &name, &sealed)?;
        Ok(name)
    }

    /// The block copies verify found damaged (pack, block): the index leaves them out, so the
    /// next backup that reads those blocks stores them again (self-healing).
    pub fn quarantine(&self) -> Result<std::collections::HashSet<(crate::index::PackId, BlockId)>> {
        let mut out = std::collections::HashSet::new();
        for (_, r) in self.load_records()?.into_iter().filter(|(_, r)| r["kind"] == "quarantine") {
            for e in r["copies"].as_array().into_iter().flatten() {
                let pack = e[0].as_str().and_then(crate::index::pack_id_from_name);
                let block = e[1].as_str().and_then(BlockId::from_hex);
                if let (Some(p), Some(b)) = (pack, block) {
                    out.insert((p, b));
                }
            }
        }
        Ok(out)
    }

    /// Adds damaged copies to the quarantine (one record holds it all; older ones go).
    pub fn add_to_quarantine(&self, copies: &[(String, String)]) -> Result<()> {
        let old: Vec<(String, serde_json::Value)> =
            self.load_records()?.into_iter().filter(|(_, r)| r["kind"] == "quarantine").collect();
        let mut all: std::collections::BTreeSet<(String, String)> = copies.iter().cloned().collect();
        for (_, r) in &old {
            for e in r["copies"].as_array().into_iter().flatten() {
                if let (Some(p), Some(b)) = (e[0].as_str(), e[1].as_str()) {
                    all.insert((p.to_string(), b.to_string()));
                }
            }
        }
        let list: Vec<[String; 2]> = all.into_iter().map(|(p, b)| [p, b]).collect();
        let name =
            self.save_record(&serde_json::json!({"kind": "quarantine", "time": crate::now_rfc3339(), "copies": list}))?;
        for (n, _) in old {
            if n != name {
                self.delete_record(&n)?;
            }
        }
        Ok(())
    }

    /// Removes a catalog record (superseded state).
    pub fn delete_record(&self, name: &str) -> Result<()> {
        Ok(self.backend.delete(Kind::Catalog, name)?)
    }

    /// Every catalog record that can be read, with its name; damaged ones are skipped.
    pub fn load_records(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        for l in self.backend.list(Kind::Catalog)? {
            let Ok(bytes) = self.backend.get(Kind::Catalog, &l.name) else { continue };
            if blake3::hash(&bytes).to_hex().as_str() != l.name {
                continue;
            }
            if let Ok(raw) = self.crypto.open(&bytes, "catalog record") {
                if let Ok(v) = serde_json::from_slice(&raw) {
                    out.push((l.name, v));
                }
            }
        }
        Ok(out)
    }

    pub fn list_points(&self) -> Result<PointList> {
        let mut points = Vec::new();
        let mut damaged = Vec::new();
        for l in self.backend.list(Kind::Point)? {
            match self.load_point(&l.name) {
                Ok(p) => points.push((l.name, p)),
                Err(Error::Storage(e)) if e.is_not_found() => {}
                Err(e) => damaged.push((l.name, e.to_string())),
            }
        }
        points.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(PointList { points, damaged })
    }

    /// Finds a point from `NAME`, `NAME@latest`, `NAME@<id prefix>` or `NAME@<time prefix>`.
    pub fn select_point(&self, spec: &str) -> Result<(String, RestorePoint)> {
        let (name, sel) = spec.split_once('@').unwrap_or((spec, "latest"));
        let all = self.list_points()?.points;
        let mine: Vec<_> = all.into_iter().filter(|(_, p)| p.name == name).collect();
        if mine.is_empty() {
            return Err(Error::NotFound(format!("no restore point named {name:?} (see `cairn points`)")));
        }
        if sel == "latest" || sel.is_empty() {
            return Ok(mine.into_iter().last().unwrap());
        }
        let matches: Vec<_> =
            mine.into_iter().filter(|(id, p)| id.starts_with(sel) || p.time.starts_with(sel)).collect();
        match matches.len() {
            0 => Err(Error::NotFound(format!("{name} has no restore point matching {sel:?}"))),
            1 => Ok(matches.into_iter().next().unwrap()),
            n => Err(Error::NotFound(format!("{sel:?} matches {n} restore points of {name}; give more of the ID"))),
        }
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
