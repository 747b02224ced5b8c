//! Sealing: compression, encryption and block identifiers.
//!
//! Every stored byte string (a pack frame, a pack trailer, an index file, a restore point)
//! goes through [`Crypto::seal`]: an envelope `flag u8 | raw_len u32 | payload` (flag 0 = stored
//! as is, 1 = zstd) that is then encrypted with AES-256-GCM when the repository is encrypted
//! (`nonce 12 | ciphertext | tag 16`). Opening checks the tag before anything is decompressed.

use crate::{BlockId, Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

const FLAG_STORED: u8 = 0;
const FLAG_ZSTD: u8 = 1;
const ENVELOPE_HEADER: usize = 5;
const TAG_LEN: usize = 16;
/// No single stored object may claim to expand beyond this (guards against a corrupt length).
const MAX_RAW_LEN: usize = 1 << 30;

/// The secrets of an encrypted repository, unwrapped from a key file with the password.
pub struct MasterKeys {
    data: [u8; 32],
    id: [u8; 32],
}

impl MasterKeys {
    fn generate() -> MasterKeys {
        let mut k = MasterKeys { data: [0; 32], id: [0; 32] };
        fill_random(&mut k.data);
        fill_random(&mut k.id);
        k
    }
}

pub fn fill_random(buf: &mut [u8]) {
    SystemRandom::new().fill(buf).expect("system random source failed");
}

/// How a repository seals data and names blocks.
pub enum Crypto {
    Plain,
    Aes { key: LessSafeKey, id_key: [u8; 32] },
}

impl Crypto {
    pub fn from_keys(keys: &MasterKeys) -> Crypto {
        Crypto::Aes { key: aes_key(&keys.data), id_key: keys.id }
    }

    /// An encrypting `Crypto` over given raw keys (fuzz targets and tests: a fixed key).
    pub fn with_raw_keys(data_key: [u8; 32], id_key: [u8; 32]) -> Crypto {
        Crypto::Aes { key: aes_key(&data_key), id_key }
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self, Crypto::Aes { .. })
    }

    /// The ID of a block or map page with this content.
    /// The key that names blocks, if any (plain repositories name them by their hash).
    pub(crate) fn id_key(&self) -> Option<[u8; 32]> {
        match self {
            Crypto::Plain => None,
            Crypto::Aes { id_key, .. } => Some(*id_key),
        }
    }

    pub fn block_id(&self, data: &[u8]) -> BlockId {
        match self {
            Crypto::Plain => BlockId(*blake3::hash(data).as_bytes()),
            Crypto::Aes { id_key, .. } => BlockId(*blake3::keyed_hash(id_key, data).as_bytes()),
        }
    }

    /// Compresses (zstd, kept only if it saves space) and seals `raw` into `out`, which is
    /// cleared first; reusing `out` and `c` across calls keeps the hot path free of allocation.
    pub fn seal_into(&self, raw: &[u8], c: &mut Compressor, out: &mut Vec<u8>) {
        out.clear();
        let pre = if self.is_encrypted() { NONCE_LEN } else { 0 };
        out.resize(pre, 0);
        out.push(FLAG_ZSTD);
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        if c.compress_append(raw, out).is_none() {
            // Incompressible (random data, compressed files): stored as is.
            out[pre] = FLAG_STORED;
            out.extend_from_slice(raw);
        }
        self.encrypt_envelope(out);
    }

    /// Encrypts in place `out`, an envelope behind room for the nonce (none when plain).
    fn encrypt_envelope(&self, out: &mut Vec<u8>) {
        if let Crypto::Aes { key, .. } = self {
            let mut nonce = [0u8; NONCE_LEN];
            fill_random(&mut nonce);
            out[..NONCE_LEN].copy_from_slice(&nonce);
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut out[NONCE_LEN..])
                .expect("AES-GCM sealing cannot fail for in-range lengths");
            out.extend_from_slice(tag.as_ref());
        }
    }

    /// Authenticates and decrypts a sealed object, then hands its envelope to `f`.
    fn with_envelope<R>(&self, sealed: &[u8], what: &str, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        match self {
            Crypto::Plain => f(sealed),
            Crypto::Aes { key, .. } => {
                if sealed.len() < NONCE_LEN + TAG_LEN {
                    return Err(Error::Corrupt(format!("{what}: too short to be encrypted data")));
                }
                let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).unwrap();
                OPEN_SCRATCH.with_borrow_mut(|buf| {
                    buf.clear();
                    buf.extend_from_slice(&sealed[NONCE_LEN..]);
                    let env = key.open_in_place(nonce, Aad::empty(), buf).map_err(|_| {
                        Error::Corrupt(format!("{what}: authentication failed (damaged or foreign data)"))
                    })?;
                    f(env)
                })
            }
        }
    }

    /// Seals for `to` what `self` sealed, without decompressing: the envelope (compressed
    /// payload and its header) is authenticated and decrypted with this key and encrypted with
    /// `to`'s under a new nonce. For copies between repositories; the caller has checked the
    /// content (a copy opens the frame and checks every block against its ID first).
    pub fn reseal_into(&self, sealed: &[u8], to: &Crypto, what: &str, out: &mut Vec<u8>) -> Result<()> {
        self.with_envelope(sealed, what, |env| {
            out.clear();
            out.resize(if to.is_encrypted() { NONCE_LEN } else { 0 }, 0);
            out.extend_from_slice(env);
            to.encrypt_envelope(out);
            Ok(())
        })
    }

    /// Compresses and seals (allocating; for small objects).
    pub fn seal(&self, raw: &[u8], level: i32) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(raw, &mut Compressor::new(level), &mut out);
        out
    }

    /// Opens a sealed object: authenticates, decrypts and decompresses it. `what` names the
    /// object in errors.
    pub fn open(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_into(sealed, what, &mut out)?;
        Ok(out)
    }

    /// Like [`Crypto::open`], into a reused buffer (cleared first).
    pub fn open_into(&self, sealed: &[u8], what: &str, out: &mut Vec<u8>) -> Result<()> {
        self.with_envelope(sealed, what, |env| open_envelope(env, what, out))
    }
}

