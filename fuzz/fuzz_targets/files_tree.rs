//! File-level recovery (cairn_disk::files::Browser: open, list, get) of a fuzzed volume
//! (ext2/3/4, NTFS or FAT: the seeds are real ones) into a scratch folder. Every path the copy
//! creates is under its target, no mode has more than the permission bits, no partial file is
//! left, and it ends (loops and depth are bounded; each input has libFuzzer's timeout). Panics
//! of the filesystem crates are cairn's to catch (see `tolerate_parser_crate_panics`); any
//! other panic is a crash.
#![no_main]
use cairn_disk::files::{Browser, DiskRead};
use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

mod guest_disk;
use guest_disk::{Disk, SparseDisk};

/// The scratch folder of this process, in memory (copies fsync every file).
fn scratch() -> PathBuf {
    static INIT: Once = Once::new();
    let dir = PathBuf::from(format!("/dev/shm/cairn-fuzz-files-{}", std::process::id()));
    INIT.call_once(|| {
        // A crafted file may claim terabytes of holes: writes past 16 MiB fail (EFBIG).
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 16 << 20, rlim_max: 16 << 20 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
        }
    });
    dir
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            walk(&e.path(), out);
        }
        out.push((e.path(), md));
    }
}

fuzz_target!(|data: &[u8]| {
    guest_disk::tolerate_parser_crate_panics();
    let disk: Arc<dyn DiskRead> = Arc::new(Disk(Arc::new(SparseDisk::parse(data, 64 << 20))));
    let Ok(browser) = Browser::open_disks(&[disk], None) else { return };
    if let Ok(entries) = browser.list("/") {
        for e in entries.iter().take(8) {
            let _ = browser.list(&format!("/{}", e.name));
        }
    }
    let dir = scratch();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let result = browser.get("/", &dir);
    let mut made = Vec::new();
    walk(&dir, &mut made);
    let target = dir.join("root");
    for (path, md) in &made {
        assert!(
            path == &target || path.starts_with(&target),
            "{} created outside {}",
            path.display(),
            target.display()
        );
        if !md.file_type().is_symlink() {
            assert_eq!(
                md.permissions().mode() & 0o7000,
                0,
                "{} has mode {:o}",
                path.display(),
                md.permissions().mode()
            );
        }
        assert!(
            !path.to_string_lossy().ends_with(".cairn-partial") || result.is_ok(),
            "{} left behind",
            path.display()
        );
    }
    if let Ok(report) = result {
        assert_eq!(report.skipped as usize, report.warnings.len());
        assert!(made.iter().all(|(p, _)| !p.to_string_lossy().ends_with(".cairn-partial")), "partial files left");
    }
    std::fs::remove_dir_all(&dir).unwrap();
});
