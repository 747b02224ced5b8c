//! `cairn-torture`: the harnesses that prove cairn keeps its promises when storage fails,
//! networks misbehave and processes die (docs/RELIABILITY.md). Each prints one JSON line per
//! operation with its figures and exits 1 when any invariant was violated.

mod faults;
mod kills;
mod network;
mod workload;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cairn-torture", about = "Fault-injection and kill harnesses for cairn (see docs/RELIABILITY.md)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fail every storage call of an operation in turn (ENOSPC, EIO, torn and lost writes,
    /// short and flipped reads), checking the repository after each
    Faults {
        /// Operations to torture (default: all): init, backup, backup-encrypted, backup-changed,
        /// restore, verify, repair, prune, forget, copy, copy-source
        #[arg(long, value_delimiter = ',')]
        ops: Vec<String>,
        /// Injections run in parallel
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Keep the work folder (printed) for inspection, with the repository of each
        /// injection that violated an invariant
        #[arg(long)]
        keep: bool,
        /// Only the injections at this storage call (`read:42`: the 42nd read, every fault
        /// of its class), to reproduce one
        #[arg(long, value_name = "CLASS:N")]
        only: Option<String>,
    },
    /// kill -9 the `cairn` binary at random moments and at every crash point of its write
    /// ordering, checking the repository (and the guest, for VM backups) after each
    Kills(kills::KillArgs),
    /// Run the real `cairn` binary against an S3 server (s3s-fs) through a proxy that fails
    /// requests (5xx, throttling, stalls, dropped connections, torn answers and uploads),
    /// checking the repository through a direct connection after each run
    Network(network::NetworkArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let summaries: Vec<serde_json::Value> = match cli.command {
        Command::Faults { ops, jobs, keep, only } => {
            let ops = if ops.is_empty() { faults::OPS.iter().map(|s| s.to_string()).collect() } else { ops };
            faults::run(&ops, jobs, keep, only.as_deref())?
                .into_iter()
                .map(|s| serde_json::to_value(s).unwrap())
                .collect()
        }
        Command::Kills(a) => kills::run(&a)?.into_iter().map(|s| serde_json::to_value(s).unwrap()).collect(),
        Command::Network(a) => network::run(&a)?.into_iter().map(|s| serde_json::to_value(s).unwrap()).collect(),
    };
    let mut violations = 0;
    for s in &summaries {
        println!("{s}");
        violations += s["violations"].as_u64().unwrap_or(0);
    }
    if violations > 0 {
        eprintln!("{violations} invariant violation(s)");
        std::process::exit(1);
    }
    Ok(())
}
