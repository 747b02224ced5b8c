//! `cairn-agent`: cairn's guest agent, for the disks only the guest sees (network LUNs, iSCSI,
//! pass-through). It holds no credential and decides nothing: the host asks, over a
//! virtio-serial port, which disks there are, to prepare and take device-mapper snapshots of
//! them while the host holds the guest frozen, then for their blocks' hashes and bytes.
//! See docs/design/guest-agent.md.

mod disks;
mod dm;
mod serve;
mod snap;

use std::process::ExitCode;

const HELP: &str = "cairn-agent: the guest side of cairn's backups of disks the host cannot see

Usage:
  cairn-agent serve [--port NAME] [--misbehave MODE]
      Serve the host over the virtio-serial port NAME (default org.cairn.agent.0; the VM needs
      a <channel type='unix'><target type='virtio' name='org.cairn.agent.0'/></channel>).
      Views left by an earlier agent are released first. MODE is for cairn's own tests only.
  cairn-agent wrap DEVICE NAME
      Put a device-mapper device /dev/mapper/cairn-NAME over DEVICE (the whole disk), to be
      mounted instead of DEVICE: only a disk used through such a device can be snapshotted.
  cairn-agent unwrap NAME
      Remove it (once unmounted).
  cairn-agent list
      The disks the agent sees, and whether each can be snapshotted.
  cairn-agent --version
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["--version"] | ["-V"] => {
            println!("cairn-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        ["--help"] | ["-h"] | [] => {
            print!("{HELP}");
            Ok(())
        }
        ["serve", rest @ ..] => serve_command(rest),
        ["wrap", device, name] => wrap(device, name),
        ["unwrap", name] => dm::Control::open().and_then(|c| c.remove(&format!("{}{name}", disks::PREFIX))).map(|()| {
            let _ = std::fs::remove_file(format!("/dev/mapper/{}{name}", disks::PREFIX));
        }),
        ["list"] => {
            for d in disks::list(std::path::Path::new("/sys/block")) {
                let i = d.info;
                let state = if i.snapshot_ready { "ready".to_string() } else { i.reason };
                println!("{}\t{}\t{} bytes\t{}", i.name, i.transport, i.size, state);
            }
            Ok(())
        }
        _ => {
            eprint!("{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve_command(mut rest: &[&str]) -> std::io::Result<()> {
    let mut port = serve::PORT_NAME.to_string();
    let mut misbehave = serve::Misbehave::None;
    while let [flag, value, more @ ..] = rest {
        match *flag {
            "--port" => port = value.to_string(),
            "--misbehave" => {
                misbehave = serve::Misbehave::parse(value).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no misbehaviour {value}"))
                })?
            }
            _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("unknown option {flag}"))),
        }
        rest = more;
    }
    if !rest.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("unexpected {rest:?}")));
    }
    snap::cleanup();
    serve::serve(&port, misbehave)
}

/// `cairn-NAME`: one linear target over the whole of `device`.
fn wrap(device: &str, name: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !cairn_agent_proto::safe_name(name) || name.ends_with(disks::REAL) || name.ends_with(disks::SNAP) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{name:?} cannot name a disk")));
    }
    let meta = std::fs::metadata(device)?;
    if !meta.file_type().is_block_device() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{device} is not a block device")));
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let sectors: u64 = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("the device's size"))?;
    if sectors == 0 {
        return Err(std::io::Error::other(format!("{device} has no size (not connected?)")));
    }
    let dm_name = format!("{}{name}", disks::PREFIX);
    let ctl = dm::Control::open()?;
    let (_, dm_minor) = ctl.create(&dm_name)?;
    let linear = dm::Target { start: 0, length: sectors, kind: "linear".into(), params: format!("{major}:{minor} 0") };
    if let Err(e) = ctl.load(&dm_name, &[linear]).and_then(|()| ctl.resume(&dm_name)) {
        let _ = ctl.remove(&dm_name);
        return Err(e);
    }
    // No udev in a minimal guest: the name devtmpfs gives it is dm-MINOR.
    let _ = std::fs::create_dir_all("/dev/mapper");
    let link = format!("/dev/mapper/{dm_name}");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("../dm-{dm_minor}"), &link)?;
    println!("{link}");
    Ok(())
}
