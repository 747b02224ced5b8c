//! Creating a repository: plain, encrypted, immutable (S3 Object Lock, Azure immutability), or
//! as the target of copies from another (`copy_of`: the same block IDs, its own password).

use crate::error::{ErrorKind, OpError, OpResult};
use cairn_repo::{InitOptions, Repository};
use cairn_storage::{Backend, LockPolicy};
use std::sync::Arc;

/// Init requests that cannot be carried out as given.
#[derive(Debug, thiserror::Error)]
pub enum InitRefusal {
    /// Locks protect against whoever holds the storage keys; in a plain repository that someone
    /// could forge the points and records cairn trusts when it extends them.
    #[error("an immutable repository must be encrypted")]
    ImmutableNeedsEncryption,
    #[error("the password is empty")]
    EmptyPassword,
}

pub struct InitRequest<'a> {
    pub encrypt: bool,
    /// The repository this one receives copies from.
    pub copy_of: Option<&'a Repository>,
    pub immutable: Option<LockPolicy>,
}

impl InitRequest<'_> {
    /// Whether the new repository is encrypted: asked, or a copy target of an encrypted one
    /// (a copy's encryption follows its source). Then it needs a password.
    pub fn encrypted(&self) -> bool {
        self.encrypt || self.copy_of.is_some_and(|s| s.crypto().is_encrypted())
    }

    /// Refuses what cannot be made, before a password is asked for.
    pub fn check(&self) -> OpResult<()> {
        // The library judges a copy target's source; a plain new one is refused here.
        if self.immutable.is_some() && !self.encrypted() && self.copy_of.is_none() {
            return Err(OpError::new(ErrorKind::InvalidRequest, InitRefusal::ImmutableNeedsEncryption));
        }
        Ok(())
    }
}

/// Creates the repository on `backend`; `password` when [`InitRequest::encrypted`].
pub fn init(backend: Arc<dyn Backend>, req: &InitRequest, password: Option<&str>) -> OpResult<Repository> {
    req.check()?;
    if password.is_some_and(str::is_empty) {
        return Err(OpError::new(ErrorKind::InvalidRequest, InitRefusal::EmptyPassword));
    }
    let opts = InitOptions { copy_of: req.copy_of, immutable: req.immutable };
    Ok(Repository::init_with(backend, password, opts)?)
}
