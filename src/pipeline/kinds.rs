//! Job kinds as data: `workers/<kind>/worker.toml` describes the sandbox a
//! kind runs in (image, command, resources, network, which environment
//! variables of the worker it may receive, timeouts). Validated at startup;
//! errors name the file and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::gates::GatesFile;
use crate::job::JobKind;
use crate::sandbox::egress::Allowlist;
use crate::sandbox::{Limits, Network};

/// The placeholders in `command` replaced by the payload's script (or task).
pub const SCRIPT_PLACEHOLDER: &str = "{script}";
pub const TASK_PLACEHOLDER: &str = "{task}";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindFile {
    /// The sandbox image, e.g. `orchestrator/script-agent:latest`.
    pub image: String,
    /// argv; `{script}` as a whole element is replaced by the payload's
    /// `script` (never spliced into a string).
    pub command: Vec<String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub network: Network,
    /// With `network = "egress"`: the hosts the sandbox may reach through
    /// the worker's proxy (`host`, `*.domain`, an IP address; `:port`,
    /// 443 by default). Required with egress, refused without it.
    #[serde(default)]
    pub egress: Vec<String>,
    /// Environment variables of the *worker* passed into the sandbox, e.g.
    /// an LLM API key. Injected at start; never stored or logged.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Fixed, non-secret environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_grace")]
    pub stop_grace_secs: u64,
    /// Quality gates run after the git stage (`[gates]`, `[[gates.gate]]`).
    #[serde(default)]
    pub gates: GatesFile,
    /// Jobs of this kind may push to a branch that already exists on the
    /// remote (the base branch included) without the admin scope.
    #[serde(default)]
    pub allow_existing_branch: bool,
    /// Most jobs of this kind sharing a concurrency key (by default the
    /// repository and the branch pushed to) that run at once.
    #[serde(default)]
    pub max_per_key: Option<u32>,
    /// What a throttled agent (its provider's 429) leads to. Without it,
    /// `::retry-after::` lines are ignored: an agent's output is data, and
    /// only a kind that asks for it lets that output reschedule a job.
    #[serde(default)]
    pub throttle: Option<Throttle>,
}

/// `[throttle]` of a kind: an agent that prints `::retry-after::<seconds>`
/// and exits non-zero, or exits with `exit_code`, is run again after the
/// delay it asked for (never less than `min_delay_secs`), else after
/// `delay_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Throttle {
    pub exit_code: Option<i64>,
    /// The delay when the agent asked for none.
    pub delay_secs: u64,
    /// The least delay an agent may ask for: what it prints is an
    /// adversary's data, and a kind may not want to be re-run at once.
    pub min_delay_secs: u64,
    /// Whether a throttled run uses up an attempt.
    pub counts_attempt: bool,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            exit_code: None,
            delay_secs: 60,
            min_delay_secs: 1,
            counts_attempt: false,
        }
    }
}

impl Throttle {
    /// How long a throttled job waits: what the agent asked for, but at
    /// least `min_delay_secs`; `delay_secs` when it asked for nothing.
    pub fn delay(&self, asked: Option<u64>) -> Duration {
        Duration::from_secs(asked.map_or(self.delay_secs, |a| a.max(self.min_delay_secs)))
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub memory_mb: i64,
    pub cpus: f64,
    pub pids: i64,
    pub tmp_mb: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_mb: 512,
            cpus: 1.0,
            pids: 256,
            tmp_mb: 64,
        }
    }
}

fn default_timeout() -> u64 {
    600
}

fn default_grace() -> u64 {
    10
}

