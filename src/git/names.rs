//! Validated names from producers: repository URLs (against the configured
//! policy) and branch names (git's check-ref-format rules, and stricter).

use std::net::IpAddr;

use crate::net::{is_local_addr, is_local_host};
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
        /// The canonical serialization of the parsed URL: the one string
        /// git, the policy and the credential check all see.
        url: String,
        scheme: String,
        host: String,
        port: u16,
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

    /// The validated host (none for a local path).
    pub fn host(&self) -> Option<&str> {
        match self {
            RepoUrl::Remote { host, .. } => Some(host),
            RepoUrl::Local { .. } => None,
        }
    }

    /// The host of a URL libgit2 asks credentials for, parsed the same way
    /// (`None` when it has none, as for a local path).
    pub fn host_of(url: &str) -> Option<String> {
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
    }

    /// Resolves the host now and refuses it when any address is this
    /// machine, a private network or a metadata service (unless
    /// `allow_local`): checked at enqueue and again before every fetch and
    /// push, since DNS may answer differently in between.
    pub fn check_resolves(&self, allow_local: bool) -> Result<(), Refused> {
        let RepoUrl::Remote { host, port, .. } = self else {
            return Ok(());
        };
        if allow_local {
            return Ok(());
        }
        let addrs = resolve(host, *port)?;
        if addrs.is_empty() {
            return Err(Refused::unresolved(format!(
                "repo host {host} resolves to no address"
            )));
        }
        refuse_local(host, &addrs)
    }
}

/// Refuses `host` when any of its addresses is a local one.
fn refuse_local(host: &str, addrs: &[IpAddr]) -> Result<(), Refused> {
    match addrs.iter().find(|a| is_local_addr(**a)) {
        Some(local) => Err(Refused::from(format!(
            "repo host {host} resolves to {local}, this machine or a private address; not allowed unless git.allow_local"
        ))),
        None => Ok(()),
    }
}

fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, Refused> {
    use std::net::ToSocketAddrs;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    (host, port)
        .to_socket_addrs()
        .map(|a| a.map(|s| s.ip()).collect())
        .map_err(|e| Refused::unresolved(format!("repo host {host} cannot be resolved: {e}")))
}

/// Why a repository URL or a branch name was refused, in words a producer
/// can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    reason: String,
    /// The host could not be resolved now: asking again later may work
    /// (every other refusal is final).
    unresolved: bool,
}

impl Refused {
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether retrying later may help (a DNS failure, not a policy).
    pub fn is_retryable(&self) -> bool {
        self.unresolved
    }

    fn unresolved(reason: String) -> Self {
        Refused {
            reason,
            unresolved: true,
        }
    }
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Refused {
            reason,
            unresolved: false,
        }
    }
}

impl From<&str> for Refused {
    fn from(reason: &str) -> Self {
        Refused::from(reason.to_owned())
    }
}

const MAX_URL: usize = 2048;

impl RepoPolicy {
    /// Validates `raw` and returns its canonical form. Strings two parsers
    /// could read differently are refused outright: backslashes, spaces and
    /// control characters, credentials, percent-encoding in the host, IPv6
    /// zone ids.
    pub fn check(&self, raw: &str) -> Result<RepoUrl, Refused> {
        if raw.is_empty() || raw.len() > MAX_URL {
            return Err(Refused::from(format!(
                "repo must be 1 to {MAX_URL} characters"
            )));
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("repo must not contain spaces or control characters".into());
        }
        if raw.contains('\\') {
            return Err("repo must not contain backslashes (parsers disagree on them)".into());
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
        // scp-like syntax (user@host:path) becomes the ssh:// URL it means,
        // so that one parser reads every form.
        let as_url = if raw.contains("://") {
            raw.to_owned()
        } else {
            let (userhost, path) = raw.split_once(':').ok_or_else(|| {
                "repo must be a URL (https://…, ssh://…), user@host:path, or an absolute path"
                    .to_string()
            })?;
            if userhost.contains(['/', '[', ']']) {
                return Err("repo is not a valid user@host:path".into());
            }
            format!("ssh://{userhost}/{}", path.trim_start_matches('/'))
        };
        let authority = as_url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
            .unwrap_or_default();
        if authority.contains('%') {
            return Err("repo host must not be percent-encoded or carry an IPv6 zone id".into());
        }
        let url = url::Url::parse(&as_url).map_err(|e| format!("repo is not a valid URL: {e}"))?;
        let scheme = url.scheme().to_owned();
        if !self
            .allowed_schemes
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&scheme))
        {
            return Err(Refused::from(format!(
                "repo scheme {scheme:?} is not allowed; allowed: {}",
                self.allowed_schemes.join(", ")
            )));
        }
        let ssh_user_only = scheme == "ssh" && url.username() == "git";
        if url.password().is_some() || (!url.username().is_empty() && !ssh_user_only) {
            return Err(
                "repo must not carry credentials; the worker takes them from its environment"
                    .into(),
            );
        }
        let host = url
            .host_str()
            .ok_or_else(|| "repo URL has no host".to_string())?
            .to_ascii_lowercase();
        if host.is_empty() || host.starts_with('-') {
            return Err("repo has no valid host".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("repo must not have a query or a fragment".into());
        }
        if is_local_host(&host) && !self.allow_local {
            return Err(Refused::from(format!(
                "repo host {host} is this machine or a private address; not allowed unless git.allow_local"
            )));
        }
        if !self
            .allowed_hosts
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(&host))
        {
            return Err(Refused::from(format!(
                "repo host {host} is not in git.allowed_hosts"
            )));
        }
        let port = url
            .port_or_known_default()
            .unwrap_or(if scheme == "ssh" { 22 } else { 443 });
        Ok(RepoUrl::Remote {
            url: url.as_str().to_owned(),
            scheme,
            host,
            port,
        })
    }

    /// [`check`](Self::check), then the host resolved: what enqueue runs.
    /// A host that does not resolve here is accepted (the fetch checks it
    /// again); one that resolves to a local address is not.
    pub fn check_now(&self, raw: &str) -> Result<RepoUrl, Refused> {
        let url = self.check(raw)?;
        if let RepoUrl::Remote { host, port, .. } = &url {
            if !self.allow_local {
                if let Ok(addrs) = resolve(host, *port) {
                    refuse_local(host, &addrs)?;
                }
            }
        }
        Ok(url)
    }
}

