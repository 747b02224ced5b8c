//! Helpers for the CLI integration tests: run the real `cairn` binary on real files.
#![allow(dead_code)]

pub mod director;
pub mod guest;
pub mod smtp;

use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const MIB: u64 = 1 << 20;
pub const BLOCK: u64 = 65536;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub password: Option<String>,
    /// A repository on an object store: its URL and the environment that reaches it.
    pub remote: Option<(String, Vec<(&'static str, String)>)>,
}

impl Env {
    pub fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap(), password: None, remote: None }
    }

    /// An environment whose repository is `url` on `server` (see cairn_storage::test_servers).
    pub fn on(server: &cairn_storage::test_servers::TestServer, url: String) -> Env {
        Env { remote: Some((url, server.env())), ..Env::new() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(args).env("CAIRN_REPO", self.repo()).env_remove("CAIRN_PASSWORD").stdin(Stdio::null());
        if let Some((url, env)) = &self.remote {
            c.env("CAIRN_REPO", url).envs(env.iter().map(|(k, v)| (k, v)));
            c.env("CAIRN_CACHE_DIR", self.path("cache"));
        }
        if let Some(p) = &self.password {
            c.env("CAIRN_PASSWORD", p);
        }
        c
    }

    /// Runs cairn; returns the output whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs cairn and requires success.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cairn {args:?} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs cairn with --json and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs cairn, requires failure with `code`, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "cairn {args:?}: expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stderr).unwrap()
    }

    pub fn init(&self) {
        self.ok(&["init"]);
    }

    /// Backs up `path` as `name`; returns the point JSON.
    pub fn backup(&self, path: &Path, name: &str, extra: &[&str]) -> Value {
        let p = path.to_str().unwrap();
        let mut a = vec!["backup", "image", p, "--name", name];
        a.extend_from_slice(extra);
        self.json(&a)
    }

    pub fn restore(&self, point: &str, to: &Path, extra: &[&str]) -> Value {
        let mut a = vec!["restore", "image", point, "--to", to.to_str().unwrap()];
        a.extend_from_slice(extra);
        self.json(&a)
    }

    /// All files under the repository folder of one kind ("packs", "index", "points").
    pub fn files(&self, kind: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.repo().join(kind)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

/// A deterministic pseudo-random generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Fills `buf` with data that compresses like text (words from a small vocabulary).
pub fn texty(rng: &mut Rng, buf: &mut [u8]) {
    const WORDS: [&str; 12] = [
        "backup ", "restore ", "block ", "qemu ", "virtual ", "machine ", "disk ", "image\n", "cairn ", "0x1f2e ",
        "hash ", "pack ",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// A sparse raw image of `size` bytes: in every MiB, a mix of random, text-like and zero
/// blocks, with some MiB left as holes.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let f = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let mut off = 0;
    while off < size {
        let n = BLOCK.min(size - off) as usize;
        match rng.below(10) {
            0..=2 => {} // hole
            3 => {
                buf[..n].fill(0);
                f.write_all_at(&buf[..n], off).unwrap(); // written zeros
            }
            4..=6 => {
                rng.fill(&mut buf[..n]);
                f.write_all_at(&buf[..n], off).unwrap();
            }
            _ => {
                texty(&mut rng, &mut buf[..n]);
                f.write_all_at(&buf[..n], off).unwrap();
            }
        }
        off += BLOCK;
    }
    f.sync_all().unwrap();
}

/// Overwrites `count` scattered 64 KiB blocks with fresh random data; returns their offsets.
pub fn scatter_writes(path: &Path, count: usize, seed: u64) -> Vec<u64> {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let mut offs = std::collections::BTreeSet::new();
    while offs.len() < count {
        offs.insert(rng.below(size / BLOCK) * BLOCK);
    }
    for &o in &offs {
        rng.fill(&mut buf);
        f.write_all_at(&buf, o).unwrap();
    }
    f.sync_all().unwrap();
    offs.into_iter().collect()
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return false;
    }
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < la {
        let n = MIB.min(la - off) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        off += n as u64;
    }
    true
}

/// Bytes allocated on disk for a file.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

pub fn run_tool(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (is qemu-utils installed?)"));
    assert!(o.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// A qemu-nbd server for tests, killed on drop.
pub struct QemuNbd {
    pub child: std::process::Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(dir: &Path, image: &Path, args: &[&str]) -> QemuNbd {
        let socket = dir.join(format!(
            "t{}.sock",
            Rng::new(std::process::id() as u64 ^ image.as_os_str().len() as u64).next() % 100000
        ));
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4"])
            .arg(format!("--socket={}", socket.display()))
            .args(args)
            .arg(image)
            .spawn()
            .expect("qemu-nbd");
        let t = std::time::Instant::now();
        while !socket.exists() {
            assert!(t.elapsed().as_secs() < 10, "qemu-nbd did not start");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        QemuNbd { child, socket }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stat(v: &Value, key: &str) -> u64 {
    v["point"]["stats"][key].as_u64().unwrap_or_else(|| panic!("no stat {key} in {v}"))
}
