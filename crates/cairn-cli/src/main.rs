//! `cairn`: host-level backup of disk images and virtual machines into a deduplicating
//! repository.

mod boot;
mod hints;
mod maintenance;
mod mount;
mod offsite;
mod output;
mod server;
mod vm;

use anyhow::{bail, Context, Result};
use cairn_engine::restore::RestoreOptions;
use cairn_engine::source::ImageFormat;
use cairn_engine::target::TargetFormat;
use cairn_engine::{NoProgress, Progress};
use cairn_repo::Repository;
use cairn_storage::{Backend, LocalBackend};
use clap::{Args, Parser, Subcommand, ValueEnum};
use output::{bytes, Bar};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Exit status when `verify` finds damage (1 is any other failure, 2 a usage error).
pub(crate) const EXIT_DAMAGED: i32 = 3;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Host-level backup of disk images and VMs into a deduplicating, verifiable repository",
    long_about = "cairn backs up running VMs (through libvirt, with no agent in the guest) and disk images (raw, \
qcow2, VHDX, VMDK, block devices, NBD exports) into a repository where every restore point is a complete \
image built from shared, deduplicated, compressed and optionally encrypted 64 KiB blocks.\n\n\
A first session:\n  cairn init --repo /backup/repo\n  cairn vm list\n  cairn backup vm web --repo /backup/repo\n  \
cairn points --repo /backup/repo\n  cairn restore vm web --repo /backup/repo --storage /var/lib/libvirt/images --start\n  \
cairn files ls web --repo /backup/repo\n  cairn verify --repo /backup/repo\n  cairn verify boot web --repo /backup/repo\n\n\
The repository can also come from CAIRN_REPO, the password of an encrypted repository from \
--password-file, --password-command or CAIRN_PASSWORD (else a prompt on a terminal).\n\
Exit status: 0 success, 1 failure, 2 bad usage, 3 verify found damage or a restore point did not boot, \
130 (143) stopped by Ctrl-C (SIGTERM): backup image, restore image and verify stop cleanly at the first one, \
leaving no restore point, no partial image file and no verdict."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct Global {
    /// Repository: a folder, s3://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX]. Object stores
    /// take their endpoint and credentials from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AZURE_STORAGE_CONNECTION_STRING or
    /// AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (or the [s3] and [azure] sections of the
    /// host configuration file)
    #[arg(long, env = "CAIRN_REPO", global = true, value_name = "DIR|URL")]
    repo: Option<PathBuf>,
    /// The host configuration file (TOML: [mail], [s3], [azure], [hosts], [server], ...; see
    /// docs/GUIDE.md) [default: /etc/cairn/cairn.toml when present; env: CAIRN_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    #[allow(dead_code)] // read before parsing (config_in_args): declared for --help and checks
    config: Option<PathBuf>,
    /// Print results as JSON on stdout (for scripts); progress bars are hidden
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Worker threads for hashing, compression and verification (default: all cores)
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// How long to wait for a conflicting lock on the repository
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 60)]
    lock_wait: u64,
    /// Read the repository's password from the first line of FILE (instead of CAIRN_PASSWORD or
    /// a prompt)
    #[arg(long, global = true, env = "CAIRN_PASSWORD_FILE", value_name = "FILE", conflicts_with = "password_command")]
    password_file: Option<PathBuf>,
    /// Run COMMAND (with sh, when the password is needed) and take the first line of its output as
    /// the repository's password: a secret manager (`pass show backup/cairn`, `systemd-creds cat
    /// cairn`)
    #[arg(long, global = true, env = "CAIRN_PASSWORD_COMMAND", value_name = "COMMAND")]
    password_command: Option<String>,
    /// Upload to an object store at no more than RATE bytes per second on average (K, M, G:
    /// binary units), for a shared uplink; backups, copies and prunes into S3 or Azure
    #[arg(long, global = true, env = "CAIRN_LIMIT_UPLOAD", value_name = "RATE")]
    limit_upload: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new repository
    #[command(long_about = "Create a new, empty repository in --repo (the folder is created).\n\n\
With --encrypt, every block, map, index and restore point is encrypted with AES-256-GCM under a random \
master key, itself wrapped by your password (Argon2id). Block IDs are keyed hashes, so they reveal nothing \
about content. Losing the password means losing the backups: keep it safe.")]
    Init {
        /// Encrypt the repository; the password comes from CAIRN_PASSWORD or a prompt
        #[arg(long)]
        encrypt: bool,
        /// Make a repository that receives copies of REPO (`cairn copy`): it names blocks as
        /// REPO does, so copies send only what it lacks. Encrypted exactly when REPO is, with its
        /// own password (CAIRN_PASSWORD) and data key; REPO's password from CAIRN_FROM_PASSWORD
        #[arg(long, value_name = "REPO")]
        copy_from: Option<PathBuf>,
        /// Make the repository immutable for DAYS: the restore points, their packs, the key files
        /// and the config stay locked by the store (S3 Object Lock in compliance mode, Azure
        /// version-level immutability) at least DAYS after each point, against anyone, cairn
        /// and holders of the bucket's keys included. Needs --encrypt (or an encrypted
        /// --copy-from source), an S3 bucket created with Object Lock and no default retention
        /// (or an Azure container with version-level immutability)
        #[arg(long, value_name = "DAYS")]
        immutable: Option<u32>,
        /// With --immutable: objects locked within one generation share one date, the end of
        /// the generation plus DAYS, so a pack that newer points use is extended once per
        /// generation (the store keeps data up to this much longer than DAYS)
        #[arg(long, value_name = "DAYS", default_value_t = cairn_storage::LockPolicy::DEFAULT_GENERATION_DAYS, requires = "immutable")]
        lock_generation: u32,
    },
    /// Copy restore points into another repository (offsite copies)
    #[command(
        long_about = "Copy restore points from --from into --to (default: --repo), sending only the blocks and map pages the target lacks, deduplicated against everything the target holds. Every block is checked against its ID as it is read from the source. The target must name blocks as the source does: make it with `cairn init --copy-from SOURCE`. A copy killed or cut off part way is resumed by running it again: what arrived is not sent again. A point already copied is skipped.

Passwords: the source's from CAIRN_FROM_PASSWORD (or --from-password-file), the target's from CAIRN_PASSWORD.

Examples:
  cairn init --repo s3://offsite/site-a --copy-from /srv/cairn --encrypt
  cairn copy --from /srv/cairn --to s3://offsite/site-a            # every point
  cairn copy --from /srv/cairn --to s3://offsite/site-a web01 db@latest"
    )]
    Copy(offsite::CopyArgs),
    /// Back up something into the repository
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Virtual machines of this host or of the hosts given (--host, CAIRN_HOSTS)
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// List restore points
    #[command(long_about = "List restore points, oldest first, with their sizes: the disk's logical size, \
bytes read, new data written to the repository (after compression) and data that was already there \
(deduplicated).")]
    Points {
        /// Only points with this name
        name: Option<String>,
    },
    /// Restore from a restore point
    #[command(subcommand)]
    Restore(RestoreCmd),
    /// Re-read and re-hash everything in the repository
    #[command(long_about = "Re-read every pack, re-hash every block and every image map, and check that every \
restore point can be restored. Damage is reported with every restore point it affects and the disk offsets \
concerned. Exits with status 3 if anything is damaged.")]
    Verify {
        /// Only these restore points (NAME[@POINT]; repeatable): their maps and the packs holding
        /// their blocks. Damage found is still reported with every point it affects
        #[arg(long = "points", value_name = "NAME[@POINT]")]
        points: Vec<String>,
        /// Only this percentage of the packs, those verified longest ago first: a scheduled
        /// `verify --sample 10` covers the whole repository every 10 runs
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        sample: Option<f64>,
        #[command(subcommand)]
        what: Option<VerifyCmd>,
    },
    /// Remove restore points a retention policy no longer keeps
    #[command(long_about = "Apply a retention policy to each VM (identified by its UUID, across renames and \
