//! Validated names from producers: repository URLs (against the configured
//! policy) and branch names (git's check-ref-format rules, and stricter).

use std::net::IpAddr;
use std::path::{Component, PathBuf};

/// Which repositories jobs may name (from `[git]`).
#[derive(Debug, Clone)]
pub struct RepoPolicy {
    /// e.g. ["https", "ssh"]; `file` is governed by `allow_local`.
    pub allowed_schemes: Vec<String>,
    /// Host names, or "*" for any (loopback and private addresses still
    /// need `allow_local`).
    pub allowed_hosts: Vec<String>,
    /// `file://` URLs, absolute paths and this machine's addresses
    /// (`ORCH_GIT_ALLOW_LOCAL=true`): for tests and local use.
    pub allow_local: bool,
}

/// A repository URL that passed the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    Remote {
        url: String,
        scheme: String,
        host: String,
    },
    Local {
        path: PathBuf,
    },
}

impl RepoUrl {
    /// What git is given.
    pub fn as_git_url(&self) -> String {
        match self {
            RepoUrl::Remote { url, .. } => url.clone(),
            RepoUrl::Local { path } => path.display().to_string(),
        }
    }
}

const MAX_URL: usize = 2048;

fn is_local_host(host: &str) -> bool {
    let host = host.trim_matches(|c| c == '[' || c == ']');
    if host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xfe00) == 0xfc00
        }
        Err(_) => false,
    }
}

impl RepoPolicy {
    pub fn check(&self, raw: &str) -> Result<RepoUrl, String> {
        if raw.is_empty() || raw.len() > MAX_URL {
            return Err(format!("repo must be 1 to {MAX_URL} characters"));
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("repo must not contain spaces or control characters".into());
        }
        if raw.starts_with('-') {
            return Err("repo must not start with '-'".into());
        }
        // An absolute path, or a file:// URL: local.
        if raw.starts_with('/') || raw.starts_with("file://") {
            let path = if let Some(rest) = raw.strip_prefix("file://") {
                PathBuf::from(rest)
            } else {
                PathBuf::from(raw)
            };
            if !self.allow_local {
                return Err("local repositories (paths, file://) are not allowed; set git.allow_local or ORCH_GIT_ALLOW_LOCAL=true".into());
            }
            if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err("a local repository must be an absolute path without '..'".into());
            }
            return Ok(RepoUrl::Local { path });
        }
        // scp-like syntax: user@host:path.
        let (scheme, host, user, has_password) = if !raw.contains("://") {
            let (userhost, _path) = raw.split_once(':').ok_or_else(|| {
                "repo must be a URL (https://…, ssh://…), user@host:path, or an absolute path"
                    .to_string()
            })?;
            let (user, host) = userhost
                .split_once('@')
                .map_or((None, userhost), |(u, h)| (Some(u.to_owned()), h));
            ("ssh".to_owned(), host.to_lowercase(), user, false)
        } else {
            let url = url::Url::parse(raw).map_err(|e| format!("repo is not a valid URL: {e}"))?;
            let host = url
                .host_str()
                .ok_or_else(|| "repo URL has no host".to_string())?
                .to_lowercase();
            let user = (!url.username().is_empty()).then(|| url.username().to_owned());
            (
                url.scheme().to_owned(),
                host,
                user,
                url.password().is_some(),
            )
        };
        if !self
            .allowed_schemes
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&scheme))
        {
            return Err(format!(
                "repo scheme {scheme:?} is not allowed; allowed: {}",
                self.allowed_schemes.join(", ")
            ));
        }
        let ssh_user_only = scheme == "ssh" && user.as_deref().is_some_and(|u| u == "git");
        if has_password || (user.is_some() && !ssh_user_only) {
            return Err(
                "repo must not carry credentials; the worker takes them from its environment"
                    .into(),
            );
        }
        if host.is_empty() || host.starts_with('-') {
            return Err("repo has no valid host".into());
        }
        if is_local_host(&host) && !self.allow_local {
            return Err(format!(
                "repo host {host} is this machine or a private address; not allowed unless git.allow_local"
            ));
        }
        if !self
            .allowed_hosts
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(&host))
        {
            return Err(format!("repo host {host} is not in git.allowed_hosts"));
        }
        Ok(RepoUrl::Remote {
            url: raw.to_owned(),
            scheme,
            host,
        })
    }
}

/// A branch name that is safe as `refs/heads/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchName(String);

