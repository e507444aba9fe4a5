//! Quality gates: each runs in a fresh sandbox against the committed tree
//! (mounted read-only), with its own timeout, and records name, passed,
//! duration and an output tail. Four types: a command; a coverage gate (a
//! command whose coverage figure, from its output or a report file, must
//! reach a threshold); an AI review gate (a reviewer container, never the
//! agent's image, reads the diff and answers
//! `{"approved": bool, "confidence": 0..1, "summary": "..."}`); and an
//! `http` gate, which runs no container: it POSTs the change to a
//! coordinator, signed like a webhook, and takes its signed answer
//! `{"pass": bool, "confidence": 0..1, "reason": "..."}`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::git::workspace::{read_relative, Limits};

/// The profiles a job may pick (or `custom`, a list of gate names).
pub const PROFILES: [&str; 3] = ["strict", "standard", "minimal"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateType {
    Command,
    Coverage,
    AiReview,
    Http,
}

/// A gate as `worker.toml` defines it (`[[gates.gate]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: GateType,
    /// argv, run with the committed tree at /workspace (read-only); none
    /// for an `http` gate.
    #[serde(default)]
    pub command: Vec<String>,
    /// Defaults to the kind's image; an AI review gate must name another.
    pub image: Option<String>,
    #[serde(default = "default_gate_timeout")]
    pub timeout_secs: u64,
    /// A required gate stops the pipeline when it fails; an advisory one is
    /// only recorded.
    #[serde(default = "default_true")]
    pub required: bool,
    /// The profiles this gate belongs to.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Coverage: the minimum percentage. AI review and http: the minimum
    /// confidence (default 0.9).
    pub threshold: Option<f64>,
    /// http: the coordinator (default: the deployment's
    /// `gates.coordinator_url`).
    pub url: Option<String>,
    /// Coverage: a report file in the tree (lcov, Cobertura XML or a JSON
    /// summary); without it the figure is read from the output.
    pub report: Option<String>,
}

fn default_gate_timeout() -> u64 {
    600
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesFile {
    /// The profile a job gets when it names none.
    #[serde(default = "default_profile")]
    pub default_profile: String,
    #[serde(default)]
    pub gate: Vec<GateDef>,
    /// The gates no job may leave out without the admin scope (a job that
    /// does is YOLO). Default: the required gates of the default profile.
    #[serde(default)]
    pub required: Option<Vec<String>>,
}

fn default_profile() -> String {
    "standard".to_owned()
}

impl Default for GatesFile {
    /// No gates; the `standard` profile.
    fn default() -> Self {
        GatesFile {
            default_profile: default_profile(),
            gate: Vec::new(),
            required: None,
        }
    }
}

/// What a gate run concluded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateResult {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: GateType,
    /// The image it ran in (a reviewer's is never the agent's).
    pub image: String,
    pub required: bool,
    pub passed: bool,
    pub duration_ms: u64,
    /// Why, when it failed (or the figure it measured).
    pub detail: String,
    /// The last lines of its output.
    pub output_tail: Vec<String>,
}

