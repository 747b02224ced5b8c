//! What a job is: which VMs, on which hosts, into which repository, when, and what is kept.

use crate::DirectorError;
use cairn_schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::Path;
use utoipa::ToSchema;

/// A backup job, as the API takes and gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique: letters, digits, `-`, `_`, `.` (1 to 64).
    pub name: String,
    /// The VMs it backs up.
    pub vms: VmSelection,
    /// Hypervisor URIs of the hosts to look for them on, from the server's host list; empty: all of it.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The repository: a folder of the server (absolute path), or `s3://BUCKET/PREFIX`,
    /// `az://CONTAINER/PREFIX`.
    pub repository: String,
    /// A file holding the repository's password (encrypted repositories), in the server's
    /// secrets folder (`--secrets-dir`, default /etc/cairn): root's, mode 0600 or stricter.
    #[serde(default)]
    pub password_file: Option<String>,
    /// How each VM is backed up.
    #[serde(default)]
    pub method: BackupMethod,
    /// When it runs: a calendar event (`daily`, `mon..fri 22:00`) or a cron expression
    /// (`0 3 * * *`), in the server's time; none: only when asked.
    #[serde(default)]
    pub schedule: Option<String>,
    /// A disabled job keeps its schedule but does not run on it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// After each run, the restore points of its VMs that are kept; the others are forgotten (their
    /// space comes back at the next prune). None: nothing is forgotten.
    #[serde(default)]
    pub retention: Option<Retention>,
    /// Boot each new point in a sandbox on the VM's host and check it comes up.
    #[serde(default)]
    pub verify_boot: bool,
    /// How many VMs of one host are backed up at once (1 to 16).
    #[serde(default = "one")]
    pub per_host: u32,
    /// Who hears of each run.
    #[serde(default)]
    pub notify: Option<Notify>,
    /// Offsite copies: after each run, its new points are copied to each of these repositories
    /// (only the blocks a target lacks travel; an S3 or Azure target may be immutable).
    #[serde(default)]
    pub copies: Vec<CopyTarget>,
}

/// A repository a job's points are copied to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyTarget {
    /// An absolute folder of the server, or `s3://BUCKET/PREFIX`, `az://CONTAINER/PREFIX`
    /// (made beforehand with `cairn init`; credentials from the server's environment).
    pub repository: String,
    /// Its password file (encrypted targets), in the server's secrets folder.
    #[serde(default)]
    pub password_file: Option<String>,
}

/// Where a job's reports go when a run ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Mail the report (with the boot checks' screenshots) to this address, through the
    /// server's SMTP settings.
    #[serde(default)]
    pub mail_to: Option<String>,
    /// POST the report as JSON (`{"job": NAME, "task": TASK}`) to this `http://` or `https://` URL.
    #[serde(default)]
    pub webhook: Option<String>,
    /// After every run, or only those that did not end `ok`.
    #[serde(default)]
    pub when: NotifyWhen,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyWhen {
    #[default]
    Always,
    /// Warning, failed, cancelled or interrupted runs only.
    Problems,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// Which VMs a job backs up: one of the three. Whole hosts are `all` with the job's `hosts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSelection {
    /// Every VM of the job's hosts, as found when it runs.
    #[serde(default)]
    pub all: bool,
    /// VMs by name or UUID.
    #[serde(default)]
    pub names: Vec<String>,
    /// The VMs of the job's hosts with any of these tags (cairn's libvirt metadata:
    /// `<hooks><tag>prod</tag></hooks>`), as found when it runs.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMethod {
    /// The best the VM allows: app-consistent with a guest agent, else saved-state (the VM's
    /// memory saved with its disks, so the point resumes where it was).
    #[default]
    Auto,
    AppConsistent,
    SavedState,
    CrashConsistent,
}

/// What a job keeps of each VM's points (the newest of each period; see `cairn forget`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

impl Retention {
    pub fn policy(&self) -> cairn_repo::retention::Policy {
        cairn_repo::retention::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: None,
        }
    }
}

fn invalid(why: String) -> DirectorError {
    DirectorError::Invalid(why)
}

/// What the server lets a job name. The server runs as root and a job comes from any operator
/// token: a hypervisor URI can make libvirt run a program (`qemu+ext://...?command=`) or read a
/// file, and a password file is read as root, so both are limited to what the administrator set
/// when starting the server.
pub struct Allowed<'a> {
    /// The server's host list.
    pub hosts: &'a [String],
    /// The folder password files must be in.
    pub secrets_dir: &'a Path,
}

/// Whether `path` is absolute and has no `..`.
fn plain_absolute(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| matches!(c, std::path::Component::ParentDir))
}

/// A name as the director takes one (a job's, a restored VM's): 1 to 64 letters, digits, `-`,
/// `_`, `.`.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A repository location (`what`) and its password file, as a job may name them.
fn check_location(
    what: &str,
    location: &str,
    password_file: Option<&str>,
    allowed: &Allowed,
) -> Result<(), DirectorError> {
    let url = location.contains("://");
    if location.len() > 4096 || !(url || plain_absolute(Path::new(location))) {
        return Err(invalid(format!("{what}: an absolute folder (no ..) or an s3:// or az:// URL")));
    }
    if let Some(f) = password_file {
        let f = Path::new(f);
        if !plain_absolute(f) || !f.starts_with(allowed.secrets_dir) {
            let field = what.replace("repository", "password_file");
            return Err(invalid(format!(
                "{field}: a file in the server's secrets folder {}",
                allowed.secrets_dir.display()
            )));
        }
    }
    Ok(())
}

