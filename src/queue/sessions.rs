//! Dashboard sessions: small hashes with a TTL, so every replica of the
//! API sees every session. The front end decides what goes in them; this
//! module only stores, reads and deletes.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::{QueueError, ValkeyQueue};

/// The fields a session record may hold; anything else read back is
/// dropped, so a hand-edited record cannot smuggle in more.
pub const SESSION_FIELDS: [&str; 4] = ["name", "binding", "csrf", "created_ms"];

impl ValkeyQueue {
    pub async fn put_session(
        &self,
        id_hash: &str,
        fields: &[(&str, String)],
        ttl: Duration,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let key = self.keys.ui_session(id_hash);
        let _: () = redis::pipe()
            .atomic()
            .del(&key)
            .ignore()
            .hset_multiple(&key, fields)
            .ignore()
            .pexpire(&key, ttl.as_millis() as i64)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The session's fields, or `None` when it does not exist (expired or
    /// logged out).
    pub async fn session(
        &self,
        id_hash: &str,
    ) -> Result<Option<HashMap<String, String>>, QueueError> {
        let mut conn = self.conn.clone();
        let mut fields: HashMap<String, String> =
            conn.hgetall(self.keys.ui_session(id_hash)).await?;
        fields.retain(|k, _| SESSION_FIELDS.contains(&k.as_str()));
        Ok((!fields.is_empty()).then_some(fields))
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(self.keys.ui_session(id_hash)).await?;
        Ok(())
    }
}