thread_local! {
    /// Per-thread decryption buffer and zstd decompression context, reused across frames.
    static OPEN_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

fn aes_key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte key"))
}

/// A reusable zstd compression context: one per thread, because a fresh context per block
/// costs more than the compression itself at 64 KiB sizes (measured in the block-store spike).
pub struct Compressor {
    cctx: zstd::zstd_safe::CCtx<'static>,
}

/// zstd parameters of a cairn compression level. Level 2, the default, uses a hash table of
/// 2^15 entries where zstd's own level 2 uses 2^16: on VM disk images that is ~8% faster for
/// ~1% larger output (docs/BENCHMARKS.md), the trade that keeps full backups 4x ahead of restic
/// on two cores while staying within 5% of its repository size.
pub const DEFAULT_LEVEL: i32 = 2;

impl Compressor {
    pub fn new(level: i32) -> Compressor {
        use zstd::zstd_safe::CParameter;
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(CParameter::CompressionLevel(level)).expect("zstd level");
        if level == DEFAULT_LEVEL {
            cctx.set_parameter(CParameter::HashLog(15)).expect("zstd hashLog");
        }
        Compressor { cctx }
    }

    /// Appends the zstd frame of `raw` to `out`; returns its size, or None if it would not be
    /// smaller than `raw` (then `out` is left as it was).
    fn compress_append(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective};
        let start = out.len();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        self.cctx.reset(ResetDirective::SessionOnly).ok()?;
        // The pledged size makes zstd choose the same parameters as a one-shot compression.
        self.cctx.set_pledged_src_size(Some(raw.len() as u64)).ok()?;
        let mut input = InBuffer::around(raw);
        let done = {
            let mut output = OutBuffer::around_pos(out, start);
            self.cctx.compress_stream2(
                &mut output,
                &mut input,
                zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
            )
        };
        let n = out.len() - start;
        if done != Ok(0) || n >= raw.len() {
            out.truncate(start);
            return None;
        }
        Some(n)
    }
}

fn open_envelope(env: &[u8], what: &str, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    if env.len() < ENVELOPE_HEADER {
        return Err(Error::Corrupt(format!("{what}: truncated envelope")));
    }
    let raw_len = u32::from_le_bytes(env[1..5].try_into().unwrap()) as usize;
    let payload = &env[ENVELOPE_HEADER..];
    match env[0] {
        FLAG_STORED if payload.len() == raw_len => {
            out.extend_from_slice(payload);
            Ok(())
        }
        FLAG_ZSTD if raw_len <= MAX_RAW_LEN => {
            out.reserve(raw_len);
            DECOMPRESSOR
                .with_borrow_mut(|d| {
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new()?);
                    }
                    d.as_mut().unwrap().decompress_to_buffer(payload, out)
                })
                .map_err(|e| Error::Corrupt(format!("{what}: zstd data is damaged ({e})")))?;
            if out.len() != raw_len {
                return Err(Error::Corrupt(format!("{what}: expands to {} bytes, expected {raw_len}", out.len())));
            }
            Ok(())
        }
        _ => Err(Error::Corrupt(format!("{what}: unknown or inconsistent envelope"))),
    }
}

