//! Controlled egress (`network = "egress"`): a sandbox on an internal
//! Docker network whose one way out is an allowlisting HTTP CONNECT proxy
//! run by this worker.
//!
//! - **The network.** [`EGRESS_NETWORK`] is an internal bridge: Docker routes
//!   nothing from it to any other network or out of the host, gives it no
//!   DNS forwarding, and (`enable_icc = false`) drops traffic between the
//!   sandboxes on it. Its bridge has a fixed name, [`EGRESS_BRIDGE`].
//! - **The host.** An internal network still reaches the host itself, every
//!   address and port of it, through the bridge. The firewall closes that:
//!   packets from the bridge to this machine go through the `ORCH-EGRESS`
//!   chain, which accepts TCP to the proxy's one port on the bridge address
//!   and drops the rest. So the host's listeners, Valkey, Postgres and the
//!   API are unreachable; so are the metadata service (169.254.169.254) and
//!   private ranges (nothing is routed). IPv6 is off in the sandbox.
//! - **The proxy.** It answers only `CONNECT host:port`, with credentials
//!   that name one running sandbox (`HTTPS_PROXY=http://orch:<token>@…`),
//!   from the egress network only: the token selects that sandbox's kind's
//!   allowlist (`egress = [...]`), and it stops working, its tunnels cut,
//!   when the sandbox ends. A target outside the list, or a name that
//!   resolves to this host (any of its addresses), loopback, link-local
//!   (the metadata service) or, unless `sandbox.egress_allow_local`, a
//!   private address, is refused with 403 before anything is sent; the
//!   proxy connects to the very address it checked, so DNS cannot change
//!   the answer in between. Refusals are counted and reported to the job.
//! - **Bounds.** A client has 3 s to send its request, and at most 64 may
//!   be sending at once; a sandbox holds at most 32 tunnels (429), the
//!   worker 512 (503); a tunnel idle for 5 minutes is closed.
//! - **Checked before every grant.** The network must still be the one this
//!   proxy made (same id, internal, no IPv6, no masquerade, ours), and the
//!   firewall still in place: INPUT jumping to `ORCH-EGRESS` first, the
//!   chain ending in DROP, the proxy's rule in it. Rules lost to a firewall
//!   reload are restored; a network that changed drops the proxy, and the
//!   next job makes a new one.
//!
//! The firewall needs `iptables` and the right to change it (root, or
//! `CAP_NET_ADMIN` in the host's network namespace). Without it, egress
//! jobs are refused with a retryable error: never run with a hole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bollard::models::{NetworkCreateRequest, NetworkInspect as DockerNetwork};
use bollard::query_parameters::InspectNetworkOptions;
use bollard::Docker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::SandboxError;
use crate::job::JobId;
use crate::metrics::{EGRESS_BYTES, EGRESS_REQUESTS};
use crate::net::is_local_addr;

/// The internal Docker network egress sandboxes join.
pub const EGRESS_NETWORK: &str = "orch-egress";
/// Its bridge interface (a name the firewall rules can match; at most 15
/// characters).
pub const EGRESS_BRIDGE: &str = "orch-egress0";
/// The iptables chain every packet from the bridge to this host goes through.
const CHAIN: &str = "ORCH-EGRESS";
/// Marks the accept rules this module writes (with a random id per proxy):
/// a rule whose port nobody listens on any more is a crashed worker's, and
/// is removed.
const RULE_COMMENT: &str = "orchestrator-egress-";

/// Largest CONNECT request head read.
const MAX_HEAD: usize = 8 * 1024;
/// A client that has not sent its whole request by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections still sending their request, at most: past it, new ones
/// are closed unanswered (so waiting connections cannot hold every slot).
const MAX_PENDING: usize = 64;
/// Tunnels one sandbox may hold open at once (429 past it).
const MAX_TUNNELS_PER_GRANT: usize = 32;
/// A tunnel with no byte either way for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most tunnels open at once through one worker's proxy (503 past it);
/// each holds two file descriptors, and the open-file limit is raised to
/// the hard limit at start.
const MAX_TUNNELS: usize = 512;
/// Most refused targets kept per sandbox for its job's trail.
const MAX_DENIALS_KEPT: usize = 32;
/// The user name in the proxy credentials (the password is the token).
const PROXY_USER: &str = "orch";

/// A kind's `egress` list: `host`, `*.domain` (any name below it), or an
/// IP literal, each with `:port` (443 when absent). Names match exactly,
/// ASCII case-insensitively; nothing else gets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: Pattern,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Name(String),
    /// `*.example.com` kept as `.example.com`: a name strictly below it.
    Below(String),
    Ip(IpAddr),
}

/// An `egress` entry that is not `host`, `*.domain` or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host, *.domain or an IP address, optionally with :port")]
pub struct BadEntry(String);

/// Where a CONNECT asks to go, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Host::Name(n) => write!(f, "{n}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
        }
    }
}

/// A DNS name as we accept it: ASCII letters, digits and hyphens in labels
/// of 1 to 63, at most 253 in all, lowercased, no trailing dot. A last
/// label of digits (`127.1`, `0x7f.1`) is refused: resolvers read such
/// names as IPv4 addresses in forms this parser does not.
fn parse_name(raw: &str) -> Option<String> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return None;
        }
    }
    let last = labels.last()?;
    if last.bytes().all(|b| b.is_ascii_digit()) || last.to_ascii_lowercase().starts_with("0x") {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// `host:port`, `[v6]:port`, or (when `default_port`) a bare host.
fn split_host_port(raw: &str, default_port: Option<u16>) -> Option<(&str, u16)> {
    let parse_port = |p: &str| -> Option<u16> {
        // Digits only: no sign, no spaces; port 0 is no port.
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok().filter(|p| *p != 0)
    };
    if let Some(rest) = raw.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, parse_port(p)?)),
            None if after.is_empty() => Some((host, default_port?)),
            None => None,
        };
    }
    match raw.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Some((host, parse_port(p)?)),
        Some(_) => None,
        None => Some((raw, default_port?)),
    }
}

