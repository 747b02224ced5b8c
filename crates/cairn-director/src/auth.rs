//! API tokens and what their roles may do.
//!
//! A token is `cairn.ID.SECRET`: ID (8 random bytes, hex) names it in the catalog, SECRET (32
//! random bytes, hex) proves it. The catalog keeps only SECRET's BLAKE3 hash (a random 256-bit
//! secret needs no slow hash), compared in constant time. The secret is shown once, when the
//! token is made (`cairn server token create`, or `POST /api/tokens` by an admin).

use crate::catalog::Catalog;
pub use crate::roles::{Action, Role};
use anyhow::{Context, Result};
use ring::rand::{SecureRandom, SystemRandom};

/// Who made a request: the token's name and role.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    SystemRandom::new().fill(&mut buf).ok().context("no random bytes from the system")?;
    Ok(hex::encode(buf))
}

fn hash_of(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Makes a token named `name` with `role`; returns it whole (the only time its secret is seen).
pub fn create_token(catalog: &Catalog, name: &str, role: Role) -> Result<String> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        anyhow::bail!(crate::DirectorError::Invalid(format!(
            "{name:?} is not a token name (1 to 64 letters, digits, - _ . @)"
        )));
    }
    let id = random_hex(8)?;
    let secret = random_hex(32)?;
    catalog.add_token(&id, name, role, &hash_of(&secret))?;
    Ok(format!("cairn.{id}.{secret}"))
}

/// The caller a token names, if it is one of the catalog's.
pub fn authenticate(catalog: &Catalog, token: &str) -> Result<Option<Caller>> {
    let mut parts = token.trim().split('.');
    let (Some("cairn"), Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() > 128 {
        return Ok(None);
    }
    let Some((stored, name, role)) = catalog.token(id)? else { return Ok(None) };
    let given = blake3::hash(secret.as_bytes());
    let Ok(stored) = blake3::Hash::from_hex(&stored) else { return Ok(None) };
    // blake3::Hash compares in constant time.
    if given != stored {
        return Ok(None);
    }
    catalog.touch_token(id)?;
    Ok(Some(Caller { name, role }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_itself_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        let token = create_token(&cat, "ci", Role::Backup).unwrap();
        let who = authenticate(&cat, &token).unwrap().unwrap();
        assert_eq!((who.name.as_str(), who.role), ("ci", Role::Backup));
        let (id, secret) = token.strip_prefix("cairn.").unwrap().split_once('.').unwrap();
        let mut wrong = secret.to_string();
        wrong.replace_range(0..1, if &secret[..1] == "0" { "1" } else { "0" });
        for bad in [format!("cairn.{id}.{wrong}"), format!("cairn.{id}"), "".into(), format!("x.{id}.{secret}")] {
            assert!(authenticate(&cat, &bad).unwrap().is_none(), "{bad}");
        }
        assert!(cat.revoke_token("ci").unwrap());
        assert!(authenticate(&cat, &token).unwrap().is_none(), "a revoked token still works");
        assert!(create_token(&cat, "no spaces", Role::Viewer).is_err());
    }

    #[test]
    fn a_backup_token_runs_jobs_but_never_changes_them() {
        assert!(Role::Backup.may(Action::RunJob));
        assert!(!Role::Backup.may(Action::ChangeJobs));
        assert!(!Role::Viewer.may(Action::RunJob));
        assert!(Role::Operator.may(Action::ChangeJobs));
        assert!(!Role::Operator.may(Action::ManageTokens));
        assert!(Role::Admin.may(Action::ManageTokens));
    }
}
