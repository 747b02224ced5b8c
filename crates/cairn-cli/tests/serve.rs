//! `cairn serve-nbd`: restore points served read-only over NBD, read by QEMU's own tools.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cairn serve-nbd` with `args` and returns it with the JSON it printed once listening.
fn start_server(e: &Env, args: &[&str]) -> (Server, serde_json::Value) {
    let mut child = e.cmd(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    while !out.contains('}') || serde_json::from_str::<serde_json::Value>(&out).is_err() {
        assert!(reader.read_line(&mut out).unwrap() > 0, "serve-nbd ended: {out}");
    }
    (Server(child), serde_json::from_str(&out).unwrap())
}

#[test]
fn qemu_reads_a_restore_point_served_over_nbd_and_cannot_write_it() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 64 * MIB + 12345 * 512, 11);
    e.backup(&img, "served", &[]);
    let sock = e.path("nbd.sock");
    // The server prints its exports once it listens.
    let (_server, v) = start_server(&e, &["serve-nbd", "served", "--socket", sock.to_str().unwrap(), "--json"]);
    let uri = v["exports"][0]["uri"].as_str().unwrap().to_string();
    assert_eq!(v["exports"][0]["export"], "disk0");

    // qemu-img reads it whole; the copy is the image, byte for byte.
    let copy = e.path("copy.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    assert!(same_content(&img, &copy), "served image differs");
    // Holes are reported (base:allocation), so the copy is as sparse as the image.
    assert!(allocated(&copy) <= allocated(&img) + MIB, "copy {} vs image {}", allocated(&copy), allocated(&img));
    // Our own NBD client too: a backup of the served point is the same point again.
    let again = e.backup(Path::new(&uri), "again", &[]);
    assert_eq!(stat(&again, "new_bytes"), 0, "{again}");
    // Writes are refused.
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 0 4096", &uri]).output().unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success() && text.contains("Permission denied"), "write not refused: {text}");
    let copy2 = e.path("copy2.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy2));
    assert!(same_content(&img, &copy2));
}

use std::path::Path;

/// A test CA and a server certificate for localhost signed by it, made with openssl.
fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=cairn-test-ca \
        -keyout ca-key.pem -out ca-cert.pem 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server-key.pem -out server.csr 2>/dev/null");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh("openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
        -extfile ext.cnf -out server-cert.pem 2>/dev/null");
}

#[test]
fn with_a_certificate_the_server_speaks_only_tls_and_qemu_reads_through_it() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 32 * MIB, 17);
    e.backup(&img, "secret", &[]);
    let pki = e.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_certs(&pki);
    let (cert, key) = (pki.join("server-cert.pem"), pki.join("server-key.pem"));
    let serve = |key: &Path| -> Vec<String> {
        ["serve-nbd", "secret", "--listen", "127.0.0.1:0", "--json", "--tls-cert", cert.to_str().unwrap(), "--tls-key"]
            .iter()
            .map(|s| s.to_string())
            .chain([key.to_str().unwrap().to_string()])
            .collect()
    };
    let args = serve(&key);
    let (_server, v) = start_server(&e, &args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(v["tls"], true);
    let uri = v["exports"][0]["uri"].as_str().unwrap().to_string();
    let port = uri.rsplit(':').next().unwrap().split('/').next().unwrap().to_string();

    // QEMU's client, trusting the test CA (only ca-cert.pem in its folder), reads the point.
    let client = e.path("client-pki");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), client.join("ca-cert.pem")).unwrap();
    let copy = e.path("copy.raw");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--object"])
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", client.display()))
            .arg("--image-opts")
            .arg(format!("driver=nbd,host=localhost,port={port},export=disk0,tls-creds=tls0"))
            .arg(&copy),
    );
    assert!(same_content(&img, &copy), "image read over TLS differs");

    // Without TLS the server refuses; with an unknown CA the client does.
    let plain = Command::new("qemu-img").args(["info", "-f", "raw", &uri]).output().unwrap();
    let text = String::from_utf8_lossy(&plain.stderr).to_string();
    assert!(!plain.status.success() && text.contains("TLS"), "plain client not refused: {text}");
    let other = e.path("other-pki");
    std::fs::create_dir_all(&other).unwrap();
    make_certs(&other);
    let stranger = Command::new("qemu-img")
        .args(["info", "--object"])
        .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", other.display()))
        .arg("--image-opts")
        .arg(format!("driver=nbd,host=localhost,port={port},export=disk0,tls-creds=tls0"))
        .output()
        .unwrap();
    assert!(!stranger.status.success(), "a client trusting another CA connected");

    // A key that does not match is refused before serving.
    let args = serve(&other.join("server-key.pem"));
    let err = e.fails(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), 1);
    assert!(err.contains("TLS"), "{err}");
}
