//! Disks only the guest sees (issue 16), against a real guest: the test guest with cairn-agent
//! in its initramfs and a LUN it attaches itself (busybox /init runs Debian's nbd-client,
//! through QEMU's user network with `restrict=on` and one guestfwd, to a qemu-nbd this test runs
//! on 127.0.0.1), wrapped by the agent in a device-mapper device and mounted on /lun. The host
//! cannot see that disk; a backup captures it with the VM's own disk at one frozen instant.

mod common;

use common::guest::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A qemu-nbd serving a fresh LUN image (export `lun`) on a free port of 127.0.0.1, stopped
/// when dropped.
struct Lun {
    port: u16,
    pid: u32,
}

impl Lun {
    fn start(dir: &Path) -> Lun {
        let image = dir.join("lun.qcow2");
        sh(Command::new(guest_sh()).arg("lun").arg(&image));
        for _ in 0..20 {
            // A port free now (the listener is dropped before qemu-nbd binds it: retried if taken).
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let pid_file = dir.join("lun.pid");
            let ok = Command::new("qemu-nbd")
                .args([
                    "-f",
                    "qcow2",
                    "-x",
                    "lun",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "--persistent",
                    "--fork",
                ])
                .arg("--pid-file")
                .arg(&pid_file)
                .arg(&image)
                .status()
                .unwrap()
                .success();
            if ok {
                let pid = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
                return Lun { port, pid };
            }
        }
        panic!("no port for qemu-nbd");
    }
}

impl Drop for Lun {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

fn sha(out: &str) -> String {
    out.split_whitespace().next().unwrap_or("").to_string()
}

fn image_stats<'a>(r: &'a Value, name: &str) -> &'a Value {
    let disks = r["disks"].as_array().unwrap();
    &disks.iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("no image {name} in {r}"))["stats"]
}

/// What the agent's views hold in the guest: device-mapper devices besides the LUN's wrapper,
/// and zram devices besides the one the module makes at load (the guest has no udev: /sys is
/// the truth, not /dev/mapper).
fn views_left(g: &Guest) -> String {
    g.exec("cat /sys/block/dm-*/dm/name | grep -v -x cairn-lun0; ls /sys/block | grep zram | grep -v -x zram0; true")
}

