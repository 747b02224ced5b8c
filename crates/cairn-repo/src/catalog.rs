//! Catalog records (FORMAT.md §11): what verification, quarantine, protection, prune and
//! immutability keep about points and packs. Each record is a sealed JSON document with a
//! `kind` and a body typed here, one struct per kind ([`CatalogRecord`]). Reading checks the
//! body of every kind this version knows against its type: one that does not fit is a damaged
//! record (named by `Repository::damaged_records`, which makes forget and prune refuse, as for
//! a record that cannot be read at all); a kind it does not know (a newer writer's) is skipped.
//! Reading and writing them is `Repository`'s (`records_of`, `typed_records`, `save_typed`).

use crate::index::{pack_id_from_name, PackId};
use crate::{Error, PointId, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

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

/// A record body of one kind: how it is written ([`Repository::save_typed`]) and read back
/// ([`Repository::typed_records`]). Fields a newer writer adds are ignored when reading.
pub trait CatalogRecord: Serialize + DeserializeOwned {
    const KIND: RecordKind;
}

/// A boot check's verdict for a point (`cairn_vm::boot::BootCheck` writes it, plus the
/// screenshot and where the report was mailed). Only what readers use is typed here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootVerification {
    pub point: PointId,
    pub vm: String,
    pub time: String,
    /// "passed" or "failed".
    pub verdict: String,
    pub reason: String,
    /// The screen when the verdict was reached, PNG as base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailed_to: Option<String>,
}

/// When each pack (by name) was last read whole and sound, RFC 3339. The newest record wins.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyState {
    pub time: String,
    pub packs: BTreeMap<String, String>,
}

/// Block copies verify proved damaged, `[pack name, block ID]`: left out of the index until a
/// backup stores the block again. Readers take the union of every quarantine record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Quarantine {
    pub time: String,
    pub copies: Vec<(String, String)>,
}

/// A point nothing may remove.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Protection {
    pub point: PointId,
    pub time: String,
    /// The host that protected it.
    pub by: String,
}

/// Packs a prune found unused, `[pack name, unix seconds it was marked]` (FORMAT.md §12).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneMarks {
    pub time: String,
    pub packs: Vec<(String, u64)>,
}

/// How long packs are locked in an immutable repository (FORMAT.md §13), by lock date.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ObjectLocks {
    pub time: String,
    pub groups: Vec<LockGroup>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockGroup {
    /// Unix seconds.
    pub until: u64,
    pub packs: Vec<String>,
}

/// Each body type is the kind of the same name.
macro_rules! record_types {
    ($($kind:ident),*) => {
        $(impl CatalogRecord for $kind {
            const KIND: RecordKind = RecordKind::$kind;
        })*
        impl RecordKind {
            /// Why `record`'s body does not fit this kind's type, if it does not.
            pub fn misfit(self, record: &Value) -> Option<String> {
                fn check<R: CatalogRecord>(record: &Value) -> Option<String> {
                    R::deserialize(record).err().map(|e| format!("not a valid {} record: {e}", R::KIND.as_str()))
                }
                match self {
                    $(RecordKind::$kind => check::<$kind>(record),)*
                }
            }
        }
    };
}
record_types!(BootVerification, VerifyState, Quarantine, Protection, PruneMarks, ObjectLocks);

/// `body` as a record of its kind: its fields and `kind`.
pub(crate) fn to_record<R: CatalogRecord>(body: &R) -> Value {
    let mut record = serde_json::to_value(body).expect("record bodies serialize");
    record["kind"] = R::KIND.as_str().into();
    record
}

/// Records of one kind, typed (their bodies were checked when read: see the module docs).
pub fn typed<R: CatalogRecord>(records: &[(String, Value)]) -> Result<Vec<(String, R)>> {
    records
        .iter()
        .filter(|(_, r)| RecordKind::of(r) == Some(R::KIND))
        .map(|(name, r)| {
            let body = R::deserialize(r).map_err(|e| {
                Error::Corrupt(format!("catalog record {}: not a valid {} record: {e}", short(name), R::KIND.as_str()))
            })?;
            Ok((name.clone(), body))
        })
        .collect()
}

/// The marks of every marks record: pack → unix seconds it was marked (the earliest, when
/// records disagree: a crash between writing a new record and deleting the old).
pub fn marks_in(records: &[(String, PruneMarks)]) -> HashMap<PackId, u64> {
    let mut out: HashMap<PackId, u64> = HashMap::new();
    for (_, r) in records {
        for (name, at) in &r.packs {
            let Some(pack) = pack_id_from_name(name) else { continue };
            out.entry(pack).and_modify(|t| *t = (*t).min(*at)).or_insert(*at);
        }
    }
    out
}

/// The point a record is about: a boot verification's or a protection's (checked when read).
pub fn point_of(record: &Value) -> Option<PointId> {
    match RecordKind::of(record)? {
        RecordKind::BootVerification => BootVerification::deserialize(record).ok().map(|r| r.point),
        RecordKind::Protection => Protection::deserialize(record).ok().map(|r| r.point),
        _ => None,
    }
}

fn short(name: &str) -> &str {
    &name[..name.len().min(8)]
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

    #[test]
    fn bodies_round_trip_and_misfits_are_named() {
        let marks = PruneMarks { time: "t".into(), packs: vec![("ab".repeat(32), 7)] };
        let record = to_record(&marks);
        assert_eq!(record["kind"], "prune-marks");
        assert_eq!(RecordKind::PruneMarks.misfit(&record), None);
        let back: Vec<(String, PruneMarks)> = typed(&[("n".into(), record)]).unwrap();
        assert_eq!(back[0].1.packs, marks.packs);
        // As older versions wrote them: a protection, a verify state, a boot verification.
        let id = PointId::of_sealed(b"p");
        for (kind, body) in [
            (RecordKind::Protection, serde_json::json!({"kind": "protection", "point": id, "time": "t", "by": "h"})),
            (RecordKind::VerifyState, serde_json::json!({"kind": "verify-state", "time": "t", "packs": {"ab": "t"}})),
            (RecordKind::Quarantine, serde_json::json!({"kind": "quarantine", "time": "t", "copies": [["ab", "cd"]]})),
            (
                RecordKind::ObjectLocks,
                serde_json::json!({"kind": "object-locks", "time": "t", "groups": [{"until": 9, "packs": ["ab"]}]}),
            ),
            (
                RecordKind::BootVerification,
                serde_json::json!({"kind": "boot-verification", "point": id, "vm": "web", "uuid": "u", "time": "t",
                    "verdict": "passed", "reason": "r", "boot_ms": 1, "screenshot": "iVBO", "mailed_to": null}),
            ),
        ] {
            assert_eq!(kind.misfit(&body), None, "{body}");
        }
        // Bodies that do not fit their kind.
        for (kind, body) in [
            (
                RecordKind::Protection,
                serde_json::json!({"kind": "protection", "point": "../x", "time": "t", "by": "h"}),
            ),
            (
                RecordKind::PruneMarks,
                serde_json::json!({"kind": "prune-marks", "time": "t", "packs": [["ab", "soon"]]}),
            ),
            (RecordKind::Quarantine, serde_json::json!({"kind": "quarantine", "time": "t"})),
        ] {
            let why = kind.misfit(&body).unwrap_or_else(|| panic!("{body} passed"));
            assert!(why.contains(kind.as_str()), "{why}");
        }
    }
}
