//! The admission policy for agent jobs (the "50% rule").

use serde::Deserialize;

use super::payload::AgentPayload;
use crate::job::PayloadError;

/// The admission policy for agent jobs (the "50% rule").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    /// A task may use at most this fraction of its model's context window.
    pub max_context_fraction: f64,
    /// Context window per model, in tokens.
    pub context_windows: std::collections::BTreeMap<String, u64>,
    /// Most jobs of a queue running at once, across every worker (e.g. to
    /// bound concurrent agents); queues not listed have no limit.
    #[serde(default)]
    pub queue_limits: std::collections::BTreeMap<String, u32>,
    /// Per queue, the most jobs sharing a concurrency key that run at once
    /// (a kind's `max_per_key` comes first; 1 where neither says).
    #[serde(default)]
    pub max_per_key: std::collections::BTreeMap<String, u32>,
    /// Per queue, at most `starts` job starts per `per_secs` (e.g. to stay
    /// under an LLM provider's rate limit); over it, jobs wait.
    #[serde(default)]
    pub rate_limits: std::collections::BTreeMap<String, RateSetting>,
    /// Per queue, the same for each concurrency key of the queue.
    #[serde(default)]
    pub key_rate_limits: std::collections::BTreeMap<String, RateSetting>,
}

/// `{ starts = N, per_secs = W }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSetting {
    pub starts: u32,
    pub per_secs: u64,
}

/// The admission policy (the "50% rule"): a task whose estimated tokens
/// exceed the configured fraction of its model's context window is refused.
pub(super) fn admit(p: &AgentPayload, admission: &AdmissionSettings) -> Result<(), PayloadError> {
    let Some(tokens) = p.estimated_tokens else {
        return Ok(());
    };
    let model = p
        .model
        .as_deref()
        .ok_or("payload.model is required with payload.estimated_tokens")?;
    let Some(window) = admission.context_windows.get(model) else {
        let known: Vec<&str> = admission
            .context_windows
            .keys()
            .map(String::as_str)
            .collect();
        return Err(PayloadError::Invalid(format!(
            "payload.model {model:?} is unknown; known models: {}",
            known.join(", ")
        )));
    };
    let limit = (*window as f64 * admission.max_context_fraction).floor() as u64;
    if tokens > limit {
        return Err(PayloadError::Invalid(format!(
            "payload.estimated_tokens: {tokens} tokens exceed {}% of {model}'s {window}-token context window (at most {limit}); split the task",
            (admission.max_context_fraction * 100.0).round()
        )));
    }
    Ok(())
}
