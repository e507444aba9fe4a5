//! Address policy, shared by every part that connects somewhere on a
//! producer's or an agent's behalf (git remotes, the egress proxy): which
//! addresses are this machine, a private network or a cloud metadata
//! service. Pure functions; no I/O.

use std::net::IpAddr;

/// Loopback, private, link-local (the cloud metadata service lives at
/// 169.254.169.254), CGNAT, unspecified, multicast, reserved, broadcast and the IPv6
/// equivalents, IPv4-mapped addresses included.
pub fn is_local_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 224
        }
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_local_addr(IpAddr::V4(v4));
            }
            let seg = ip.segments();
            let first = seg[0];
            // 6to4 (2002:aabb:ccdd::/48) carries an IPv4 address.
            if first == 0x2002 {
                let v4 = std::net::Ipv4Addr::new(
                    (seg[1] >> 8) as u8,
                    seg[1] as u8,
                    (seg[2] >> 8) as u8,
                    seg[2] as u8,
                );
                return is_local_addr(IpAddr::V4(v4));
            }
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (first & 0xfe00) == 0xfc00
                // Link-local fe80::/10 and the old site-local fec0::/10.
                || (first & 0xff80) == 0xfe80
                // IPv4-compatible (::a.b.c.d) and NAT64 forms of an IPv4 address.
                || (seg[..6].iter().all(|s| *s == 0))
                || (first == 0x64 && seg[1] == 0xff9b)
                // Teredo tunnels (2001:0::/32) reach whatever they wrap.
                || (first == 0x2001 && seg[1] == 0)
        }
    }
}

/// `localhost`, a name under `.localhost`, or a literal local address.
pub fn is_local_host(host: &str) -> bool {
    let bare = host.trim_matches(|c| c == '[' || c == ']');
    let name = bare.trim_end_matches('.');
    if name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    bare.parse::<IpAddr>().is_ok_and(is_local_addr)
}

/// The longest URL a webhook or a coordinator may have.
pub const MAX_URL_BYTES: usize = 2048;

/// An `http` or `https` URL a host sends requests to on someone's behalf (a
/// job's `callback_url`, a webhook subscription, a coordinator): parsed once,
/// and its canonical form (the `url` crate's, which the HTTP client uses
/// too) is what is stored, checked and sent to. No credentials, no fragment,
/// and no local host unless `allow_local`; a name that resolves to a local
/// address is refused when it is resolved, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

impl HttpUrl {
    pub fn parse(raw: &str, allow_local: bool) -> Result<HttpUrl, String> {
        if raw.len() > MAX_URL_BYTES {
            return Err(format!("must be at most {MAX_URL_BYTES} bytes"));
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("must not hold whitespace or control characters".into());
        }
        let url = url::Url::parse(raw).map_err(|e| format!("is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {:?} is not http or https", url.scheme()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials (user:password@)".into());
        }
        if url.fragment().is_some() {
            return Err("must not have a #fragment".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("has no host".into()),
        };
        if !allow_local && is_local_host(&host) {
            return Err(format!(
                "host {host} is this machine or a private address; not allowed unless webhooks.allow_local"
            ));
        }
        if url.as_str().len() > MAX_URL_BYTES {
            return Err(format!(
                "must be at most {MAX_URL_BYTES} bytes once normalised"
            ));
        }
        Ok(HttpUrl(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &url::Url {
        &self.0
    }

    /// The host as a name to resolve, or `None` for a literal address.
    pub fn domain(&self) -> Option<&str> {
        self.0.domain()
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_are_canonical_and_refuse_what_the_policy_forbids() {
        let ok = HttpUrl::parse("https://Example.COM:443/hook?a=1", false).expect("valid");
        assert_eq!(ok.as_str(), "https://example.com/hook?a=1");
        for (raw, why) in [
            ("ftp://example.com/", "scheme"),
            ("https://user:pw@example.com/", "credentials"),
            ("https://example.com/#frag", "fragment"),
            ("http://127.0.0.1:9/", "this machine"),
            // Two parsers could read these differently; ours normalises
            // them to 127.0.0.1 before the check.
            ("http://0x7f.1/", "this machine"),
            ("http://2130706433/", "this machine"),
            ("http://[::ffff:127.0.0.1]/", "this machine"),
            ("http://169.254.169.254/latest/meta-data", "this machine"),
            ("http://localhost./", "this machine"),
            ("http://224.0.0.251/", "this machine"),
            ("http://a.localhost/", "this machine"),
            ("https://example.com/\u{0}", "control"),
            ("https://exa mple.com/", "whitespace"),
            ("notaurl", "not a URL"),
        ] {
            let err = HttpUrl::parse(raw, false).expect_err(raw);
            assert!(err.contains(why), "{raw}: {err}");
        }
        assert!(HttpUrl::parse("http://127.0.0.1:9/", true).is_ok());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(HttpUrl::parse(&long, false).is_err());
    }
}
