//! Mail: the verdict of a boot check, with its screenshot, through an SMTP server (lettre).

use anyhow::{Context, Result};
use cairn_vm::boot::BootCheck;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtpTls {
    #[default]
    None,
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

/// Where a report goes and how.
#[derive(Clone)]
pub struct MailSettings {
    pub to: String,
    /// `HOST:PORT` (port 25 when left out).
    pub server: String,
    pub tls: SmtpTls,
    /// The SMTP user; it and the password are sent only over TLS ([`MailSettings::check`]).
    pub user: Option<String>,
    /// The user's password. Missing, the mail fails when sent (the check itself goes on).
    pub password: Option<String>,
    pub from: String,
}

/// Never prints the password.
impl std::fmt::Debug for MailSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailSettings")
            .field("to", &self.to)
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("from", &self.from)
            .finish()
    }
}

/// Why mail settings cannot work, found before anything is booted.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("refusing to send the SMTP user's password unencrypted to {0}")]
    CredentialsWithoutTls(String),
}

impl MailSettings {
    /// Refuses settings that would send a password in clear text.
    pub fn check(&self) -> Result<(), MailError> {
        if self.user.is_some() && self.tls == SmtpTls::None {
            return Err(MailError::CredentialsWithoutTls(self.server.clone()));
        }
        Ok(())
    }

    /// Mails the verdict of `check`, with the screenshot attached when there is one.
    pub fn send_boot_report(&self, check: &BootCheck, png: Option<&[u8]>) -> Result<()> {
        let subject = format!(
            "cairn boot verification {}: {} restore point {} ({})",
            check.verdict.to_uppercase(),
            check.vm,
            check.point.short(),
            check.point_time
        );
        let body = format!(
            "VM: {} ({})\nRestore point: {} taken {}\nVerdict: {}\nWhy: {}\nMethod: {}\nUp after: {:.1} s; verification took {:.1} s\nSandbox: {} (no network, removed afterwards)\n{}\n",
            check.vm,
            check.uuid,
            check.point,
            check.point_time,
            check.verdict.to_uppercase(),
            check.reason,
            check.method,
            check.boot_ms as f64 / 1000.0,
            check.total_ms as f64 / 1000.0,
            check.sandbox,
            if png.is_some() { "The screen of the booted VM is attached." } else { "No screenshot could be taken." }
        );
        let shot = png.map(|p| ("screenshot.png".to_string(), p.to_vec()));
        self.send(&subject, body, shot.as_slice())
    }

    /// Mails `body` under `subject`, with PNG `images` (file name, bytes) attached.
    pub fn send(&self, subject: &str, body: String, images: &[(String, Vec<u8>)]) -> Result<()> {
        use lettre::message::{header::ContentType, Attachment, MultiPart, SinglePart};
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::{Message, SmtpTransport, Transport};
        self.check()?;
        let mut parts = MultiPart::mixed().singlepart(SinglePart::plain(body));
        for (name, png) in images {
            parts = parts.singlepart(Attachment::new(name.clone()).body(png.clone(), ContentType::parse("image/png")?));
        }
        let msg = Message::builder()
            .from(self.from.parse().with_context(|| format!("the sender {:?} is not an address", self.from))?)
            .to(self.to.parse().with_context(|| format!("the recipient {:?} is not an address", self.to))?)
            .subject(subject)
            .multipart(parts)?;
        let (host, port) = match self.server.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse::<u16>().context("SMTP port")?),
            None => (self.server.clone(), 25),
        };
        let mut t = match self.tls {
            SmtpTls::None => SmtpTransport::builder_dangerous(&host),
            SmtpTls::Starttls => SmtpTransport::starttls_relay(&host)?,
            SmtpTls::Tls => SmtpTransport::relay(&host)?,
        }
        .port(port)
        .timeout(Some(Duration::from_secs(30)));
        if let Some(user) = &self.user {
            let pass = self.password.as_ref().with_context(|| format!("no password was given for SMTP user {user}"))?;
            t = t.credentials(Credentials::new(user.clone(), pass.clone()));
        }
        t.build().send(&msg).with_context(|| format!("sending through {}", self.server))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_need_tls() {
        let mut s = MailSettings {
            to: "ops@example.org".into(),
            server: "mail:25".into(),
            tls: SmtpTls::None,
            user: Some("u".into()),
            password: Some("p".into()),
            from: "cairn@localhost".into(),
        };
        assert!(matches!(s.check(), Err(MailError::CredentialsWithoutTls(_))));
        s.tls = SmtpTls::Starttls;
        assert!(s.check().is_ok());
        s.tls = SmtpTls::None;
        s.user = None;
        assert!(s.check().is_ok());
    }
}