/// A branch name that is safe as `refs/heads/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchName(String);

impl BranchName {
    pub const MAX_LEN: usize = 200;

    /// git's check-ref-format rules for a branch, and stricter: printable
    /// ASCII only, no leading '-', at most 200 characters.
    pub fn parse(name: &str) -> Result<BranchName, Refused> {
        let fail = |why: &str| {
            Err(Refused::from(format!(
                "branch {:?} is not allowed: {why}",
                name.chars().take(60).collect::<String>()
            )))
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
            // One URL, two parsers: the url crate reads github.com, libgit2
            // would connect to 127.0.0.1.
            ("https://github.com\\@127.0.0.1:9/x.git", "backslashes"),
            ("https://github.com\\.evil.example/x", "backslashes"),
            ("https://github.com@127.0.0.1/x.git", "credentials"),
            ("https://github.com:x@evil.example.com/x", "credentials"),
            ("https://%67ithub.com/x", "percent-encoded"),
            ("https://127.0.0.%31/x", "percent-encoded"),
            ("https://[fe80::1%25eth0]/x", "zone id"),
            ("https://[::1]:443/x", "this machine"),
            ("https://[::ffff:127.0.0.1]/x", "this machine"),
            ("https://0x7f.1/x", "this machine"),
            ("https://2130706433/x", "this machine"),
            ("https://169.254.169.254/latest", "private"),
            ("https://100.64.0.1/x", "private"),
            ("https://[2002:7f00:1::1]/x", "this machine"),
            ("https://[2002:a9fe:a9fe::1]/x", "this machine"),
            ("https://[fec0::1]/x", "this machine"),
            ("https://[2001:0:4136:e378::1]/x", "this machine"),
            ("https://[ff02::1]/x", "this machine"),
            ("https://localhost./x", "this machine"),
            ("https://github.com/x?upload-pack=evil", "query"),
            ("ssh://-oProxyCommand=x/y", "host"),
        ] {
            let err = p.check(url).expect_err(url);
            assert!(err.reason().contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn the_canonical_form_is_what_git_sees() {
        let p = policy(false);
        let url = |raw: &str| p.check(raw).map(|u| u.as_git_url());
        assert_eq!(
            url("https://GitHub.com/acme/app.git"),
            Ok("https://github.com/acme/app.git".into())
        );
        assert_eq!(
            url("git@github.com:acme/app.git"),
            Ok("ssh://git@github.com/acme/app.git".into())
        );
        assert_eq!(
            url("https://github.com/a/../acme/app.git"),
            Ok("https://github.com/acme/app.git".into())
        );
        // A look-alike host is punycoded, and then not in the list.
        let err = p.check("https://gіthub.com/x").expect_err("cyrillic i");
        assert!(err.reason().contains("xn--"), "{err}");
    }

    #[test]
    fn names_that_resolve_to_this_machine_are_refused() {
        let open = RepoPolicy {
            allowed_schemes: vec!["https".into()],
            allowed_hosts: vec!["*".into()],
            allow_local: false,
        };
        // This machine's own name resolves to a loopback or private
        // address (from /etc/hosts) without being a literal; so does
        // `localhost`, which the name check alone would refuse, so it is
        // built here as if it had passed that check.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .expect("hostname")
            .trim()
            .to_owned();
        let raw = format!("https://{host}/x.git");
        if let Ok(url) = open.check(&raw) {
            if resolve(&host, 443).is_ok() {
                assert!(url.check_resolves(false).is_err(), "{host} resolves here");
                assert!(open.check_now(&raw).is_err());
            }
        }
        let url = RepoUrl::Remote {
            url: "https://localhost/x.git".into(),
            scheme: "https".into(),
            host: "localhost".into(),
            port: 443,
        };
        let err = url.check_resolves(false).expect_err("resolves to loopback");
        assert!(
            err.reason().contains("resolves to 127.0.0.1")
                || err.reason().contains("resolves to ::1"),
            "{err}"
        );
        assert!(url.check_resolves(true).is_ok(), "unless allow_local");
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
