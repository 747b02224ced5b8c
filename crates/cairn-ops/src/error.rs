//! Typed errors: what a caller can act on. An interface maps an [`ErrorKind`] to its own
//! vocabulary (an exit code, an HTTP status) and adds its own advice; the message says what
//! happened, never which flag to pass.

use serde::Serialize;
use std::fmt;

/// What kind of failure, for a caller that acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request cannot be carried out as given (a bad option, a conflicting pair).
    InvalidRequest,
    /// A named thing (VM, restore point, repository, object) does not exist.
    NotFound,
    /// The request collides with what exists (a name or UUID taken, a file in the way).
    Conflict,
    /// Someone else holds what the request needs (a repository lock); retrying later may work.
    Busy,
    /// Stored data failed its checks (a damaged block, a corrupt document).
    Damaged,
    /// The wrong password or key.
    Unauthorized,
    /// The request was cancelled through its [`crate::Cancel`].
    Cancelled,
    /// Anything else: the hypervisor, the storage or the host failed.
    Failed,
}

/// An operation's error: a kind, and the whole chain of what happened.
pub struct OpError {
    kind: ErrorKind,
    error: anyhow::Error,
}

pub type OpResult<T> = std::result::Result<T, OpError>;

impl OpError {
    pub fn new(kind: ErrorKind, error: impl Into<anyhow::Error>) -> OpError {
        OpError { kind, error: error.into() }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The underlying error, for callers that look for a typed cause (`downcast_ref`).
    pub fn error(&self) -> &anyhow::Error {
        &self.error
    }

    /// The kind of an untyped error, from the typed errors of the libraries in its chain.
    pub fn classify(error: anyhow::Error) -> OpError {
        OpError { kind: kind_of(&error), error }
    }
}

/// The first typed cause in the chain decides.
pub fn kind_of(error: &anyhow::Error) -> ErrorKind {
    use cairn_repo::Error as R;
    use cairn_storage::StorageError as S;
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<OpError>() {
            return e.kind;
        }
        if let Some(e) = cause.downcast_ref::<R>() {
            return match e {
                R::NotARepository(_) | R::NotFound(_) | R::NoSuchPoint(_) | R::MissingBlock { .. } => {
                    ErrorKind::NotFound
                }
                R::AlreadyExists(_) => ErrorKind::Conflict,
                R::WrongPassword | R::PasswordRequired => ErrorKind::Unauthorized,
                R::Corrupt(_) | R::Format(_) | R::DamagedBlock { .. } | R::DamagedIndex { .. } => ErrorKind::Damaged,
                R::Invalid(_) | R::Incompatible(_) => ErrorKind::InvalidRequest,
                R::Protected { .. } => ErrorKind::Conflict,
                R::Locked(_) => ErrorKind::Busy,
                R::Cache(_) => ErrorKind::Failed,
                R::Storage(s) => storage_kind(s),
            };
        }
        if let Some(s) = cause.downcast_ref::<S>() {
            return storage_kind(s);
        }
        if let Some(e) = cause.downcast_ref::<cairn_vm::Refusal>() {
            return refusal_kind(e);
        }
        if cause.downcast_ref::<cairn_hypervisor::NoSuchVm>().is_some() {
            return ErrorKind::NotFound;
        }
        if cause.downcast_ref::<cairn_hypervisor::Unreachable>().is_some() {
            return ErrorKind::Failed;
        }
        if let Some(t) = cause.downcast_ref::<cairn_engine::target::TargetRefusal>() {
            use cairn_engine::target::TargetRefusal as T;
            return match t {
                T::Exists { .. } => ErrorKind::Conflict,
                T::DeviceNeedsForce(_) | T::DeviceNeedsRaw(_) | T::IsFolder(_) => ErrorKind::InvalidRequest,
            };
        }
        if cause.downcast_ref::<cairn_engine::Cancelled>().is_some() {
            return ErrorKind::Cancelled;
        }
        if cause.downcast_ref::<cairn_disk::files::UnsupportedFilesystem>().is_some() {
            return ErrorKind::InvalidRequest;
        }
        if cause.downcast_ref::<crate::mail::MailError>().is_some() {
            return ErrorKind::InvalidRequest;
        }
    }
    ErrorKind::Failed
}

