//! Roles, and what each may do.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, tokens included.
    Admin,
    /// Jobs (create, change, delete, run), restores and everything a viewer sees; not tokens.
    Operator,
    /// Reads only (jobs, tasks, VMs, points and their boot screens; never a file of a point).
    Viewer,
    /// Runs jobs (creates restore points) and reads; never changes or deletes a job, so never
    /// its retention: what a backup script or a compromised client may hold.
    Backup,
}

/// What a request does, as roles are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read,
    RunJob,
    ChangeJobs,
    /// Restores a point, or reads the files in it.
    Restore,
    ManageTokens,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Backup => "backup",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            "backup" => Role::Backup,
            _ => return None,
        })
    }

    pub fn may(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => action != Action::ManageTokens,
            Role::Viewer => action == Action::Read,
            Role::Backup => matches!(action, Action::Read | Action::RunJob),
        }
    }
}
