//! The agent job payload (public contract) and its validation.

use serde::Deserialize;
use serde_json::Value;

use super::admission::{admit, AdmissionSettings};
use super::git_host::GitHost;
use crate::git::names::BranchName;
use crate::job::PayloadError;

/// Largest script a payload may carry.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;

/// The agent job payload (public contract): the text for the agent
/// (`script` for script-agent, `task` for LLM agents: either name), and, to
/// work on a repository, `repo`, `base`, `branch`, `push`, `message`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentPayload {
    pub script: Option<String>,
    pub task: Option<String>,
    pub repo: Option<String>,
    pub base: Option<String>,
    pub branch: Option<String>,
    #[serde(default)]
    pub push: bool,
    pub message: Option<String>,
    /// A gate profile (`strict`, `standard`, `minimal`) or a list of the
    /// kind's gate names; the kind's default profile when absent.
    pub gates: Option<Value>,
    /// YOLO mode: skip the quality gates (the API requires the admin
    /// scope; the job and its trail say so).
    pub yolo: Option<bool>,
    /// Push to a branch that already exists on the remote (the base
    /// branch included): the admin scope, unless the kind allows it.
    pub allow_existing_branch: Option<bool>,
    /// For the admission policy: the tokens the task is expected to need,
    /// and the model it is for.
    pub estimated_tokens: Option<u64>,
    pub model: Option<String>,
}

impl AgentPayload {
    pub fn text(&self) -> &str {
        self.script
            .as_deref()
            .or(self.task.as_deref())
            .unwrap_or_default()
    }
}

pub(super) fn parse_payload(
    payload: &Value,
    git: Option<&GitHost>,
    admission: &AdmissionSettings,
) -> Result<AgentPayload, PayloadError> {
    let p: AgentPayload = serde_json::from_value(payload.clone()).map_err(|e| {
        format!("payload must look like {{\"script\": \"echo hello\"}} (optionally with repo, base, branch, push, message): {e}")
    })?;
    let text = match (&p.script, &p.task) {
        (Some(_), Some(_)) => return Err("give payload.script or payload.task, not both".into()),
        (None, None) => return Err("payload.script (or payload.task) is required".into()),
        (Some(t), None) | (None, Some(t)) => t,
    };
    if text.trim().is_empty() {
        return Err("payload.script must not be empty".into());
    }
    if text.len() > MAX_SCRIPT_BYTES {
        return Err(PayloadError::Invalid(format!(
            "payload.script is larger than {MAX_SCRIPT_BYTES} bytes"
        )));
    }
    if text.contains('\0') {
        return Err("payload.script must not contain NUL characters".into());
    }
    admit(&p, admission)?;
    if p.yolo == Some(true) && p.gates.is_some() {
        return Err("give payload.gates or payload.yolo, not both".into());
    }
    match (&p.repo, git) {
        (None, _) => {
            if p.base.is_some() || p.branch.is_some() || p.push || p.message.is_some() {
                return Err("payload.base, branch, push and message need payload.repo".into());
            }
        }
        (Some(_), None) => return Err("this deployment has no git stage configured".into()),
        (Some(repo), Some(git)) => {
            git.policy
                .check(repo)
                .map_err(|e| format!("payload.repo: {e}"))?;
            if let Some(b) = &p.base {
                BranchName::parse(b).map_err(|e| format!("payload.base: {e}"))?;
            }
            if let Some(b) = &p.branch {
                BranchName::parse(b).map_err(|e| format!("payload.branch: {e}"))?;
            }
            if p.message
                .as_ref()
                .is_some_and(|m| m.trim().is_empty() || m.len() > 10_000)
            {
                return Err("payload.message must be 1 to 10000 bytes".into());
            }
        }
    }
    Ok(p)
}
