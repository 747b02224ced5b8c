//! `cairn mount`: a restore point's disks and partitions as read-only files, through FUSE, so
//! any filesystem the kernel knows can be loop-mounted from them.

use crate::{open_indexed, Global};
use anyhow::{bail, Context, Result};
use cairn_disk::files::{volumes, Volume};
use cairn_engine::serve::PointDisk;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

struct Node {
    /// The volume's name, with `/` (LVM's vg/lv) made `-` as device-mapper does.
    name: String,
    disk: Arc<PointDisk>,
    volume: Volume,
}

struct PointFs {
    nodes: Vec<Node>,
    time: SystemTime,
}

const TTL: Duration = Duration::from_secs(3600);

impl PointFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm) = if ino == 1 {
            (FileType::Directory, 0, 0o555)
        } else {
            let n = self.nodes.get(ino as usize - 2)?;
            (FileType::RegularFile, n.volume.length, 0o444)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink: if ino == 1 { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 65536,
        })
    }
}

impl Filesystem for PointFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found =
            (u64::from(parent) == 1).then(|| self.nodes.iter().position(|n| OsStr::new(&n.name) == name)).flatten();
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(u64::from(ino)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = (u64::from(ino) as usize).checked_sub(2).and_then(|i| self.nodes.get(i)) else {
            return reply.error(Errno::ENOENT);
        };
        if offset >= n.volume.length {
            return reply.data(&[]);
        }
        let len = (size as u64).min(n.volume.length - offset) as usize;
        let mut buf = vec![0u8; len];
        match n.volume.read_at(&n.disk, offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                eprintln!("cairn mount: {}: {e:#}", n.name);
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries =
            vec![(1u64, FileType::Directory, ".".to_string()), (1, FileType::Directory, "..".to_string())];
        for (i, n) in self.nodes.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, n.name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn mounted(path: &Path) -> bool {
    let p = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&p)))
        .unwrap_or(false)
}

pub fn mount(g: &Global, point: &str, mountpoint: &Path) -> Result<i32> {
    let (repo, _lock) = open_indexed(g, "mount")?;
    let (id, p) = repo.select_point(point)?;
    if !mountpoint.is_dir() {
        bail!("{} is not a folder; create it first", mountpoint.display());
    }
    let mountpoint: PathBuf = std::fs::canonicalize(mountpoint)?;
    let mut nodes = Vec::new();
    for img in &p.disks {
        let disk = Arc::new(PointDisk::new(repo.clone(), img.clone()));
        nodes.push(Node { name: img.name.clone(), disk, volume: Volume::disk(img) });
    }
    for v in volumes(&repo, &p)? {
        if v.name != v.disk {
            let disk = nodes.iter().find(|n| n.name == v.disk).map(|n| n.disk.clone()).context("disk vanished")?;
            nodes.push(Node { name: v.name.replace('/', "-"), disk, volume: v });
        }
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let time = humantime::parse_rfc3339(&p.time).unwrap_or(SystemTime::now());
    // Signals are waited for below; block them before the FUSE threads start so they inherit it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut config = fuser::Config::default();
    config.mount_options.extend([MountOption::RO, MountOption::FSName(format!("cairn:{}@{}", p.name, id.short()))]);
    let session = fuser::spawn_mount(PointFs { nodes, time }, &mountpoint, &config)
        .with_context(|| format!("mounting on {} (FUSE needs /dev/fuse and root)", mountpoint.display()))?;
    if g.json {
        crate::print_json(&serde_json::json!({"point": id, "mountpoint": mountpoint, "files": names}));
    } else {
        println!(
            "restore point {} of {} mounted read-only on {}: {}",
            id.short(),
            p.name,
            mountpoint.display(),
            names.join(", ")
        );
        println!(
            "loop-mount a partition with: mount -o loop,ro {}/{} /mnt; Ctrl-C or `umount {}` ends",
            mountpoint.display(),
            names.last().unwrap(),
            mountpoint.display()
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Until Ctrl-C/SIGTERM, or until someone unmounts it.
    let ts = libc::timespec { tv_sec: 0, tv_nsec: 300_000_000 };
    loop {
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig > 0 || !mounted(&mountpoint) {
            break;
        }
    }
    drop(session); // unmounts
    Ok(0)
}