impl Target {
    /// The authority of a CONNECT request: `host:port`, the port required.
    pub fn parse(raw: &str) -> Result<Target, &'static str> {
        let (host, port) = split_host_port(raw, None).ok_or("the target must be host:port")?;
        let host = if raw.starts_with('[') {
            Host::Ip(IpAddr::V6(
                host.parse()
                    .map_err(|_| "the target is not an IPv6 address")?,
            ))
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else {
            Host::Name(parse_name(host).ok_or("the target host is not a DNS name")?)
        };
        Ok(Target { host, port })
    }
}

impl Allowlist {
    /// Validates a kind's `egress` entries.
    pub fn parse(entries: &[String]) -> Result<Allowlist, BadEntry> {
        let mut rules = Vec::with_capacity(entries.len());
        for entry in entries {
            let bad = || BadEntry(entry.clone());
            let (host, port) = split_host_port(entry, Some(443)).ok_or_else(bad)?;
            let pattern = if entry.starts_with('[') {
                Pattern::Ip(IpAddr::V6(host.parse().map_err(|_| bad())?))
            } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
                Pattern::Ip(IpAddr::V4(ip))
            } else if let Some(domain) = host.strip_prefix("*.") {
                // `*.com` would open a whole top-level domain.
                let domain = parse_name(domain)
                    .filter(|d| d.contains('.'))
                    .ok_or_else(bad)?;
                Pattern::Below(format!(".{domain}"))
            } else {
                Pattern::Name(parse_name(host).ok_or_else(bad)?)
            };
            rules.push(Rule {
                host: pattern,
                port,
            });
        }
        Ok(Allowlist { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn allows(&self, target: &Target) -> bool {
        self.rules.iter().any(|rule| {
            rule.port == target.port
                && match (&rule.host, &target.host) {
                    (Pattern::Name(n), Host::Name(t)) => n == t,
                    (Pattern::Below(suffix), Host::Name(t)) => t.ends_with(suffix.as_str()),
                    (Pattern::Ip(ip), Host::Ip(t)) => ip == t,
                    _ => false,
                }
        })
    }
}

/// What one sandbox may reach, while it runs.
struct GrantState {
    job: JobId,
    allow: Arc<Allowlist>,
    denied: Mutex<Vec<String>>,
    /// Cut when the sandbox ends: its tunnels close with it.
    cut: CancellationToken,
    tunnels: Arc<Semaphore>,
}

impl GrantState {
    /// Records a refused target; true the first time (so it is logged once).
    fn deny(&self, what: String) -> bool {
        let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        if denied.len() < MAX_DENIALS_KEPT && !denied.contains(&what) {
            denied.push(what);
            return true;
        }
        false
    }
}

/// Which resolved addresses the proxy connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Public addresses only.
    Public,
    /// Private ones too (`sandbox.egress_allow_local`); never this host,
    /// link-local or metadata.
    Private,
    /// Anything: unit tests, whose upstreams live on loopback.
    #[cfg_attr(not(test), allow(dead_code))]
    Anything,
}

struct Shared {
    grants: Mutex<HashMap<String, Arc<GrantState>>>,
    reach: Reach,
    pending: Arc<Semaphore>,
    tunnels: Arc<Semaphore>,
    /// Only clients from this network (the egress bridge's) are served.
    peers: Option<(Ipv4Addr, u8)>,
}

/// The proxy of one worker: its listener, its firewall rule, the grants of
/// the sandboxes running now. Dropping it stops it and removes the rule.
pub struct EgressProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
    firewall: Option<Firewall>,
    /// The daemon and the network's id, to check the network is still the
    /// one made for this proxy before each grant.
    network: Option<(Docker, String)>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(firewall) = &self.firewall {
            firewall.remove();
        }
    }
}

/// A sandbox's right to use the proxy; revoked (and its tunnels cut) when
/// dropped.
pub struct EgressGrant {
    token: String,
    url: String,
    state: Arc<GrantState>,
    shared: Arc<Shared>,
}

impl EgressGrant {
    /// The `HTTPS_PROXY` value for the sandbox. It holds the grant's token:
    /// pass it like a secret (it opens only this sandbox's allowlist, and
    /// only while the sandbox runs).
    pub fn proxy_url(&self) -> &str {
        &self.url
    }

