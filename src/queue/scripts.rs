//! The Lua scripts, one per queue operation, compiled into the binary.
//!
//! A script's file is named `verb-<number of keys>.lua`; the count is checked
//! at every call so a caller can never pass the wrong keys. Shared helpers
//! (`includes/common.lua`) are prepended at build time. Calls go through
//! EVALSHA, falling back to loading the script once on NOSCRIPT (after a
//! Valkey restart, say).

use super::Connection;
use redis::{FromRedisValue, Script, ToRedisArgs};

use super::QueueError;

const COMMON: &str = include_str!("lua/includes/common.lua");

macro_rules! lua {
    ($file:literal) => {
        concat!(
            include_str!("lua/includes/common.lua"),
            "\n",
            include_str!(concat!("lua/", $file))
        )
    };
}

pub struct LuaScript {
    name: &'static str,
    num_keys: usize,
    script: Script,
}

impl LuaScript {
    fn new(file: &'static str, source: &'static str) -> Self {
        let (name, num_keys) = parse_file_name(file);
        debug_assert!(source.starts_with(COMMON));
        LuaScript {
            name,
            num_keys,
            script: Script::new(source),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub async fn call<T: FromRedisValue>(
        &self,
        conn: &mut Connection,
        keys: &[&str],
        args: &[impl ToRedisArgs],
    ) -> Result<T, QueueError> {
        if keys.len() != self.num_keys {
            return Err(QueueError::Protocol(format!(
                "script {} takes {} keys, was given {}",
                self.name,
                self.num_keys,
                keys.len()
            )));
        }
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        invocation
            .invoke_async(conn)
            .await
            .map_err(|source| QueueError::Script {
                script: self.name,
                source,
            })
    }
}

/// `claim-12.lua` -> ("claim", 12). File names are compile-time constants, so
/// a malformed one is a programming error caught by the unit test below.
fn parse_file_name(file: &'static str) -> (&'static str, usize) {
    let stem = file.strip_suffix(".lua").unwrap_or(file);
    match stem.rsplit_once('-') {
        Some((name, keys)) => (name, keys.parse().unwrap_or(usize::MAX)),
        None => (stem, usize::MAX),
    }
}

pub struct Scripts {
    pub enqueue: LuaScript,
    pub reindex: LuaScript,
    pub claim: LuaScript,
    pub heartbeat: LuaScript,
    pub ack: LuaScript,
    pub forget: LuaScript,
    pub missing: LuaScript,
    pub request_cancel: LuaScript,
    pub schedule: LuaScript,
    pub promote: LuaScript,
    pub reap: LuaScript,
    pub set_paused: LuaScript,
    pub depth: LuaScript,
    pub engage_kill_switch: LuaScript,
    pub lift_kill_switch: LuaScript,
    pub restore_running: LuaScript,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            enqueue: LuaScript::new("enqueue-6.lua", lua!("enqueue-6.lua")),
            reindex: LuaScript::new("reindex-5.lua", lua!("reindex-5.lua")),
            claim: LuaScript::new("claim-12.lua", lua!("claim-12.lua")),
            heartbeat: LuaScript::new("heartbeat-1.lua", lua!("heartbeat-1.lua")),
            ack: LuaScript::new("ack-2.lua", lua!("ack-2.lua")),
            forget: LuaScript::new("forget-6.lua", lua!("forget-6.lua")),
            missing: LuaScript::new("missing-4.lua", lua!("missing-4.lua")),
            request_cancel: LuaScript::new("requestCancel-1.lua", lua!("requestCancel-1.lua")),
            schedule: LuaScript::new("schedule-5.lua", lua!("schedule-5.lua")),
            promote: LuaScript::new("promote-4.lua", lua!("promote-4.lua")),
            reap: LuaScript::new("reap-1.lua", lua!("reap-1.lua")),
            set_paused: LuaScript::new("setPaused-1.lua", lua!("setPaused-1.lua")),
            depth: LuaScript::new("depth-7.lua", lua!("depth-7.lua")),
            engage_kill_switch: LuaScript::new(
                "engageKillSwitch-1.lua",
                lua!("engageKillSwitch-1.lua"),
            ),
            lift_kill_switch: LuaScript::new("liftKillSwitch-1.lua", lua!("liftKillSwitch-1.lua")),
            restore_running: LuaScript::new("restoreRunning-2.lua", lua!("restoreRunning-2.lua")),
        }
    }

    pub fn all(&self) -> [&LuaScript; 16] {
        [
            &self.enqueue,
            &self.reindex,
            &self.claim,
            &self.heartbeat,
            &self.ack,
            &self.forget,
            &self.missing,
            &self.request_cancel,
            &self.schedule,
            &self.promote,
            &self.reap,
            &self.set_paused,
            &self.depth,
            &self.engage_kill_switch,
            &self.lift_kill_switch,
            &self.restore_running,
        ]
    }

    /// Loads every script into the server's cache (SCRIPT LOAD), so the first
    /// calls go straight to EVALSHA and a syntax error shows up at startup.
    pub async fn load(&self, conn: &mut Connection) -> Result<(), QueueError> {
        for s in self.all() {
            s.script
                .load_async(conn)
                .await
                .map_err(|source| QueueError::Script {
                    script: s.name,
                    source,
                })?;
        }
        Ok(())
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_declares_its_key_count() {
        let scripts = Scripts::new();
        for s in scripts.all() {
            assert!(
                s.num_keys >= 1 && s.num_keys <= 12,
                "{}: {}",
                s.name,
                s.num_keys
            );
        }
        assert_eq!(parse_file_name("claim-12.lua"), ("claim", 12));
        assert_eq!(parse_file_name("setPaused-1.lua"), ("setPaused", 1));
    }
}
