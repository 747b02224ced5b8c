//! Refusals of VM jobs: requests that cannot be carried out as given, typed so that an interface
//! can act on them and add its own advice (the CLI names its flags, a server its fields). The
//! messages say what happened and why, never which flag to pass.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("VM {vm} cannot be backed up app-consistently: {why}")]
    AppConsistentImpossible { vm: String, why: String },
    #[error("restore point {point} of {name} is not a VM backup")]
    NotAVmPoint { point: String, name: String },
    #[error("restore point {point} was taken with the {method} method and holds no memory state")]
    NoMemoryState { point: String, method: String },
    #[error(
        "restore point {point} recorded its swap areas as zeros ({areas}), and its saved memory may refer to pages swapped out there: resumed, the guest would read zeros instead of them"
    )]
    SwapNotKept { point: String, areas: String },
    #[error("an instant recovery boots the VM, so it cannot resume a saved memory state")]
    InstantCannotResume,
    #[error(
        "resuming the saved memory state needs the VM's own identity (UUID, MACs), and VM {vm} still has it on this host"
    )]
    IdentityInUse { vm: String },
    #[error("a VM named {name} already exists on {uri} (UUID {uuid})")]
    NameTaken { name: String, uri: String, uuid: String },
    #[error("VM {vm} already has UUID {uuid}")]
    UuidTaken { vm: String, uuid: String },
    /// Networks, bridges or host devices the point's VM uses and this host lacks.
    #[error("restore point {point} of {vm} needs what this host does not have: {}; nothing was written", .missing.join(", "))]
    MissingOnHost { point: String, vm: String, missing: Vec<String> },
    #[error("{} already exists", .0.display())]
    FileExists(PathBuf),
    /// The VM has a backup job cairn did not start (another tool's, or another repository's).
    #[error("VM {vm} already has a backup job that cairn did not start (NBD socket {})", .socket.display())]
    ForeignBackupJob { vm: String, socket: PathBuf },
}