hosts) and each image name, and remove the restore points it does not keep. Their data stays in the \
repository until `cairn prune` (or --prune) reclaims it; backups may run meanwhile.\n\n\
Rules, applied in this order to each group's points, newest first (as Proxmox Backup Server does):\n  \
--keep-within D   every point taken within D before now (not counted by the rules below)\n  \
--keep-last N     the N newest points\n  \
--keep-hourly N, --keep-daily N, --keep-weekly N (ISO weeks), --keep-monthly N, --keep-yearly N\n                    \
the newest point of each of the N newest periods that have one, periods already covered by an earlier \
rule skipped\n\
Protected points (`cairn protect`), points dated in the future and points whose time cannot be read are \
always kept and count toward no rule. Periods follow this host's time zone.\n\n\
Removing a VM's newest point is allowed: its next backup reads every disk in full and says why.\n\n\
Examples:\n  cairn forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run\n  \
cairn forget web --keep-last 3 --prune\n  cairn forget --keep-within 30days --keep-monthly 24")]
    Forget(maintenance::ForgetArgs),
    /// Keep a restore point whatever the retention policy says (or stop keeping it)
    #[command(long_about = "Protect a restore point: `cairn forget` never removes it, and a prune never \
deletes its data. `--unprotect` removes the protection.\n\n\
Examples:\n  cairn protect web@2026-11-25 --repo R\n  cairn protect web@3f2a91c0 --unprotect --repo R")]
    Protect(maintenance::ProtectArgs),
    /// Reclaim the space of data no restore point needs, while backups go on
    #[command(long_about = "Find the packs no restore point needs and delete them; rewrite packs mostly \
unused (more than --max-unused) with only what points still need.\n\n\
Backups, restores and verifies keep running: a prune first marks what it would delete, and deletes a \
marked pack only in a later run, once the mark is --grace old (23h by default, so a daily prune deletes \
what the previous one marked) and every process that was using the repository when it was marked has \
finished. A backup that reused a marked pack meanwhile gets it back. With --grace 0 and nothing else using \
the repository, one run reclaims everything.\n\n\
A prune stops, having deleted nothing, when a restore point, map or index file cannot be read: run \
`cairn verify` or `cairn repair index` first.\n\n\
Examples:\n  cairn prune --dry-run --repo R\n  cairn prune --repo R --json\n  cairn prune --grace 0 --repo R")]
    Prune {
        #[command(flatten)]
        opts: maintenance::PruneArgs,
        /// Show what would be marked, repacked and deleted; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Sizes: logical, stored, deduplication and compression, and what a prune would reclaim
    Stats {
        /// Only points with these names (or VM UUIDs)
        #[arg(value_name = "NAME|UUID")]
        names: Vec<String>,
    },
    /// Repair the repository's metadata from what its data says about itself
    #[command(subcommand)]
    Repair(RepairCmd),
    /// A VM's restore points with their verification history (and an HTML page)
    Report(boot::Report),
    /// Browse and copy files out of a restore point, without restoring its disks
    #[command(subcommand)]
    Files(FilesCmd),
    /// Mount a restore point's disks and partitions as read-only files (FUSE)
    #[command(long_about = "Expose every disk of a restore point, and each partition of them, as a read-only \
file under MOUNTPOINT (vda, vda1, vdb2, ...), read from the repository on demand and hash-checked. Any \
filesystem the kernel knows can then be loop-mounted from them. Stays mounted until Ctrl-C or \
`umount MOUNTPOINT`. Needs root and /dev/fuse.\n\n\
Example:\n  cairn mount web /mnt/web-point --repo R &\n  mount -o loop,ro /mnt/web-point/vda1 /mnt/web-root")]
    Mount {
        /// NAME[@POINT]
        point: String,
        /// An existing empty folder
        mountpoint: PathBuf,
    },
    /// Serve a restore point's disks read-only over NBD, straight from the repository
    #[command(long_about = "Serve every disk of a restore point as a read-only NBD export (export name = the \
disk's name: vda, disk0, ...; the first disk is also the default export). Blocks are read from the \
repository on demand and checked against their hashes; nothing is restored first. Runs until stopped \
(Ctrl-C).\n\n\
Without --socket or --listen, the socket is made in a private folder (/run/cairn-nbd for root, \
$XDG_RUNTIME_DIR/cairn-nbd otherwise) and printed.\n\n\
Examples:\n  cairn serve-nbd web --repo R --socket /run/web.sock\n  \
qemu-img convert -O qcow2 'nbd+unix:///vda?socket=/run/web.sock' web-vda.qcow2\n  \
cairn serve-nbd web@2026-11-25T10 --repo R --listen 127.0.0.1:10809\n  \
qemu-system-x86_64 ... -drive file=nbd://127.0.0.1:10809/vda,format=raw,snapshot=on\n\n\
NBD has no authentication of its own: whoever reaches the server reads every disk of the point, \
decrypted. So a non-loopback address needs TLS (or --insecure), and clients should be made to \
present a certificate of your CA (--tls-client-ca); the client's folder then holds ca-cert.pem, \
client-cert.pem and client-key.pem:\n  \
cairn serve-nbd web --repo R --listen 192.0.2.10:10809 --tls-cert server-cert.pem --tls-key server-key.pem \
--tls-client-ca clients-ca.pem\n  \
qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=/etc/pki/qemu \\\n    \
--image-opts driver=nbd,host=backup.example.com,port=10809,export=vda,tls-creds=tls0")]
    ServeNbd(ServeNbd),
    /// Run the director: backup jobs on schedules as tasks, behind a REST API (see docs/ARCHITECTURE.md)
    #[command(long_about = "Run the director until SIGTERM or Ctrl-C: jobs (which VMs, which hosts, which \
repository, when, what is kept) run on their schedules as tasks with a state, a live progress and a log, \
behind a REST API under /api/ (OpenAPI document at /api/openapi.json). Every request needs a token \
(Authorization: Bearer cairn.ID.SECRET); make the first one here with `cairn server token create NAME \
--role admin`.\n\n\
Examples:\n  cairn server token create ops --role admin\n  cairn server --listen 127.0.0.1:8470 --host qemu:///system\n  \
curl -H 'Authorization: Bearer cairn.…' -d '{\"name\":\"nightly\",\"vms\":{\"all\":true},\
\"repository\":\"/srv/cairn\",\"schedule\":\"daily\",\"retention\":{\"keep_daily\":7}}' \
-H 'Content-Type: application/json' http://127.0.0.1:8470/api/jobs")]
    Server(server::ServerArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(long_about = "Print the completion script of SHELL on stdout.\n\n\
Examples:\n  cairn completions bash > /etc/bash_completion.d/cairn\n  \
cairn completions zsh > /usr/local/share/zsh/site-functions/_cairn\n  \
cairn completions fish > ~/.config/fish/completions/cairn.fish")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (cairn.1, cairn-backup-vm.1, ...) into DIR
    #[command(long_about = "Write a manual page for cairn and for each of its commands into DIR (created if \
missing), made from the same text as --help.\n\nExample:\n  cairn man /usr/local/share/man/man1 && man cairn-backup-vm")]
    Man { dir: PathBuf },
    /// (internal) Guards a guest while a backup has it frozen or paused
    #[command(hide = true)]
    Watchdog(vm::WatchdogArgs),
    /// (internal) The host's side of a job on one of its VMs, run over SSH from the repository's machine
    #[command(hide = true, subcommand)]
    Host(vm::HostCmd),
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Back up a disk image, block device or NBD export
    #[command(long_about = "Back up one disk image as a restore point named --name.\n\n\
