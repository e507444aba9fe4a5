//! Secret values: a string that never prints itself. Connection URLs hold
//! passwords, tokens are credentials, a kind's API key is passed into its
//! sandbox and nowhere else.

use serde::Deserialize;

/// A string that never prints itself (connection URLs hold passwords).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