    /// The targets refused so far, each once (at most 32).
    pub fn denied(&self) -> Vec<String> {
        self.state
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for EgressGrant {
    fn drop(&mut self) {
        self.state.cut.cancel();
        self.shared
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.token);
    }
}

impl EgressProxy {
    /// Makes sure the egress network exists (and is what it must be),
    /// listens on its bridge address, and installs the firewall rule.
    pub async fn start(docker: &Docker, allow_local: bool) -> Result<EgressProxy, SandboxError> {
        // Each tunnel holds two descriptors: use what the hard limit allows.
        if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
            tracing::warn!(error = %err, "could not raise the open-file limit");
        }
        let (network_id, gateway, prefix) = ensure_network(docker).await?;
        let listener = TcpListener::bind((gateway, 0)).await?;
        let port = listener.local_addr()?.port();
        let firewall = Firewall::install(gateway, port).await?;
        let reach = if allow_local {
            Reach::Private
        } else {
            Reach::Public
        };
        let mut proxy = EgressProxy::serve_on(listener, reach, Some((gateway, prefix)))?;
        proxy.firewall = Some(firewall);
        proxy.network = Some((docker.clone(), network_id));
        tracing::info!(addr = %proxy.addr, network = EGRESS_NETWORK, "egress proxy listening");
        Ok(proxy)
    }

    /// Serves the proxy on `listener` (no network, no firewall: what
    /// [`EgressProxy::start`] builds on, and what unit tests use).
    pub fn serve(listener: TcpListener, allow_local: bool) -> Result<EgressProxy, SandboxError> {
        let reach = if allow_local {
            Reach::Private
        } else {
            Reach::Public
        };
        EgressProxy::serve_on(listener, reach, None)
    }

    /// A proxy that connects to any address (its tests' upstreams listen on
    /// loopback, which a real proxy never reaches).
    #[cfg(test)]
    fn serve_unchecked(listener: TcpListener) -> Result<EgressProxy, SandboxError> {
        EgressProxy::serve_on(listener, Reach::Anything, None)
    }

    /// Serves clients from `peers` (a network: address and prefix length),
    /// or from anywhere when `None`.
    fn serve_on(
        listener: TcpListener,
        reach: Reach,
        peers: Option<(Ipv4Addr, u8)>,
    ) -> Result<EgressProxy, SandboxError> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            grants: Mutex::new(HashMap::new()),
            reach,
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            tunnels: Arc::new(Semaphore::new(MAX_TUNNELS)),
            peers,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(EgressProxy {
            shared,
            addr,
            stop,
            firewall: None,
            network: None,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A grant for one sandbox of `job`, allowed `allow`. Checks first that
    /// the network is still the one made for this proxy and the firewall
    /// still closes the host (repairing the rules if they were flushed or
    /// pushed down): an `Err` means the proxy must not be used.
    pub async fn grant(
        &self,
        job: JobId,
        allow: Arc<Allowlist>,
    ) -> Result<EgressGrant, SandboxError> {
        if let Some((docker, id)) = &self.network {
            let network = inspect_network(docker).await?.ok_or_else(|| {
                SandboxError::Spec(format!("the {EGRESS_NETWORK} network is gone"))
            })?;
            if network.id.as_deref() != Some(id.as_str()) {
                return Err(SandboxError::Spec(format!(
                    "the {EGRESS_NETWORK} network was replaced since this proxy started"
                )));
            }
            check_network(&network)?;
        }
        if let Some(firewall) = &self.firewall {
            firewall.verify_or_repair().await?;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let state = Arc::new(GrantState {
            job,
            allow,
            denied: Mutex::new(Vec::new()),
            cut: self.stop.child_token(),
            tunnels: Arc::new(Semaphore::new(MAX_TUNNELS_PER_GRANT)),
        });
        self.shared
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), state.clone());
        Ok(EgressGrant {
            url: format!("http://{PROXY_USER}:{token}@{}", self.addr),
            token,
            state,
            shared: self.shared.clone(),
        })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if !from_network(peer.ip(), shared.peers) {
                    // Not a sandbox of the egress network: never served.
                    continue;
                }
                let Ok(pending) = shared.pending.clone().try_acquire_owned() else {
                    // Too many still sending their request: closed unanswered.
                    continue;
                };
                let shared = shared.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    handle(stream, &shared, &stop, pending).await;
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "egress proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How a request was answered, for the metric and the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    BadRequest,
    NotConnect,
    Unauthenticated,
    Denied,
    Upstream,
    Timeout,
    /// The sandbox holds as many tunnels as it may.
    Busy,
    /// The worker holds as many tunnels as it may.
    Full,
}

impl Refusal {
    fn reply(self) -> &'static [u8] {
        match self {
            Refusal::BadRequest => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::NotConnect => b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Unauthenticated => b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"orchestrator egress\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Denied => b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Upstream => b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Timeout => b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Busy => b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::Full => b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            Refusal::BadRequest | Refusal::NotConnect => "bad_request",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Denied => "denied",
            Refusal::Upstream | Refusal::Timeout => "upstream_error",
            Refusal::Busy | Refusal::Full => "busy",
        }
    }
}

async fn handle(
    mut client: TcpStream,
    shared: &Shared,
    stop: &CancellationToken,
    pending: tokio::sync::OwnedSemaphorePermit,
) {
    let (upstream, grant, early, permits) = match open(&mut client, shared, pending).await {
        Ok(opened) => opened,
        Err(refusal) => {
            metrics::counter!(EGRESS_REQUESTS, "outcome" => refusal.outcome()).increment(1);
            let _ = client.write_all(refusal.reply()).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    metrics::counter!(EGRESS_REQUESTS, "outcome" => "allowed").increment(1);
    tunnel(client, upstream, &early, &grant.cut, stop).await;
    drop(permits);
}

/// The slots an open tunnel holds: its sandbox's and the worker's.
type TunnelPermits = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// Whether `peer` is on the egress network (`None`: any peer, in tests).
fn from_network(peer: IpAddr, network: Option<(Ipv4Addr, u8)>) -> bool {
    let Some((gateway, prefix)) = network else {
        return true;
    };
    let IpAddr::V4(peer) = peer else {
        return false;
    };
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    u32::from(peer) & mask == u32::from(gateway) & mask
}

/// Reads and checks the CONNECT request, then connects; returns the
/// upstream stream, the grant, and any bytes the client sent past the head.
async fn open(
    client: &mut TcpStream,
    shared: &Shared,
    pending: tokio::sync::OwnedSemaphorePermit,
) -> Result<(TcpStream, Arc<GrantState>, Vec<u8>, TunnelPermits), Refusal> {
    let (head, early) = tokio::time::timeout(HEAD_TIMEOUT, read_head(client))
        .await
        .map_err(|_| Refusal::BadRequest)??;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::BadRequest),
    }
    if request.method != Some("CONNECT") {
        return Err(Refusal::NotConnect);
    }
    let grant = authenticate(request.headers, shared).ok_or(Refusal::Unauthenticated)?;
    drop(pending);
    let mine = grant
        .tunnels
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Busy)?;
    let all = shared
        .tunnels
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Full)?;
    let raw = request.path.unwrap_or_default();
    let target = match Target::parse(raw) {
        Ok(t) => t,
        Err(why) => {
            grant.deny(format!("(invalid target: {why})"));
            return Err(Refusal::BadRequest);
        }
    };
    if !grant.allow.allows(&target) {
        if grant.deny(target.to_string()) {
            tracing::warn!(job.id = %grant.job, target = %target, "egress refused: not in the kind's allowlist");
        }
        return Err(Refusal::Denied);
    }
    let addr = resolve(&target, shared.reach)
        .await
        .inspect_err(|refusal| {
            if *refusal == Refusal::Denied
                && grant.deny(format!("{target} (resolves to a local address)"))
            {
                tracing::warn!(job.id = %grant.job, target = %target, "egress refused: resolves to this machine or a private address");
            }
        })?;
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Refusal::Timeout)?
        .map_err(|_| Refusal::Upstream)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .map_err(|_| Refusal::Upstream)?;
    Ok((upstream, grant, early, (mine, all)))
}

