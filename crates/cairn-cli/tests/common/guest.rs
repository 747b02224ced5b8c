//! Test guests in libvirt (built and run by `scripts/guest.sh`) and what VM tests share.

use super::*;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn guest_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest.sh")
}

pub fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn virsh(args: &[&str]) -> String {
    sh(Command::new("virsh").arg("-q").args(args))
}

/// A libvirt test guest, removed (domain, checkpoints, disks) when dropped.
pub struct Guest {
    pub name: String,
}

impl Guest {
    pub fn start(test: &str, opts: &[&str]) -> Guest {
        let name = format!("cairn-{test}-{}", std::process::id());
        let g = Guest { name };
        let _ = Command::new(guest_sh()).args(["remove", &g.name]).output();
        let mut args = vec!["define", g.name.as_str(), "--wait"];
        args.extend_from_slice(opts);
        sh(Command::new(guest_sh()).args(&args));
        g
    }

    /// Runs a shell command in the guest through the agent.
    pub fn exec(&self, cmd: &str) -> String {
        sh(Command::new(guest_sh()).args(["exec", &self.name, cmd]))
    }

    pub fn disk(&self, target: &str) -> PathBuf {
        Path::new("/var/lib/cairn-test/vms").join(&self.name).join(format!("{target}.qcow2"))
    }

    pub fn state(&self) -> String {
        virsh(&["domstate", &self.name]).trim().to_string()
    }

    pub fn checkpoints(&self) -> Vec<String> {
        virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    pub fn agent(&self, cmd: &str) -> Value {
        serde_json::from_str(&virsh(&["qemu-agent-command", &self.name, cmd])).unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = Command::new(guest_sh()).args(["remove", &self.name]).output();
    }
}

pub struct VmEnv {
    pub env: Env,
}

impl VmEnv {
    pub fn new() -> VmEnv {
        let env = Env::new();
        env.init();
        VmEnv { env }
    }

    /// With an encrypted repository (its password in CAIRN_PASSWORD for every command).
    pub fn encrypted() -> VmEnv {
        let mut env = Env::new();
        env.password = Some("correct horse battery staple".into());
        env.ok(&["init", "--encrypt"]);
        VmEnv { env }
    }

    /// `cairn backup vm` with --json: the one VM's result object.
    pub fn backup(&self, g: &Guest, extra: &[&str]) -> Value {
        let work = self.env.path("work");
        let mut args = vec!["backup", "vm", g.name.as_str(), "--work-dir", work.to_str().unwrap()];
        args.extend_from_slice(extra);
        let v = self.env.json(&args);
        let r = v[0].clone();
        assert_eq!(r["ok"], true, "{r}");
        r
    }

    pub fn restore(&self, id: &str, name: &str, disk: &str, to: &Path) {
        let point = format!("{name}@{}", &id[..8]);
        self.env.ok(&["restore", "image", &point, "--disk", disk, "--to", to.to_str().unwrap(), "--force"]);
    }
}

pub fn record(r: &Value) -> &Value {
    &r["record"]
}

/// Compares two raw images; bytes inside `zeroed` must be zero in `restored` instead.
pub fn assert_same_except(restored: &Path, oracle: &Path, zeroed: &[(u64, u64)]) {
    let (mut a, mut b) = (std::fs::File::open(restored).unwrap(), std::fs::File::open(oracle).unwrap());
    assert_eq!(a.metadata().unwrap().len(), b.metadata().unwrap().len(), "sizes differ");
    let mut off = 0u64;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        b.read_exact(&mut bb[..n]).unwrap();
        for i in (0..n).step_by(4096) {
            let at = off + i as u64;
            let end = (i + 4096).min(n);
            let in_zeroed = zeroed.iter().any(|&(o, l)| at >= o && at < o + l);
            if in_zeroed {
                assert!(
                    ba[i..end].iter().all(|&x| x == 0),
                    "{}: offset {at} should be zero (skipped swap)",
                    restored.display()
                );
            } else {
                assert!(
                    ba[i..end] == bb[i..end],
                    "{} differs from {} at offset {at}",
                    restored.display(),
                    oracle.display()
                );
            }
        }
        off += n as u64;
    }
}

/// Whether process `pid`'s environment holds `var`.
pub fn env_has(pid: u32, var: &str) -> bool {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0).any(|kv| kv.starts_with(format!("{var}=").as_bytes()))
}

/// PIDs of processes whose command line matches `pattern` (pgrep -f).
pub fn pgrep(pattern: &str) -> Vec<u32> {
    let o = Command::new("pgrep").args(["-f", pattern]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Whether the guest's filesystems are frozen (guest agent).
pub fn frozen(g: &Guest) -> bool {
    g.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"] == "frozen"
}