fn refusal_kind(e: &cairn_vm::Refusal) -> ErrorKind {
    use cairn_vm::Refusal as V;
    match e {
        V::NameTaken { .. } | V::UuidTaken { .. } | V::IdentityInUse { .. } | V::FileExists(_) => ErrorKind::Conflict,
        V::ForeignBackupJob { .. } => ErrorKind::Busy,
        V::AppConsistentImpossible { .. }
        | V::NotAVmPoint { .. }
        | V::NoMemoryState { .. }
        | V::SwapNotKept { .. }
        | V::InstantCannotResume
        | V::MissingOnHost { .. } => ErrorKind::InvalidRequest,
    }
}

fn storage_kind(e: &cairn_storage::StorageError) -> ErrorKind {
    use cairn_storage::StorageError as S;
    match e {
        S::NotFound { .. } => ErrorKind::NotFound,
        S::AlreadyExists { .. } | S::Locked { .. } => ErrorKind::Conflict,
        S::ShortRead { .. } => ErrorKind::Damaged,
        S::Io { .. } => ErrorKind::Failed,
    }
}

impl From<anyhow::Error> for OpError {
    fn from(e: anyhow::Error) -> OpError {
        OpError::classify(e)
    }
}

impl From<cairn_storage::StorageError> for OpError {
    fn from(e: cairn_storage::StorageError) -> OpError {
        OpError::classify(e.into())
    }
}

impl From<cairn_repo::Error> for OpError {
    fn from(e: cairn_repo::Error) -> OpError {
        OpError::classify(e.into())
    }
}

/// Like `anyhow::Error`: `{}` is the outermost step, `{:#}` the whole chain, and
/// [`source`](std::error::Error::source) goes on down the chain.
impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

impl fmt::Debug for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {:?}", self.kind, self.error)
    }
}

impl std::error::Error for OpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.chain().nth(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_first_typed_cause_decides_the_kind() {
        let e = anyhow::Error::from(cairn_repo::Error::Locked("prune by root@host".into())).context("opening");
        assert_eq!(kind_of(&e), ErrorKind::Busy);
        let e: anyhow::Result<()> = Err(cairn_repo::Error::NotFound("no point".into()).into());
        assert_eq!(kind_of(&e.context("selecting").unwrap_err()), ErrorKind::NotFound);
        assert_eq!(kind_of(&anyhow::anyhow!("libvirt is down")), ErrorKind::Failed);
        let wrapped = anyhow::Error::from(OpError::new(ErrorKind::Cancelled, anyhow::anyhow!("stop")));
        assert_eq!(kind_of(&wrapped.context("backing up")), ErrorKind::Cancelled);
    }

    #[test]
    fn refusals_and_hypervisor_errors_have_kinds_an_interface_can_act_on() {
        let taken = cairn_vm::Refusal::NameTaken { name: "web".into(), uri: "qemu:///system".into(), uuid: "u".into() };
        assert_eq!(kind_of(&anyhow::Error::from(taken).context("recovering")), ErrorKind::Conflict);
        let gone = cairn_hypervisor::NoSuchVm { name: "web".into(), uri: "qemu:///system".into() };
        assert_eq!(kind_of(&gone.into()), ErrorKind::NotFound);
        let busy = cairn_vm::Refusal::ForeignBackupJob { vm: "web".into(), socket: "/s".into() };
        assert_eq!(kind_of(&busy.into()), ErrorKind::Busy);
        let e = OpError::classify(anyhow::Error::from(cairn_repo::Error::WrongPassword).context("opening"));
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        // `{}` is the outermost step, `{:#}` the chain, and the chain goes on through `source`.
        assert_eq!(e.to_string(), "opening");
        assert!(format!("{e:#}").contains("wrong password"), "{e:#}");
        assert!(std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("wrong password")));
    }
}