SOURCE is a raw image or block device (read directly, holes skipped with SEEK_DATA), an image in any format \
QEMU reads (qcow2, vhdx, vmdk, vpc, vdi: opened through qemu-nbd), or an NBD URI \
(nbd://host:port/export, nbd+unix:///export?socket=/path).\n\n\
Every restore point is a complete image, but only blocks new to the repository are stored. With \
--changed-ranges (or --dirty-bitmap), only the listed ranges are read; every other block is taken from \
the latest restore point of the same name.\n\n\
Examples:\n  cairn backup image disk.img --repo R --name web\n  \
cairn backup image disk.img --repo R --name web --changed-ranges dirty.txt\n  \
cairn backup image web.qcow2 --repo R --name web --dirty-bitmap backup-1")]
    Image(BackupImage),
    /// Back up running or stopped VMs through libvirt, with no agent needed in the guest
    #[command(long_about = "Back up each VM as one restore point named after it (and keyed by its UUID): \
every disk, the VM's configuration (libvirt domain XML) and the files it names outside its disks (direct-boot \
kernel and initrd, firmware, UEFI variables).\n\n\
Methods for a running VM (--method):\n  \
app-consistent    the guest agent freezes the guest's filesystems (running --pre-freeze commands first), the \
point is taken, the guest is thawed at once (--post-thaw commands follow); needs a guest agent that answers \
and qcow2 disks\n  \
saved-state       the VM is paused, its memory saved into the restore point, the point taken, the VM resumed \
(offline a fraction of a second for a small VM)\n  \
crash-consistent  the point is taken with no freeze and no pause\n  \
auto              app-consistent when its requirements hold, else saved-state (the default)\n\
A shut-off VM is read straight from its disk files (only the changes, when QEMU stored its bitmaps on a clean stop).\n\n\
Pre-freeze and post-thaw commands can also live with the VM, in its libvirt metadata:\n  \
virsh metadata web https://cairn.dev/xmlns/hooks/1 --key cairn --set \
'<hooks><pre-freeze>CMD</pre-freeze><post-thaw>CMD</post-thaw></hooks>'\n\n\
Incremental forever: each backup leaves a libvirt checkpoint (a persistent dirty bitmap per disk); the next \
one reads only what changed since and takes the rest from the previous restore point. If the checkpoint \
cannot be trusted (deleted, broken by a crash, disks added or resized), the backup reads everything and says \
why. Swap (Linux swap partitions and LVM volumes, Windows pagefile.sys and swapfile.sys) and unallocated space are never read (--no-skip-swap keeps swap).\n\n\
A watchdog process thaws or resumes the guest if cairn dies or hangs while the guest is frozen or paused.\n\n\
Examples:\n  cairn backup vm web db --repo /backup/repo\n  \
cairn backup vm web --repo R --method app-consistent --pre-freeze 'mysql -e \"FLUSH TABLES\"'\n  \
cairn restore image web --disk vda --repo R --to /tmp/web-vda.qcow2 --format qcow2")]
    Vm(vm::BackupVm),
}

#[derive(Args)]
struct BackupImage {
    /// Image file, block device or NBD URI
    source: String,
    /// Name of the restore point (the image or machine it belongs to)
    #[arg(long)]
    name: String,
    /// File listing the byte ranges changed since the last backup of --name: lines of
    /// `OFFSET LENGTH`, or a JSON array of {"offset","length"} (as `nbdinfo --map --json` prints)
    #[arg(long, value_name = "FILE", conflicts_with = "dirty_bitmap")]
    changed_ranges: Option<PathBuf>,
    /// Take the changed ranges from this QEMU dirty bitmap (qcow2 images and NBD exports)
    #[arg(long, value_name = "BITMAP")]
    dirty_bitmap: Option<String>,
    /// Image format, when detection by magic number is not wanted (raw, qcow2, vhdx, vmdk, vpc, vdi)
    #[arg(long)]
    format: Option<String>,
    /// Name of the disk inside the restore point
    #[arg(long, default_value = "disk0")]
    disk: String,
    /// zstd level (1 fastest .. 19 smallest); the default 2 is tuned for speed vs size (docs/BENCHMARKS.md)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compression: i32,
}

#[derive(Subcommand)]
enum RestoreCmd {
    /// Restore one disk of a restore point into an image file
    #[command(long_about = "Restore a disk of a restore point into a new image file.\n\n\
POINT selects the point: NAME (the latest), NAME@latest, NAME@ID (a prefix of the ID shown by \
`cairn points`), or NAME@TIME (a prefix of its time, e.g. NAME@2026-11-25T10).\n\n\
Every block is checked against its hash before it is written; on damage the restore stops, names the \
block, its disk offset and the restore point, and leaves no file behind. Zero blocks stay holes. The \
image is written under a temporary name and renamed when complete and synced.")]
    Image(RestoreImage),
    /// Recover a whole VM from a restore point onto this host and a storage folder
    #[command(long_about = "Recover a VM from a VM restore point: every disk is written into --storage \
(qcow2 by default, sparse, every block checked against its hash), then the VM is defined again from its \
stored configuration (vCPUs, memory, disks, NICs, other devices) on the host of --connect.\n\n\
By default it is a new VM (NAME-restored, or --as NAME) with a new UUID and new MAC addresses, its disk \
paths pointing into --storage, so it can run next to the original. With --replace it takes the original's \
place: same name, UUID and MACs; the original is stopped and undefined first (after a question, or --yes).\n\n\
Before anything is written, the point's networks, bridges and host devices are checked on this host: \
missing ones stop the recovery unless mapped (--map-network OLD=NEW) or left out (--drop-missing), and \
the storage folder must have room for the data.\n\n\
A saved-state restore point can come back running from its saved memory (--resume-state); other points \
cold-boot with --start.\n\n\
Examples:\n  cairn restore vm web --repo R --storage /var/lib/libvirt/images --start\n  \
cairn restore vm web@2026-11-25T10 --repo R --storage /srv/vms --as web-test --map-network prod=lab --start\n  \
cairn restore vm web --repo R --storage /var/lib/libvirt/images --replace --yes --resume-state")]
    Vm(vm::RestoreVm),
    /// Write a disk only the guest sees back onto it, inside the running VM, through cairn-agent
    #[command(
        long_about = "Write a guest disk of a VM restore point (a LUN the guest attached itself, captured through cairn-agent) back onto that disk inside the running VM, through the VM's cairn-agent.

The disk must be unmounted in the guest (the agent opens it exclusively, and refuses while it is in use) and have the point's size. Every block read from the repository is checked against its hash; zero runs are written as zeros. Afterwards the agent hashes the disk and every block must equal what was sent. The disk's old content is overwritten: a question is asked first (or --yes).

To get the disk as a file instead, use `cairn restore vm` (it writes NAME-guest-DISK.raw) or `cairn restore image NAME --disk guest-DISK`.

Example (in the guest first: umount /lun):
  cairn restore guest-disk db@2026-11-25T10 --disk lun0 --repo R --yes"
    )]
    GuestDisk(vm::RestoreGuestDisk),
}