/// A validated kind.
#[derive(Debug, Clone)]
pub struct KindDef {
    pub kind: JobKind,
    pub file: PathBuf,
    pub image: String,
    pub command: Vec<String>,
    pub limits: Limits,
    pub network: Network,
    /// What `network = "egress"` lets through (empty otherwise).
    pub egress: Arc<Allowlist>,
    pub secrets: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u64,
    pub stop_grace_secs: u64,
    pub gates: GatesFile,
    pub allow_existing_branch: bool,
    pub max_per_key: Option<u32>,
    pub throttle: Option<Throttle>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {field}: {message}", file.display())]
pub struct KindError {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
}

fn err(file: &Path, field: &str, message: impl Into<String>) -> KindError {
    KindError {
        file: file.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

fn env_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl KindDef {
    pub fn parse(kind: &str, file: &Path, text: &str) -> Result<KindDef, KindError> {
        let kind = JobKind::parse(kind).map_err(|e| err(file, "(folder name)", e.to_string()))?;
        let raw: KindFile = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| format!("at bytes {}..{}", s.start, s.end))
                .unwrap_or_default();
            err(file, &field, e.message().to_owned())
        })?;
        if raw.image.trim().is_empty() {
            return Err(err(file, "image", "must name an image"));
        }
        if raw.command.is_empty() || raw.command[0].is_empty() {
            return Err(err(file, "command", "must be a non-empty argv array"));
        }
        let r = raw.resources;
        if !(4..=65_536).contains(&r.memory_mb) {
            return Err(err(
                file,
                "resources.memory_mb",
                "must be between 4 and 65536",
            ));
        }
        if !(r.cpus > 0.0 && r.cpus <= 64.0) {
            return Err(err(
                file,
                "resources.cpus",
                "must be above 0 and at most 64",
            ));
        }
        if !(1..=100_000).contains(&r.pids) {
            return Err(err(file, "resources.pids", "must be between 1 and 100000"));
        }
        if !(1..=65_536).contains(&r.tmp_mb) {
            return Err(err(file, "resources.tmp_mb", "must be between 1 and 65536"));
        }
        for name in raw.secrets.iter().chain(raw.env.keys()) {
            if !env_name_ok(name) {
                return Err(err(
                    file,
                    "secrets/env",
                    format!("{name:?} is not an environment variable name"),
                ));
            }
        }
        if raw.timeout_secs == 0 || raw.timeout_secs > 86_400 {
            return Err(err(file, "timeout_secs", "must be between 1 and 86400"));
        }
        let throttle = raw.throttle.unwrap_or_default();
        if throttle.delay_secs == 0 || throttle.delay_secs > crate::job::MAX_RETRY_AFTER_SECS {
            return Err(err(
                file,
                "throttle.delay_secs",
                "must be between 1 and 86400",
            ));
        }
        if throttle.exit_code.is_some_and(|c| !(1..=255).contains(&c)) {
            return Err(err(file, "throttle.exit_code", "must be between 1 and 255"));
        }
        if raw.max_per_key.is_some_and(|n| n == 0 || n > 10_000) {
            return Err(err(file, "max_per_key", "must be between 1 and 10000"));
        }
        if raw.stop_grace_secs == 0 || raw.stop_grace_secs > 600 {
            return Err(err(file, "stop_grace_secs", "must be between 1 and 600"));
        }
        let egress =
            Allowlist::parse(&raw.egress).map_err(|e| err(file, "egress", e.to_string()))?;
        match (raw.network, egress.is_empty()) {
            (Network::Egress, true) => {
                return Err(err(
                    file,
                    "egress",
                    "network = \"egress\" needs the hosts it may reach, e.g. egress = [\"api.anthropic.com\"]",
                ))
            }
            (Network::None | Network::Bridge, false) => {
                return Err(err(
                    file,
                    "egress",
                    "an egress list needs network = \"egress\"",
                ))
            }
            _ => {}
        }
        raw.gates
            .validate(&raw.image)
            .map_err(|(field, message)| err(file, &field, message))?;
        Ok(KindDef {
            kind,
            file: file.to_owned(),
            image: raw.image,
            command: raw.command,
            limits: Limits {
                memory_bytes: r.memory_mb * 1024 * 1024,
                nano_cpus: (r.cpus * 1e9) as i64,
                pids: r.pids,
                tmp_bytes: r.tmp_mb * 1024 * 1024,
            },
            network: raw.network,
            egress: Arc::new(egress),
            secrets: raw.secrets,
            env: raw.env,
            timeout_secs: raw.timeout_secs,
            stop_grace_secs: raw.stop_grace_secs,
            gates: raw.gates,
            allow_existing_branch: raw.allow_existing_branch,
            max_per_key: raw.max_per_key,
            throttle: raw.throttle,
        })
    }