/// A password-wrapped copy of the master keys, stored under `keys/`.
#[derive(Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    pub kdf: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
    /// `nonce | AES-256-GCM(kek, data_key | id_key | config tag) | tag`, hex. The config tag
    /// (32 bytes, since 2026-11-29; see [`config_tag`]) sits inside the seal, so it cannot be
    /// stripped or changed without the password: older key files wrap 64 bytes.
    pub wrapped: String,
    pub created: String,
    pub hostname: String,
}

/// What a key file holds once its password opened it.
pub struct Unwrapped {
    pub keys: MasterKeys,
    /// The tag of the config this key was made for (`None`: a key file from before tags).
    config_tag: Option<[u8; 32]>,
}

impl Unwrapped {
    /// Whether `config` is the exact config this key was made for; `None` for an older key
    /// file, which carries no tag (its config can only be sanity-checked).
    pub fn authenticates(&self, config: &[u8]) -> Option<bool> {
        self.config_tag.map(|t| t == config_tag(&self.keys, config))
    }
}

/// Limits on the Argon2 costs a key file may ask for: a tampered key file must not make
/// opening take gigabytes of memory or minutes (cairn writes 64 MiB, 3 passes, 1 lane).
const KDF_MAX_MEMORY_KIB: u32 = 1024 * 1024;
const KDF_MAX_ITERATIONS: u32 = 32;
const KDF_MAX_PARALLELISM: u32 = 16;

/// Argon2id costs: 64 MiB and 3 passes (~170 ms here); the costs are stored per key file so
/// they can be raised later without breaking old repositories.
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_ITERATIONS: u32 = 3;
const KDF_PARALLELISM: u32 = 1;

impl KeyFile {
    /// What unwrapping this key costs (memory × passes), to try the cheapest first.
    pub fn cost(&self) -> u64 {
        self.memory_kib as u64 * self.iterations.max(1) as u64
    }

    /// Refuses an unknown KDF or costs beyond any cairn writes, before any work is done.
    pub fn check_costs(&self) -> Result<()> {
        if self.kdf != "argon2id" {
            return Err(Error::Format(format!("key file uses unknown KDF {:?}", self.kdf)));
        }
        if self.memory_kib > KDF_MAX_MEMORY_KIB
            || self.iterations > KDF_MAX_ITERATIONS
            || self.parallelism > KDF_MAX_PARALLELISM
        {
            return Err(Error::Format(format!(
                "key file asks for Argon2 costs beyond any cairn writes ({} KiB, {} passes, {} lanes)",
                self.memory_kib, self.iterations, self.parallelism
            )));
        }
        Ok(())
    }
}