impl GatesFile {
    /// Checks the definitions of `kind_image`'s kind.
    pub fn validate(&self, kind_image: &str) -> Result<(), (String, String)> {
        let mut names = std::collections::HashSet::new();
        if !PROFILES.contains(&self.default_profile.as_str()) {
            return Err((
                "gates.default_profile".into(),
                format!("must be one of {}", PROFILES.join(", ")),
            ));
        }
        if let Some(unknown) = self
            .required
            .iter()
            .flatten()
            .find(|r| !self.gate.iter().any(|g| &g.name == *r))
        {
            return Err((
                "gates.required".into(),
                format!("names {unknown:?}, which is not a gate of this kind"),
            ));
        }
        for (i, g) in self.gate.iter().enumerate() {
            let field = |f: &str| format!("gates.gate[{i}].{f}");
            if g.name.is_empty()
                || !g
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err((field("name"), "must be letters, digits, '-' or '_'".into()));
            }
            if !names.insert(g.name.clone()) {
                return Err((field("name"), format!("{:?} appears twice", g.name)));
            }
            if g.kind == GateType::Http {
                if !g.command.is_empty() || g.image.is_some() || g.report.is_some() {
                    return Err((
                        field("command"),
                        "an http gate runs no container: no command, image or report".into(),
                    ));
                }
                if let Some(url) = &g.url {
                    // The address policy is applied when it is called.
                    crate::net::HttpUrl::parse(url, true).map_err(|e| (field("url"), e))?;
                }
            } else if g.command.is_empty() {
                return Err((field("command"), "must be a non-empty argv array".into()));
            } else if g.url.is_some() {
                return Err((field("url"), "only an http gate has a url".into()));
            }
            if g.timeout_secs == 0 || g.timeout_secs > 86_400 {
                return Err((field("timeout_secs"), "must be between 1 and 86400".into()));
            }
            if let Some(p) = g.profiles.iter().find(|p| !PROFILES.contains(&p.as_str())) {
                return Err((
                    field("profiles"),
                    format!("{p:?} is not one of {}", PROFILES.join(", ")),
                ));
            }
            match g.kind {
                GateType::Coverage => {
                    if !g.threshold.is_some_and(|t| (0.0..=100.0).contains(&t)) {
                        return Err((
                            field("threshold"),
                            "a coverage gate needs a percentage from 0 to 100".into(),
                        ));
                    }
                }
                GateType::Http => {
                    if g.threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                        return Err((field("threshold"), "a confidence from 0 to 1".into()));
                    }
                }
                GateType::AiReview => {
                    if g.threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                        return Err((field("threshold"), "a confidence from 0 to 1".into()));
                    }
                    if g.image.as_deref().is_none_or(|img| img == kind_image) {
                        return Err((
                            field("image"),
                            "an AI review gate runs a reviewer image, never the agent's own".into(),
                        ));
                    }
                }
                GateType::Command => {}
            }
        }
        Ok(())
    }

    /// The gates a job runs: a profile's, or a custom list of names.
    pub fn select(&self, choice: Option<&Value>) -> Result<Vec<GateDef>, String> {
        match choice {
            None => Ok(self.in_profile(&self.default_profile)),
            Some(Value::String(profile)) if PROFILES.contains(&profile.as_str()) => {
                Ok(self.in_profile(profile))
            }
            Some(Value::String(other)) => Err(format!(
                "payload.gates {other:?} is not a profile; use one of {} or a list of gate names",
                PROFILES.join(", ")
            )),
            Some(Value::Array(names)) => names
                .iter()
                .map(|n| {
                    let name = n
                        .as_str()
                        .ok_or("payload.gates must list gate names (strings)")?;
                    self.gate
                        .iter()
                        .find(|g| g.name == name)
                        .cloned()
                        .ok_or_else(|| {
                            let known: Vec<&str> =
                                self.gate.iter().map(|g| g.name.as_str()).collect();
                            format!(
                                "payload.gates: this kind has no gate {name:?}; it has: {}",
                                known.join(", ")
                            )
                        })
                })
                .collect(),
            Some(_) => Err("payload.gates must be a profile name or a list of gate names".into()),
        }
    }

    /// The names of the gates a job must run (see [`GatesFile::required`]).
    pub fn required_names(&self) -> Vec<String> {
        match &self.required {
            Some(names) => names.clone(),
            None => self
                .in_profile(&self.default_profile)
                .into_iter()
                .filter(|g| g.required)
                .map(|g| g.name)
                .collect(),
        }
    }

    /// The required gates that `selected` leaves out: a job choosing those
    /// gates is YOLO (admin scope, audited like `yolo: true`).
    pub fn dropped(&self, selected: &[GateDef]) -> Vec<String> {
        self.required_names()
            .into_iter()
            .filter(|name| !selected.iter().any(|g| &g.name == name))
            .collect()
    }

    fn in_profile(&self, profile: &str) -> Vec<GateDef> {
        self.gate
            .iter()
            .filter(|g| g.profiles.iter().any(|p| p == profile))
            .cloned()
            .collect()
    }
}

