//! What the command line advises after an error: the libraries say what happened (typed), this
//! says which command or flag changes it. A server words its own advice from the same types.

use cairn_engine::target::TargetRefusal;
use cairn_hypervisor::{NoSuchVm, Unreachable};
use cairn_ops::mail::MailError;
use cairn_vm::Refusal;

/// The advice for an operation's error, as a sentence to append (empty when there is none).
pub fn suffix(e: &cairn_ops::OpError) -> String {
    hint(e.error()).map(|h| format!(" ({h})")).unwrap_or_default()
}

/// The advice for the first typed cause in `e`'s chain that has one.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        // An operation's error carries the whole chain inside it.
        if let Some(op) = cause.downcast_ref::<cairn_ops::OpError>() {
            if let Some(h) = hint(op.error()) {
                return Some(h);
            }
        }
        if let Some(r) = cause.downcast_ref::<cairn_repo::Error>() {
            if let Some(h) = repository(r) {
                return Some(h);
            }
        }
        if cause.downcast_ref::<cairn_repo::retention::EmptyPolicy>().is_some() {
            return Some("give at least one --keep-* option".into());
        }
        if let Some(t) = cause.downcast_ref::<TargetRefusal>() {
            return Some(target(t).into());
        }
        if cause.downcast_ref::<cairn_disk::files::UnsupportedFilesystem>().is_some() {
            return Some("restore the disk, or `cairn mount` it and loop-mount the partition".into());
        }
        if let Some(r) = cause.downcast_ref::<Refusal>() {
            return Some(refusal(r));
        }
        if cause.downcast_ref::<NoSuchVm>().is_some() {
            return Some("`cairn vm list` shows the VMs of the hosts (--host URI, repeated, for others)".into());
        }
        if cause.downcast_ref::<Unreachable>().is_some() {
            return Some(
                "Is libvirtd running on this host? Start it (`systemctl start libvirtd`, or `libvirtd -d`), or pass --host URI."
                    .into(),
            );
        }
        if cause.downcast_ref::<cairn_vm::ssh::NotSsh>().is_some() {
            return Some("give that host as qemu+ssh://[USER@]HOST/system, with SSH set up as for virsh".into());
        }
        if let Some(cairn_ops::init::InitRefusal::ImmutableNeedsEncryption) = cause.downcast_ref() {
            return Some("add --encrypt".into());
        }
        if let Some(o) = cause.downcast_ref::<cairn_ops::offsite::OffsiteRefusal>() {
            use cairn_ops::offsite::OffsiteRefusal as O;
            return match o {
                O::NoSuchSourcePoint(_) => Some("see `cairn points --repo SOURCE`".into()),
                O::UnreadableSourcePoint { .. } => Some("`cairn verify` on the source tells more".into()),
                O::Incompatible { .. } => {
                    Some("make the target with `cairn init --repo TARGET --copy-from SOURCE`".into())
                }
                _ => None,
            };
        }
        if let Some(f) = cause.downcast_ref::<cairn_ops::maintenance::ForgetRefusal>() {
            use cairn_ops::maintenance::ForgetRefusal as F;
            return Some(
                match f {
                    F::MixedSelection => "give either NAME@POINT selections or names with --keep-* rules",
                    F::RulesWithPoints => "drop the --keep-* options to remove exactly the points named",
                    F::NoRule => "pass at least one --keep-* option, or NAME@POINT to remove one point",
                }
                .into(),
            );
        }
        if let Some(i) = cause.downcast_ref::<cairn_ops::image::ImageRefusal>() {
            return Some(match i {
                cairn_ops::image::ImageRefusal::NoParentForChanges(_) => "drop --changed-ranges/--dirty-bitmap".into(),
                cairn_ops::image::ImageRefusal::WhichDisk(_) => "name the disk with --disk NAME".into(),
            });
        }
        if let Some(MailError::CredentialsWithoutTls(_)) = cause.downcast_ref::<MailError>() {
            return Some("set --smtp-tls starttls (or tls), or leave out the user".into());
        }
    }
    None
}

fn repository(e: &cairn_repo::Error) -> Option<String> {
    use cairn_repo::Error as E;
    Some(match e {
        E::NotARepository(at) => format!("create one with `cairn init --repo {at}`"),
        E::NoSuchPoint(_) => "`cairn points` lists the restore points".into(),
        E::Protected { spec, .. } => format!("`cairn protect {spec} --unprotect` first"),
        E::DamagedIndex { .. } => "run `cairn repair index` first".into(),
        E::MissingBlock { .. } | E::DamagedBlock { .. } | E::Corrupt(_) => {
            "`cairn verify` names what is damaged".into()
        }
        _ => return None,
    })
}

fn target(t: &TargetRefusal) -> &'static str {
    match t {
        TargetRefusal::DeviceNeedsForce(_) => "add --force to write the disk into it",
        TargetRefusal::DeviceNeedsRaw(_) => "write it as raw: --format raw",
        TargetRefusal::Exists { replaceable: true, .. } => "choose another --to, or add --force to replace it",
        TargetRefusal::Exists { replaceable: false, .. } => "choose another --to",
        TargetRefusal::IsFolder(_) => "--to takes the path of the image file to create",
    }
}

fn refusal(r: &Refusal) -> String {
    let fixed = match r {
        Refusal::AppConsistentImpossible { .. } => "use --method saved-state or auto",
        Refusal::NotAVmPoint { .. } => "restore its disks with `cairn restore image`",
        Refusal::NoMemoryState { .. } | Refusal::SwapNotKept { .. } => "drop --resume-state to cold-boot it",
        Refusal::InstantCannotResume => "--instant and --resume-state do not go together",
        Refusal::IdentityInUse { .. } => "add --replace, or recover on another host",
        Refusal::NameTaken { .. } => "choose another name with --as, or --replace the original",
        Refusal::UuidTaken { .. } => "add --replace to replace it",
        Refusal::MissingOnHost { .. } => {
            "map networks with --map-network OLD=NEW, or leave missing devices out with --drop-missing"
        }
        Refusal::FileExists(_) => "choose another --storage or --as name",
        Refusal::ForeignBackupJob { vm, .. } => return format!("end it first (virsh domjobabort {vm})"),
    };
    fixed.into()
}
