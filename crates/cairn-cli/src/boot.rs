//! `cairn verify boot` (boot a restore point in a sandbox, screenshot it, mail the verdict) and
//! `cairn report` (a VM's restore points with their verification history).

use crate::output::bytes;
use crate::{bar, open_indexed, open_repo, print_json, workers, Global};
use anyhow::{bail, Context, Result};
use cairn_libvirt::{Libvirt, DEFAULT_URI};
use cairn_ops::boot_check::{boot_check, BootCheckRequest, BootOutcome};
use cairn_ops::mail::MailSettings;
use cairn_repo::vm_record::VmRecord;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, ValueEnum)]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

#[derive(Args)]
pub struct VerifyBoot {
    /// NAME[@POINT] of a VM restore point
    point: String,
    /// Hypervisor URI of the host the sandbox runs on: this machine's, or another's over
    /// qemu+ssh:// (with cairn installed there; the point is read from here over SSH)
    #[arg(long, default_value = DEFAULT_URI, env = "LIBVIRT_DEFAULT_URI", value_name = "URI")]
    connect: String,
    /// Folder of this machine for the sandbox's overlays and NBD socket (emptied afterwards);
    /// created 0700, and refused if another user could write in it. On another host, the
    /// overlays go into its work folder (CAIRN_REMOTE_WORK_DIR)
    #[arg(long, default_value = cairn_ops::DEFAULT_WORK_DIR, value_name = "DIR")]
    work_dir: PathBuf,
    #[command(flatten)]
    pub mail: BootMail,
}