impl GateDef {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Judges a finished run: `exit_code`, its output lines, the tree.
    /// The report file is read as untrusted data: never through a symlink,
    /// never a FIFO or device, at most `limits.max_file_bytes`.
    pub fn judge(
        &self,
        exit_code: i64,
        output: &[String],
        tree: &Path,
        limits: Limits,
    ) -> (bool, String) {
        match self.kind {
            GateType::Command => {
                if exit_code == 0 {
                    (true, "exit code 0".into())
                } else {
                    (false, format!("exit code {exit_code}"))
                }
            }
            GateType::Coverage => {
                if exit_code != 0 {
                    return (
                        false,
                        format!("the coverage command exited with code {exit_code}"),
                    );
                }
                let threshold = self.threshold.unwrap_or(0.0);
                let figure = match &self.report {
                    Some(report) => read_report(tree, Path::new(report), limits),
                    None => coverage_from_output(output)
                        .ok_or_else(|| "no coverage figure in the output".to_owned()),
                };
                match figure {
                    Ok(pct) if pct >= threshold => {
                        (true, format!("coverage {pct:.1}% ≥ {threshold}%"))
                    }
                    Ok(pct) => (
                        false,
                        format!("coverage {pct:.1}% is below the threshold of {threshold}%"),
                    ),
                    Err(e) => (false, e),
                }
            }
            // Judged by `Coordinator::ask`; it never runs a command.
            GateType::Http => (false, "an http gate is judged by its coordinator".into()),
            GateType::AiReview => {
                let threshold = self.threshold.unwrap_or(0.9);
                match review_verdict(output) {
                    Ok(v) if v.approved && v.confidence >= threshold => (
                        true,
                        format!(
                            "approved with confidence {:.2}: {}",
                            v.confidence, v.summary
                        ),
                    ),
                    Ok(v) if v.approved => (
                        false,
                        format!(
                            "approved, but with confidence {:.2} below {threshold}: {}",
                            v.confidence, v.summary
                        ),
                    ),
                    Ok(v) => (
                        false,
                        format!(
                            "not approved (confidence {:.2}): {}",
                            v.confidence, v.summary
                        ),
                    ),
                    Err(e) => (false, e),
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Verdict {
    approved: bool,
    confidence: f64,
    #[serde(default)]
    summary: String,
}

/// The reviewer's answer: the last output line that parses as the verdict.
fn review_verdict(output: &[String]) -> Result<Verdict, String> {
    output
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<Verdict>(l.trim()).ok())
        .filter(|v| (0.0..=1.0).contains(&v.confidence))
        .ok_or_else(|| "the reviewer gave no verdict {\"approved\": bool, \"confidence\": 0..1, \"summary\": \"...\"}".into())
}

/// `coverage: 85.2%`, `TOTAL ... 85%`, `Lines: 85.2%` in the output.
fn coverage_from_output(output: &[String]) -> Option<f64> {
    // A keyword, then (after anything) a whole number with a percent sign.
    let re =
        Regex::new(r"(?i)(?:coverage|total|lines)\b.*?(?:^|[^0-9.])([0-9]{1,3}(?:\.[0-9]+)?)\s*%")
            .ok()?;
    output
        .iter()
        .rev()
        .find_map(|l| re.captures(l).and_then(|c| c[1].parse::<f64>().ok()))
}

/// A coverage percentage from an lcov, Cobertura XML or JSON summary report.
fn read_report(tree: &Path, report: &Path, limits: Limits) -> Result<f64, String> {
    let bytes = read_relative(tree, report, limits)
        .map_err(|e| format!("cannot read the coverage report {}: {e}", report.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let name = report.to_string_lossy();
    if name.ends_with(".json") {
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("coverage report is not JSON: {e}"))?;
        // istanbul's json-summary, or a flat {"coverage": pct}.
        return v["total"]["lines"]["pct"]
            .as_f64()
            .or_else(|| v["coverage"].as_f64())
            .ok_or_else(|| "no total.lines.pct or coverage field in the JSON report".into());
    }
    if text.contains("<coverage") {
        let re =
            Regex::new(r#"<coverage[^>]*\bline-rate="([0-9.]+)""#).map_err(|e| e.to_string())?;
        return re
            .captures(&text)
            .and_then(|c| c[1].parse::<f64>().ok())
            .map(|r| r * 100.0)
            .ok_or_else(|| "no line-rate on <coverage> in the Cobertura report".into());
    }
    // lcov: sum of LH (lines hit) over LF (lines found).
    let (mut hit, mut found) = (0u64, 0u64);
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("LH:") {
            hit += n.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(n) = line.strip_prefix("LF:") {
            found += n.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if found == 0 {
        return Err("the lcov report has no LF/LH lines".into());
    }
    Ok(hit as f64 * 100.0 / found as f64)
}

/// Where `http` gates go: the client (no redirects, the address policy,
/// bounded answers), the coordinator's own signer (never the webhooks':
/// their receivers could forge answers), and the deployment's default
/// coordinator.
#[derive(Clone, Debug)]
pub struct Coordinator {
    pub client: crate::webhook::Client,
    pub signer: crate::webhook::Signer,
    pub default_url: Option<String>,
}

/// The coordinator's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorVerdict {
    pass: bool,
    confidence: f64,
    reason: String,
}

impl Coordinator {
    /// POSTs `review` (JSON) for `gate`, then judges the answer. Fails
    /// closed: no URL, no secret, a timeout, a non-2xx status, an answer
    /// without a valid signature (under any configured secret), a cut-off
    /// or unparsable body, or a confidence outside 0..1 all fail the gate.
    pub async fn ask(&self, gate: &GateDef, message_id: &str, review: &Value) -> (bool, String) {
        let Some(url) = gate.url.as_deref().or(self.default_url.as_deref()) else {
            return (
                false,
                "no coordinator: the gate names no url and gates.coordinator_url is not set".into(),
            );
        };
        if self.signer.is_empty() {
            return (
                false,
                "no coordinator secret (ORCH_COORDINATOR_SECRET or gates.coordinator_secrets): the request could not be signed".into(),
            );
        }
        let body = serde_json::to_vec(review).unwrap_or_default();
        let ask = self.client.post(url, &self.signer, message_id, body);
        let answer = match tokio::time::timeout(gate.timeout(), ask).await {
            Err(_) => {
                return (
                    false,
                    format!(
                        "the coordinator did not answer within {}s",
                        gate.timeout_secs
                    ),
                )
            }
            Ok(Err(e)) => return (false, format!("the coordinator could not be reached: {e}")),
            Ok(Ok(answer)) => answer,
        };
        self.judge(gate, message_id, &answer, chrono::Utc::now().timestamp())
    }

    fn judge(
        &self,
        gate: &GateDef,
        message_id: &str,
        answer: &crate::webhook::Answer,
        now: i64,
    ) -> (bool, String) {
        if !(200..300).contains(&answer.status) {
            return (
                false,
                format!("the coordinator answered HTTP {}", answer.status),
            );
        }
        if answer.truncated {
            return (false, "the coordinator's answer is too large".into());
        }
        if let Err(e) = self.signer.verify(
            answer.webhook_id.as_deref(),
            answer.webhook_timestamp.as_deref(),
            answer.webhook_signature.as_deref(),
            &answer.body,
            now,
        ) {
            return (false, format!("rejected the coordinator's answer: {e}"));
        }
        // A signed answer to another request (replayed) is not an answer.
        if answer.webhook_id.as_deref() != Some(message_id) {
            return (
                false,
                format!("rejected the coordinator's answer: its webhook-id is not this request's ({message_id})"),
            );
        }
        let verdict: CoordinatorVerdict = match serde_json::from_slice(&answer.body) {
            Ok(v) => v,
            Err(e) => {
                return (
                    false,
                    format!("the coordinator's answer is not {{\"pass\": bool, \"confidence\": 0..1, \"reason\": \"...\"}}: {e}"),
                )
            }
        };
        if !(0.0..=1.0).contains(&verdict.confidence) {
            return (
                false,
                format!(
                    "the coordinator's confidence {} is not between 0 and 1",
                    verdict.confidence
                ),
            );
        }
        let threshold = gate.threshold.unwrap_or(0.9);
        let reason: String = verdict
            .reason
            .chars()
            .filter(|c| !c.is_control())
            .take(2000)
            .collect();
        match (verdict.pass, verdict.confidence >= threshold) {
            (true, true) => (
                true,
                format!("passed with confidence {:.2}: {reason}", verdict.confidence),
            ),
            (true, false) => (
                false,
                format!(
                    "passed, but with confidence {:.2} below {threshold}: {reason}",
                    verdict.confidence
                ),
            ),
            (false, _) => (
                false,
                format!("failed (confidence {:.2}): {reason}", verdict.confidence),
            ),
        }
    }
}

/// Gate results as the job's result and events show them.
pub fn summary(results: &[GateResult]) -> BTreeMap<String, Value> {
    results
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                serde_json::to_value(r).unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(kind: GateType, threshold: Option<f64>, report: Option<&str>) -> GateDef {
        GateDef {
            name: "g".into(),
            kind,
            command: vec!["true".into()],
            image: Some("reviewer".into()),
            timeout_secs: 10,
            required: true,
            profiles: vec!["standard".into()],
            threshold,
            report: report.map(str::to_owned),
            url: None,
        }
    }

    #[test]
    fn coverage_is_read_from_output_and_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = gate(GateType::Coverage, Some(80.0), None);
        let (ok, detail) = g.judge(
            0,
            &["TOTAL   120   10   91.7%".into()],
            dir.path(),
            Limits::default(),
        );
        assert!(ok && detail.contains("91.7"), "{detail}");
        let strict = gate(GateType::Coverage, Some(90.0), None);
        let (ok, detail) = strict.judge(
            0,
            &["TOTAL 100 20 80.0%".into()],
            dir.path(),
            Limits::default(),
        );
        assert!(!ok && detail.contains("80.0% is below"), "{detail}");
        assert!(
            !g.judge(
                0,
                &["coverage: 42.5%".into()],
                dir.path(),
                Limits::default()
            )
            .0
        );
        assert!(
            !g.judge(0, &["no figure".into()], dir.path(), Limits::default())
                .0
        );
        std::fs::write(
            dir.path().join("lcov.info"),
            "SF:a\nLF:10\nLH:9\nend_of_record\nSF:b\nLF:10\nLH:7\n",
        )
        .expect("w");
        let (ok, detail) = gate(GateType::Coverage, Some(80.0), Some("lcov.info")).judge(
            0,
            &[],
            dir.path(),
            Limits::default(),
        );
        assert!(ok, "{detail}");
        std::fs::write(
            dir.path().join("cov.xml"),
            "<?xml?><coverage line-rate=\"0.55\" branch-rate=\"0\">",
        )
        .expect("w");
        assert!(
            !gate(GateType::Coverage, Some(80.0), Some("cov.xml"))
                .judge(0, &[], dir.path(), Limits::default())
                .0
        );
        std::fs::write(
            dir.path().join("s.json"),
            r#"{"total":{"lines":{"pct":88.1}}}"#,
        )
        .expect("w");
        assert!(
            gate(GateType::Coverage, Some(80.0), Some("s.json"))
                .judge(0, &[], dir.path(), Limits::default())
                .0
        );
    }

    #[test]
    fn a_review_needs_approval_and_confidence() {
        let g = gate(GateType::AiReview, None, None);
        let dir = tempfile::tempdir().expect("tempdir");
        let say = |s: &str| vec!["thinking...".to_owned(), s.to_owned()];
        assert!(
            g.judge(
                0,
                &say(r#"{"approved": true, "confidence": 0.95, "summary": "ok"}"#),
                dir.path(),
                Limits::default()
            )
            .0
        );
        assert!(
            !g.judge(
                0,
                &say(r#"{"approved": true, "confidence": 0.5, "summary": "meh"}"#),
                dir.path(),
                Limits::default()
            )
            .0
        );
        assert!(
            !g.judge(
                0,
                &say(r#"{"approved": false, "confidence": 0.99, "summary": "no"}"#),
                dir.path(),
                Limits::default()
            )
            .0
        );
        assert!(!g.judge(0, &say("LGTM"), dir.path(), Limits::default()).0);
        assert!(
            !g.judge(
                0,
                &say(r#"{"approved": true, "confidence": 7}"#),
                dir.path(),
                Limits::default()
            )
            .0
        );
    }

    #[test]
    fn profiles_and_custom_lists_select_gates() {
        let mut a = gate(GateType::Command, None, None);
        a.name = "lint".into();
        a.profiles = vec!["strict".into(), "standard".into()];
        let mut b = gate(GateType::Command, None, None);
        b.name = "slow".into();
        b.profiles = vec!["strict".into()];
        let file = GatesFile {
            required: None,
            default_profile: "standard".into(),
            gate: vec![a, b],
        };
        let names = |v: Vec<GateDef>| v.into_iter().map(|g| g.name).collect::<Vec<_>>();
        assert_eq!(names(file.select(None).expect("default")), vec!["lint"]);
        assert_eq!(
            names(file.select(Some(&Value::from("strict"))).expect("strict")),
            vec!["lint", "slow"]
        );
        assert!(file
            .select(Some(&Value::from("minimal")))
            .expect("minimal")
            .is_empty());
        assert_eq!(
            names(
                file.select(Some(&serde_json::json!(["slow"])))
                    .expect("custom")
            ),
            vec!["slow"]
        );
        assert!(file.select(Some(&serde_json::json!(["nope"]))).is_err());
        assert!(file.select(Some(&Value::from("yolo"))).is_err());
    }

    #[test]
    fn the_reviewer_must_not_be_the_agent() {
        let mut g = gate(GateType::AiReview, None, None);
        g.image = Some("agent-image".into());
        let file = GatesFile {
            required: None,
            default_profile: "standard".into(),
            gate: vec![g],
        };
        let err = file.validate("agent-image").expect_err("same image");
        assert!(err.1.contains("never the agent's own"), "{err:?}");
    }
}