#[derive(Args)]
struct RestoreImage {
    /// NAME[@POINT]
    point: String,
    /// Where to write the image
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// Image format to write
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    format: Format,
    /// Which disk of the point (needed when it has several)
    #[arg(long)]
    disk: Option<String>,
    /// Replace --to if it exists; a block device (/dev/vg/lv) is written into, in place: it must
    /// hold at least the disk's size, and the format must be raw
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum RepairCmd {
    /// Rebuild the index from the pack files
    #[command(
        long_about = "Rebuild the index (where every block lives) from the packs themselves: entries of sound index files are kept for packs that exist, packs no sound index file lists are read by their trailers (packs left by interrupted backups, or listed only in damaged index files), entries of missing packs are dropped. The new index files are stored durably before the old ones are removed, so an interruption leaves nothing missing.

Run it when verify reports damaged index files, or restore points fail with \"missing from the repository\" although their packs are intact. Takes the exclusive lock: no backup runs meanwhile. Exits with status 3 when some pack could not be read (run `cairn verify` to see which restore points that affects).

Examples:
  cairn repair index --repo R --dry-run
  cairn repair index --repo R"
    )]
    Index {
        /// Show what would be done, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Bring back objects someone hid or overwrote (versioned S3 bucket or Azure container)
    #[command(
        long_about = "In a versioned S3 bucket, a plain DELETE does not remove an object: it hides it behind a \"delete marker\", and S3 allows that even for a locked object; a PUT over a locked object adds a new version on top. Someone with the bucket's keys (or ransomware) can so make an immutable repository look empty, or replace its objects with garbage, while every locked version is still there. This finds the repository's objects whose newest version is a delete marker, and those whose current version is not cairn's (its bytes do not hash to the object's name; for the config, it is not the locked version cairn wrote), and makes cairn's version current again: markers and the versions written over it are deleted where the store allows, and otherwise cairn's version is copied back on top, locked as it was. Lock files stay deleted. Only for immutable repositories (their locked config says so). `cairn verify locks` reports objects whose current version is not locked while an older one is.

Examples:
  cairn repair undelete --repo s3://bucket/repo --dry-run
  cairn repair undelete --repo s3://bucket/repo"
    )]
    Undelete {
        /// Show what is hidden, change nothing
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum VerifyCmd {
    /// Boot a VM restore point in a sandbox, screenshot it, record and mail the verdict
    #[command(long_about = "Boot a VM restore point in an isolated sandbox and check that its OS comes up: the \
sandbox runs straight from the repository (instant-recovery overlays over an NBD export), under a name and \
identity of its own, with no network and no host devices; the original VM is never touched. The OS is up \
when the guest agent answers (VMs with an agent channel), otherwise when the screen has settled on \
something that is not blank. Its screen is captured (PNG), the sandbox and everything it created removed, \
and the verdict stored in the repository's catalog (see `cairn report`) and mailed with the screenshot \
(--mail-to). Exits 3 when the point did not boot.\n\n\
Example:\n  cairn verify boot web --repo R --mail-to ops@example.com --smtp-server mail.example.com:587 --smtp-tls starttls")]
    Boot(boot::VerifyBoot),
    /// Check with the store that every object each restore point needs is locked long enough
    #[command(long_about = "For an immutable repository: ask the store (S3 Object Lock, Azure version-level \
immutability) for the lock of every object each restore point needs (the point itself, the packs of its map \
pages and blocks, the key files and the config), and report any locked for less time than the point needs \
(its `locked_until`). One request per object. Exits 3 when some lock is short.\n\n\
Example:\n  cairn verify locks --repo s3://vault/site-a")]
    Locks,
}

#[derive(Subcommand)]
enum FilesCmd {
    /// List a restore point's volumes, or a directory of one of them
    #[command(long_about = "With only NAME[@POINT]: the point's volumes (each disk's partitions, from its MBR or \
GPT, or the whole disk when it has no table, and the linear LVM logical volumes on them, named vg/lv) with \
the filesystem found on each. With VOLUME (vda1, vda for a disk without partitions, or vg/lv) and PATH: that directory of its filesystem (ext2/3/4, NTFS or FAT12/16/32; \
NTFS and FAT names match without regard to case, as on Windows). Only the blocks the \
listing needs are read from the repository.\n\n\
Examples:\n  cairn files ls web --repo R\n  cairn files ls web vda1 /etc --repo R")]
    Ls {
        /// NAME[@POINT]
        point: String,
        /// vda1, vda for a disk without partitions, or vg/lv (may be left out when there is one filesystem)
        volume: Option<String>,
        /// Directory or file in the volume (default /)
        path: Option<String>,
    },
    /// Copy a file or a directory tree out of a restore point
    #[command(long_about = "Copy PATH (a file, or a directory with everything under it) from VOLUME of a \
restore point to --to (a new path, or an existing folder to put it in). Only the file's own blocks are \
read from the repository, every one checked against its hash.\n\n\
Example:\n  cairn files get web vda1 /etc/nginx/nginx.conf --to /tmp/ --repo R")]
    Get {
        /// NAME[@POINT]
        point: String,
        /// vda1, vda for a disk without partitions, or vg/lv
        volume: String,
        /// File or directory in the volume
        path: String,
        /// Where to write it
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
    },
}

#[derive(Args)]
struct ServeNbd {
    /// NAME[@POINT]
    point: String,
    /// Unix socket to listen on
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// TCP address to listen on (HOST:PORT)
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Require TLS: the server's certificate chain (PEM, server certificate first)
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by a CA of this file (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve a non-loopback --listen address without TLS (anyone reaching it reads the disks)
    #[arg(long)]
    insecure: bool,
    /// Clients served at once; more are refused
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    max_connections: u16,
    /// Disconnect a client that sends no request for this long (e.g. 30m; 0 never does)
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Raw,
    Qcow2,
}

/// The host configuration file: settings that belong to the machine, not to a repository (mail
/// server, object store endpoints, and their credentials). `CAIRN_CONFIG` names it; by default `/etc/cairn/cairn.toml`, if
/// present. Each setting becomes the environment variable the matching option reads, unless that
/// variable is already set, so the command line and the environment still win:
///
/// ```toml
/// [mail]
/// server = "mail.example.com:587"   # CAIRN_SMTP_SERVER
/// tls = "starttls"                  # CAIRN_SMTP_TLS: none, starttls, tls
/// user = "backup"                   # CAIRN_SMTP_USER
/// password = "..."                  # CAIRN_SMTP_PASSWORD
/// from = "cairn@example.com"        # CAIRN_MAIL_FROM
///
/// [s3]                              # for --repo s3://BUCKET/PREFIX
/// endpoint = "https://s3.example.com" # AWS_ENDPOINT_URL (AWS itself when absent)
/// region = "eu-west-1"              # AWS_REGION
/// access_key_id = "..."             # AWS_ACCESS_KEY_ID
/// secret_access_key = "..."         # AWS_SECRET_ACCESS_KEY
/// conditional_put = "disabled"      # CAIRN_S3_CONDITIONAL_PUT: for stores without If-None-Match
/// virtual_hosted = true             # CAIRN_S3_VIRTUAL_HOSTED: bucket.host URLs
///
/// [azure]                           # for --repo az://CONTAINER/PREFIX
/// connection_string = "..."         # AZURE_STORAGE_CONNECTION_STRING
/// account = "..."                   # AZURE_STORAGE_ACCOUNT (with key)
/// key = "..."                       # AZURE_STORAGE_KEY
/// endpoint = "https://..."          # AZURE_STORAGE_ENDPOINT: the blob endpoint
///
/// [network]
/// limit_upload = "20M"              # CAIRN_LIMIT_UPLOAD: bytes per second to object stores
/// request_timeout = "300s"          # CAIRN_REQUEST_TIMEOUT: one request to an object store
///
/// [hosts]                           # CAIRN_HOSTS: the hypervisors `vm list` covers by default
/// uris = ["qemu:///system", "qemu+ssh://kvm2/system"]
///
/// [server]                          # `cairn server`'s options: listen, catalog, secrets_dir,
/// listen = "127.0.0.1:8470"         #   work_dir, restore_storage (a list), per_host_limit,
/// restore_storage = ["/var/lib/libvirt/images"] # freeze_limit, tls_cert, tls_key
///
/// [cache]                           # local state that can be rebuilt
/// dir = "/var/cache/cairn"          # CAIRN_CACHE_DIR: large indexes, object store metadata
/// max = "2G"                        # CAIRN_CACHE_MAX: cap of the object store cache
/// ```
fn load_host_config() -> Result<()> {
    use cairn_ops::host_config::{HostConfig, DEFAULT_PATH};
    let config = match config_in_args().or_else(|| std::env::var_os("CAIRN_CONFIG").map(PathBuf::from)) {
        Some(p) => HostConfig::load(&p, true)?,
        None => HostConfig::load(std::path::Path::new(DEFAULT_PATH), false)?,
    };
    // Each setting stands for an environment variable (clap's `env =` reads them); one set in
    // the environment wins.
    for (var, value) in config.not_in_environment() {
        // SAFETY: single-threaded here, before anything else runs.
        unsafe { std::env::set_var(var, value) };
    }
    Ok(())
}

/// `--config FILE` on the command line: read before the command line is parsed, since the file's
/// settings are the defaults of its options.
fn config_in_args() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(v.into());
        }
    }
    None
}

