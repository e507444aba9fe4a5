//! Outgoing HTTP on a producer's or an operator's behalf: webhook deliveries
//! and the `http` gate's coordinator. Two parts:
//!
//! - [`Signer`]: the Standard Webhooks signature (`webhook-id`,
//!   `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//!   "id.timestamp.body">`), with every configured secret at once so that a
//!   rotation has no gap, and its check of an answer.
//! - [`Client`]: a POST that follows no redirect, uses no proxy, is bounded in
//!   time and in the bytes it reads back, and connects only to addresses the
//!   policy allows. The policy is applied by the resolver, to the addresses
//!   the connection then uses, so a name that resolves to a public address
//!   when checked and to 127.0.0.1 when connecting (DNS rebinding) is
//!   refused all the same.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::net::{is_local_addr, HttpUrl};
use crate::secret::Secret;

/// The prefix of a Standard Webhooks secret; the rest is base64.
const SECRET_PREFIX: &str = "whsec_";
/// The fewest key bytes a secret may decode to.
const MIN_KEY_BYTES: usize = 24;
/// The longest a name may take to resolve at enqueue.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How far an answer's timestamp may be from this host's clock.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook secret #{index}: {message}")]
    BadSecret { index: usize, message: String },
    #[error("the HTTP client could not be built: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why an answer's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the answer is not signed (webhook-id, webhook-timestamp and webhook-signature are required)")]
    Unsigned,
    #[error("the answer's webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("the answer's webhook-timestamp is more than {TIMESTAMP_TOLERANCE_SECS}s from this host's clock")]
    Stale,
    #[error("no signature of the answer matches a configured secret")]
    Mismatch,
}

/// Signs with every configured secret (the newest first): during a
/// rotation, receivers that know either secret accept every message.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    /// Secrets in the Standard Webhooks form, `whsec_<base64 key>`.
    pub fn new(secrets: &[Secret]) -> Result<Signer, WebhookError> {
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, s)| {
                decode_secret(s.expose())
                    .map_err(|message| WebhookError::BadSecret { index, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Signer {
            keys: Arc::new(keys),
        })
    }

    /// No secret configured: nothing can be signed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `webhook-signature` header: one `v1,<base64>` per secret.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.keys
            .iter()
            .map(|key| format!("v1,{}", signature(key, id, timestamp, body)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Checks a signed message (an answer) against every secret, in
    /// constant time per comparison; `now` is Unix seconds.
    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signatures: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        let (Some(id), Some(timestamp), Some(signatures)) = (id, timestamp, signatures) else {
            return Err(VerifyError::Unsigned);
        };
        let ts: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::BadTimestamp)?;
        if (now - ts).abs() > TIMESTAMP_TOLERANCE_SECS {
            return Err(VerifyError::Stale);
        }
        let given: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .collect();
        for key in self.keys.iter() {
            let mut mac = mac(key, id, ts, body);
            for sig in &given {
                // `verify_slice` compares in constant time; it consumes the
                // MAC, so each comparison gets a copy.
                if mac.clone().verify_slice(sig).is_ok() {
                    return Ok(());
                }
            }
            mac.reset();
        }
        Err(VerifyError::Mismatch)
    }
}

fn decode_secret(raw: &str) -> Result<Vec<u8>, String> {
    let b64 = raw.trim().strip_prefix(SECRET_PREFIX).ok_or(
        "must be whsec_ followed by base64 (make one with `orchestrator webhooks secret`)",
    )?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        // The decoder's error names a character of the secret: not shown.
        .map_err(|_| "the part after whsec_ is not valid base64".to_owned())?;
    if key.len() < MIN_KEY_BYTES {
        return Err(format!(
            "decodes to {} bytes; at least {MIN_KEY_BYTES} are needed",
            key.len()
        ));
    }
    Ok(key)
}

/// A new random secret in the Standard Webhooks form.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    Ok(format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(mac(key, id, timestamp, body).finalize().into_bytes())
}

/// What a POST got back.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The answer's own signature headers (the `http` gate checks them).
    pub webhook_id: Option<String>,
    pub webhook_timestamp: Option<String>,
    pub webhook_signature: Option<String>,
    /// At most the client's body limit; `truncated` says whether more came.
    pub body: Vec<u8>,
    pub truncated: bool,
    pub elapsed: Duration,
}

/// Why a POST got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("refused by the address policy: {0}")]
    Refused(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Http(String),
}

/// A POST client with the bounds and the address policy of this module.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    allow_local: bool,
    timeout: Duration,
    body_limit: usize,
}

impl Client {
    pub fn new(
        timeout: Duration,
        allow_local: bool,
        body_limit: usize,
    ) -> Result<Client, WebhookError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("orchestrator/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(PolicyResolver { allow_local }))
            .build()
            .map_err(WebhookError::Client)?;
        Ok(Client {
            http,
            allow_local,
            timeout,
            body_limit,
        })
    }