/// The boot check's options, declared twice: as `verify boot` takes them, and as `backup vm`
/// does, where each needs `--verify-boot` (clap refuses them without it, instead of ignoring
/// them). The SMTP settings also come from the environment (and the host configuration file),
/// read in [`BootMail::settings`], not by clap: a setting in the environment is not a flag given.
macro_rules! boot_mail {
    ($(#[$m:meta])* $name:ident $(, $requires:literal)?) => {
        $(#[$m])*
        #[derive(Args, Clone, Default)]
        pub struct $name {
            /// How long the OS may take to come up [default: 120]
            #[arg(long = "boot-timeout", alias = "timeout", value_name = "SECONDS" $(, requires = $requires)?)]
            timeout: Option<u64>,
            /// Mail the verdict and the screenshot to this address
            #[arg(long, value_name = "ADDR" $(, requires = $requires)?)]
            mail_to: Option<String>,
            /// SMTP server [default: localhost:25; env: CAIRN_SMTP_SERVER]
            #[arg(long, value_name = "HOST:PORT" $(, requires = $requires)?)]
            smtp_server: Option<String>,
            /// SMTP security: none, starttls, or tls (implicit TLS, port 465) [default: none;
            /// env: CAIRN_SMTP_TLS]. A user and password are only ever sent over TLS
            #[arg(long, value_enum $(, requires = $requires)?)]
            smtp_tls: Option<SmtpTls>,
            /// SMTP user [env: CAIRN_SMTP_USER]; the password comes from CAIRN_SMTP_PASSWORD
            #[arg(long $(, requires = $requires)?)]
            smtp_user: Option<String>,
            /// Sender address [default: cairn@localhost; env: CAIRN_MAIL_FROM]
            #[arg(long $(, requires = $requires)?)]
            mail_from: Option<String>,
        }
    };
}

boot_mail!(
    /// How long a boot may take and where its report goes.
    BootMail
);
boot_mail!(
    /// [`BootMail`] for `backup vm`: every one needs `--verify-boot`.
    BackupBootMail,
    "verify_boot"
);

impl From<&BackupBootMail> for BootMail {
    fn from(b: &BackupBootMail) -> BootMail {
        let BackupBootMail { timeout, mail_to, smtp_server, smtp_tls, smtp_user, mail_from } = b.clone();
        BootMail { timeout, mail_to, smtp_server, smtp_tls, smtp_user, mail_from }
    }
}

impl From<SmtpTls> for cairn_ops::mail::SmtpTls {
    fn from(t: SmtpTls) -> Self {
        match t {
            SmtpTls::None => cairn_ops::mail::SmtpTls::None,
            SmtpTls::Starttls => cairn_ops::mail::SmtpTls::Starttls,
            SmtpTls::Tls => cairn_ops::mail::SmtpTls::Tls,
        }
    }
}

impl BootMail {
    /// The boot check these options ask for: flags first, then CAIRN_SMTP_* / CAIRN_MAIL_FROM
    /// (and the host configuration file, through them), then defaults. Settings that cannot work
    /// are refused here, before anything is booted.
    pub fn request(&self, g: &Global, work_dir: &Path) -> Result<BootCheckRequest> {
        let mail = match &self.mail_to {
            None => None,
            Some(to) => Some(smtp_settings(
                to,
                self.smtp_server.clone(),
                self.smtp_tls,
                self.smtp_user.clone(),
                self.mail_from.clone(),
            )?),
        };
        Ok(BootCheckRequest {
            work_dir: std::path::absolute(work_dir).context("resolving --work-dir")?,
            timeout: Duration::from_secs(self.timeout.unwrap_or(120)),
            mail,
            workers: workers(g),
        })
    }
}

/// Mail settings for `to`: the flags given, then CAIRN_SMTP_* / CAIRN_MAIL_FROM (and the host
/// configuration file, through them), then defaults; refused if they cannot work.
pub(crate) fn smtp_settings(
    to: &str,
    server: Option<String>,
    tls: Option<SmtpTls>,
    user: Option<String>,
    from: Option<String>,
) -> Result<MailSettings> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let tls = match (tls, env("CAIRN_SMTP_TLS")) {
        (Some(t), _) => t,
        (None, Some(v)) => SmtpTls::from_str(&v, true)
            .map_err(|_| anyhow::anyhow!("CAIRN_SMTP_TLS={v:?}: expected none, starttls or tls"))?,
        (None, None) => SmtpTls::None,
    };
    let settings = MailSettings {
        to: to.to_string(),
        server: server.or_else(|| env("CAIRN_SMTP_SERVER")).unwrap_or("localhost:25".into()),
        tls: tls.into(),
        user: user.or_else(|| env("CAIRN_SMTP_USER")),
        password: std::env::var("CAIRN_SMTP_PASSWORD").ok(),
        from: from.or_else(|| env("CAIRN_MAIL_FROM")).unwrap_or("cairn@localhost".into()),
    };
    settings.check()?;
    Ok(settings)
}

pub fn verify_boot_cmd(g: &Global, a: &VerifyBoot) -> Result<i32> {
    let req = a.mail.request(g, &a.work_dir)?;
    let hv = Libvirt::connect(&a.connect)?;
    let settings = cairn_ops::hosts::RemoteSettings::from_env();
    let host = cairn_ops::hosts::open_access(&a.connect, &a.work_dir, &settings)?;
    let (repo, _lock) = open_indexed(g, "verify boot")?;
    let (id, point) = repo.select_point(&a.point)?;
    let helpers = crate::helpers(g)?;
    let outcome = boot_check(&hv, host.as_ref(), &repo, &id, &point, &req, &helpers, &bar(g))?;
    if g.json {
        let mut out = serde_json::to_value(&outcome.check)?;
        out["record"] = outcome.record_id.clone().into();
        out["mailed_to"] = outcome.mailed_to.clone().into();
        print_json(&out);
    } else {
        print_check(&outcome);
    }
    Ok(if outcome.check.passed() { 0 } else { crate::EXIT_DAMAGED })
}

pub fn print_check(outcome: &BootOutcome) {
    let check = &outcome.check;
    println!(
        "boot verification of {} ({}, {}): {} ({})",
        check.vm,
        check.point.short(),
        check.point_time,
        check.verdict.to_uppercase(),
        check.reason
    );
    println!(
        "  sandbox {} (no network), up in {:.1} s, {:.1} s in all; screenshot {}; {}",
        check.sandbox,
        check.boot_ms as f64 / 1000.0,
        check.total_ms as f64 / 1000.0,
        outcome.screenshot.as_ref().map(|s| format!("{} PNG", bytes(s.len() as u64))).unwrap_or("none".into()),
        outcome.mailed_to.as_ref().map(|m| format!("mailed to {m}")).unwrap_or("not mailed".into())
    );
    for r in &check.left_out {
        println!("  left out: {r}");
    }
    println!("  stored in the repository's catalog as {}", &outcome.record_id[..8]);
}

#[derive(Args)]
pub struct Report {
    /// The VM (or image) name
    name: String,
    /// Also write an HTML page, screenshots inline
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

pub fn report(g: &Global, a: &Report) -> Result<i32> {
    let repo = open_repo(g)?;
    let _lock = repo.lock(false, "report", Duration::from_secs(g.lock_wait))?;
    let points: Vec<_> = repo.list_points()?.points.into_iter().filter(|(_, p)| p.name == a.name).collect();
    if points.is_empty() {
        bail!("no restore point named {:?}", a.name);
    }
    let records = repo.records_of(cairn_repo::RecordKind::BootVerification)?;
    let mut rows = Vec::new();
    for (id, p) in &points {
        let mut checks: Vec<&serde_json::Value> =
            records.iter().filter(|(_, r)| r["point"] == id.as_str()).map(|(_, r)| r).collect();
        checks.sort_by_key(|r| r["time"].as_str().unwrap_or("").to_string());
        let vm = VmRecord::of(p);
        rows.push(serde_json::json!({
            "id": id, "time": p.time, "mode": p.stats.mode,
            "method": vm.as_ref().map(|r| r.method.as_str()),
            "frozen_window_ms": vm.as_ref().and_then(|r| r.frozen_window_ms),
            "logical_bytes": p.stats.totals.logical_bytes, "stored_bytes": p.stats.totals.stored_bytes,
            "verifications": checks.iter().map(|c| {
                let mut c = (*c).clone();
                c.as_object_mut().map(|o| o.remove("screenshot"));
                c
            }).collect::<Vec<_>>(),
        }));
    }
    if let Some(file) = &a.html {
        std::fs::write(file, html(&a.name, &points, &records))
            .with_context(|| format!("writing {}", file.display()))?;
    }
    if g.json {
        print_json(&serde_json::json!({"name": a.name, "points": rows}));
        return Ok(0);
    }
    println!("restore points of {}", a.name);
    for r in &rows {
        println!(
            "  {}  {}  {:<14} {:<16} {}",
            &r["id"].as_str().unwrap()[..8],
            r["time"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["method"].as_str().unwrap_or("-"),
            bytes(r["logical_bytes"].as_u64().unwrap_or(0))
        );
        for c in r["verifications"].as_array().unwrap() {
            println!(
                "      boot verification {}: {} ({}){}",
                c["time"].as_str().unwrap_or(""),
                c["verdict"].as_str().unwrap_or("").to_uppercase(),
                c["reason"].as_str().unwrap_or(""),
                c["mailed_to"].as_str().map(|m| format!(", mailed to {m}")).unwrap_or_default()
            );
        }
    }
    if let Some(file) = &a.html {
        println!("wrote {}", file.display());
    }
    Ok(0)
}

/// Whether `s` is made of the base64 alphabet only (so it cannot end an attribute or a tag).
fn is_base64(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html(
    name: &str,
    points: &[(cairn_repo::PointId, cairn_repo::RestorePoint)],
    records: &[(String, serde_json::Value)],
) -> String {
    let mut h = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>cairn report: {0}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:left;vertical-align:top}}\
         .passed{{color:#070}}.failed{{color:#b00}}img{{max-width:480px;border:1px solid #999}}</style></head>\
         <body><h1>Restore points of {0}</h1><table><tr><th>Point</th><th>Time</th><th>Mode</th><th>Method</th><th>Size</th><th>Boot verifications</th></tr>",
        esc(name)
    );
    for (id, p) in points {
        let vm = VmRecord::of(p);
        let mut cell = String::new();
        for (_, r) in records.iter().filter(|(_, r)| r["point"] == id.as_str()) {
            let verdict = r["verdict"].as_str().unwrap_or("");
            cell.push_str(&format!(
                "<div class='{v}'><b>{V}</b> {t}: {why}</div>",
                v = esc(verdict),
                V = esc(&verdict.to_uppercase()),
                t = esc(r["time"].as_str().unwrap_or("")),
                why = esc(r["reason"].as_str().unwrap_or(""))
            ));
            // The catalog record comes from the repository: only base64 goes into the page.
            if let Some(img) = r["screenshot"].as_str().filter(|i| is_base64(i)) {
                cell.push_str(&format!("<img alt='screen of the booted VM' src='data:image/png;base64,{img}'>"));
            }
        }
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            id.short(),
            esc(&p.time),
            esc(&p.stats.mode),
            esc(vm.as_ref().map(|r| r.method.as_str()).unwrap_or("-")),
            bytes(p.stats.totals.logical_bytes),
            if cell.is_empty() { "none".into() } else { cell }
        ));
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(point: &str, shot: &str) -> (String, serde_json::Value) {
        let r =
            serde_json::json!({"point": point, "verdict": "passed", "time": "t", "reason": "r", "screenshot": shot});
        ("rec".into(), r)
    }

    #[test]
    fn the_report_page_takes_only_base64_screenshots() {
        let stats = serde_json::to_value(cairn_repo::PointStats::default()).unwrap();
        let point: cairn_repo::RestorePoint = serde_json::from_value(serde_json::json!({"version": 1, "name": "web",
            "time": "t", "hostname": "h", "source": "s", "disks": [], "stats": stats}))
        .unwrap();
        let id = cairn_repo::PointId::of_sealed(b"a point");
        let good = html("web", &[(id.clone(), point.clone())], &[record(id.as_str(), "iVBORw0KGgo+/=")]);
        assert!(good.contains("src='data:image/png;base64,iVBORw0KGgo+/='"), "{good}");
        let evil = "x'><script>alert(1)</script><img src='";
        let page = html("web", &[(id.clone(), point)], &[record(id.as_str(), evil)]);
        assert!(!page.contains("<script>") && !page.contains("alert"), "{page}");
        assert!(page.contains("PASSED"));
    }

    #[test]
    fn smtp_credentials_need_tls() {
        let g = <crate::Cli as clap::Parser>::parse_from(["cairn", "points"]).global;
        let mut m = BootMail {
            mail_to: Some("ops@example.com".into()),
            smtp_user: Some("backup".into()),
            smtp_tls: Some(SmtpTls::None),
            ..Default::default()
        };
        let err = m.request(&g, Path::new("/tmp")).err().expect("credentials without TLS accepted").to_string();
        assert!(err.contains("unencrypted"), "{err}");
        m.smtp_user = None;
        assert!(m.request(&g, Path::new("/tmp")).is_ok(), "no credentials, no TLS needed");
    }
}
