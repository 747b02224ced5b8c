//! `cairn serve-nbd`: restore points served read-only over NBD, read by QEMU's own tools.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: std::process::Child,
    /// What the server wrote on stderr (its log).
    log: PathBuf,
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cairn serve-nbd` with `args` and returns it with the JSON it printed once listening.
fn start_server(e: &Env, args: &[&str]) -> (Server, serde_json::Value) {
    let log = e.path(&format!("serve-{}.log", rand_tag()));
    let mut child = e.cmd(args).stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut out = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    while !out.contains('}') || serde_json::from_str::<serde_json::Value>(&out).is_err() {
        let read = reader.read_line(&mut out).unwrap();
        assert!(read > 0, "serve-nbd ended: {out}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    (Server { child, log }, serde_json::from_str(&out).unwrap())
}

fn rand_tag() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
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
    // And a client certificate from the same CA (what QEMU presents from client-cert.pem).
    std::fs::write(
        dir.join("client-ext.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=cairn-test-client -keyout client-key.pem -out client.csr \
        2>/dev/null");
    sh("openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
        -extfile client-ext.cnf -out client-cert.pem 2>/dev/null");
}

/// A folder of QEMU client credentials: `cas` (concatenated as ca-cert.pem) and, if given,
/// a client certificate and key.
fn client_pki(dir: &Path, cas: &[&Path], cert: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ca: Vec<u8> = cas.iter().flat_map(|p| std::fs::read(p.join("ca-cert.pem")).unwrap()).collect();
    std::fs::write(dir.join("ca-cert.pem"), ca).unwrap();
    if let Some(from) = cert {
        std::fs::copy(from.join("client-cert.pem"), dir.join("client-cert.pem")).unwrap();
        std::fs::copy(from.join("client-key.pem"), dir.join("client-key.pem")).unwrap();
    }
    dir.to_path_buf()
}

/// qemu-img `command` on export disk0 at localhost:`port` over TLS with the credentials in
/// `pki`; `out` is the copy's path for `convert`.
fn qemu_img_tls(command: &str, port: &str, pki: &Path, out: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new("qemu-img");
    cmd.arg(command);
    if out.is_some() {
        cmd.args(["-O", "raw"]);
    }
    cmd.arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.display()))
        .arg("--image-opts")
        .arg(format!("driver=nbd,host=localhost,port={port},export=disk0,tls-creds=tls0"))
        .args(out);
    cmd.output().unwrap()
}

fn port_of(uri: &str) -> String {
    uri.rsplit(':').next().unwrap().split('/').next().unwrap().to_string()
}

#[test]
fn with_a_client_ca_only_clients_holding_a_certificate_of_that_ca_read() {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 16 * MIB, 23);
    e.backup(&img, "guarded", &[]);
    let (pki, other) = (e.path("pki"), e.path("other-pki"));
    for d in [&pki, &other] {
        std::fs::create_dir_all(d).unwrap();
        make_certs(d);
    }
    let arg = |p: PathBuf| p.to_str().unwrap().to_string();
    let args = [
        "serve-nbd".to_string(),
        "guarded".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--json".into(),
        "--tls-cert".into(),
        arg(pki.join("server-cert.pem")),
        "--tls-key".into(),
        arg(pki.join("server-key.pem")),
        "--tls-client-ca".into(),
        arg(pki.join("ca-cert.pem")),
    ];
    let (server, v) = start_server(&e, &args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(v["client_certificates"], true);
    let port = port_of(v["exports"][0]["uri"].as_str().unwrap());

    // A client with a certificate of the CA reads the point, byte for byte.
    let good = client_pki(&e.path("good"), &[&pki], Some(&pki));
    let copy = e.path("copy.raw");
    let o = qemu_img_tls("convert", &port, &good, Some(&copy));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(same_content(&img, &copy), "image read with a client certificate differs");

    // Without a certificate, and with one from another CA, the server refuses the client.
    let none = client_pki(&e.path("none"), &[&pki], None);
    let o = qemu_img_tls("info", &port, &none, None);
    assert!(!o.status.success(), "a client without a certificate read the export");
    // (Both CAs in its ca-cert.pem, so QEMU itself accepts its certificate and the server decides.)
    let stranger = client_pki(&e.path("stranger"), &[&pki, &other], Some(&other));
    let o = qemu_img_tls("info", &port, &stranger, None);
    assert!(!o.status.success(), "a client with a certificate of another CA read the export");
    let log = server.log();
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("invalid peer certificate"), "{log}");
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

/// A point of a small image in a fresh repository: (env, image).
fn served_point(name: &str) -> (Env, PathBuf) {
    let e = Env::new();
    e.init();
    let img = e.path("disk.img");
    make_image(&img, 8 * MIB, 29);
    e.backup(&img, name, &[]);
    (e, img)
}

#[test]
fn a_non_loopback_address_without_tls_is_refused_unless_insecure() {
    let (e, img) = served_point("exposed");
    let err = e.fails(&["serve-nbd", "exposed", "--listen", "0.0.0.0:0"], 1);
    assert!(err.contains("without TLS") && err.contains("--insecure") && err.contains("no authentication"), "{err}");
    // A client CA needs a server certificate to go with it.
    e.fails(&["serve-nbd", "exposed", "--listen", "127.0.0.1:0", "--tls-client-ca", "/dev/null"], 2);

    let (_server, v) = start_server(&e, &["serve-nbd", "exposed", "--listen", "0.0.0.0:0", "--insecure", "--json"]);
    let port = port_of(v["exports"][0]["uri"].as_str().unwrap());
    let copy = e.path("copy.raw");
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    assert!(same_content(&img, &copy));
    // Loopback names need nothing.
    let (_local, v) = start_server(&e, &["serve-nbd", "exposed", "--listen", "localhost:0", "--json"]);
    assert!(v["exports"][0]["uri"].as_str().unwrap().starts_with("nbd://127.0.0.1:"), "{v}");
}

/// Connects a raw TCP client and reads what the server says first: its 18-byte greeting, or
/// nothing when it refuses (closes) the connection.
fn raw_client(port: &str) -> (std::net::TcpStream, usize) {
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    let mut got = 0;
    while got < greeting.len() {
        match s.read(&mut greeting[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (s, got)
}

#[test]
fn a_connection_flood_beyond_the_cap_is_refused_while_clients_keep_reading() {
    let (e, _img) = served_point("flooded");
    let (server, v) = start_server(&e, &["serve-nbd", "flooded", "--listen", "127.0.0.1:0", "--json"]);
    let port = port_of(v["exports"][0]["uri"].as_str().unwrap());
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    // A client in the middle of its work: it reads, waits while the flood comes, reads again
    // (stdbuf: its lines arrive as printed, so the flood starts once it is connected).
    let mut reader = Command::new("stdbuf")
        .args(["-oL", "qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", "-c", "sleep 4000", "-c", "read 1M 64k", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap());
    let mut first = String::new();
    while !first.contains("read 65536/65536") {
        assert!(lines.read_line(&mut first).unwrap() > 0, "qemu-io did not read: {first}");
    }
    // 15 more fill the 16 slots (they stop at the handshake); every one past that is refused.
    let holders: Vec<_> = (0..15).map(|_| raw_client(&port)).collect();
    assert!(holders.iter().all(|(_, got)| *got == 18), "a client within the limit got no greeting");
    for _ in 0..5 {
        let (_, got) = raw_client(&port);
        assert_eq!(got, 0, "a client past the limit was served");
    }
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    let out = reader.wait_with_output().unwrap();
    let text = rest + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("read 65536/65536 bytes at offset 1048576"), "{text}");
    assert!(server.log().contains("16 clients are connected already"), "{}", server.log());

    // Clients that never finish the handshake lose their slot after 10 s (QEMU's own limit).
    let started = Instant::now();
    for (mut s, _) in holders {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "slots held for {waited:?}");
    let info = Command::new("qemu-img").args(["info", "-f", "raw", &uri]).output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    assert!(server.log().contains("did not finish the handshake in time"), "{}", server.log());
}

#[test]
fn an_idle_client_is_disconnected_only_when_asked() {
    let (e, _img) = served_point("idle");
    let (server, v) =
        start_server(&e, &["serve-nbd", "idle", "--listen", "127.0.0.1:0", "--idle-timeout", "1s", "--json"]);
    let uri = format!("nbd://127.0.0.1:{}/disk0", port_of(v["exports"][0]["uri"].as_str().unwrap()));
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 64k", "-c", "sleep 2500", "-c", "read 0 64k", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.matches("read 65536/65536").count(), 1, "{text}");
    assert!(server.log().contains("idle for 1 s"), "{}", server.log());
}

/// A client whose host vanishes leaves a half-open connection that no read or write on our
/// side would notice while it waits for the next request: keepalives do, after a minute idle.
#[test]
fn served_tcp_connections_probe_with_keepalives_after_a_minute_idle() {
    let (e, _img) = served_point("keepalive");
    let (_server, v) = start_server(&e, &["serve-nbd", "keepalive", "--listen", "127.0.0.1:0", "--json"]);
    let port = port_of(v["exports"][0]["uri"].as_str().unwrap());
    let (_client, got) = raw_client(&port);
    assert_eq!(got, 18);
    // The server's end of the connection (source port = the server's): its keepalive timer.
    let out = Command::new("ss").args(["-tnoH", "state", "established", &format!("( sport = :{port} )")]).output();
    let Ok(out) = out else {
        eprintln!("skipped: no ss (iproute2)");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let timer = text.split("timer:(keepalive,").nth(1).unwrap_or_else(|| panic!("no keepalive timer: {text:?}"));
    let left = timer.split(',').next().unwrap();
    let secs: u64 = match left.strip_suffix("sec") {
        Some(s) => s.parse().unwrap(),
        None if left.starts_with("1min") => 60,
        None => panic!("keepalive due in {left}, not within a minute: {text:?}"),
    };
    assert!(secs <= 60, "{text:?}");
}

#[test]
fn the_default_socket_is_private_and_an_existing_path_is_removed_only_when_stale() {
    use std::os::unix::fs::PermissionsExt;
    let (e, img) = served_point("local");
    let runtime = e.path("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = e.cmd(&["serve-nbd", "local", "--json"]);
    cmd.env("XDG_RUNTIME_DIR", &runtime); // used when not root; root gets /run/cairn-nbd
    let log = e.path("default.log");
    let mut child = cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    while serde_json::from_str::<serde_json::Value>(&line).is_err() {
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{}", std::fs::read_to_string(&log).unwrap());
    }
    let server = Server { child, log };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let uri = v["exports"][0]["uri"].as_str().unwrap().to_string();
    let socket = PathBuf::from(uri.split("socket=").nth(1).unwrap());
    let folder = socket.parent().unwrap();
    assert!(folder == Path::new("/run/cairn-nbd") || folder == runtime.join("cairn-nbd"), "{uri}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(folder), 0o700, "{}", folder.display());
    assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    let copy = e.path("copy.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    assert!(same_content(&img, &copy));
    drop(server);

    // Something that is not a socket is never removed.
    let path = e.path("taken.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = e.fails(&["serve-nbd", "local", "--socket", path.to_str().unwrap()], 1);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // Nor a socket someone listens on.
    let live = e.path("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = e.fails(&["serve-nbd", "local", "--socket", live.to_str().unwrap()], 1);
    assert!(err.contains("already listening"), "{err}");
    // A socket left by a server that died is taken over.
    drop(listener);
    assert!(live.exists());
    let (_server, v) = start_server(&e, &["serve-nbd", "local", "--socket", live.to_str().unwrap(), "--json"]);
    let info = Command::new("qemu-img")
        .args(["info", "-f", "raw", v["exports"][0]["uri"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
}

/// `cmd` run as user nobody (setpriv), its environment kept.
fn as_nobody(cmd: &Command) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Waits up to 60 s for `child` to end; its status, or None if it still runs (then killed).
fn ended(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A user's default socket folder ($XDG_RUNTIME_DIR/cairn-nbd) gets the checks of the engine's
/// own private folders: one under a folder other users can write is refused (they could swap
/// it for theirs), one under a proper runtime folder is used.
#[test]
fn the_default_socket_folder_of_a_user_is_refused_under_a_folder_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    if Command::new("setpriv").arg("--version").output().is_err() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and setpriv to run as another user");
        return;
    }
    let (e, _img) = served_point("user");
    // User nobody reads and locks the repository.
    run_tool(Command::new("chown").args(["-R", "65534:65534"]).arg(e.repo()));
    std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let open = e.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = e.cmd(&["serve-nbd", "user", "--json"]);
    cmd.env("XDG_RUNTIME_DIR", &open);
    let log = e.path("open.log");
    let mut child = as_nobody(&cmd).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let status = ended(&mut child);
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "served from a folder under {}: {err}", open.display());
    assert!(err.contains("can be written by other users") && err.contains("--socket"), "{err}");
    assert!(!open.join("cairn-nbd").exists(), "the folder was made");

    // A runtime folder of its own: served from there.
    let run = e.path("run");
    std::fs::create_dir(&run).unwrap();
    run_tool(Command::new("chown").args(["65534:65534"]).arg(&run));
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = e.cmd(&["serve-nbd", "user", "--json"]);
    cmd.env("XDG_RUNTIME_DIR", &run);
    let log = e.path("run.log");
    let mut child =
        as_nobody(&cmd).stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    while serde_json::from_str::<serde_json::Value>(&line).is_err() {
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{}", std::fs::read_to_string(&log).unwrap());
    }
    let _server = Server { child, log };
    assert!(line.contains(run.join("cairn-nbd").to_str().unwrap()), "{line}");
}

/// The guard against a plain repository where a password is given names the variable that
/// gave it.
#[test]
fn a_plain_repository_with_a_password_by_descriptor_names_that_variable() {
    let (e, _img) = served_point("plain");
    let out = e.cmd(&["serve-nbd", "plain"]).env("CAIRN_PASSWORD_FD", "3").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not encrypted, but CAIRN_PASSWORD_FD is set") && err.contains("unset CAIRN_PASSWORD_FD"),
        "{err}"
    );
    assert!(!err.contains("CAIRN_PASSWORD "), "{err}");
}

/// A restore point in a repository on S3 is served like a local one (the data path of
/// instant recovery and boot verification): QEMU reads it whole through cairn's NBD server,
/// which fetches and checks each block from the bucket.
#[test]
fn a_point_on_s3_is_served_over_nbd_and_qemu_reads_it() {
    use cairn_storage::test_servers::{Flavor, TestServer};
    let Some(server) = TestServer::start(Flavor::S3sFs) else { return };
    let mut e = Env::on(&server, server.bucket("served", "offsite"));
    e.password = Some("served secret".into());
    e.ok(&["init", "--encrypt"]);
    let img = e.path("disk.img");
    make_image(&img, 32 * MIB + 4096, 12);
    e.backup(&img, "remote", &[]);
    let sock = e.path("nbd.sock");
    let (_server, v) = start_server(&e, &["serve-nbd", "remote", "--socket", sock.to_str().unwrap(), "--json"]);
    let uri = v["exports"][0]["uri"].as_str().unwrap().to_string();
    let copy = e.path("copy.raw");
    let start = Instant::now();
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    eprintln!("read 32 MiB from the S3 repository over NBD in {:?}", start.elapsed());
    assert!(same_content(&img, &copy), "the point served from S3 differs from its image");
}
