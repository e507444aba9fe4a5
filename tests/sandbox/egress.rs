//! `network = "egress"`, tried from inside a real sandbox: the allowed host
//! (a busybox httpd container on a network this test creates) is reachable
//! through the worker's proxy; a listener on the host, the host's Valkey
//! and 169.254.169.254 are not, neither through the proxy nor directly.

use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orchestrator::job::Status;
use serde_json::json;

use crate::docker_cli;
use crate::support::{request, unique_queue, TestEnv};

const MARKER: &str = "EGRESS-MARKER-7c1f";

/// A network and an httpd container of this test's own, removed on drop.
struct AllowedHost {
    network: String,
    container: String,
    ip: String,
    gateway: String,
}

impl AllowedHost {
    fn start() -> AllowedHost {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let network = format!("orch-test-net-{id}");
        let container = format!("orch-test-httpd-{id}");
        docker_cli(&["network", "create", &network]);
        docker_cli(&[
            "run",
            "-d",
            "--name",
            &container,
            "--network",
            &network,
            "--user",
            "0:0",
            "orchestrator/script-agent:latest",
            "sh",
            "-c",
            &format!("mkdir -p /tmp/www && echo {MARKER} > /tmp/www/m.txt && exec httpd -f -p 80 -h /tmp/www"),
        ]);
        let ip = docker_cli(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &container,
        ]);
        let gateway = docker_cli(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            &network,
        ]);
        AllowedHost {
            network,
            container,
            ip,
            gateway,
        }
    }
}

impl Drop for AllowedHost {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// A listener on every address of this host (so a sandbox could reach it
/// through any bridge's gateway, were nothing in the way), counting callers.
struct HostListener {
    port: u16,
    heard: Arc<AtomicUsize>,
}

impl HostListener {
    fn start() -> HostListener {
        let socket = TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        let heard = Arc::new(AtomicUsize::new(0));
        let h = heard.clone();
        std::thread::spawn(move || {
            for stream in socket.incoming() {
                let Ok(mut stream) = stream else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = stream.read(&mut [0u8; 256]);
            }
        });
        HostListener { port, heard }
    }

    fn heard(&self) -> usize {
        self.heard.load(Ordering::SeqCst)
    }
}

/// The kind under test: the httpd container, plus two entries that name
/// this host (a bridge gateway of the host, and localhost), which the
/// proxy must refuse by address even with `egress_allow_local`.
fn workers_dir(allowed: &str, host_gateway: &str, listener: u16) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("egress-agent");
    std::fs::create_dir_all(&path).expect("mkdir");
    std::fs::write(
        path.join("worker.toml"),
        format!(
            "image = \"orchestrator/script-agent:latest\"\ncommand = [\"sh\", \"-c\", \"{{script}}\"]\n\
             network = \"egress\"\negress = [\"{allowed}:80\", \"api.example.invalid\", \"{host_gateway}:{listener}\", \"localhost:{listener}\"]\n\
             timeout_secs = 120\nstop_grace_secs = 2\n"
        ),
    )
    .expect("write worker.toml");
    dir
}

/// The probe the agent runs: every line it prints is `what:result`.
fn probe(allowed_ip: &str, host_gateway: &str, listener: u16, valkey: u16) -> String {
    format!(
        r#"p=${{HTTPS_PROXY#http://}}; cred=${{p%@*}}; hp=${{p##*@}}; ph=${{hp%:*}}; pp=${{hp##*:}}
auth=$(printf %s "$cred" | base64)
connect() {{ printf 'CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\nGET /m.txt HTTP/1.0\r\n\r\n' "$1" "$1" "$auth" | timeout 10 nc "$ph" "$pp"; }}
r=$(connect {allowed_ip}:80); case "$r" in *{MARKER}*) echo "allowed:reached";; *) echo "allowed:failed";; esac
for t in "$ph:{listener}" "127.0.0.1:{listener}" "127.0.0.1:{valkey}" "$ph:{valkey}" 169.254.169.254:80 {allowed_ip}:81 localhost:{listener} {host_gateway}:{listener}; do
  echo "proxy:$t:$(connect "$t" | head -n 1 | tr -d '\r')"
done
r=$(printf 'CONNECT {allowed_ip}:80 HTTP/1.1\r\n\r\n' | timeout 5 nc "$ph" "$pp" | head -n 1 | tr -d '\r'); echo "noauth:$r"
r=$(printf 'GET http://{allowed_ip}/m.txt HTTP/1.1\r\nProxy-Authorization: Basic %s\r\n\r\n' "$auth" | timeout 5 nc "$ph" "$pp" | head -n 1 | tr -d '\r'); echo "plain-get:$r"
for t in "$ph {listener}" "$ph {valkey}" "169.254.169.254 80" "{allowed_ip} 80"; do
  if timeout 3 nc $t </dev/null >/dev/null 2>&1; then echo "direct:$t:reached"; else echo "direct:$t:blocked"; fi
done
if nslookup example.com >/dev/null 2>&1; then echo "dns:resolved"; else echo "dns:none"; fi
echo "env-proxy=$HTTPS_PROXY"
echo done
"#
    )
}

fn valkey_port() -> u16 {
    let url = std::env::var("ORCH_VALKEY_URL").expect("ORCH_VALKEY_URL");
    url::Url::parse(&url)
        .expect("valkey url")
        .port()
        .unwrap_or(6379)
}