/// CAIRN_PASSWORD as this process was given it, taken out of its environment at startup.
static ENV_PASSWORD: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Reads CAIRN_PASSWORD once and removes it from our environment, so that no process started from
/// this one inherits it (where it would sit in /proc/PID/environ): not our helpers, not the ones a
/// library starts (libvirt's session daemon, qemu-img, qemu-nbd), not a hook. Called first in
/// main, before any thread exists (another thread reading the environment meanwhile would race).
fn take_env_password() {
    let _ = ENV_PASSWORD.set(std::env::var_os("CAIRN_PASSWORD"));
    let _ = offsite::FROM_PASSWORD.set(std::env::var("CAIRN_FROM_PASSWORD").ok());
    unsafe {
        std::env::remove_var("CAIRN_PASSWORD");
        std::env::remove_var("CAIRN_FROM_PASSWORD");
    }
}

/// Like other Unix tools, end quietly when the reader of our output goes away (`cairn points |
/// head`) instead of panicking on a broken pipe: a write to stdout that fails with EPIPE ends
/// the process by SIGPIPE, as if the signal had not been ignored.
///
/// SIGPIPE itself stays ignored (Rust's default), because a connection a server resets while
/// we write a request to it raises it too (hyper writes requests with `writev`, which has no
/// MSG_NOSIGNAL): with the default action that killed cairn silently in the middle of an
/// upload that object_store would have retried (found by `cairn-torture network`).
fn end_quietly_on_a_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        default_hook(info);
    }));
}

/// The password given in CAIRN_PASSWORD, if any (and if it is text).
pub(crate) fn env_password() -> Option<String> {
    ENV_PASSWORD.get()?.as_ref()?.to_str().map(String::from)
}

/// Where `--password-file` or `--password-command` said the password is (set once in `run`).
static PASSWORD_SOURCE: std::sync::OnceLock<Option<PasswordSource>> = std::sync::OnceLock::new();
/// That password, read or run once, when first needed.
static SOURCED_PASSWORD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

#[derive(Clone, Debug)]
enum PasswordSource {
    File(PathBuf),
    Command(String),
}

/// The first line of `text`, without its line break; none if empty.
fn first_line(text: &str) -> Option<String> {
    let line = text.lines().next().unwrap_or("");
    (!line.is_empty()).then(|| line.to_string())
}

/// The password `--password-file` or `--password-command` gives. A file that cannot be read, or a
/// command that fails, is said on stderr once (the repository then says it needs a password).
fn sourced_password() -> Option<String> {
    SOURCED_PASSWORD
        .get_or_init(|| {
            let source = PASSWORD_SOURCE.get()?.as_ref()?;
            let got = match source {
                PasswordSource::File(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("--password-file {}", f.display()))
                    .map(|t| first_line(&t)),
                PasswordSource::Command(c) => std::process::Command::new("sh")
                    .args(["-c", c])
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .with_context(|| format!("--password-command {c:?}"))
                    .and_then(|o| {
                        if !o.status.success() {
                            bail!("--password-command {c:?} failed ({})", o.status);
                        }
                        Ok(first_line(&String::from_utf8_lossy(&o.stdout)))
                    }),
            };
            match got {
                Ok(Some(p)) => Some(p),
                Ok(None) => {
                    eprintln!("error: {source:?} gave an empty password");
                    None
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    None
                }
            }
        })
        .clone()
}

/// The password given without a prompt: `--password-file`, `--password-command`, or
/// CAIRN_PASSWORD.
pub(crate) fn given_password() -> Option<String> {
    if PASSWORD_SOURCE.get().is_some_and(|s| s.is_some()) {
        return sourced_password();
    }
    env_password()
}

fn main() {
    take_env_password();
    end_quietly_on_a_closed_stdout();
    if let Err(e) = load_host_config() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = hints::hint(&e) {
                eprintln!("hint: {hint}");
            }
            match output::interrupted_by() {
                Some(signal) if cairn_ops::kind_of(&e) == cairn_ops::ErrorKind::Cancelled => {
                    std::process::exit(128 + signal)
                }
                _ => std::process::exit(1),
            }
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    let source = match (&g.password_file, &g.password_command) {
        (Some(f), _) => Some(PasswordSource::File(f.clone())),
        (None, Some(c)) => Some(PasswordSource::Command(c.clone())),
        (None, None) => None,
    };
    let _ = PASSWORD_SOURCE.set(source);
    if let Some(rate) = &g.limit_upload {
        if cairn_storage::cache::parse_size(rate).is_none_or(|r| r == 0) {
            bail!("--limit-upload {rate:?}: give a rate in bytes per second, e.g. 20M (20 MiB/s)");
        }
        // Read where object stores are opened (ObjectOptions::from_env); one thread so far.
        unsafe { std::env::set_var("CAIRN_LIMIT_UPLOAD", rate) };
    }
    match &cli.command {
        Command::Init { encrypt, copy_from, immutable, lock_generation } => init(
            g,
            *encrypt,
            copy_from.as_deref(),
            immutable.map(|days| cairn_storage::LockPolicy { days, generation_days: *lock_generation }),
        ),
        Command::Copy(a) => offsite::copy(g, a),
        Command::Backup(BackupCmd::Image(a)) => backup_image(g, a),
        Command::Backup(BackupCmd::Vm(a)) => vm::backup(g, a),
        Command::Vm(vm::VmCmd::List(a)) => vm::list(g, a),
        Command::Watchdog(a) => vm::run_watchdog(a),
        Command::Host(c) => vm::run_host(c),
        Command::Server(a) => server::run(g, a),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "cairn",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man { dir } => write_man_pages(dir),
        Command::ServeNbd(a) => serve_nbd(g, a),
        Command::Files(c) => files(g, c),
        Command::Mount { point, mountpoint } => mount::mount(g, point, mountpoint),
        Command::Points { name } => points(g, name.as_deref()),
        Command::Restore(RestoreCmd::Image(a)) => restore_image(g, a),
        Command::Restore(RestoreCmd::Vm(a)) => vm::restore(g, a),
        Command::Restore(RestoreCmd::GuestDisk(a)) => vm::restore_guest_disk(g, a),
        Command::Verify { what: None, points, sample } => verify(g, points, *sample),
        Command::Verify { what: Some(VerifyCmd::Boot(a)), .. } => boot::verify_boot_cmd(g, a),
        Command::Verify { what: Some(VerifyCmd::Locks), .. } => verify_locks(g),
        Command::Repair(RepairCmd::Index { dry_run }) => repair_index(g, *dry_run),
        Command::Repair(RepairCmd::Undelete { dry_run }) => offsite::undelete(g, *dry_run),
        Command::Forget(a) => maintenance::forget(g, a),
        Command::Protect(a) => maintenance::protect(g, a),
        Command::Prune { opts, dry_run } => maintenance::prune_cmd(g, opts, *dry_run),
        Command::Stats { names } => maintenance::stats(g, names),
        Command::Report(a) => boot::report(g, a),
    }
}