#[test]
fn a_lun_the_guest_attached_itself_is_in_the_same_point_and_incrementals_read_what_changed() {
    let e = VmEnv::new();
    let lun = Lun::start(e.env.dir.path());
    let port = lun.port.to_string();
    let g = Guest::start("glun", &["--cairn-agent", "--lun", &port]);
    assert!(g.exec("grep ' /lun ' /proc/mounts").contains("/dev/mapper/cairn-lun0"), "the LUN is not mounted");

    // vm list: the LUN is named, and will be captured.
    let list = e.env.json(&["vm", "list"]);
    let vm = list.as_array().unwrap().iter().find(|v| v["name"] == g.name.as_str()).unwrap().clone();
    assert!(vm["guest"]["cairn_agent"].as_str().unwrap().starts_with("cairn-agent "), "{vm}");
    let d = &vm["guest"]["disks"][0];
    assert_eq!(
        (d["disk"].as_str(), d["transport"].as_str(), d["captured"].as_bool()),
        (Some("lun0"), Some("nbd"), Some(true)),
        "{vm}"
    );

    // A file on each disk before the backup.
    let data_sum =
        sha(&g.exec("dd if=/dev/urandom of=/data/before bs=1M count=2 2>/dev/null; sync; sha256sum /data/before"));
    let lun_sum =
        sha(&g.exec("dd if=/dev/urandom of=/lun/before bs=1M count=2 2>/dev/null; sync; sha256sum /lun/before"));
    let r1 = e.backup(&g, &[]);
    let rec = record(&r1);
    assert_eq!(rec["method"], "app-consistent", "{rec}");
    // One freeze for both: qemu-ga froze /lun too, and the agent's snapshot fell inside it.
    assert!(rec["method_reason"].as_str().unwrap().contains("/lun"), "{rec}");
    assert!(rec["frozen_window_ms"].as_u64().unwrap() < 1000, "frozen window {}", rec["frozen_window_ms"]);
    let gd = &rec["guest_disks"][0];
    assert_eq!(
        (gd["disk"].as_str(), gd["image"].as_str(), gd["read"].as_str()),
        (Some("lun0"), Some("guest-lun0"), Some("full")),
        "{rec}"
    );
    assert!(rec["not_captured"].is_null() || rec["not_captured"].as_array().unwrap().is_empty(), "{rec}");
    assert_eq!(image_stats(&r1, "guest-lun0")["logical_bytes"], 64 << 20);
    assert_eq!(views_left(&g), "", "the agent kept its views after the backup");

    // 1 MiB more on the LUN: the incremental reads about that much of it.
    let after_sum =
        sha(&g.exec("dd if=/dev/urandom of=/lun/after bs=1M count=1 2>/dev/null; sync; sha256sum /lun/after"));
    let r2 = e.backup(&g, &[]);
    let gd = &record(&r2)["guest_disks"][0];
    assert_eq!(gd["read"], "changed", "{gd}");
    let read = image_stats(&r2, "guest-lun0")["read_bytes"].as_u64().unwrap();
    eprintln!("incremental of the LUN: read {read} bytes for 1 MiB written");
    assert!(((1 << 20)..=(3 << 19)).contains(&read), "read {read} bytes of the LUN for 1 MiB written");
    assert!(image_stats(&r2, "guest-lun0")["unchanged_bytes"].as_u64().unwrap() > 60 << 20);

    // Its files come back by hash, from the point (files) and from a recovery (the image file).
    let id2 = r2["id"].as_str().unwrap();
    let point = format!("{}@{}", g.name, &id2[..8]);
    let out = e.env.path("got");
    std::fs::create_dir_all(&out).unwrap();
    for (file, want) in [("/before", &lun_sum), ("/after", &after_sum)] {
        e.env.ok(&["files", "get", &point, "guest-lun0", file, "--to", out.to_str().unwrap()]);
        let got = sha(&sh(Command::new("sha256sum").arg(out.join(&file[1..]))));
        assert_eq!(&got, want, "{file} from the point's LUN");
    }
    e.env.ok(&["files", "get", &point, "vda", "/before", "--to", out.join("data-before").to_str().unwrap()]);
    assert_eq!(sha(&sh(Command::new("sha256sum").arg(out.join("data-before")))), data_sum);

    let storage = e.env.path("restored");
    std::fs::create_dir_all(&storage).unwrap();
    let restored = format!("{}-r", g.name);
    let report = e.env.json(&["restore", "vm", &point, "--storage", storage.to_str().unwrap(), "--as", &restored]);
    let _ = Command::new("virsh").args(["-q", "undefine", &restored]).output();
    let lun_file = storage.join(format!("{restored}-guest-lun0.raw"));
    assert!(report["files"].to_string().contains(lun_file.to_str().unwrap()), "{report}");
    // The guest-side filesystem checks clean (taken frozen), and holds the files by hash.
    sh(Command::new("e2fsck").arg("-fn").arg(&lun_file));
    let debugfs = |f: &str| {
        let to = e.env.path(&format!("dump{}", f.replace('/', "-")));
        sh(Command::new("debugfs").args(["-R", &format!("dump {f} {}", to.display())]).arg(&lun_file));
        sha(&sh(Command::new("sha256sum").arg(&to)))
    };
    assert_eq!(debugfs("/before"), lun_sum);
    assert_eq!(debugfs("/after"), after_sum);
    e.env.ok(&["verify"]);

    // Back onto the LUN itself, through the agent: refused while it is mounted, then, unmounted,
    // written and read back; the guest mounts it again with the point's files.
    g.exec("touch /run/writer.pause; rm /lun/before; echo junk > /lun/junk; sync");
    let args = ["restore", "guest-disk", point.as_str(), "--disk", "lun0", "--yes"];
    let refused = e.env.run(&args);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unmount it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    g.exec("umount /lun");
    // A program reading the LUN underneath (not exclusively, as a database on a raw LUN would).
    g.exec("(exec 3</dev/nbd0; sleep 60) </dev/null >/dev/null 2>&1 & echo $! > /run/holder.pid");
    let refused = e.env.run(&args);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("is open in process"), "{said}");
    g.exec("kill $(cat /run/holder.pid); sleep 0.5");
    let done = e.env.json(&args);
    assert_eq!(done["verified_blocks"], 1024, "{done}");
    g.exec("mount -t ext4 /dev/mapper/cairn-lun0 /lun; rm -f /run/writer.pause");
    assert_eq!(sha(&g.exec("sha256sum /lun/before")), lun_sum);
    assert_eq!(sha(&g.exec("sha256sum /lun/after")), after_sum);
    let junk = g.exec("ls /lun/junk 2>&1 || true");
    assert!(junk.contains("No such file"), "the LUN kept a file written after the point: {junk}");
    drop(lun);
}