fn derive_kek(password: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32]> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| Error::Format(format!("key file: bad Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(password.as_bytes(), salt, &mut out)
        .map_err(|e| Error::Format(format!("key derivation failed: {e}")))?;
    Ok(out)
}

/// Creates new master keys and a key file that wraps them with `password`, together with the
/// tag of `config`, the exact bytes of the repository config they belong to.
pub fn new_keys(password: &str, hostname: &str, config: &[u8]) -> Result<(MasterKeys, KeyFile)> {
    new_keys_sharing_ids(password, hostname, config, None)
}

/// Like [`new_keys`], with the block-ID key of another repository (`init --copy-from`): the
/// two name blocks alike, so copies between them deduplicate; the data key is new.
pub fn new_keys_sharing_ids(
    password: &str,
    hostname: &str,
    config: &[u8],
    id_key: Option<[u8; 32]>,
) -> Result<(MasterKeys, KeyFile)> {
    let mut keys = MasterKeys::generate();
    if let Some(id) = id_key {
        keys.id = id;
    }
    let mut salt = [0u8; 16];
    fill_random(&mut salt);
    let kek = derive_kek(password, &salt, KDF_MEMORY_KIB, KDF_ITERATIONS, KDF_PARALLELISM)?;
    let mut secret = Vec::with_capacity(96);
    secret.extend_from_slice(&keys.data);
    secret.extend_from_slice(&keys.id);
    secret.extend_from_slice(&config_tag(&keys, config));
    let wrapped = Crypto::Aes { key: aes_key(&kek), id_key: [0; 32] }.seal(&secret, 1);
    let file = KeyFile {
        version: 1,
        kdf: "argon2id".into(),
        memory_kib: KDF_MEMORY_KIB,
        iterations: KDF_ITERATIONS,
        parallelism: KDF_PARALLELISM,
        salt: hex::encode(salt),
        wrapped: hex::encode(wrapped),
        created: crate::now_rfc3339(),
        hostname: hostname.to_string(),
    };
    Ok((keys, file))
}

/// The tag that authenticates a repository config under these master keys: keyed BLAKE3 of
/// its exact bytes, under a key derived from the data key.
fn config_tag(keys: &MasterKeys, config: &[u8]) -> [u8; 32] {
    let mac_key = blake3::derive_key("cairn 2026-11-29 repository config authentication", &keys.data);
    *blake3::keyed_hash(&mac_key, config).as_bytes()
}

/// Unwraps a key file; `Ok(None)` when the password does not open it. A key file asking for
/// an unknown KDF or absurd costs is an error (the caller tries other keys).
pub fn unwrap_keys(file: &KeyFile, password: &str) -> Result<Option<Unwrapped>> {
    file.check_costs()?;
    let salt = hex::decode(&file.salt).map_err(|_| Error::Format("key file: bad salt".into()))?;
    let wrapped = hex::decode(&file.wrapped).map_err(|_| Error::Format("key file: bad wrapped key".into()))?;
    let kek = derive_kek(password, &salt, file.memory_kib, file.iterations, file.parallelism)?;
    let c = Crypto::Aes { key: aes_key(&kek), id_key: [0; 32] };
    let Ok(secret) = c.open(&wrapped, "key") else { return Ok(None) };
    if secret.len() != 64 && secret.len() != 96 {
        return Ok(None);
    }
    let mut keys = MasterKeys { data: [0; 32], id: [0; 32] };
    keys.data.copy_from_slice(&secret[..32]);
    keys.id.copy_from_slice(&secret[32..64]);
    let config_tag = (secret.len() == 96).then(|| secret[64..].try_into().unwrap());
    Ok(Some(Unwrapped { keys, config_tag }))
}

/// Opens a frame into `out`, checking it has the raw length the index records.
pub(crate) fn open_frame_into(
    crypto: &Crypto,
    stored: &[u8],
    raw_len: u32,
    what: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    if raw_len as usize > crate::config::MAX_FRAME_RAW {
        return Err(Error::Corrupt(format!("{what}: the index claims {raw_len} bytes, more than any frame holds")));
    }
    crypto.open_into(stored, what, out)?;
    if out.len() != raw_len as usize {
        return Err(Error::Corrupt(format!("{what}: holds {} bytes, the index says {raw_len}", out.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trip_and_incompressible() {
        let c = Crypto::Plain;
        let text = b"hello hello hello hello hello hello".repeat(100);
        let s = c.seal(&text, 3);
        assert!(s.len() < text.len());
        assert_eq!(c.open(&s, "t").unwrap(), text);
        let mut random = vec![0u8; 4096];
        fill_random(&mut random);
        let s = c.seal(&random, 3);
        assert_eq!(s[0], FLAG_STORED);
        assert_eq!(c.open(&s, "t").unwrap(), random);
    }

    #[test]
    fn encrypted_round_trip_detects_tamper_and_keys_ids() {
        let (keys, file) = new_keys("pw", "h", b"config").unwrap();
        let c = Crypto::from_keys(&keys);
        let s = c.seal(b"secret data secret data", 3);
        assert_eq!(c.open(&s, "t").unwrap(), b"secret data secret data");
        let mut bad = s.clone();
        let n = bad.len();
        bad[n / 2] ^= 1;
        assert!(matches!(c.open(&bad, "t"), Err(Error::Corrupt(_))));
        assert_ne!(c.block_id(b"x"), Crypto::Plain.block_id(b"x"));
        // A frame resealed for another key opens there to the same bytes, and not here.
        let raw: Vec<u8> = (0..50_000u32).map(|i| (i % 97) as u8).collect();
        let other = Crypto::with_raw_keys([7; 32], [8; 32]);
        let sealed = c.seal(&raw, 3);
        let mut moved = Vec::new();
        c.reseal_into(&sealed, &other, "test", &mut moved).unwrap();
        assert_eq!(other.open(&moved, "test").unwrap(), raw);
        assert!(c.open(&moved, "test").is_err());
        c.reseal_into(&sealed, &Crypto::Plain, "test", &mut moved).unwrap();
        assert_eq!(Crypto::Plain.open(&moved, "test").unwrap(), raw);
        assert!(other.reseal_into(&sealed, &c, "test", &mut moved).is_err(), "a foreign key cannot open it");
        assert!(unwrap_keys(&file, "wrong").unwrap().is_none());
        let opened = unwrap_keys(&file, "pw").unwrap().unwrap();
        assert_eq!(opened.authenticates(b"config"), Some(true));
        assert_eq!(opened.authenticates(b"other config"), Some(false));
        let again = Crypto::from_keys(&opened.keys);
        assert_eq!(again.block_id(b"x"), c.block_id(b"x"));
        assert_eq!(again.open(&s, "t").unwrap(), b"secret data secret data");
    }
}
