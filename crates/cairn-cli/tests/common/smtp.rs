//! A real SMTP server for the tests: aiosmtpd (Debian's python3-aiosmtpd).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// aiosmtpd delivering into a maildir; stopped when dropped.
pub struct Smtp {
    child: Child,
    pub port: u16,
    maildir: PathBuf,
}

impl Smtp {
    pub fn start(dir: &Path) -> Smtp {
        let maildir = dir.join("mail");
        for d in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd (scripts/setup.sh installs it)");
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed().as_secs() < 10, "SMTP server did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Smtp { child, port, maildir }
    }

    /// Every message received: (subject, text part, PNG attachment), decoded by Python's email.
    pub fn messages(&self) -> Vec<(String, String, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        for f in std::fs::read_dir(self.maildir.join("new")).unwrap().flatten() {
            let script = "import email,sys,json,base64\nm=email.message_from_binary_file(open(sys.argv[1],'rb'))\n\
                text='';png=None\nfor p in m.walk():\n  t=p.get_content_type()\n  \
                if t=='text/plain': text=p.get_payload(decode=True).decode()\n  \
                if t=='image/png': png=base64.b64encode(p.get_payload(decode=True)).decode()\n\
                print(json.dumps({'subject':' '.join(str(m['subject']).split()),'text':text,'png':png}))";
            let o = Command::new("/usr/bin/python3").args(["-c", script]).arg(f.path()).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let png = v["png"].as_str().map(|b| {
                let o = Command::new("base64").arg("-d").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
                use std::io::Write;
                o.stdin.as_ref().unwrap().write_all(b.as_bytes()).unwrap();
                o.wait_with_output().unwrap().stdout
            });
            out.push((v["subject"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string(), png));
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
