//! What operators expect of a Linux tool: passwords from a file or a secret manager, shell
//! completions and manual pages.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn the_password_comes_from_a_file_or_a_command_and_a_failing_command_is_said() {
    let e = Env::new();
    let pw = e.path("pw");
    std::fs::write(&pw, "correct horse\nsecond line ignored\n").unwrap();
    let file = pw.to_str().unwrap();
    e.ok(&["init", "--encrypt", "--password-file", file]);
    let img = e.path("disk.img");
    make_image(&img, 4 * MIB, 7);
    e.ok(&["backup", "image", img.to_str().unwrap(), "--name", "d", "--password-file", file]);
    // The same password from a command (a secret manager), and from the environment's file.
    let cmd = format!("head -n1 {file}");
    let listed = e.json(&["points", "--password-command", &cmd]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let o = e.cmd(&["points"]).env("CAIRN_PASSWORD_FILE", file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A wrong password, and a failing command: refused, and the command's failure is said.
    std::fs::write(e.path("wrong"), "battery staple\n").unwrap();
    let err = e.fails(&["points", "--password-file", e.path("wrong").to_str().unwrap()], 1);
    assert!(err.to_lowercase().contains("password"), "{err}");
    let err = e.fails(&["points", "--password-command", "echo vault sealed >&2; exit 4"], 1);
    assert!(err.contains("vault sealed") && err.contains("--password-command"), "{err}");
    // Both at once is a usage error.
    e.fails(&["points", "--password-file", file, "--password-command", "true"], 2);
}

#[test]
fn completions_and_manual_pages_come_from_the_same_text_as_help() {
    let e = Env::new();
    let bash = e.ok(&["completions", "bash"]);
    assert!(bash.contains("_cairn") && bash.contains("backup") && bash.contains("--password-file"), "{bash}");
    let zsh = e.ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef cairn"), "{zsh}");
    let dir = e.path("man");
    e.ok(&["man", dir.to_str().unwrap()]);
    let page = std::fs::read_to_string(dir.join("cairn-backup-vm.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("freeze"), "{page}");
    assert!(dir.join("cairn.1").is_file() && dir.join("cairn-server-token-create.1").is_file());
    assert!(!dir.join("cairn-watchdog.1").exists(), "a hidden command got a manual page");
    assert!(!dir.join("cairn-backup-help.1").exists(), "clap's help subcommand got a manual page");
    // The page reads as a manual page.
    let o = Command::new("man").args(["-l", "-P", "cat"]).arg(dir.join("cairn-restore-vm.1")).output();
    if let Some(o) = o.ok().filter(|o| o.status.success()) {
        assert!(String::from_utf8_lossy(&o.stdout).contains("--storage"));
    }
}

/// The Debian package `scripts/deb.sh` builds (from this binary): its control data, its files,
/// and a cairn that runs once unpacked.
#[test]
fn the_debian_package_holds_cairn_its_unit_manual_pages_and_completions() {
    let e = Env::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/deb.sh");
    let out = e.path("dist");
    let o = Command::new(&script).args(["--binary", env!("CARGO_BIN_EXE_cairn"), "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deb = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert!(deb.ends_with(&format!("cairn_{version}_amd64.deb")), "{deb}");
    let field = |name: &str| {
        let o = Command::new("dpkg-deb").args(["--field", &deb, name]).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    assert_eq!((field("Package"), field("Version")), ("cairn".to_string(), version.to_string()));
    assert!(field("Depends").contains("libvirt0") && field("Depends").contains("qemu-utils"), "{}", field("Depends"));
    let list = Command::new("dpkg-deb").args(["--contents", &deb]).output().unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    for path in [
        "./usr/bin/cairn",
        "./lib/systemd/system/cairn-server.service",
        "./usr/share/man/man1/cairn-backup-vm.1.gz",
        "./usr/share/bash-completion/completions/cairn",
        "./usr/share/zsh/vendor-completions/_cairn",
        "./usr/share/doc/cairn/copyright",
        "./usr/lib/cairn/cairn-agent",
        "./usr/lib/cairn/cairn-agent.service",
    ] {
        assert!(list.lines().any(|l| l.ends_with(path)), "{path} not in the package:\n{list}");
    }
    assert!(list.lines().all(|l| l.contains("root/root")), "files not owned by root:\n{list}");
    let root = e.path("unpacked");
    let o = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/cairn-server.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/cairn server"), "{unit}");
    let o = Command::new(root.join("usr/bin/cairn")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("cairn {version}"));
    // The guest agent runs anywhere: statically linked, and it answers.
    let agent = root.join("usr/lib/cairn/cairn-agent");
    let o = Command::new(&agent).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("cairn-agent {version}"));
    let o = Command::new("ldd").arg(&agent).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("not a dynamic executable") || said.contains("statically linked"), "{said}");
}