/// A manual page for cairn and each visible command (`cairn-backup-vm.1`), into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<i32> {
    fn write(dir: &std::path::Path, cmd: clap::Command, name: &str, written: &mut usize) -> Result<()> {
        // clap takes static names; a one-shot command may leak a few.
        let cmd = cmd.name(&*Box::leak(name.to_string().into_boxed_str()));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page).with_context(|| format!("writing {name}.1"))?;
        *written += 1;
        // clap's own `help` subcommands are no command of ours: `cairn-backup-help.1` would be noise.
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            write(dir, sub.clone(), &format!("{name}-{}", sub.get_name()), written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    let mut cli = <Cli as clap::CommandFactory>::command();
    cli.build();
    write(dir, cli, "cairn", &mut written)?;
    println!("{written} manual pages written into {}", dir.display());
    Ok(0)
}

fn backend(g: &Global) -> Result<Arc<dyn Backend>> {
    let Some(dir) = &g.repo else {
        bail!("no repository given: pass --repo DIR (or s3://BUCKET/PREFIX, az://CONTAINER/PREFIX) or set CAIRN_REPO");
    };
    backend_at(dir)
}

/// The backend of a repository location given on the command line.
pub(crate) fn backend_at(dir: &std::path::Path) -> Result<Arc<dyn Backend>> {
    match dir.to_str() {
        Some(url) if url.contains("://") => Ok(cairn_storage::open(url)?),
        // Paths are taken as given (they need not be UTF-8).
        _ => Ok(Arc::new(LocalBackend::new(dir))),
    }
}

/// The helper processes of operations (`cairn_ops::helpers`): this binary's `serve-nbd` and
/// `watchdog` commands, on this repository, with the password this process was given.
pub(crate) fn helpers(g: &Global) -> Result<cairn_ops::ExeHelpers> {
    Ok(cairn_ops::ExeHelpers {
        exe: std::env::current_exe().context("locating the cairn executable for its helpers")?,
        repo: repo_for_helper(g)?,
        password: PROMPTED_PASSWORD
            .get()
            .cloned()
            .or_else(cairn_ops::helpers::password_from_fd)
            .or_else(given_password),
    })
}

/// The repository as a helper process of this one must be told it: a folder made absolute
/// (the helper may run elsewhere), a URL as given.
pub(crate) fn repo_for_helper(g: &Global) -> Result<PathBuf> {
    let repo = g.repo.as_ref().context("no repository: pass --repo DIR or set CAIRN_REPO")?;
    if repo.to_str().is_some_and(|s| s.contains("://")) {
        return Ok(repo.clone());
    }
    Ok(std::path::absolute(repo)?)
}

pub(crate) static PROMPTED_PASSWORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn password_from_env_or_prompt(confirm: bool) -> Option<String> {
    if let Some(p) = cairn_ops::helpers::password_from_fd() {
        return Some(p);
    }
    // Given by flag: that, or nothing (a failing secret manager is not answered by a prompt).
    if PASSWORD_SOURCE.get().is_some_and(|s| s.is_some()) {
        return sourced_password();
    }
    if let Some(p) = env_password() {
        return Some(p);
    }
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let p = rpassword::prompt_password("Repository password: ").ok()?;
    // Helper processes this run starts (instant recovery's NBD server) need it too.
    let _ = PROMPTED_PASSWORD.set(p.clone());
    if confirm {
        let again = rpassword::prompt_password("Repeat the password: ").ok()?;
        if again != p {
            eprintln!("the passwords differ");
            return None;
        }
    }
    Some(p)
}

pub(crate) fn open_repo(g: &Global) -> Result<Arc<Repository>> {
    let b = backend(g)?;
    let repo = Repository::open(b, || password_from_env_or_prompt(false))?;
    // A password was given for a repository that says it is not encrypted: either the wrong
    // repository, or its config was altered to turn encryption off. Writing plaintext where
    // the operator expects ciphertext is the worse mistake, so stop.
    // Named as given: an operator told to unset CAIRN_PASSWORD when it is not set is lost.
    // CAIRN_PASSWORD itself was taken out of the environment at startup (take_env_password).
    let given_by = if let Some(Some(source)) = PASSWORD_SOURCE.get() {
        Some(match source {
            PasswordSource::File(_) => "--password-file (CAIRN_PASSWORD_FILE)",
            PasswordSource::Command(_) => "--password-command (CAIRN_PASSWORD_COMMAND)",
        })
    } else if ENV_PASSWORD.get().is_some_and(|p| p.is_some()) {
        Some("CAIRN_PASSWORD")
    } else {
        std::env::var_os(cairn_ops::helpers::PASSWORD_FD_ENV).map(|_| cairn_ops::helpers::PASSWORD_FD_ENV)
    };
    if let Some(var) = given_by.filter(|_| !repo.crypto().is_encrypted()) {
        bail!(
            "the repository at {} is not encrypted, but {var} is set: if it should be encrypted, its \
             config was altered (do not use it); if not, unset {var}",
            repo.backend().location()
        );
    }
    Ok(Arc::new(repo))
}

/// Opens the repository for reading or adding (a shared lock, held while the returned lock
/// lives) with its index loaded.
pub(crate) fn open_indexed(g: &Global, purpose: &str) -> Result<(Arc<Repository>, cairn_repo::Lock)> {
    let repo = open_repo(g)?;
    let lock = repo.lock(false, purpose, Duration::from_secs(g.lock_wait))?;
    repo.load_index()?;
    Ok((repo, lock))
}

pub(crate) fn workers(g: &Global) -> usize {
    g.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)).max(1)
}

pub(crate) fn bar(g: &Global) -> Bar {
    Bar::new(!g.json && !g.quiet && std::io::stderr().is_terminal())
}

/// A bar for work that stops cleanly when interrupted (see [`output::stop_on_interrupt`]).
pub(crate) fn stoppable_bar(g: &Global) -> Bar {
    output::stop_on_interrupt();
    bar(g)
}

pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap());
}

fn init(
    g: &Global,
    encrypt: bool,
    copy_from: Option<&std::path::Path>,
    immutable: Option<cairn_storage::LockPolicy>,
) -> Result<i32> {
    let b = backend(g)?;
    let source = copy_from.map(offsite::open_source).transpose()?;
    let req = cairn_ops::init::InitRequest { encrypt, copy_of: source.as_ref(), immutable };
    req.check()?;
    let password = if req.encrypted() {
        Some(
            password_from_env_or_prompt(true)
                .context("an encrypted repository needs a password: set CAIRN_PASSWORD or run in a terminal")?,
        )
    } else {
        None
    };
    let repo = cairn_ops::init::init(b.clone(), &req, password.as_deref())?;
    let lock = repo.lock_policy();
    if g.json {
        print_json(&serde_json::json!({"repository": b.location(), "id": repo.config().id,
            "encryption": repo.config().encryption, "immutability": lock}));
    } else {
        println!(
            "created repository {} at {} (encryption: {})",
            &repo.config().id[..8],
            b.location(),
            repo.config().encryption
        );
        if let Some(p) = lock {
            println!(
                "immutable: restore points, their packs, the key files and the config stay locked by the store \
                 for at least {} days after each point, in generations of {} days",
                p.days, p.generation_days
            );
        }
    }
    Ok(0)
}

