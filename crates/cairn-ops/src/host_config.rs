//! The host configuration file (`/etc/cairn/cairn.toml`, or `CAIRN_CONFIG`): settings for mail,
//! object stores, the local cache and the network, shared by every interface on the host. Each
//! setting stands for the environment variable a tool would read (the AWS and Azure tools' own
//! names where there are some), and a variable set in the environment wins over the file; so a
//! setting means the same whether it comes from the file, a systemd unit or a shell.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Every section, its settings, and the environment variable each stands for.
pub const SETTINGS: &[(&str, &[(&str, &str)])] = &[
    (
        "mail",
        &[
            ("server", "CAIRN_SMTP_SERVER"),
            ("tls", "CAIRN_SMTP_TLS"),
            ("user", "CAIRN_SMTP_USER"),
            ("password", "CAIRN_SMTP_PASSWORD"),
            ("from", "CAIRN_MAIL_FROM"),
        ],
    ),
    (
        "s3",
        &[
            ("endpoint", "AWS_ENDPOINT_URL"),
            ("region", "AWS_REGION"),
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("conditional_put", "CAIRN_S3_CONDITIONAL_PUT"),
            ("virtual_hosted", "CAIRN_S3_VIRTUAL_HOSTED"),
        ],
    ),
    ("cache", &[("dir", "CAIRN_CACHE_DIR"), ("max", "CAIRN_CACHE_MAX")]),
    // The hypervisor hosts commands work on when none is named (a list: URIs joined by spaces).
    // remote_cairn and remote_work_dir: how cairn runs on those of another machine (over SSH).
    (
        "hosts",
        &[
            ("uris", "CAIRN_HOSTS"),
            ("remote_cairn", "CAIRN_REMOTE_CAIRN"),
            ("remote_work_dir", "CAIRN_REMOTE_WORK_DIR"),
        ],
    ),
    ("network", &[("limit_upload", "CAIRN_LIMIT_UPLOAD"), ("request_timeout", "CAIRN_REQUEST_TIMEOUT")]),
    // `cairn server`: each setting is one of its options.
    (
        "server",
        &[
            ("listen", "CAIRN_SERVER_LISTEN"),
            ("catalog", "CAIRN_CATALOG"),
            ("secrets_dir", "CAIRN_SECRETS_DIR"),
            ("work_dir", "CAIRN_SERVER_WORK_DIR"),
            ("restore_storage", "CAIRN_RESTORE_STORAGE"),
            ("per_host_limit", "CAIRN_PER_HOST_LIMIT"),
            ("freeze_limit", "CAIRN_SERVER_FREEZE_LIMIT"),
            ("tls_cert", "CAIRN_TLS_CERT"),
            ("tls_key", "CAIRN_TLS_KEY"),
        ],
    ),
    (
        "azure",
        &[
            ("connection_string", "AZURE_STORAGE_CONNECTION_STRING"),
            ("account", "AZURE_STORAGE_ACCOUNT"),
            ("key", "AZURE_STORAGE_KEY"),
            ("endpoint", "AZURE_STORAGE_ENDPOINT"),
        ],
    ),
];

/// The default place of the file.
pub const DEFAULT_PATH: &str = "/etc/cairn/cairn.toml";

/// A host configuration, read and checked: (environment variable, value) for each setting.
#[derive(Clone, Debug, Default)]
pub struct HostConfig {
    pub path: Option<PathBuf>,
    pub settings: Vec<(&'static str, String)>,
}

impl HostConfig {
    /// Reads the file at `path`. A missing file is an empty configuration unless `required`
    /// (named explicitly). Unknown sections and settings are refused, naming the known ones.
    pub fn load(path: &Path, required: bool) -> Result<HostConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(HostConfig::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read the configuration file {}", path.display())),
        };
        let mut config = HostConfig::parse(&text).with_context(|| path.display().to_string())?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses the TOML text of a host configuration.
    pub fn parse(text: &str) -> Result<HostConfig> {
        let doc: toml::Table = text.parse().context("not valid TOML")?;
        let sections = SETTINGS.iter().map(|(s, _)| format!("[{s}]")).collect::<Vec<_>>().join(", ");
        let mut settings = Vec::new();
        for (section, table) in &doc {
            let (Some(table), Some((_, known))) = (table.as_table(), SETTINGS.iter().find(|(s, _)| s == section))
            else {
                bail!("unknown section [{section}] (known: {sections})");
            };
            for (key, value) in table {
                let Some((_, var)) = known.iter().find(|(k, _)| k == key) else {
                    let names = known.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
                    bail!("unknown setting {section}.{key} (known: {names})");
                };
                let value = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(items) => {
                        let Some(words) =
                            items.iter().map(|i| i.as_str().filter(|w| !w.contains(' '))).collect::<Option<Vec<_>>>()
                        else {
                            bail!("{section}.{key} must be a list of strings without spaces");
                        };
                        words.join(" ")
                    }
                    other => other.to_string(),
                };
                settings.push((*var, value));
            }
        }
        Ok(HostConfig { path: None, settings })
    }

    /// The settings whose variable the environment does not set: those the file decides.
    pub fn not_in_environment(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.settings.iter().filter(|(var, _)| std::env::var_os(var).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_map_to_their_variables_and_unknown_ones_are_refused() {
        let mut c = HostConfig::parse("[s3]\nendpoint = \"http://127.0.0.1:9000\"\n[cache]\nmax = 1024\n").unwrap();
        c.settings.sort();
        assert_eq!(
            c.settings,
            [("AWS_ENDPOINT_URL", "http://127.0.0.1:9000".to_string()), ("CAIRN_CACHE_MAX", "1024".to_string())]
        );
        let e = HostConfig::parse("[s3]\nendpoint_url = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown setting s3.endpoint_url") && e.contains("endpoint"), "{e}");
        let c = HostConfig::parse("[hosts]\nuris = [\"qemu:///system\", \"qemu+ssh://b/system\"]\n").unwrap();
        assert_eq!(c.settings, [("CAIRN_HOSTS", "qemu:///system qemu+ssh://b/system".to_string())]);
        assert!(HostConfig::parse("[hosts]\nuris = [\"a b\"]\n").is_err());
        let e = HostConfig::parse("[smtp]\nserver = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown section [smtp]") && e.contains("[mail]"), "{e}");
    }
}