#[test]
fn a_guest_attached_disk_without_the_agent_is_named_as_missing_in_the_point() {
    let e = VmEnv::new();
    let lun = Lun::start(e.env.dir.path());
    let g = Guest::start("gnoagent", &["--lun", &lun.port.to_string()]);
    let r = e.backup(&g, &[]);
    let rec = record(&r);
    let missing = rec["not_captured"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{rec}");
    assert_eq!(
        (missing[0]["disk"].as_str(), missing[0]["transport"].as_str()),
        (Some("/dev/nbd0"), Some("nbd")),
        "{rec}"
    );
    assert!(missing[0]["why"].as_str().unwrap().contains("cairn-agent"), "{rec}");
    assert!(rec["warnings"].to_string().contains("/dev/nbd0 is not in this point"), "{rec}");
    assert!(r["disks"].as_array().unwrap().iter().all(|d| d["role"] != "guest-disk"));
    drop(lun);
}

/// Sets the agent's misbehaviour (`serve --misbehave file`) for its next requests.
fn misbehave(g: &Guest, mode: &str) {
    g.exec(&format!("echo {mode} > /run/cairn-agent.misbehave"));
}

fn thawed(g: &Guest) {
    assert!(!frozen(g), "the guest was left frozen");
}

#[test]
fn an_agent_that_lies_stalls_or_dies_cannot_hang_the_backup_keep_the_guest_frozen_or_damage_the_repository() {
    let e = VmEnv::new();
    let lun = Lun::start(e.env.dir.path());
    let g = Guest::start("gliar", &["--cairn-agent", "file", "--lun", &lun.port.to_string()]);
    let work = e.env.path("work");
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", "vm", g.name.as_str(), "--work-dir", work.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let t0 = Instant::now();
        let o = e.env.run(&args);
        (
            o.status.code(),
            serde_json::from_slice::<Value>(&o.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t0.elapsed(),
        )
    };

    // Bytes that are no frame before every answer: the session is refused, the point is taken
    // without the LUN, which it names.
    misbehave(&g, "garbage");
    let (code, out, err, _) = backup(&[]);
    assert_eq!(code, Some(0), "{err}");
    let rec = &out[0]["record"];
    assert!(rec["not_captured"].to_string().contains("bad magic"), "{rec}");
    thawed(&g);

    // A snapshot that does not come: the guest is thawed within the freeze limit, the point is
    // taken without the LUN.
    misbehave(&g, "stall-snapshot");
    let (code, out, err, took) = backup(&[]);
    assert_eq!(code, Some(0), "{err}");
    let rec = &out[0]["record"];
    assert!(rec["frozen_window_ms"].as_u64().unwrap() < 3000, "{rec}");
    let missing = rec["not_captured"].as_array().unwrap();
    assert_eq!(missing[0]["disk"], "lun0", "{rec}");
    assert!(missing[0]["why"].as_str().unwrap().contains("frozen"), "{rec}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    thawed(&g);
    // The agent answers its stalled request 10 s late; then it serves again.
    std::thread::sleep(Duration::from_secs(11));

    // One byte short of a read: the backup fails, and leaves no point.
    misbehave(&g, "short-read");
    let before = e.env.json(&["points"]).as_array().unwrap().len();
    let (code, _, err, _) = backup(&[]);
    assert_ne!(code, Some(0), "a short read was accepted");
    assert!(err.contains("bytes for"), "{err}");
    assert_eq!(e.env.json(&["points"]).as_array().unwrap().len(), before);
    thawed(&g);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(views_left(&g), "", "the agent kept its views after the host gave up");

    // Hashes that say every block is zeros: the point's LUN is wrong about the guest's own disk
    // (all zeros), and nothing else; the next honest backup reads every block again, since the
    // list the host kept says zeros.
    // (An honest point first: hashes are only asked for when there is a list to compare with.)
    misbehave(&g, "none");
    let (code, _, err, _) = backup(&[]);
    assert_eq!(code, Some(0), "{err}");
    misbehave(&g, "zero-hashes");
    let (code, out, err, _) = backup(&[]);
    assert_eq!(code, Some(0), "{err}");
    let lie = image_stats(&out[0], "guest-lun0");
    assert_eq!(lie["read_bytes"], 0, "{lie}");
    assert!(lie["zero_bytes"].as_u64().unwrap() > 2 << 20, "{lie}");
    misbehave(&g, "none");
    let (code, out, err, _) = backup(&[]);
    assert_eq!(code, Some(0), "{err}");
    let stats = image_stats(&out[0], "guest-lun0");
    // Every block with data (the 2 MiB file and the filesystem's own), none kept from the lie.
    assert!(stats["read_bytes"].as_u64().unwrap() > 2 << 20, "{stats}");
    let point = format!("{}@{}", g.name, &out[0]["id"].as_str().unwrap()[..8]);
    let ls = e.env.ok(&["files", "ls", &point, "guest-lun0", "/"]);
    assert!(ls.contains("random-2M.bin"), "{ls}");

    // A restore onto the LUN whose read-back lies fails, and says the disk is half done; the
    // next, honest one goes through.
    g.exec("touch /run/writer.pause; umount /lun");
    misbehave(&g, "zero-hashes");
    let args = ["restore", "guest-disk", point.as_str(), "--disk", "lun0", "--yes"];
    let o = e.env.run(&args);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && said.contains("does not hold what was written"), "{said}");
    assert!(said.contains("partly overwritten"), "{said}");
    misbehave(&g, "none");
    e.env.ok(&args);
    g.exec("mount -t ext4 /dev/mapper/cairn-lun0 /lun; rm -f /run/writer.pause");
    assert!(g.exec("ls /lun").contains("random-2M.bin"));

    // The agent dies in the middle of a read: the backup fails within its read deadline.
    misbehave(&g, "die-on-read");
    let (code, _, err, took) = backup(&[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no answer") || err.contains("closed"), "{err}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    thawed(&g);

    // Nothing in the repository is damaged; the failed runs left no point.
    e.env.ok(&["verify"]);
    assert_eq!(e.env.json(&["points"]).as_array().unwrap().len(), before + 3);
    drop(lun);
}
