//! Boot verification (`cairn verify boot`) against real libvirt and QEMU guests, with a real
//! SMTP server (aiosmtpd, Debian's python3-aiosmtpd) receiving the reports.

mod common;

use common::guest::*;
use common::smtp::Smtp;
use common::*;
use std::path::Path;
use std::process::Command;

/// Decodes a PNG; returns (width, height, distinct first-row-and-column colours > 1).
fn png_info(bytes: &[u8]) -> (u32, u32, bool) {
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let data = &buf[..info.buffer_size()];
    let first = &data[..px];
    (info.width, info.height, data.chunks(px).any(|p| p != first))
}

/// Sandboxes of this VM still defined (tests run in parallel: only look at our own).
fn sandboxes(vm: &str) -> Vec<String> {
    let prefix = format!("cairn-verify-{vm}-");
    virsh(&["list", "--all", "--name"]).lines().filter(|l| l.starts_with(&prefix)).map(String::from).collect()
}

#[test]
fn boot_verification_mails_a_screenshot_and_never_touches_the_original() {
    let e = VmEnv::new();
    let smtp = Smtp::start(e.env.dir.path());
    let g = Guest::start("bootok", &[]);
    let r = e.backup(&g, &[]);
    let id = r["id"].as_str().unwrap().to_string();
    let uuid = virsh(&["domuuid", &g.name]).trim().to_string();
    let xml_before = virsh(&["dumpxml", &g.name, "--inactive"]);
    let server = format!("127.0.0.1:{}", smtp.port);
    let t = std::time::Instant::now();
    let v = e.env.json(&[
        "verify",
        "boot",
        &g.name,
        "--mail-to",
        "ops@example.com",
        "--smtp-server",
        &server,
        "--timeout",
        "60",
    ]);
    let took = t.elapsed().as_secs_f64();
    eprintln!("boot verification took {took:.1} s");
    // About 5 s on a quiet machine (docs/BENCHMARKS.md); the bound catches a hang or a wait
    // that never ends, with room for a loaded 2-core CI machine booting two guests under TCG.
    assert!(took < 45.0, "boot verification took {took:.1} s");
    assert_eq!(v["verdict"], "passed", "{v}");
    assert_eq!(v["method"], "guest agent");
    assert_eq!(v["mailed_to"], "ops@example.com");
    assert!(sandboxes(&g.name).is_empty(), "sandbox left: {:?}", sandboxes(&g.name));
    // The original: same state, identity and configuration.
    assert_eq!(g.state(), "running");
    assert_eq!(virsh(&["domuuid", &g.name]).trim(), uuid);
    assert_eq!(virsh(&["dumpxml", &g.name, "--inactive"]), xml_before);

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    let (subject, text, png) = &mails[0];
    assert!(subject.contains("PASSED") && subject.contains(&g.name) && subject.contains(&id[..8]), "{subject}");
    assert!(text.contains("guest agent answered"), "{text}");
    let (w, h, not_blank) = png_info(png.as_ref().expect("no screenshot attached"));
    assert!(w >= 640 && h >= 400 && not_blank, "{w}x{h}, not blank: {not_blank}");

    // Right after a backup, with --verify-boot; the mail server from the host configuration file.
    let conf = e.env.path("cairn.toml");
    std::fs::write(&conf, format!("[mail]\nserver = \"{server}\"\ntls = \"none\"\nfrom = \"backup@example.com\"\n"))
        .unwrap();
    let work = e.env.path("work");
    let o = e
        .env
        .cmd(&[
            "backup",
            "vm",
            &g.name,
            "--work-dir",
            work.to_str().unwrap(),
            "--verify-boot",
            "--mail-to",
            "ops@example.com",
            "--json",
        ])
        .env("CAIRN_CONFIG", &conf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r2 = &r2[0];
    assert_eq!(r2["boot_verification"]["verdict"], "passed", "{r2}");
    assert_eq!(r2["boot_verification"]["mailed_to"], "ops@example.com", "{r2}");
    assert_eq!(smtp.messages().len(), 2);
    assert!(sandboxes(&g.name).is_empty());

    // The catalog keeps them: `cairn report` shows them, and the HTML page carries the image.
    let html = e.env.path("report.html");
    let rep = e.env.json(&["report", &g.name, "--html", html.to_str().unwrap()]);
    let checks = rep["points"][0]["verifications"].as_array().unwrap();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0]["verdict"], "passed");
    assert_eq!(rep["points"][1]["verifications"][0]["verdict"], "passed");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("data:image/png;base64,") && page.contains("PASSED"));
}

#[test]
fn a_point_that_never_boots_fails_and_the_mail_says_so() {
    let e = VmEnv::new();
    let smtp = Smtp::start(e.env.dir.path());
    // A VM whose initramfs is garbage: the kernel panics and the agent never answers.
    let name = format!("cairn-bootbad-{}", std::process::id());
    let _ = Command::new(guest_sh()).args(["remove", &name]).output();
    sh(Command::new(guest_sh()).args(["define", &name]));
    let g = Guest { name: name.clone() };
    let bad = Path::new("/var/lib/cairn-test/vms").join(&name).join("bad-initrd");
    let mut junk = vec![0u8; 1 << 20];
    Rng::new(1).fill(&mut junk);
    std::fs::write(&bad, &junk).unwrap();
    let xml = virsh(&["dumpxml", &name, "--inactive"]);
    let start = xml.find("<initrd>").unwrap() + "<initrd>".len();
    let end = xml.find("</initrd>").unwrap();
    let fixed = format!("{}{}{}", &xml[..start], bad.display(), &xml[end..]);
    let f = e.env.path("bad.xml");
    std::fs::write(&f, fixed).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
    e.backup(&g, &[]); // shut off: read from its files
    let server = format!("127.0.0.1:{}", smtp.port);
    let o = e.env.run(&[
        "verify",
        "boot",
        &name,
        "--mail-to",
        "ops@example.com",
        "--smtp-server",
        &server,
        "--timeout",
        "15",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "failed", "{v}");
    assert!(sandboxes(&name).is_empty(), "sandbox left: {:?}", sandboxes(&name));
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].0.contains("FAILED"), "{}", mails[0].0);
    assert!(mails[0].1.contains("did not answer"), "{}", mails[0].1);
}

/// A point in a repository on S3 (the offsite copy) is boot-verified like a local one: the
/// sandbox boots from the bucket through cairn's NBD server.
#[test]
fn a_point_on_s3_is_boot_verified() {
    use cairn_storage::test_servers::{Flavor, TestServer};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let mut env = common::Env::on(&server, server.bucket("boots", "offsite"));
    env.password = Some("offsite boot secret".into());
    env.ok(&["init", "--encrypt"]);
    let e = VmEnv { env };
    let g = Guest::start("boots3", &[]);
    e.backup(&g, &[]);
    let t = std::time::Instant::now();
    let v = e.env.json(&["verify", "boot", &g.name, "--timeout", "60"]);
    eprintln!("boot verification from S3 took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(v["verdict"], "passed", "{v}");
    assert!(sandboxes(&g.name).is_empty(), "sandbox left: {:?}", sandboxes(&g.name));
    // The verdict is recorded in the bucket's catalog, as for a local repository.
    let report = e.env.json(&["report", &g.name]);
    assert!(report.to_string().contains("passed"), "{report}");
}
