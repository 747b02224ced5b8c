//! `cairn server`: the director (jobs on schedules, tasks, REST API), and its tokens.

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Where the catalog is by default: root's own folder.
pub const DEFAULT_CATALOG: &str = "/var/lib/cairn/director/catalog.db";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: Option<ServerCmd>,
    /// Address of the API: HTTPS with --tls-cert and --tls-key, else plain HTTP on loopback only
    #[arg(long, default_value = "127.0.0.1:8470", value_name = "HOST:PORT", env = "CAIRN_SERVER_LISTEN")]
    listen: std::net::SocketAddr,
    /// The server's certificate chain (PEM, server first): the API is served over HTTPS
    #[arg(long, requires = "tls_key", value_name = "FILE", env = "CAIRN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long, requires = "tls_cert", value_name = "FILE", env = "CAIRN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The catalog (jobs, tasks, tokens): a SQLite file
    #[arg(long, default_value = DEFAULT_CATALOG, value_name = "FILE", env = "CAIRN_CATALOG")]
    catalog: PathBuf,
    /// Hosts whose VMs jobs back up when they name none (repeatable; default: CAIRN_HOSTS, else
    /// this machine's hypervisor)
    #[arg(long = "host", value_name = "URI")]
    hosts: Vec<String>,
    /// The folder where jobs' password files must be (root's files, mode 0600)
    #[arg(long, default_value = "/etc/cairn", value_name = "DIR", env = "CAIRN_SECRETS_DIR")]
    secrets_dir: PathBuf,
    /// Work folder for the VM jobs' sockets, scratch files and sandboxes
    #[arg(long, default_value = cairn_ops::DEFAULT_WORK_DIR, value_name = "DIR", env = "CAIRN_SERVER_WORK_DIR")]
    work_dir: PathBuf,
    /// Seconds a guest may stay frozen (or paused) before its watchdog thaws it
    #[arg(long, default_value_t = 30, value_name = "SECONDS", env = "CAIRN_SERVER_FREEZE_LIMIT")]
    freeze_limit: u64,
    /// Seconds between two looks at the jobs' schedules
    #[arg(long, default_value_t = 10, value_name = "SECONDS", hide = true)]
    tick: u64,
    /// A folder of the hosts that restores asked through the API and the console may write
    /// VMs' disks to (repeatable; an API caller picks among these, never another)
    #[arg(
        long = "restore-storage",
        value_name = "DIR",
        default_value = "/var/lib/libvirt/images",
        env = "CAIRN_RESTORE_STORAGE",
        value_delimiter = ' '
    )]
    restore_storage: Vec<PathBuf>,
    /// At most this many VM backups at once on one host, across all jobs (a job's per_host is
    /// its own share of it)
    #[arg(long, default_value_t = 4, value_name = "N", env = "CAIRN_PER_HOST_LIMIT")]
    per_host_limit: usize,
    /// Seconds between two listings of the hosts' VMs (for the console's VM list and dashboard)
    #[arg(long, default_value_t = 60, value_name = "SECONDS", hide = true)]
    inventory_every: u64,
    /// SMTP server that jobs' reports are mailed through [env: CAIRN_SMTP_SERVER; none: reports
    /// are not mailed]
    #[arg(long, value_name = "HOST:PORT")]
    smtp_server: Option<String>,
    /// SMTP security: none, starttls, or tls [default: none; env: CAIRN_SMTP_TLS]. A user and
    /// password (CAIRN_SMTP_PASSWORD) are only ever sent over TLS
    #[arg(long, value_enum)]
    smtp_tls: Option<crate::boot::SmtpTls>,
    /// SMTP user [env: CAIRN_SMTP_USER]
    #[arg(long)]
    smtp_user: Option<String>,
    /// Sender address of the reports [default: cairn@localhost; env: CAIRN_MAIL_FROM]
    #[arg(long)]
    mail_from: Option<String>,
    /// Testing aid: each VM stays frozen this many seconds after its point is taken
    #[arg(long, hide = true, value_name = "SECONDS")]
    debug_hold: Option<f64>,
}