    /// POSTs `body` (JSON) to `url` with the signature headers of
    /// `signer` under message `id`. The URL is checked again here: the
    /// policy may have changed since it was stored.
    pub async fn post(
        &self,
        url: &str,
        signer: &Signer,
        id: &str,
        body: Vec<u8>,
    ) -> Result<Answer, SendError> {
        let url = HttpUrl::parse(url, self.allow_local).map_err(SendError::Refused)?;
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signer.sign(id, timestamp, &body);
        let started = Instant::now();
        let sent = self
            .http
            .post(url.url().clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut response = sent.map_err(|e| self.failure(e))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (webhook_id, webhook_timestamp, webhook_signature) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        let mut truncated = false;
        // Read no more than the limit: the rest is never downloaded.
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.body_limit - bytes.len();
                    if chunk.len() > room {
                        bytes.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.failure(e)),
            }
        }
        Ok(Answer {
            status,
            webhook_id,
            webhook_timestamp,
            webhook_signature,
            body: bytes,
            truncated,
            elapsed: started.elapsed(),
        })
    }

    fn failure(&self, err: reqwest::Error) -> SendError {
        if err.is_timeout() {
            return SendError::Timeout(self.timeout);
        }
        // A URL can carry a credential (a token in its path or query):
        // errors that are logged and stored name no URL.
        let err = err.without_url();
        // The resolver's refusal is the innermost cause.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut chain = Vec::new();
        while let Some(e) = source {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return SendError::Refused(refused.0.clone());
            }
            chain.push(e.to_string());
            source = e.source();
        }
        chain.dedup();
        SendError::Http(chain.join(": "))
    }
}

/// A name that resolved to an address the policy forbids.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Resolves with the system resolver, then refuses the whole answer when
/// any address is local (unless allowed), as the git remotes' check does.
struct PolicyResolver {
    allow_local: bool,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_local = self.allow_local;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_local {
                if let Some(local) = addrs.iter().find(|a| is_local_addr(a.ip())) {
                    return Err(Box::new(Refused(format!(
                        "{host} resolves to {}, this machine or a private address; not allowed unless webhooks.allow_local",
                        local.ip()
                    ))) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Resolves `url`'s host now and refuses it when an address is local (the
/// check at enqueue; sending checks again).
pub async fn check_resolves(url: &HttpUrl, allow_local: bool) -> Result<(), String> {
    let Some(host) = url.domain() else {
        // A literal address was checked when the URL was parsed.
        return Ok(());
    };
    if allow_local {
        return Ok(());
    }
    let port = url.url().port_or_known_default().unwrap_or(443);
    let lookup = tokio::net::lookup_host((host, port));
    let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
        .await
        .map_err(|_| format!("host {host} did not resolve within {RESOLVE_TIMEOUT:?}"))?
        .map_err(|e| format!("host {host} does not resolve: {e}"))?;
    for addr in addrs {
        if is_local_addr(addr.ip()) {
            return Err(format!(
                "host {host} resolves to {}, this machine or a private address; not allowed unless webhooks.allow_local",
                addr.ip()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> Secret {
        Secret::new(format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        ))
    }

    #[test]
    fn the_standard_webhooks_example_signs_as_published() {
        // The example of the Standard Webhooks specification.
        let signer = Signer::new(&[Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")])
            .expect("the specification's secret");
        // It decodes to 24 bytes, the least this module takes.
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signer.sign(id, 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        signer
            .verify(
                Some(id),
                Some("1614265330"),
                Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
                body,
                1614265330 + 10,
            )
            .expect("its own signature");
    }

    #[test]
    fn two_secrets_sign_at_once_and_either_verifies() {
        let both = Signer::new(&[secret(1), secret(2)]).expect("secrets");
        let header = both.sign("msg_1", 100, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        for only in [secret(1), secret(2)] {
            let one = Signer::new(&[only]).expect("secret");
            one.verify(Some("msg_1"), Some("100"), Some(&header), b"{}", 100)
                .expect("a receiver with either secret accepts");
        }
        let other = Signer::new(&[secret(3)]).expect("secret");
        assert_eq!(
            other.verify(Some("msg_1"), Some("100"), Some(&header), b"{}", 100),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn verification_refuses_what_is_unsigned_stale_or_changed() {
        let signer = Signer::new(&[secret(7)]).expect("secret");
        let header = signer.sign("msg_1", 1000, b"{\"pass\":true}");
        let verify = |id, ts, sig, body: &[u8], now| signer.verify(id, ts, sig, body, now);
        assert_eq!(
            verify(Some("msg_1"), Some("1000"), None, b"{}", 1000),
            Err(VerifyError::Unsigned)
        );
        assert_eq!(
            verify(Some("msg_1"), Some("soon"), Some(&header), b"{}", 1000),
            Err(VerifyError::BadTimestamp)
        );
        assert_eq!(
            verify(
                Some("msg_1"),
                Some("1000"),
                Some(&header),
                b"{\"pass\":true}",
                2000
            ),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(
                Some("msg_1"),
                Some("1000"),
                Some(&header),
                b"{\"pass\":false}",
                1000
            ),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(
                Some("msg_2"),
                Some("1000"),
                Some(&header),
                b"{\"pass\":true}",
                1000
            ),
            Err(VerifyError::Mismatch)
        );
        assert!(verify(
            Some("msg_1"),
            Some("1000"),
            Some(&header),
            b"{\"pass\":true}",
            1000
        )
        .is_ok());
    }

    #[test]
    fn secrets_must_be_standard_and_long_enough() {
        for bad in [
            "plain-text-secret-of-some-length",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert!(Signer::new(&[Secret::new(bad)]).is_err(), "{bad}");
        }
        let made = new_secret().expect("randomness");
        assert!(Signer::new(&[Secret::new(made)]).is_ok());
    }
}
