//! Who may do what: the scopes a token carries. Shared by the settings
//! (tokens are configured with scopes) and every front end that checks them.

use serde::{Deserialize, Serialize};

/// What a token may do. `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Enqueue,
    Read,
    Cancel,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Enqueue => "enqueue",
            Scope::Read => "read",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
        }
    }
}