fn backup_image(g: &Global, a: &BackupImage) -> Result<i32> {
    use cairn_ops::image::{backup_image, BackupImageRequest, Changes};
    let repo = open_repo(g)?;
    let req = BackupImageRequest {
        source: a.source.clone(),
        format: a.format.as_deref().map(ImageFormat::parse).transpose()?,
        changes: match (&a.changed_ranges, &a.dirty_bitmap) {
            (Some(f), _) => Changes::RangesFile(f.clone()),
            (None, Some(b)) => Changes::DirtyBitmap(b.clone()),
            (None, None) => Changes::All,
        },
        name: a.name.clone(),
        disk: a.disk.clone(),
        compression_level: a.compression,
        workers: workers(g),
        lock_wait: Duration::from_secs(g.lock_wait),
    };
    let (id, point) = backup_image(&repo, &req, &stoppable_bar(g))?;
    if g.json {
        print_json(&serde_json::json!({"id": id, "point": point}));
    } else {
        output::print_backup(&id, &point);
    }
    Ok(0)
}

fn points(g: &Global, name: Option<&str>) -> Result<i32> {
    use cairn_ops::points::{list_points, PointSummary};
    let repo = open_repo(g)?;
    let listed = list_points(&repo, name, Duration::from_secs(g.lock_wait))?;
    let (pts, protected): (Vec<_>, _) = (listed.points.iter().collect(), &listed.protected);
    if g.json {
        let v: Vec<_> = pts.iter().map(|(id, p)| PointSummary::of(id, p, protected.contains(id))).collect();
        print_json(&v);
    } else {
        output::print_points(&pts, protected);
    }
    for (id, problem) in &listed.damaged {
        eprintln!("warning: restore point {} cannot be read: {problem}", &id[..8]);
    }
    if let Some(n) = name {
        if pts.is_empty() {
            bail!("no restore point named {n:?}");
        }
    }
    Ok(0)
}

fn restore_image(g: &Global, a: &RestoreImage) -> Result<i32> {
    use cairn_ops::image::{restore_image, RestoreImageRequest, RestoredImage};
    let repo = open_repo(g)?;
    let req = RestoreImageRequest {
        point: a.point.clone(),
        disk: a.disk.clone(),
        to: a.to.clone(),
        options: RestoreOptions {
            format: match a.format {
                Format::Raw => TargetFormat::Raw,
                Format::Qcow2 => TargetFormat::Qcow2,
            },
            force: a.force,
            workers: workers(g),
        },
        lock_wait: Duration::from_secs(g.lock_wait),
    };
    // A block device a running VM uses is refused: the engine asks when --to is one.
    cairn_engine::target::check_device_users(Box::new(running_vm_disks));
    let RestoredImage { id, point, report } = restore_image(&repo, &req, &stoppable_bar(g))?;
    if g.json {
        print_json(
            &serde_json::json!({"point": id, "name": point.name, "time": point.time, "to": a.to, "report": report}),
        );
    } else {
        use std::os::unix::fs::FileTypeExt;
        // A device holds old data where a file has holes: its zero ranges were zeroed (unmapped
        // where the device can, as a thin LV or a zvol does), not left alone.
        let device = std::fs::metadata(&a.to).is_ok_and(|m| m.file_type().is_block_device());
        println!(
            "restored disk {} of {} ({}, {}) to {}: {} data, {} zero ({}), {:.1} s",
            report.disk,
            point.name,
            id.short(),
            point.time,
            a.to.display(),
            bytes(report.data_bytes),
            bytes(report.zero_bytes),
            if device { "zeroed on the device" } else { "left sparse" },
            report.duration_ms as f64 / 1000.0
        );
    }
    Ok(0)
}

/// The disks of the VMs running (or paused) on this host's libvirt (see
/// [`cairn_libvirt::running_vm_disks`]); when libvirt does not answer, a warning says the check
/// was not made.
fn running_vm_disks() -> Vec<(String, PathBuf)> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| cairn_libvirt::DEFAULT_URI.into());
    cairn_libvirt::running_vm_disks(&uri).unwrap_or_else(|e| {
        eprintln!("warning: could not ask libvirt ({uri}) which block devices its VMs use: {e:#}");
        Vec::new()
    })
}

fn files(g: &Global, c: &FilesCmd) -> Result<i32> {
    use cairn_ops::files::{get_files, list_files, list_volumes, Listing};
    let (repo, _lock) = open_indexed(g, "files")?;
    match c {
        FilesCmd::Ls { point, volume, path } => {
            // `ls web /etc`: a path where the volume would be, with one filesystem to choose.
            let (volume, path) = match (volume, path) {
                (Some(v), None) if v.starts_with('/') => (None, Some(v.clone())),
                (v, p) => (v.clone(), p.clone()),
            };
            if volume.is_none() && path.is_none() {
                let (id, p, vols) = list_volumes(&repo, point)?;
                if g.json {
                    print_json(&serde_json::json!({"point": id, "volumes": vols}));
                } else {
                    println!("volumes of {} ({}, {})", p.name, id.short(), p.time);
                    for v in &vols {
                        println!(
                            "  {:<8} {:>10}  at {:>12}  {}{}",
                            v.name,
                            bytes(v.length),
                            v.offset,
                            v.filesystem.unwrap_or("-"),
                            v.problem.as_ref().map(|p| format!("  ({p})")).unwrap_or_default()
                        );
                    }
                }
                return Ok(0);
            }
            let path = path.unwrap_or_else(|| "/".into());
            let Listing { id, volume, entries, repository_bytes_read, .. } =
                list_files(&repo, point, volume.as_deref(), &path)?;
            if g.json {
                print_json(&serde_json::json!({"point": id, "volume": volume, "path": path, "entries": entries,
                    "repository_bytes_read": repository_bytes_read}));
            } else {
                for e in &entries {
                    let when = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(e.modified.max(0) as u64),
                    );
                    println!("{:<7} {:o} {:>12}  {}  {}", e.kind, e.mode & 0o7777, e.size, when, e.name);
                }
            }
        }
        FilesCmd::Get { point, volume, path, to } => {
            let (id, p, volume, r) = get_files(&repo, point, volume, path, to)?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if g.json {
                print_json(&serde_json::json!({"point": id, "volume": volume, "path": path, "to": to, "report": r}));
            } else {
                println!(
                    "copied {} from {} {} ({}): {} file(s), {} dir(s), {}; {} read from the repository",
                    path,
                    p.name,
                    volume,
                    id.short(),
                    r.files,
                    r.dirs,
                    bytes(r.bytes),
                    bytes(r.repository_bytes_read)
                );
            }
        }
    }
    Ok(0)
}