impl BranchName {
    pub const MAX_LEN: usize = 200;

    /// git's check-ref-format rules for a branch, and stricter: printable
    /// ASCII only, no leading '-', at most 200 characters.
    pub fn parse(name: &str) -> Result<BranchName, String> {
        let fail = |why: &str| {
            Err(format!(
                "branch {:?} is not allowed: {why}",
                name.chars().take(60).collect::<String>()
            ))
        };
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return fail("it must be 1 to 200 characters");
        }
        if !name.chars().all(|c| c.is_ascii_graphic()) {
            return fail("only printable ASCII, no spaces or control characters");
        }
        if name.starts_with('-') {
            return fail("it must not start with '-'");
        }
        if name.contains("..") || name.contains("@{") || name == "@" {
            return fail("it must not contain '..' or '@{'");
        }
        if name
            .chars()
            .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
        {
            return fail("it must not contain ~ ^ : ? * [ or \\");
        }
        if name.starts_with('/')
            || name.ends_with('/')
            || name.contains("//")
            || name.ends_with('.')
        {
            return fail("no leading, trailing or doubled '/', no trailing '.'");
        }
        for part in name.split('/') {
            if part.starts_with('.') || part.ends_with(".lock") {
                return fail("no part may start with '.' or end with '.lock'");
            }
        }
        Ok(BranchName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn refname(&self) -> String {
        format!("refs/heads/{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_local: bool) -> RepoPolicy {
        RepoPolicy {
            allowed_schemes: vec!["https".into(), "ssh".into()],
            allowed_hosts: vec!["github.com".into(), "gitlab.example.org".into()],
            allow_local,
        }
    }

    #[test]
    fn allowed_urls_pass() {
        let p = policy(false);
        assert!(matches!(
            p.check("https://github.com/acme/app.git"),
            Ok(RepoUrl::Remote { .. })
        ));
        assert!(matches!(
            p.check("git@github.com:acme/app.git"),
            Ok(RepoUrl::Remote { .. })
        ));
        assert!(matches!(
            p.check("ssh://git@gitlab.example.org/acme/app"),
            Ok(RepoUrl::Remote { .. })
        ));
    }

    #[test]
    fn hostile_urls_are_refused_with_a_reason() {
        let p = policy(false);
        for (url, why) in [
            ("http://github.com/acme/app", "scheme"),
            ("git://github.com/acme/app", "scheme"),
            ("https://evil.example.com/x", "allowed_hosts"),
            ("https://user:token@github.com/acme/app", "credentials"),
            ("https://token@github.com/acme/app", "credentials"),
            ("https://127.0.0.1/repo", "this machine"),
            ("https://localhost/repo", "this machine"),
            ("https://[::1]/repo", "this machine"),
            ("https://10.0.0.5/repo", "private"),
            ("file:///etc", "local"),
            ("/srv/repos/app", "local"),
            ("../../etc/passwd", "URL"),
            ("-uhttps://github.com/x", "'-'"),
            ("--upload-pack=touch /tmp/pwned", "spaces"),
            ("https://github.com/a b", "spaces"),
            ("ext::sh -c touch% /tmp/pwned", "spaces"),
            ("", "1 to"),
        ] {
            let err = p.check(url).expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn local_repositories_only_when_allowed() {
        let p = policy(true);
        assert!(matches!(
            p.check("/srv/repos/app"),
            Ok(RepoUrl::Local { .. })
        ));
        assert!(matches!(
            p.check("file:///srv/repos/app"),
            Ok(RepoUrl::Local { .. })
        ));
        assert!(p.check("/srv/../etc").is_err());
    }

    #[test]
    fn branch_names_follow_check_ref_format_and_more() {
        for good in ["feature/x", "orchestrator/0190-abc", "fix-1.2", "a"] {
            assert!(BranchName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-rf",
            "a..b",
            "a/../b",
            "../etc",
            "x.lock",
            "a/.hidden",
            "a//b",
            "/a",
            "a/",
            "a.",
            "a b",
            "a\tb",
            "a\u{7}b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[b",
            "a\\b",
            "@",
            "a@{1}",
            "fé",
            "a\u{202e}b",
        ] {
            assert!(BranchName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(BranchName::parse(&"x".repeat(201)).is_err());
        assert_eq!(
            BranchName::parse("feature/x").map(|b| b.refname()),
            Ok("refs/heads/feature/x".into())
        );
    }
}