/// The request head (through the blank line) and what followed it.
async fn read_head(client: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|_| Refusal::BadRequest)?;
        if n == 0 {
            return Err(Refusal::BadRequest);
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched_from + end + 4;
            let early = buf.split_off(end);
            return Ok((buf, early));
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::BadRequest);
        }
    }
}

/// The grant named by `Proxy-Authorization: Basic base64(orch:<token>)`.
fn authenticate(headers: &[httparse::Header<'_>], shared: &Shared) -> Option<Arc<GrantState>> {
    let value = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))?
        .value;
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, token) = decoded.split_once(':')?;
    if user != PROXY_USER {
        return None;
    }
    shared
        .grants
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(token)
        .cloned()
}

/// The address to connect to: the first the name resolves to, refused when
/// any of them is local (unless `allow_local`).
async fn resolve(target: &Target, reach: Reach) -> Result<SocketAddr, Refusal> {
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), target.port)),
        )
        .await
        .map_err(|_| Refusal::Timeout)?
        .map_err(|_| Refusal::Upstream)?
        .collect(),
    };
    if reach != Reach::Anything {
        // Without the host's own addresses nothing can be shown safe.
        let own = own_addresses().ok_or(Refusal::Denied)?;
        let allow_local = reach == Reach::Private;
        if addrs.iter().any(|a| refused(a.ip(), allow_local, &own)) {
            return Err(Refusal::Denied);
        }
    }
    addrs.into_iter().next().ok_or(Refusal::Upstream)
}

/// Never reached through the proxy: this host (loopback, any address of
/// its interfaces, unspecified), link-local (the metadata service at
/// 169.254.169.254), multicast and broadcast. Other private addresses only
/// with `allow_local`.
fn refused(ip: IpAddr, allow_local: bool, own: &[IpAddr]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let always = own.contains(&ip)
        || match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_unspecified()
                    || v4.is_link_local()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.octets()[0] == 0
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
    always || (!allow_local && is_local_addr(ip))
}

/// The addresses of this host's interfaces (a name that resolves to one of
/// them would reach the host's own listeners).
fn own_addresses() -> Option<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let own = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    Some(own)
}

/// Carries bytes both ways until either side closes, the sandbox ends, or
/// the proxy stops.
async fn tunnel(
    mut client: TcpStream,
    mut upstream: TcpStream,
    early: &[u8],
    cut: &CancellationToken,
    stop: &CancellationToken,
) {
    if !early.is_empty() {
        if upstream.write_all(early).await.is_err() {
            return;
        }
        metrics::counter!(EGRESS_BYTES, "direction" => "sent").increment(early.len() as u64);
    }
    let (mut from_client, mut to_client) = client.split();
    let (mut from_upstream, mut to_upstream) = upstream.split();
    tokio::select! {
        biased;
        () = cut.cancelled() => {}
        () = stop.cancelled() => {}
        // Both directions to their end: one side closing its half (a
        // request sent) must not cut the answer still coming.
        _ = async {
            tokio::join!(
                pump(&mut from_client, &mut to_upstream, "sent"),
                pump(&mut from_upstream, &mut to_client, "received"),
            )
        } => {}
    }
}

