use crate::BlockId;
use cairn_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cairn repository at {0}")]
    NotARepository(String),
    #[error("a repository already exists at {0}")]
    AlreadyExists(String),
    #[error("wrong password: no key of this repository opens with it")]
    WrongPassword,
    #[error("this repository is encrypted: give its password in CAIRN_PASSWORD or at the prompt")]
    PasswordRequired,
    #[error("repository data is damaged: {0}")]
    Corrupt(String),
    #[error("repository format error: {0}")]
    Format(String),
    #[error("block {} is missing from the repository ({context})", .id.short())]
    MissingBlock { id: BlockId, context: String },
    #[error("block {} in pack {pack} is damaged: {detail}", .id.short())]
    DamagedBlock { id: BlockId, pack: String, detail: String },
    #[error("{0}")]
    NotFound(String),
    /// No restore point has this name.
    #[error("no restore point named {0:?}")]
    NoSuchPoint(String),
    /// The point is protected (`protect`): nothing removes it until it is unprotected.
    #[error("restore point {point} of {name} is protected")]
    Protected { point: String, name: String, spec: String },
    /// An index file cannot be read; `consequence` says what the operation did about it.
    #[error("index file {file} is damaged ({why}): {consequence}")]
    DamagedIndex { file: String, why: String, consequence: String },
    /// A request that cannot be carried out as given (an empty retention policy).
    #[error("{0}")]
    Invalid(String),
    /// The local folder holding a large index's entries (see `index::SpillConfig`) failed.
    #[error("local index cache: {0}")]
    Cache(String),
    /// Two repositories that cannot exchange blocks as they are (a copy between repositories
    /// that name blocks differently).
    #[error("{0}")]
    Incompatible(String),
    #[error("repository is locked: {0}")]
    Locked(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub type Result<T> = std::result::Result<T, Error>;
