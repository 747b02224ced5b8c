//! The kinds of catalog records (FORMAT.md §11): what verification, quarantine, protection,
//! prune and immutability keep about points and packs. Each record is a sealed JSON document
//! with a `kind`; a reader skips kinds it does not know (a newer writer's).

use crate::{Repository, Result};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A boot check's verdict (and screenshot) for a point.
    BootVerification,
    /// When each pack was last verified (the next verify starts with the oldest).
    VerifyState,
    /// Block copies verify found damaged: left out of the index until healed.
    Quarantine,
    /// A point nothing may remove.
    Protection,
    /// Packs a prune found unused, to delete in a later run.
    PruneMarks,
    /// How long each group of packs is locked in an immutable repository.
    ObjectLocks,
}

impl RecordKind {
    pub const ALL: [RecordKind; 6] = [
        RecordKind::BootVerification,
        RecordKind::VerifyState,
        RecordKind::Quarantine,
        RecordKind::Protection,
        RecordKind::PruneMarks,
        RecordKind::ObjectLocks,
    ];

    /// The `kind` written in the record.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKind::BootVerification => "boot-verification",
            RecordKind::VerifyState => "verify-state",
            RecordKind::Quarantine => "quarantine",
            RecordKind::Protection => "protection",
            RecordKind::PruneMarks => "prune-marks",
            RecordKind::ObjectLocks => "object-locks",
        }
    }

    /// The kind of a record; `None` for a kind this version does not know.
    pub fn of(record: &Value) -> Option<RecordKind> {
        let kind = record["kind"].as_str()?;
        RecordKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl Repository {
    /// The catalog records of one kind, with their names (see [`Repository::load_records`]).
    pub fn records_of(&self, kind: RecordKind) -> Result<Vec<(String, Value)>> {
        Ok(self.load_records()?.into_iter().filter(|(_, r)| RecordKind::of(r) == Some(kind)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_and_unknown_ones_are_none() {
        for k in RecordKind::ALL {
            assert_eq!(RecordKind::of(&serde_json::json!({"kind": k.as_str()})), Some(k));
        }
        assert_eq!(RecordKind::of(&serde_json::json!({"kind": "from-the-future"})), None);
        assert_eq!(RecordKind::of(&serde_json::json!({"no": "kind"})), None);
    }
}