/// Copies one direction of a tunnel, counting bytes as they pass, until EOF,
/// an error, or [`IDLE_TIMEOUT`] without a byte.
///
/// Written out rather than `copy_bidirectional`, which has no idle timeout
/// and counts only once a tunnel closes cleanly.
async fn pump<R, W>(from: &mut R, to: &mut W, direction: &'static str)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, from.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        metrics::counter!(EGRESS_BYTES, "direction" => direction).increment(n as u64);
    }
    let _ = to.shutdown().await;
}

/// Creates [`EGRESS_NETWORK`] if missing and checks it is internal, with
/// inter-container traffic off, on [`EGRESS_BRIDGE`]; returns its gateway
/// (the bridge's address on this host) with its prefix length, and the
/// network's id.
async fn ensure_network(docker: &Docker) -> Result<(String, Ipv4Addr, u8), SandboxError> {
    let network = match inspect_network(docker).await? {
        Some(network) => network,
        None => {
            let options = HashMap::from([
                (
                    "com.docker.network.bridge.name".to_owned(),
                    EGRESS_BRIDGE.to_owned(),
                ),
                (
                    "com.docker.network.bridge.enable_icc".to_owned(),
                    "false".to_owned(),
                ),
                (
                    "com.docker.network.bridge.enable_ip_masquerade".to_owned(),
                    "false".to_owned(),
                ),
            ]);
            let created = docker
                .create_network(NetworkCreateRequest {
                    name: EGRESS_NETWORK.to_owned(),
                    driver: Some("bridge".to_owned()),
                    internal: Some(true),
                    enable_ipv6: Some(false),
                    options: Some(options),
                    labels: Some(HashMap::from([(
                        "dev.orchestrator.egress".to_owned(),
                        "true".to_owned(),
                    )])),
                    ..NetworkCreateRequest::default()
                })
                .await;
            match created {
                Ok(_) => {}
                // Another worker created it first.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
            inspect_network(docker).await?.ok_or_else(|| {
                SandboxError::Spec(format!("the {EGRESS_NETWORK} network vanished"))
            })?
        }
    };
    let (gateway, prefix) = check_network(&network)?;
    let id = network
        .id
        .clone()
        .ok_or_else(|| SandboxError::Spec(format!("the {EGRESS_NETWORK} network has no id")))?;
    Ok((id, gateway, prefix))
}

async fn inspect_network(docker: &Docker) -> Result<Option<DockerNetwork>, SandboxError> {
    match docker
        .inspect_network(EGRESS_NETWORK, None::<InspectNetworkOptions>)
        .await
    {
        Ok(network) => Ok(Some(network)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A network of that name someone else made (not internal, another
/// bridge, IPv6, masquerading, not ours) is refused, never used.
fn check_network(network: &DockerNetwork) -> Result<(Ipv4Addr, u8), SandboxError> {
    let wrong = |what: &str| {
        SandboxError::Spec(format!(
            "the Docker network {EGRESS_NETWORK} exists but {what}; remove it (docker network rm {EGRESS_NETWORK}) and the worker makes it again"
        ))
    };
    if network.internal != Some(true) {
        return Err(wrong("is not internal"));
    }
    if network.driver.as_deref() != Some("bridge") {
        return Err(wrong("is not a bridge network"));
    }
    if network.enable_ipv6 == Some(true) {
        return Err(wrong("has IPv6"));
    }
    let labels = network.labels.clone().unwrap_or_default();
    if labels.get("dev.orchestrator.egress").map(String::as_str) != Some("true") {
        return Err(wrong("was not made by orchestrator"));
    }
    let options = network.options.clone().unwrap_or_default();
    let option = |key: &str| options.get(key).map(String::as_str);
    if option("com.docker.network.bridge.name") != Some(EGRESS_BRIDGE) {
        return Err(wrong(&format!("its bridge is not {EGRESS_BRIDGE}")));
    }
    if option("com.docker.network.bridge.enable_icc") != Some("false") {
        return Err(wrong("lets its containers reach each other"));
    }
    if option("com.docker.network.bridge.enable_ip_masquerade") != Some("false") {
        return Err(wrong("masquerades"));
    }
    let config = network
        .ipam
        .as_ref()
        .and_then(|ipam| ipam.config.as_ref())
        .and_then(|configs| {
            configs.iter().find_map(|c| {
                let gateway: Ipv4Addr = c.gateway.as_deref()?.parse().ok()?;
                let prefix: u8 = c.subnet.as_deref()?.split_once('/')?.1.parse().ok()?;
                (prefix <= 32).then_some((gateway, prefix))
            })
        });
    config.ok_or_else(|| wrong("has no IPv4 gateway and subnet"))
}

/// The worker's rule in the `ORCH-EGRESS` chain, and the chain's place: the
/// only traffic from the bridge this host accepts is TCP to the proxy.
///
/// iptables is driven through its command line: the rules are few, and the
/// CLI is the interface every distribution keeps stable (nft-backed or
/// legacy alike). Rules are checked (and repaired) before every grant: a
/// firewall reload or an `iptables-restore` drops them without a word.
struct Firewall {
    accept: Vec<String>,
}

/// The jump from INPUT to our chain, as `iptables -S` prints it.
fn jump_rule() -> String {
    format!("-A INPUT -i {EGRESS_BRIDGE} -j {CHAIN}")
}

impl Firewall {
    async fn install(gateway: Ipv4Addr, port: u16) -> Result<Firewall, SandboxError> {
        let comment = format!(
            "{RULE_COMMENT}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let accept: Vec<String> = [
            CHAIN,
            "-d",
            &format!("{gateway}/32"),
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            &port.to_string(),
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let firewall = Firewall { accept };
        firewall.repair().await?;
        remove_stale_rules().await;
        firewall.verify().await?;
        Ok(firewall)
    }

    /// Our rule as `iptables -S` prints it.
    fn accept_line(&self) -> String {
        format!("-A {}", self.accept.join(" "))
    }

    /// The chain ends in DROP and holds our ACCEPT, and INPUT jumps to it
    /// first; `Err` says what is wrong.
    async fn verify(&self) -> Result<(), SandboxError> {
        let input = iptables_output(&["-S", "INPUT"]).await?;
        let first = input.lines().find(|l| l.starts_with("-A "));
        if first != Some(jump_rule().as_str()) {
            return Err(SandboxError::Spec(format!(
                "the egress firewall is not in place: INPUT does not start with `{}`",
                jump_rule()
            )));
        }
        let chain = iptables_output(&["-S", CHAIN]).await?;
        let rules: Vec<&str> = chain.lines().filter(|l| l.starts_with("-A ")).collect();
        if rules.last() != Some(&format!("-A {CHAIN} -j DROP").as_str()) {
            return Err(SandboxError::Spec(format!(
                "the egress firewall is not in place: {CHAIN} does not end in DROP"
            )));
        }
        if !rules.contains(&self.accept_line().as_str()) {
            return Err(SandboxError::Spec(format!(
                "the egress firewall is not in place: the proxy's rule is missing from {CHAIN}"
            )));
        }
        Ok(())
    }

    /// Writes what is missing, in the order that never leaves a gap: the
    /// chain and its final DROP, our ACCEPT, then the jump at the top of
    /// INPUT (moved there if something was put above it).
    async fn repair(&self) -> Result<(), SandboxError> {
        // Fails when the chain exists; the checks below tell what is there.
        let _ = iptables(&["-N", CHAIN]).await;
        let chain = iptables_output(&["-S", CHAIN]).await?;
        let rules: Vec<&str> = chain.lines().filter(|l| l.starts_with("-A ")).collect();
        let drop_rule = format!("-A {CHAIN} -j DROP");
        if rules.last() != Some(&drop_rule.as_str()) {
            iptables(&["-A", CHAIN, "-j", "DROP"]).await?;
        }
        if !rules.contains(&self.accept_line().as_str()) {
            let mut insert = vec!["-I".to_owned()];
            insert.extend(self.accept.iter().cloned());
            iptables(&insert.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
        let input = iptables_output(&["-S", "INPUT"]).await?;
        let first = input.lines().find(|l| l.starts_with("-A "));
        if first != Some(jump_rule().as_str()) {
            // Insert first, then remove the copies further down.
            iptables(&["-I", "INPUT", "1", "-i", EGRESS_BRIDGE, "-j", CHAIN]).await?;
            let copies = input.lines().filter(|l| *l == jump_rule()).count();
            for _ in 0..copies {
                // `-D` removes the first match, which is now ours at the
                // top: delete by position from the end instead.
                let listing = iptables_output(&["-S", "INPUT"]).await?;
                let positions: Vec<usize> = listing
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .enumerate()
                    .filter(|(_, l)| *l == jump_rule())
                    .map(|(i, _)| i + 1)
                    .collect();
                if let Some(last) = positions.last().filter(|p| **p > 1) {
                    iptables(&["-D", "INPUT", &last.to_string()]).await?;
                }
            }
        }
        Ok(())
    }

    /// Checks the rules, repairing them once if they are not in place.
    async fn verify_or_repair(&self) -> Result<(), SandboxError> {
        if let Err(err) = self.verify().await {
            tracing::warn!(error = %err, "egress firewall rules changed under us; restoring them");
            self.repair().await?;
            self.verify().await?;
        }
        Ok(())
    }

    /// Deletes this worker's rule; blocking, since it runs from `Drop`.
    fn remove(&self) {
        let mut args = vec!["-w".to_owned(), "-D".to_owned()];
        args.extend(self.accept.iter().cloned());
        match std::process::Command::new("iptables").args(&args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => tracing::warn!(
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "could not remove the egress firewall rule"
            ),
            Err(err) => tracing::warn!(error = %err, "could not remove the egress firewall rule"),
        }
    }
}

/// Accept rules nobody listens behind (a crashed worker skips `Drop`): a
/// port left open could be taken by any other process. Liveness is a
/// listening socket on the rule's address and port in this network
/// namespace (`/proc/net/tcp`), which holds across pid namespaces.
async fn remove_stale_rules() {
    let Ok(listing) = iptables_output(&["-S", CHAIN]).await else {
        return;
    };
    let listening = tokio::fs::read_to_string("/proc/net/tcp")
        .await
        .map(|t| listening_sockets(&t))
        .unwrap_or_default();
    for line in listing.lines() {
        if !line.contains(RULE_COMMENT) {
            continue;
        }
        let words = shell_words(line);
        let value = |flag: &str| {
            words
                .iter()
                .position(|w| w == flag)
                .and_then(|i| words.get(i + 1))
        };
        let addr = value("-d")
            .and_then(|d| d.split('/').next())
            .and_then(|d| d.parse::<Ipv4Addr>().ok());
        let port = value("--dport").and_then(|p| p.parse::<u16>().ok());
        let (Some(addr), Some(port)) = (addr, port) else {
            continue;
        };
        if listening.contains(&(addr, port)) {
            continue;
        }
        // `-S` prints `-A CHAIN …`; the same words after `-D` delete it.
        let mut args = vec!["-D"];
        args.extend(words.iter().skip(1).map(String::as_str));
        match iptables(&args).await {
            Ok(()) => tracing::info!(rule = line, "removed a stale egress rule"),
            Err(err) => {
                tracing::warn!(error = %err, rule = line, "could not remove a stale egress rule")
            }
        }
    }
}

/// The IPv4 sockets in LISTEN state, from `/proc/net/tcp` (addresses in
/// hex, host byte order on the little-endian machines Linux runs here).
fn listening_sockets(table: &str) -> Vec<(Ipv4Addr, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&"0A") {
                return None;
            }
            let (addr, port) = fields.get(1)?.split_once(':')?;
            let addr = u32::from_str_radix(addr, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the address as a native-endian u32.
            Some((Ipv4Addr::from(addr.to_le_bytes()), port))
        })
        .collect()
}

/// Splits an `iptables -S` line: words, with double-quoted comments kept
/// whole (our comments have no spaces, but another tool's might).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

async fn iptables(args: &[&str]) -> Result<(), SandboxError> {
    iptables_output(args).await.map(drop)
}

async fn iptables_output(args: &[&str]) -> Result<String, SandboxError> {
    let output = tokio::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .await
        .map_err(|source| SandboxError::Spawn {
            command: "iptables".into(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(SandboxError::Spec(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::parse(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("valid")
    }

    fn target(raw: &str) -> Target {
        Target::parse(raw).expect("valid target")
    }

    #[test]
    fn names_match_exactly_and_wildcards_only_below() {
        let allow = list(&[
            "api.anthropic.com",
            "*.example.com:8443",
            "10.1.2.3:80",
            "[::1]:81",
        ]);
        assert!(allow.allows(&target("api.anthropic.com:443")));
        assert!(allow.allows(&target("API.Anthropic.COM.:443")));
        assert!(!allow.allows(&target("api.anthropic.com:80")));
        assert!(!allow.allows(&target("api.anthropic.com.evil.net:443")));
        assert!(!allow.allows(&target("xapi.anthropic.com:443")));
        assert!(allow.allows(&target("a.b.example.com:8443")));
        assert!(!allow.allows(&target("example.com:8443")));
        assert!(!allow.allows(&target("badexample.com:8443")));
        assert!(allow.allows(&target("10.1.2.3:80")));
        assert!(allow.allows(&target("[::1]:81")));
        assert!(!allow.allows(&target("10.1.2.4:80")));
    }

    #[test]
    fn targets_two_parsers_could_read_differently_are_refused() {
        for raw in [
            "127.1:80",
            "0x7f.0.0.1:80",
            "2130706433:80",
            "host:0",
            "host:+80",
            "host: 80",
            "host",
            "host:80:90",
            "[::1%eth0]:80",
            "ho st:80",
            "host\0:80",
            "user@host:80",
            "host/path:80",
            "-host:80",
            "ex%61mple.com:80",
            "xn--\u{e9}.com:80",
            "[::1]",
            "",
        ] {
            assert!(Target::parse(raw).is_err(), "{raw:?} must be refused");
        }
    }

    #[test]
    fn allowlist_entries_are_validated() {
        for bad in [
            "",
            "*",
            "*.",
            "a..b",
            "host:99999",
            "http://host",
            "host/x",
            "[zz]:1",
        ] {
            assert!(
                Allowlist::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn stale_rule_lines_split_into_words() {
        assert_eq!(
            shell_words(
                r#"ORCH-EGRESS -d 172.18.0.1/32 -p tcp -m comment --comment "a b" -j ACCEPT"#
            ),
            vec![
                "ORCH-EGRESS",
                "-d",
                "172.18.0.1/32",
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                "a b",
                "-j",
                "ACCEPT"
            ]
        );
    }

    /// Sends `request` to the proxy and returns everything it answers.
    async fn ask(proxy: &EgressProxy, request: Vec<u8>) -> String {
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
        stream.write_all(&request).await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn connect_request(target: &str, grant: &EgressGrant, after: &str) -> Vec<u8> {
        let token = grant
            .proxy_url()
            .split_once(':')
            .map(|(_, r)| r)
            .unwrap_or_default();
        let creds = token
            .trim_start_matches("//")
            .split_once('@')
            .map(|(c, _)| c)
            .unwrap_or_default();
        let basic = base64::engine::general_purpose::STANDARD.encode(creds);
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {basic}\r\n\r\n{after}")
            .into_bytes()
    }

    /// An upstream that echoes what it gets, prefixed, and counts callers.
    async fn echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = heard.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf).await {
                        let _ = s.write_all(b"echo:").await;
                        let _ = s.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        (addr, heard)
    }

    /// A proxy on loopback: `None` connects anywhere (upstreams here are on
    /// loopback too); `Some(allow_local)` checks addresses as in service.
    async fn proxy(checked: Option<bool>) -> EgressProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        match checked {
            None => EgressProxy::serve_unchecked(listener),
            Some(allow_local) => EgressProxy::serve(listener, allow_local),
        }
        .expect("serve")
    }

    #[tokio::test]
    async fn an_allowed_target_is_tunnelled_with_the_bytes_sent_early() {
        let (upstream, heard) = echo_server().await;
        let proxy = proxy(None).await;
        let grant = proxy
            .grant(JobId::new(), Arc::new(list(&[&upstream.to_string()])))
            .await
            .expect("grant");
        let answer = ask(
            &proxy,
            connect_request(&upstream.to_string(), &grant, "hello"),
        )
        .await;
        assert_eq!(
            answer,
            "HTTP/1.1 200 Connection established\r\n\r\necho:hello"
        );
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(grant.denied().is_empty());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_this_host_is_refused_even_with_local_allowed() {
        let (upstream, heard) = echo_server().await;
        let target = format!("localhost:{}", upstream.port());
        for allow_local in [false, true] {
            let proxy = proxy(Some(allow_local)).await;
            let grant = proxy
                .grant(JobId::new(), Arc::new(list(&[&target])))
                .await
                .expect("grant");
            let answer = ask(&proxy, connect_request(&target, &grant, "hello")).await;
            assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
            assert_eq!(
                heard.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "nothing was sent"
            );
            assert_eq!(
                grant.denied(),
                vec![format!("{target} (resolves to a local address)")]
            );
        }
    }

    #[test]
    fn this_host_link_local_and_metadata_are_never_reached() {
        let own: Vec<IpAddr> = vec!["172.18.0.1".parse().expect("ip")];
        for allow_local in [false, true] {
            for ip in [
                "127.0.0.1",
                "::1",
                "0.0.0.0",
                "169.254.169.254",
                "fe80::1",
                "172.18.0.1",
                "::ffff:127.0.0.1",
                "224.0.0.1",
            ] {
                let ip: IpAddr = ip.parse().expect("ip");
                assert!(
                    refused(ip, allow_local, &own),
                    "{ip} with allow_local={allow_local}"
                );
            }
        }
        for ip in ["10.1.2.3", "192.168.1.5", "172.20.0.2", "fd00::5"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!(refused(ip, false, &own), "{ip} is private");
            assert!(!refused(ip, true, &own), "{ip} is allowed with allow_local");
        }
        assert!(!refused("93.184.216.34".parse().expect("ip"), false, &own));
    }

    #[test]
    fn listening_sockets_are_read_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 010012AC:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(
            listening_sockets(table),
            vec![("172.18.0.1".parse().expect("ip"), 40000)]
        );
    }

    #[test]
    fn only_the_egress_network_is_served() {
        let net = Some(("172.18.0.1".parse().expect("ip"), 16));
        assert!(from_network("172.18.3.4".parse().expect("ip"), net));
        assert!(!from_network("172.17.0.2".parse().expect("ip"), net));
        assert!(!from_network("127.0.0.1".parse().expect("ip"), net));
        assert!(!from_network("::1".parse().expect("ip"), net));
        assert!(from_network("127.0.0.1".parse().expect("ip"), None));
    }

    #[tokio::test]
    async fn wrong_or_revoked_credentials_and_other_methods_are_refused() {
        let (upstream, heard) = echo_server().await;
        let proxy = proxy(None).await;
        let allow = Arc::new(list(&[&upstream.to_string()]));
        let grant = proxy
            .grant(JobId::new(), allow.clone())
            .await
            .expect("grant");
        let request = connect_request(&upstream.to_string(), &grant, "");
        drop(grant);
        let answer = ask(&proxy, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 407 "),
            "a revoked grant: {answer}"
        );
        let no_auth = format!("CONNECT {upstream} HTTP/1.1\r\n\r\n").into_bytes();
        assert!(ask(&proxy, no_auth).await.starts_with("HTTP/1.1 407 "));
        let grant = proxy.grant(JobId::new(), allow).await.expect("grant");
        let mut get = connect_request(&upstream.to_string(), &grant, "");
        get.splice(0..7, b"GET".iter().copied());
        assert!(ask(&proxy, get).await.starts_with("HTTP/1.1 405 "));
        let mut huge = b"CONNECT ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 20_000));
        assert!(ask(&proxy, huge).await.starts_with("HTTP/1.1 400 "));
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// An upstream that accepts, never answers and never closes.
    async fn silent_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        upstream
    }

    /// A tunnel to `upstream` through `proxy` under `grant`, its 200 read.
    async fn open_tunnel(
        proxy: &EgressProxy,
        upstream: SocketAddr,
        grant: &EgressGrant,
    ) -> TcpStream {
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
        stream
            .write_all(&connect_request(&upstream.to_string(), grant, ""))
            .await
            .expect("write");
        let mut head = [0u8; 39];
        stream.read_exact(&mut head).await.expect("200");
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
        stream
    }

    #[tokio::test]
    async fn one_sandbox_cannot_hold_every_tunnel() {
        let upstream = silent_upstream().await;
        let proxy = proxy(None).await;
        let allow = Arc::new(list(&[&upstream.to_string()]));
        let hog = proxy
            .grant(JobId::new(), allow.clone())
            .await
            .expect("grant");
        let mut open = Vec::new();
        for _ in 0..MAX_TUNNELS_PER_GRANT {
            open.push(open_tunnel(&proxy, upstream, &hog).await);
        }
        let refused = ask(&proxy, connect_request(&upstream.to_string(), &hog, "")).await;
        assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
        let other = proxy.grant(JobId::new(), allow).await.expect("grant");
        // Another sandbox still gets through.
        open_tunnel(&proxy, upstream, &other).await;
    }

    #[tokio::test]
    async fn ending_a_grant_cuts_its_open_tunnels() {
        let upstream = silent_upstream().await;
        let proxy = proxy(None).await;
        let grant = proxy
            .grant(JobId::new(), Arc::new(list(&[&upstream.to_string()])))
            .await
            .expect("grant");
        let mut stream = open_tunnel(&proxy, upstream, &grant).await;
        drop(grant);
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "the tunnel closed: {read:?}");
    }
}