#[derive(Subcommand)]
pub enum ServerCmd {
    /// API tokens: make one (its secret is printed once), list them, revoke one
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token; prints it (`cairn.ID.SECRET`), the only time its secret is shown
    Create {
        /// Its name (letters, digits, - _ . @)
        name: String,
        /// What it may do: admin (everything), operator (jobs, not tokens), viewer (read only),
        /// backup (run jobs and read; never change or delete a job)
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long, default_value = DEFAULT_CATALOG, value_name = "FILE", env = "CAIRN_CATALOG")]
        catalog: PathBuf,
    },
    /// List the tokens (never their secrets)
    List {
        #[arg(long, default_value = DEFAULT_CATALOG, value_name = "FILE", env = "CAIRN_CATALOG")]
        catalog: PathBuf,
    },
    /// Revoke a token
    Revoke {
        name: String,
        #[arg(long, default_value = DEFAULT_CATALOG, value_name = "FILE", env = "CAIRN_CATALOG")]
        catalog: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Admin,
    Operator,
    Viewer,
    Backup,
}

impl From<RoleArg> for cairn_director::auth::Role {
    fn from(r: RoleArg) -> Self {
        use cairn_director::auth::Role;
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Operator => Role::Operator,
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Backup => Role::Backup,
        }
    }
}

pub fn run(g: &crate::Global, a: &ServerArgs) -> Result<i32> {
    match &a.command {
        Some(ServerCmd::Token(t)) => token(g, t),
        None => {
            let smtp_given = a.smtp_server.is_some() || std::env::var("CAIRN_SMTP_SERVER").is_ok_and(|v| !v.is_empty());
            let mail = if smtp_given {
                // Each job names its recipient.
                let (server, user, from) = (a.smtp_server.clone(), a.smtp_user.clone(), a.mail_from.clone());
                Some(crate::boot::smtp_settings("", server, a.smtp_tls, user, from)?)
            } else {
                None
            };
            if let Some(dir) = a.restore_storage.iter().find(|d| !d.is_absolute()) {
                anyhow::bail!("--restore-storage {}: a host's folder is an absolute path", dir.display());
            }
            let settings = cairn_director::Settings {
                mail,
                listen: a.listen,
                tls: a.tls_cert.clone().zip(a.tls_key.clone()),
                catalog: a.catalog.clone(),
                hosts: crate::vm::host_list(&a.hosts),
                secrets_dir: std::path::absolute(&a.secrets_dir)?,
                connect: std::sync::Arc::new(|uri: &str| -> Result<Box<dyn cairn_hypervisor::Hypervisor>> {
                    Ok(Box::new(cairn_libvirt::Libvirt::connect(uri)?))
                }),
                work_dir: std::path::absolute(&a.work_dir)?,
                remote: cairn_ops::hosts::RemoteSettings::from_env(),
                tick: Duration::from_secs(a.tick.max(1)),
                inventory_every: Duration::from_secs(a.inventory_every.max(1)),
                per_host_limit: a.per_host_limit.max(1),
                restore_storage: a.restore_storage.clone(),
                freeze_limit_secs: a.freeze_limit,
                debug_hold: a.debug_hold.map(Duration::from_secs_f64),
            };
            cairn_director::serve(settings)?;
            Ok(0)
        }
    }
}

fn token(g: &crate::Global, t: &TokenCmd) -> Result<i32> {
    match t {
        TokenCmd::Create { name, role, catalog } => {
            let catalog = cairn_director::open_catalog(catalog)?;
            let token = cairn_director::auth::create_token(&catalog, name, (*role).into())?;
            if g.json {
                crate::print_json(&serde_json::json!({"name": name, "token": token}));
            } else {
                println!("{token}");
            }
        }
        TokenCmd::List { catalog } => {
            let tokens = cairn_director::open_catalog(catalog)?.tokens()?;
            if g.json {
                crate::print_json(&tokens);
            } else {
                for t in tokens {
                    println!(
                        "{:<20} {:<9} made {}  last used {}",
                        t.name,
                        t.role.as_str(),
                        t.created,
                        t.last_used.as_deref().unwrap_or("never")
                    );
                }
            }
        }
        TokenCmd::Revoke { name, catalog } => {
            if !cairn_director::open_catalog(catalog)?.revoke_token(name)? {
                anyhow::bail!("no token named {name:?}");
            }
        }
    }
    Ok(0)
}
