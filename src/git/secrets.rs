//! Secret scanning of a change before it is committed and pushed.
//!
//! Rules are data in gitleaks' TOML format (id, regex, keywords, entropy,
//! secretGroup, path, allowlists), so a user can point at their own gitleaks
//! config; `secret_rules.toml` is our default set. Rules are compiled once;
//! an Aho-Corasick automaton over every rule's keywords picks the rules worth
//! running on a line. A finding names the rule, the file and the line, never
//! the secret. A file that cannot be read is an error, never "clean".

use std::collections::HashMap;
use std::path::Path;

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::{Deserialize, Serialize};

const DEFAULT_RULES: &str = include_str!("secret_rules.toml");

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("secret rules: {0}")]
    Rules(String),
    #[error("cannot read {path} to scan it for secrets: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One secret found: where, and by which rule. Never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub rule_id: String,
    pub description: String,
    pub file: String,
    pub line: usize,
}

// The gitleaks TOML shape (fields we do not use are ignored, as gitleaks'
// own configs carry more).
#[derive(Deserialize)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    allowlist: Option<RawAllowlist>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    id: String,
    #[serde(default)]
    description: String,
    regex: Option<String>,
    path: Option<String>,
    #[serde(default)]
    keywords: Vec<String>,
    entropy: Option<f64>,
    secret_group: Option<usize>,
    allowlist: Option<RawAllowlist>,
    #[serde(default)]
    allowlists: Vec<RawAllowlist>,
}

#[derive(Deserialize, Default)]
struct RawAllowlist {
    #[serde(default)]
    regexes: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    stopwords: Vec<String>,
}

#[derive(Debug, Default)]
struct Allowlist {
    regexes: Vec<Regex>,
    paths: Vec<Regex>,
    stopwords: Vec<String>,
}

impl Allowlist {
    fn compile(raw: &RawAllowlist, what: &str) -> Result<Allowlist, ScanError> {
        let re = |s: &String| {
            Regex::new(s)
                .map_err(|e| ScanError::Rules(format!("{what}: allowlist regex {s:?}: {e}")))
        };
        Ok(Allowlist {
            regexes: raw.regexes.iter().map(re).collect::<Result<_, _>>()?,
            paths: raw.paths.iter().map(re).collect::<Result<_, _>>()?,
            stopwords: raw.stopwords.iter().map(|s| s.to_lowercase()).collect(),
        })
    }

    fn allows_path(&self, path: &str) -> bool {
        self.paths.iter().any(|r| r.is_match(path))
    }

    fn allows_secret(&self, secret: &str) -> bool {
        let lower = secret.to_lowercase();
        self.regexes.iter().any(|r| r.is_match(secret))
            || self.stopwords.iter().any(|w| lower.contains(w.as_str()))
    }
}

#[derive(Debug)]
struct Rule {
    id: String,
    description: String,
    regex: Option<Regex>,
    path: Option<Regex>,
    entropy: Option<f64>,
    secret_group: Option<usize>,
    allow: Vec<Allowlist>,
    has_keywords: bool,
}

/// Compiled rules, ready to scan many files.
#[derive(Debug)]
pub struct Scanner {
    rules: Vec<Rule>,
    keywords: Option<AhoCorasick>,
    /// Keyword index (in the automaton) → the rules it selects.
    keyword_rules: Vec<Vec<usize>>,
    global: Allowlist,
}