fn serve_nbd(g: &Global, a: &ServeNbd) -> Result<i32> {
    use cairn_nbd::server::{serve_tcp, serve_unix, Export, Exports, Limits};
    // Held while serving: maintenance (gc) must not remove packs a client is reading.
    let (repo, _lock) = open_indexed(g, "serve-nbd")?;
    let (id, point) = repo.select_point(&a.point)?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(
            cairn_nbd::server::tls_config(cert, key, a.tls_client_ca.as_deref())
                .context("loading the TLS certificate")?,
        ),
        _ => None,
    };
    let limits = Limits {
        max_connections: a.max_connections.into(),
        idle_timeout: (!a.idle_timeout.is_zero()).then_some(a.idle_timeout),
        ..Limits::default()
    };
    let exports = Exports(
        point
            .disks
            .iter()
            .map(|d| {
                let e: Arc<dyn Export> = Arc::new(cairn_engine::serve::PointDisk::new(repo.clone(), d.clone()));
                (d.name.clone(), e)
            })
            .collect(),
    );
    let names: Vec<&str> = point.disks.iter().map(|d| d.name.as_str()).collect();
    let describe = |uri: &dyn Fn(&str) -> String| -> Vec<serde_json::Value> {
        names.iter().map(|n| serde_json::json!({"export": n, "uri": uri(n)})).collect()
    };
    let client_certs = a.tls_client_ca.is_some();
    let say = |list: Vec<serde_json::Value>| {
        if g.json {
            print_json(&serde_json::json!({"point": id, "name": point.name, "time": point.time,
                "tls": tls.is_some(), "client_certificates": client_certs, "exports": list}));
        } else {
            let tls_note = match (tls.is_some(), client_certs) {
                (true, true) => ", TLS and a client certificate required",
                (true, false) => ", TLS required",
                _ => "",
            };
            println!(
                "serving restore point {} of {} ({}), read-only{tls_note}; Ctrl-C stops",
                id.short(),
                point.name,
                point.time
            );
            for e in &list {
                println!("  {}  {}", e["export"].as_str().unwrap_or(""), e["uri"].as_str().unwrap_or(""));
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    if let Some(addr) = &a.listen {
        let addrs = listen_addresses(addr, a)?;
        let l = std::net::TcpListener::bind(&addrs[..]).with_context(|| format!("cannot listen on {addr}"))?;
        let local = l.local_addr()?;
        say(describe(&|n| format!("nbd://{local}/{n}")));
        serve_tcp(l, exports, tls, limits)?;
    } else {
        let (path, private) = match &a.socket {
            Some(p) => (std::path::absolute(p)?, false),
            None => (private_socket_dir()?.join(format!("cairn-nbd-{}.sock", id.short())), true),
        };
        clear_stale_socket(&path)?;
        let l = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        say(describe(&|n| cairn_nbd::NbdAddress::unix(&path, n).to_string()));
        serve_unix(l, exports, tls, limits)?;
    }
    Ok(0)
}

fn repair_index(g: &Global, dry_run: bool) -> Result<i32> {
    let repo = open_repo(g)?;
    let r = cairn_ops::check::repair_index(&repo, dry_run, Duration::from_secs(g.lock_wait), &bar(g))?;
    if g.json {
        print_json(&r);
    } else {
        println!(
            "{} packs: {} listed by sound index files, {} read from their trailers, {} unreadable",
            r.packs_stored,
            r.packs_from_index,
            r.packs_from_trailers.len(),
            r.unreadable_packs.len()
        );
        for u in &r.unreadable_packs {
            println!("UNREADABLE pack {}: {}", &u.pack[..16], u.problem);
        }
        if !r.missing_packs.is_empty() {
            println!("{} pack(s) listed by the index are missing: their entries are dropped", r.missing_packs.len());
        }
        if !r.damaged_index_files.is_empty() {
            println!("{} damaged index file(s) replaced", r.damaged_index_files.len());
        }
        if dry_run {
            println!("dry run: nothing changed");
        } else {
            println!("wrote {} index file(s) and removed {} old one(s)", r.index_files_written, r.index_files_removed);
        }
    }
    Ok(if r.unreadable_packs.is_empty() { 0 } else { EXIT_DAMAGED })
}

/// The addresses `--listen` resolves to, refused when one is not loopback and nothing
/// protects it: NBD has no authentication of its own.
fn listen_addresses(addr: &str, a: &ServeNbd) -> Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = addr.to_socket_addrs().with_context(|| format!("cannot listen on {addr}"))?.collect();
    let exposed = addrs.iter().any(|s| !s.ip().is_loopback());
    if exposed && a.tls_cert.is_none() && !a.insecure {
        bail!(
            "refusing to serve on {addr} without TLS: NBD has no authentication of its own, so anyone who \
             can reach this address could read every disk of the point, decrypted. Give --tls-cert and \
             --tls-key with --tls-client-ca (clients must then present a certificate signed by that CA), \
             listen on a loopback address or a --socket, or add --insecure to serve in the clear anyway"
        );
    }
    if exposed && a.tls_cert.is_some() && a.tls_client_ca.is_none() {
        eprintln!(
            "warning: {addr} is reachable from other hosts and no client certificate is required: anyone \
             who can reach it can read every disk of the point (add --tls-client-ca)"
        );
    }
    Ok(addrs)
}

/// A folder only this user can enter, for the default socket: /run/cairn-nbd for root,
/// $XDG_RUNTIME_DIR/cairn-nbd otherwise (never a predictable name in a world-writable folder).
fn private_socket_dir() -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let euid = unsafe { libc::geteuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|_| euid != 0) {
        Some(run) => PathBuf::from(run).join("cairn-nbd"),
        None if euid == 0 => PathBuf::from("/run/cairn-nbd"),
        None => bail!("no private folder for the socket ($XDG_RUNTIME_DIR is not set): give --socket PATH"),
    };
    // The engine's check for its own folders: made 0700 if missing, else ours, a real folder
    // writable by nobody else, under parents nobody else can write or swap.
    cairn_vm::host::private_dir(&dir).context("the folder for the socket (or give --socket PATH)")?;
    // Nobody else may even enter it: the socket takes its mode 0600 only after it exists.
    let m = std::fs::symlink_metadata(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if m.mode() & 0o077 != 0 {
        bail!(
            "{} can be entered by other users (mode {:o}): make it 0700 or remove it, or give --socket PATH",
            dir.display(),
            m.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// Removes `path` only when it is a socket nobody listens on (a server that died); anything
/// else there is left alone and refused.
fn clear_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.with_context(|| format!("cannot read {}", path.display()))?,
    };
    if !m.file_type().is_socket() {
        bail!("{} exists and is not a socket: remove it or choose another --socket", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("a server is already listening on {}: stop it or choose another --socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
        Err(e) => bail!(
            "cannot tell whether a server still listens on {} ({e}): remove it if none does, or choose another --socket",
            path.display()
        ),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("{s:?} is not a percentage between 0 and 100")),
    }
}

fn verify_locks(g: &Global) -> Result<i32> {
    let (repo, _lock) = open_indexed(g, "verify locks")?;
    let quiet = g.json || g.quiet || !std::io::stderr().is_terminal();
    let progress: Box<dyn Progress> = if quiet { Box::new(NoProgress) } else { Box::new(bar(g)) };
    let audit = cairn_ops::offsite::audit(&repo, progress.as_ref())?;
    if g.json {
        print_json(&audit);
    } else {
        println!(
            "{} restore point(s): {} object(s) asked, {} locked for less than their points need{}",
            audit.points,
            audit.objects_checked,
            audit.short.len(),
            if audit.points_past_their_lock > 0 {
                format!(" ({} point(s) past their lock, not checked)", audit.points_past_their_lock)
            } else {
                String::new()
            }
        );
        for (point, why) in &audit.unreadable {
            println!("UNREADABLE point {}: {why} (its packs were not all checked)", &point[..point.len().min(8)]);
        }
        for s in audit.short.iter().take(20) {
            let have = s.locked_until.map(cairn_storage::object_lock::rfc3339).unwrap_or_else(|| "not locked".into());
            println!(
                "SHORT {} {}: {have}, needed until {} by point {}",
                s.kind,
                &s.name[..s.name.len().min(16)],
                cairn_storage::object_lock::rfc3339(s.needed_until),
                s.point.short()
            );
        }
    }
    Ok(if audit.ok { 0 } else { EXIT_DAMAGED })
}

fn verify(g: &Global, points: &[String], sample: Option<f64>) -> Result<i32> {
    let repo = open_repo(g)?;
    let req = cairn_ops::check::VerifyRequest {
        points: points.to_vec(),
        sample_percent: sample,
        workers: workers(g),
        lock_wait: Duration::from_secs(g.lock_wait),
    };
    let run = cairn_ops::check::verify(&repo, &req, &stoppable_bar(g))?;
    let report = &run.report;
    if g.json {
        print_json(&run);
    } else {
        output::print_verify(report);
        if report.packs_verified.len() as u64 != report.packs_total {
            println!("read {} of {} packs this run", report.packs_verified.len(), report.packs_total);
        }
        if run.packs_never_verified > 0 {
            println!("{} pack(s) not verified yet by any run", run.packs_never_verified);
        } else if let Some(t) = &run.all_verified_since {
            println!("every pack verified at least once since {t}");
        }
    }
    Ok(if report.ok { 0 } else { EXIT_DAMAGED })
}