    /// Every `workers/<kind>/worker.toml` under `dir`, sorted by kind.
    pub fn load_dir(dir: &Path) -> Result<Vec<KindDef>, KindError> {
        let mut defs = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(defs),
            Err(e) => return Err(err(dir, "(directory)", e.to_string())),
        };
        for entry in entries {
            let entry = entry.map_err(|e| err(dir, "(directory)", e.to_string()))?;
            let file = entry.path().join("worker.toml");
            if !file.is_file() {
                continue;
            }
            let kind = entry.file_name().to_string_lossy().into_owned();
            let text =
                std::fs::read_to_string(&file).map_err(|e| err(&file, "(file)", e.to_string()))?;
            defs.push(KindDef::parse(&kind, &file, &text)?);
        }
        defs.sort_by(|a, b| a.kind.cmp(&b.kind));
        Ok(defs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KindDef, KindError> {
        KindDef::parse("k", Path::new("workers/k/worker.toml"), text)
    }

    #[test]
    fn a_throttle_keeps_the_asked_delay_above_its_floor() {
        let t = parse(
            "command = [\"x\"]\nimage = \"i\"\n[throttle]\ndelay_secs = 3600\nmin_delay_secs = 5\n",
        )
        .expect("kind")
        .throttle
        .expect("throttle");
        assert_eq!(t.delay(None), Duration::from_secs(3600), "none asked");
        assert_eq!(t.delay(Some(30)), Duration::from_secs(30), "as asked");
        assert_eq!(t.delay(Some(1)), Duration::from_secs(5), "the floor");
        let d = Throttle::default();
        assert_eq!((d.delay_secs, d.min_delay_secs), (60, 1));
    }

    #[test]
    fn the_shipped_kinds_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers");
        let kinds = KindDef::load_dir(&dir).expect("every workers/*/worker.toml is valid");
        let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(names, vec!["claude-code", "script-agent"]);
        let claude = &kinds[0];
        assert_eq!(claude.secrets, vec!["ANTHROPIC_API_KEY".to_owned()]);
        assert_eq!(claude.network, Network::Egress);
        assert!(!claude.egress.is_empty());
        assert!(claude.command.iter().any(|a| a == TASK_PLACEHOLDER));
        for kind in &kinds {
            assert!(
                dir.join(kind.kind.as_str()).join("Dockerfile").is_file(),
                "{} has a Dockerfile",
                kind.kind
            );
        }
    }

    #[test]
    fn a_minimal_kind_gets_defaults() {
        let d =
            parse("image = \"img\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\n").expect("valid");
        assert_eq!(d.network, Network::None);
        assert_eq!(d.limits.memory_bytes, 512 * 1024 * 1024);
        assert_eq!(d.timeout_secs, 600);
    }

    #[test]
    fn egress_needs_its_list_and_the_list_needs_egress() {
        let base = "image = \"img\"\ncommand = [\"sh\"]\n";
        let e = parse(&format!("{base}network = \"egress\"\n")).unwrap_err();
        assert_eq!(e.field, "egress", "{e}");
        let e = parse(&format!("{base}egress = [\"api.example.com\"]\n")).unwrap_err();
        assert_eq!(e.field, "egress", "{e}");
        let e = parse(&format!(
            "{base}network = \"egress\"\negress = [\"127.1\"]\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("127.1"), "{e}");
        let d = parse(&format!(
            "{base}network = \"egress\"\negress = [\"api.example.com\", \"*.pypi.org\"]\n"
        ))
        .expect("valid");
        assert_eq!(d.network, Network::Egress);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = parse("image = \"img\"\ncommand = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("workers/k/worker.toml: command:"), "{e}");
        let e = parse("image = \"img\"\ncommand = [\"sh\"]\n[resources]\nmemory_mb = 1\ncpus = 1.0\npids = 1\ntmp_mb = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resources.memory_mb"), "{e}");
        let e = parse("image = \"img\"\ncommand = [\"sh\"]\nsecrets = [\"A B\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets"), "{e}");
        let e = parse("image = \"img\"\ncommand = [\"sh\"]\nsurprise = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