/// Shannon entropy in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts: HashMap<char, usize> = HashMap::new();
    let mut n = 0usize;
    for c in s.chars() {
        *counts.entry(c).or_default() += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

impl Scanner {
    /// Our default rule set.
    pub fn default_rules() -> Result<Scanner, ScanError> {
        Scanner::from_toml(DEFAULT_RULES)
    }

    /// A gitleaks-format rules file.
    pub fn from_file(path: &Path) -> Result<Scanner, ScanError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScanError::Rules(format!("{}: {e}", path.display())))?;
        Scanner::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Scanner, ScanError> {
        let file: RulesFile = toml::from_str(text).map_err(|e| ScanError::Rules(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        let mut keywords: Vec<String> = Vec::new();
        let mut keyword_rules: Vec<Vec<usize>> = Vec::new();
        for (index, raw) in file.rules.into_iter().enumerate() {
            let compile = |s: &str| {
                Regex::new(s).map_err(|e| ScanError::Rules(format!("rule {}: {e}", raw.id)))
            };
            let regex = raw.regex.as_deref().map(compile).transpose()?;
            let path = raw.path.as_deref().map(compile).transpose()?;
            if regex.is_none() && path.is_none() {
                return Err(ScanError::Rules(format!(
                    "rule {} has neither regex nor path",
                    raw.id
                )));
            }
            let mut allow = Vec::new();
            for a in raw.allowlist.iter().chain(raw.allowlists.iter()) {
                allow.push(Allowlist::compile(a, &raw.id)?);
            }
            for k in &raw.keywords {
                let k = k.to_lowercase();
                match keywords.iter().position(|x| *x == k) {
                    Some(i) => keyword_rules[i].push(index),
                    None => {
                        keywords.push(k);
                        keyword_rules.push(vec![index]);
                    }
                }
            }
            rules.push(Rule {
                has_keywords: !raw.keywords.is_empty(),
                id: raw.id,
                description: raw.description,
                regex,
                path,
                entropy: raw.entropy,
                secret_group: raw.secret_group,
                allow,
            });
        }
        let automaton = if keywords.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&keywords).map_err(|e| ScanError::Rules(e.to_string()))?)
        };
        let global = match &file.allowlist {
            Some(a) => Allowlist::compile(a, "global")?,
            None => Allowlist::default(),
        };
        Ok(Scanner {
            rules,
            keywords: automaton,
            keyword_rules,
            global,
        })
    }

    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    /// Marks in `runs` the rules to try on `text`: those without keywords,
    /// and those whose keywords the text contains (any case).
    fn select_rules(&self, text: &str, runs: &mut [bool]) {
        for (run, rule) in runs.iter_mut().zip(&self.rules) {
            *run = !rule.has_keywords;
        }
        if let Some(ac) = &self.keywords {
            let lower = text.to_lowercase();
            for m in ac.find_overlapping_iter(&lower) {
                for &r in &self.keyword_rules[m.pattern().as_usize()] {
                    runs[r] = true;
                }
            }
        }
    }

    /// The secrets `rule` (whose regex is `regex`) finds in `text`: each
    /// match's secret group, past the rule's entropy minimum and the
    /// allowlists.
    fn secrets<'t>(
        &'t self,
        rule: &'t Rule,
        regex: &'t Regex,
        text: &'t str,
    ) -> impl Iterator<Item = regex::Match<'t>> + 't {
        regex.captures_iter(text).filter_map(move |caps| {
            let group = rule
                .secret_group
                .unwrap_or(if caps.len() > 1 { 1 } else { 0 });
            let secret = caps.get(group).or_else(|| caps.get(0))?;
            let value = secret.as_str();
            let kept = !rule.entropy.is_some_and(|min| entropy(value) < min)
                && !self.global.allows_secret(value)
                && !rule.allow.iter().any(|a| a.allows_secret(value));
            kept.then_some(secret)
        })
    }

    /// Scans the given lines (number, text) of `file` (a path relative to
    /// the repository), e.g. the lines a change adds.
    pub fn scan_lines<'a>(
        &self,
        file: &str,
        lines: impl IntoIterator<Item = (usize, &'a str)>,
    ) -> Vec<Finding> {
        if self.global.allows_path(file) {
            return Vec::new();
        }
        let mut findings = Vec::new();
        // Rules that match on the path alone.
        for rule in &self.rules {
            if rule.regex.is_none() && rule.path.as_ref().is_some_and(|p| p.is_match(file)) {
                findings.push(self.finding(rule, file, 0));
            }
        }
        let mut runs = vec![false; self.rules.len()];
        for (number, text) in lines {
            self.select_rules(text, &mut runs);
            for (rule, _) in self.rules.iter().zip(&runs).filter(|(_, run)| **run) {
                let Some(regex) = &rule.regex else { continue };
                if rule.path.as_ref().is_some_and(|p| !p.is_match(file)) {
                    continue;
                }
                if rule.allow.iter().any(|a| a.allows_path(file)) {
                    continue;
                }
                if self.secrets(rule, regex, text).next().is_some() {
                    findings.push(self.finding(rule, file, number));
                }
            }
        }
        findings
    }

    /// `text` with every secret the rules find replaced by
    /// `[REDACTED:<rule id>]`, and the ids of the rules that matched (once
    /// per match): for agent output, before it is stored or streamed.
    pub fn redact(&self, text: &str) -> (String, Vec<String>) {
        let mut runs = vec![false; self.rules.len()];
        self.select_rules(text, &mut runs);
        let mut spans: Vec<(usize, usize, &str)> = Vec::new();
        for (rule, _) in self.rules.iter().zip(&runs).filter(|(_, run)| **run) {
            // Rules tied to a file path do not apply to output.
            let (Some(regex), None) = (&rule.regex, &rule.path) else {
                continue;
            };
            spans.extend(
                self.secrets(rule, regex, text)
                    .filter(|secret| !secret.is_empty())
                    .map(|secret| (secret.start(), secret.end(), rule.id.as_str())),
            );
        }
        if spans.is_empty() {
            return (text.to_owned(), Vec::new());
        }
        spans.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
        let mut out = String::with_capacity(text.len());
        let mut ids = Vec::new();
        let mut at = 0;
        for (start, end, id) in spans {
            if start < at {
                // Overlaps a span already redacted: extend it if longer.
                at = at.max(end);
                continue;
            }
            out.push_str(&text[at..start]);
            out.push_str(&format!("[REDACTED:{id}]"));
            ids.push(id.to_owned());
            at = end;
        }
        if at < text.len() {
            out.push_str(&text[at..]);
        }
        (out, ids)
    }

    /// Scans a whole text (a new file).
    pub fn scan_text(&self, file: &str, text: &str) -> Vec<Finding> {
        self.scan_lines(file, text.lines().enumerate().map(|(i, l)| (i + 1, l)))
    }

    /// Scans a file on disk; unreadable is an error, not a clean result.
    /// Binary files (a NUL in the first 8 KiB) are scanned as lossy text.
    pub fn scan_file(&self, root: &Path, file: &str) -> Result<Vec<Finding>, ScanError> {
        let bytes = std::fs::read(root.join(file)).map_err(|source| ScanError::Unreadable {
            path: file.to_owned(),
            source,
        })?;
        Ok(self.scan_text(file, &String::from_utf8_lossy(&bytes)))
    }

    fn finding(&self, rule: &Rule, file: &str, line: usize) -> Finding {
        Finding {
            rule_id: rule.id.clone(),
            description: rule.description.clone(),
            file: file.to_owned(),
            line,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn output_is_redacted_with_the_rules() {
        let scanner = Scanner::default_rules().expect("rules");
        let token = "ghp_aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zAB";
        let (text, rules) = scanner.redact(&format!("pushing with {token} now"));
        assert_eq!(text, "pushing with [REDACTED:github-pat] now");
        assert_eq!(rules, vec!["github-pat".to_owned()]);
        let (text, rules) = scanner.redact("nothing to see, line 42");
        assert_eq!((text.as_str(), rules.len()), ("nothing to see, line 42", 0));
    }

    use super::*;

    /// Synthetic credentials in each provider's public format: (rule,
    /// positive line, negative line).
    fn cases() -> Vec<(&'static str, String, String)> {
        let b62 = "aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zA5bC7dE9fG2hJ4kL6mN8pQ0rS2tU4vW6xY8z";
        vec![
            ("aws-access-key-id", format!("id = AKIA{}", "Q7ZX3LM5NB2VC4DF"), "id = AKIA_EXAMPLE".into()),
            (
                "aws-secret-access-key",
                format!("aws_secret_access_key = {}", &format!("{b62}{b62}")[..40]),
                "aws_secret_access_key = ${AWS_SECRET}".into(),
            ),
            ("gcp-api-key", format!("key: AIza{}", &b62[..35]), "key: AIzaShort".into()),
            (
                "gcp-service-account",
                "{\"type\": \"service_account\", \"project_id\": \"p\", \"private_key\": \"...\"}".into(),
                "{\"type\": \"user\"}".into(),
            ),
            (
                "azure-storage-account-key",
                format!("DefaultEndpointsProtocol=https;AccountKey={}==;", &format!("{b62}{b62}")[..86]),
                "AccountKey=;".into(),
            ),
            ("azure-ad-client-secret", format!("secret: \"abc1Q~{}\"", &b62[..32]), "Q~ alone".into()),
            ("github-pat", format!("token ghp_{}", &b62[..36]), "ghp_short".into()),
            ("github-fine-grained-pat", format!("github_pat_{}", &format!("{b62}{b62}")[..82]), "github_pat_x".into()),
            ("github-app-token", format!("ghs_{}", &b62[..36]), "ghs_".into()),
            ("gitlab-pat", format!("glpat-{}", &b62[..20]), "glpat-".into()),
            ("slack-token", format!("xoxb-{}", "1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"), "xoxb-".into()),
            (
                "slack-webhook",
                format!("https://hooks.slack.com/services/{}", &b62[..44]),
                "https://hooks.slack.com/".into(),
            ),
            ("stripe-key", format!("sk_live_{}", &b62[..24]), "sk_live_".into()),
            ("anthropic-api-key", format!("sk-ant-api03-{}", &format!("{b62}{b62}")[..95]), "sk-ant-".into()),
            (
                "openai-api-key",
                format!("sk-proj-{}T3BlbkFJ{}", &b62[..30], &b62[30..60]),
                "sk-proj-abc".into(),
            ),
            ("private-key", "-----BEGIN OPENSSH PRIVATE KEY-----".into(), "-----BEGIN PUBLIC KEY-----".into()),
            ("private-key", "-----BEGIN RSA PRIVATE KEY-----".into(), "BEGIN PRIVATE".into()),
            (
                "jwt",
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into(),
                "eyJ.eyJ.x".into(),
            ),
            (
                "generic-api-key",
                "api_token = \"q9X2vL7mK4pR8sT1wZ6yB3nC5\"".into(),
                "api_token = \"example-token-placeholder\"".into(),
            ),
        ]
    }

    #[test]
    fn every_default_rule_has_a_positive_and_a_negative_example() {
        let scanner = Scanner::default_rules().expect("default rules compile");
        let mut covered = std::collections::HashSet::new();
        for (rule, positive, negative) in cases() {
            let found = scanner.scan_text("src/config.txt", &positive);
            assert!(
                found.iter().any(|f| f.rule_id == rule),
                "{rule} missed {positive:?}: {found:?}"
            );
            let found = scanner.scan_text("src/config.txt", &negative);
            assert!(
                !found.iter().any(|f| f.rule_id == rule),
                "{rule} flagged {negative:?}"
            );
            covered.insert(rule);
        }
        for id in scanner.rule_ids() {
            assert!(covered.contains(id), "rule {id} has no examples");
        }
    }

    #[test]
    fn findings_name_rule_file_and_line_but_never_the_secret() {
        let scanner = Scanner::default_rules().expect("rules");
        let secret = "ghp_aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zAB";
        let text = format!("line one\nline two\nGITHUB_TOKEN={secret}\n");
        let found = scanner.scan_text("deploy/env", &text);
        assert!(found.iter().any(|f| f.rule_id == "github-pat"), "{found:?}");
        assert!(
            found.iter().all(|f| f.file == "deploy/env" && f.line == 3),
            "{found:?}"
        );
        assert!(!serde_json::to_string(&found)
            .expect("json")
            .contains(secret));
    }

    #[test]
    fn allowlisted_paths_and_low_entropy_values_pass() {
        let scanner = Scanner::default_rules().expect("rules");
        assert!(scanner
            .scan_text("Cargo.lock", "checksum = \"AKIAQ7ZX3LM5NB2VC4DF\"")
            .is_empty());
        assert!(scanner
            .scan_text("a.txt", "password = \"aaaaaaaaaaaaaaaaaaaa\"")
            .is_empty());
    }

    #[test]
    fn unreadable_files_are_errors() {
        let scanner = Scanner::default_rules().expect("rules");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = scanner
            .scan_file(dir.path(), "missing.txt")
            .expect_err("must fail");
        assert!(matches!(err, ScanError::Unreadable { .. }), "{err}");
    }

    #[test]
    fn a_users_gitleaks_config_replaces_the_rules() {
        let custom = r#"
            [[rules]]
            id = "internal-token"
            description = "Our internal tokens"
            regex = '''\b(itk_[a-z0-9]{12})\b'''
            keywords = ["itk_"]
            tags = ["internal"]
        "#;
        let scanner = Scanner::from_toml(custom).expect("gitleaks format");
        assert_eq!(
            scanner.scan_text("x", "t = itk_abcdef123456")[0].rule_id,
            "internal-token"
        );
        assert!(Scanner::from_toml("[[rules]]\nid = \"bad\"\nregex = \"(\"").is_err());
    }

    #[test]
    fn entropy_is_shannon_bits_per_char() {
        assert_eq!(entropy("aaaa"), 0.0);
        assert!((entropy("ab") - 1.0).abs() < 1e-9);
    }
}