impl JobSpec {
    /// Checks everything that can be checked without running it; returns its schedule.
    pub fn check(&self, allowed: &Allowed) -> Result<Option<Schedule>, DirectorError> {
        if !plain_name(&self.name) {
            return Err(invalid(format!("{:?} is not a job name (1 to 64 letters, digits, - _ .)", self.name)));
        }
        let ways = [self.vms.all, !self.vms.names.is_empty(), !self.vms.tags.is_empty()];
        if ways.iter().filter(|w| **w).count() != 1 {
            return Err(invalid(
                "choose the VMs one way: by name or UUID (vms.names), by tag (vms.tags), or all (vms.all)".into(),
            ));
        }
        if self.vms.tags.len() > cairn_hypervisor::MAX_TAGS
            || !self.vms.tags.iter().all(|t| cairn_hypervisor::is_tag(t))
        {
            return Err(invalid("vms.tags: tags of 1 to 64 letters, digits, - _ .".into()));
        }
        if self.vms.names.len() > 1000 || self.vms.names.iter().any(|n| n.is_empty() || n.len() > 256) {
            return Err(invalid("vms.names: at most 1000 names of 1 to 256 characters".into()));
        }
        if let Some(h) = self.hosts.iter().find(|h| !allowed.hosts.contains(h)) {
            return Err(invalid(format!(
                "hosts: {h:?} is not in the server's host list ({}); an administrator adds hosts with --host",
                allowed.hosts.join(", ")
            )));
        }
        check_location("repository", &self.repository, self.password_file.as_deref(), allowed)?;
        if self.copies.len() > 8 {
            return Err(invalid("copies: at most 8 targets".into()));
        }
        for (i, c) in self.copies.iter().enumerate() {
            check_location(&format!("copies[{i}].repository"), &c.repository, c.password_file.as_deref(), allowed)?;
            let key = |l: &str| l.trim_end_matches('/').to_string();
            if key(&c.repository) == key(&self.repository)
                || self.copies[..i].iter().any(|o| key(&o.repository) == key(&c.repository))
            {
                return Err(invalid(format!("copies[{i}].repository: {} is named twice", c.repository)));
            }
        }
        if !(1..=16).contains(&self.per_host) {
            return Err(invalid(format!("per_host {} is not between 1 and 16", self.per_host)));
        }
        if let Some(n) = &self.notify {
            if n.mail_to.as_ref().is_some_and(|m| m.len() > 254 || !m.contains('@')) {
                return Err(invalid("notify.mail_to: an e-mail address".into()));
            }
            let web = |u: &str| (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 2048;
            if n.webhook.as_deref().is_some_and(|u| !web(u)) {
                return Err(invalid("notify.webhook: an http:// or https:// URL".into()));
            }
        }
        if self.retention.as_ref().is_some_and(|r| r.policy() == cairn_repo::retention::Policy::default()) {
            return Err(invalid("retention keeps nothing: give at least one keep_* above 0, or no retention".into()));
        }
        self.schedule.as_deref().map(Schedule::parse).transpose().map_err(|e| invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTS: &[String] = &[];

    fn allowed() -> Allowed<'static> {
        Allowed { hosts: HOSTS, secrets_dir: Path::new("/etc/cairn") }
    }

    fn spec() -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "nightly", "vms": {"names": ["web"]}, "repository": "/srv/repo", "schedule": "daily"
        }))
        .unwrap()
    }

    #[test]
    fn a_job_is_checked_before_it_is_kept() {
        assert_eq!(spec().check(&allowed()).unwrap().unwrap().text(), "daily");
        assert!(spec().enabled && spec().per_host == 1);
        let bad = |f: &dyn Fn(&mut JobSpec), why: &str| {
            let mut s = spec();
            f(&mut s);
            let e = s.check(&allowed()).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        };
        bad(&|s| s.name = "no spaces".into(), "job name");
        bad(&|s| s.vms.all = true, "one way");
        bad(&|s| s.vms.names.clear(), "one way");
        bad(&|s| s.vms.tags = vec!["has space".into()], "one way");
        bad(&|s| s.schedule = Some("25:00".into()), "hours");
        bad(&|s| s.per_host = 0, "per_host");
        bad(&|s| s.retention = Some(Retention::default()), "keeps nothing");
        bad(&|s| s.hosts = vec!["qemu+ext:///system?command=/tmp/x".into()], "not in the server's host list");
        bad(&|s| s.repository = "relative/repo".into(), "absolute");
        bad(&|s| s.repository = "/srv/../etc".into(), "absolute");
        bad(&|s| s.password_file = Some("/root/.ssh/id_ed25519".into()), "secrets folder");
        bad(&|s| s.password_file = Some("/etc/cairn/../shadow".into()), "secrets folder");
        bad(
            &|s| s.notify = Some(Notify { webhook: Some("file:///etc/passwd".into()), ..Default::default() }),
            "webhook",
        );
        let unknown = serde_json::from_value::<JobSpec>(serde_json::json!({
            "name": "x", "vms": {"all": true}, "repository": "/r", "keep_everything": true
        }));
        assert!(unknown.is_err(), "an unknown field is refused, not ignored");
    }
}