#[tokio::test]
async fn an_egress_sandbox_reaches_its_allowlist_and_nothing_else() {
    let allowed = AllowedHost::start();
    let listener = HostListener::start();
    let valkey = valkey_port();

    // The check below can fail: from a container on an ordinary network,
    // the host listener is one connect away.
    docker_cli(&[
        "run",
        "--rm",
        "--network",
        &allowed.network,
        "orchestrator/script-agent:latest",
        "sh",
        "-c",
        &format!(
            "echo hi | timeout 5 nc {} {}",
            allowed.gateway, listener.port
        ),
    ]);
    assert_eq!(
        listener.heard(),
        1,
        "the control container reached the host"
    );

    let dir = workers_dir(&allowed.ip, &allowed.gateway, listener.port);
    let workers = dir.path().to_owned();
    // The allowed host is on a private address (a container of ours).
    let env = TestEnv::with_settings(move |s| {
        s.sandbox.workers_dir = workers;
        s.sandbox.egress_allow_local = true;
    })
    .await;
    let queue = unique_queue();
    let pool = env.start_pool(env.pool_config(&queue, 1));
    let mut r = request(
        "egress-agent",
        &queue,
        json!({ "script": probe(&allowed.ip, &allowed.gateway, listener.port, valkey) }),
    );
    r.max_attempts = Some(1);
    let job = env.enqueue(vec![r]).await.remove(0);
    let done = env
        .wait_terminal(&[job.id], Duration::from_secs(120))
        .await
        .remove(0);
    pool.shutdown().await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);

    let events = env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    let log: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "log")
        .filter_map(|e| e.data["line"].as_str().map(str::to_owned))
        .collect();
    let line =
        |prefix: &str| -> Vec<&String> { log.iter().filter(|l| l.starts_with(prefix)).collect() };
    assert_eq!(line("done").len(), 1, "the probe ran to its end: {log:?}");
    assert_eq!(line("allowed:"), vec!["allowed:reached"], "{log:?}");
    let proxied = line("proxy:");
    assert_eq!(proxied.len(), 8, "{log:?}");
    for l in &proxied {
        assert!(l.ends_with("HTTP/1.1 403 Forbidden"), "{l}");
    }
    assert_eq!(
        line("noauth:"),
        vec!["noauth:HTTP/1.1 407 Proxy Authentication Required"]
    );
    assert_eq!(
        line("plain-get:"),
        vec!["plain-get:HTTP/1.1 405 Method Not Allowed"]
    );
    let direct = line("direct:");
    assert_eq!(direct.len(), 4, "{log:?}");
    for l in &direct {
        assert!(l.ends_with(":blocked"), "{l}");
    }
    assert_eq!(line("dns:"), vec!["dns:none"], "no DNS out of the sandbox");
    assert_eq!(
        listener.heard(),
        1,
        "the sandbox reached the host's listener (only the control container may)"
    );

    // What the proxy refused is in the job's trail (once each).
    let denied: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == "egress_denied")
        .map(|e| &e.data["targets"])
        .collect();
    assert_eq!(denied.len(), 1, "one egress_denied event");
    let targets = denied[0].as_array().expect("targets");
    for t in [
        "127.0.0.1:".to_owned() + &listener.port.to_string(),
        "169.254.169.254:80".to_owned(),
        format!("{}:81", allowed.ip),
        format!("localhost:{} (resolves to a local address)", listener.port),
        format!(
            "{}:{} (resolves to a local address)",
            allowed.gateway, listener.port
        ),
    ] {
        assert!(targets.iter().any(|v| v == &json!(t)), "{t} in {targets:?}");
    }
    // The agent printed its HTTPS_PROXY: masked, so the token is nowhere
    // in the trail.
    assert_eq!(line("env-proxy="), vec!["env-proxy=***"], "{log:?}");
    let trail = serde_json::to_string(&events).expect("json");
    let token = regex::Regex::new("orch:[0-9a-f]{32}").expect("regex");
    assert!(!token.is_match(&trail), "a proxy token in the trail");

    // A firewall reload (here: the chain flushed and the jump deleted)
    // is repaired before the next sandbox gets its grant.
    iptables(&["-F", "ORCH-EGRESS"]);
    iptables(&["-D", "INPUT", "-i", "orch-egress0", "-j", "ORCH-EGRESS"]);
    let pool = env.start_pool(env.pool_config(&queue, 1));
    let mut r = request(
        "egress-agent",
        &queue,
        json!({ "script": format!(
            "p=${{HTTPS_PROXY##*@}}; if timeout 3 nc ${{p%:*}} {} </dev/null >/dev/null 2>&1; then echo direct:reached; else echo direct:blocked; fi",
            listener.port
        ) }),
    );
    r.max_attempts = Some(1);
    let job = env.enqueue(vec![r]).await.remove(0);
    let again = env
        .wait_terminal(&[job.id], Duration::from_secs(120))
        .await
        .remove(0);
    pool.shutdown().await;
    assert_eq!(again.status, Status::Succeeded, "{:?}", again.last_error);
    let events = env
        .app
        .store()
        .job_events(again.id, None)
        .await
        .expect("events");
    let said: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "log")
        .filter_map(|e| e.data["line"].as_str())
        .collect();
    assert_eq!(said, vec!["direct:blocked"], "after the flush");
    assert_eq!(
        listener.heard(),
        1,
        "the host listener heard only the control container"
    );
    let input = iptables(&["-S", "INPUT"]);
    assert_eq!(
        input.lines().find(|l| l.starts_with("-A ")),
        Some("-A INPUT -i orch-egress0 -j ORCH-EGRESS"),
        "{input}"
    );
}

fn iptables(args: &[&str]) -> String {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
