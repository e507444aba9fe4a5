//! The sandbox runtimes against a real Docker daemon (and the host, for the
//! local-process runtime). Run them with `scripts/test.sh`, which starts
//! Docker and builds the `orchestrator/script-agent` image.

mod agent;
mod egress;
mod gates;
mod image;
mod jobs;
mod kill;
#[path = "../support/mod.rs"]
mod support;
mod trust;

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator::job::JobId;
use orchestrator::sandbox::{
    DockerRuntime, Finished, Limits, LocalRuntime, LogCap, LogLine, LogStream, Network, Outcome,
    Owner, RunOptions, Runtime, SandboxSpec,
};
use orchestrator::secret::Secret;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "orchestrator/script-agent:latest";

/// Runs the docker CLI; panics with its stderr when it fails. Its stdout,
/// trimmed.
fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
const DEPLOYMENT: &str = "sandbox-tests";

async fn docker() -> Runtime {
    match DockerRuntime::connect().await {
        Ok(d) => Runtime::Docker(d),
        Err(e) => panic!(
            "no Docker daemon ({e}): run the tests with scripts/test.sh, which starts dockerd"
        ),
    }
}

fn spec(script: &str) -> SandboxSpec {
    let now = chrono::Utc::now();
    SandboxSpec {
        name: format!(
            "orch-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        image: IMAGE.to_owned(),
        command: vec!["sh".into(), "-c".into(), script.to_owned()],
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        workspace: None,
        mounts: Vec::new(),
        limits: Limits::default(),
        network: Network::None,
        owner: Owner {
            deployment: DEPLOYMENT.to_owned(),
            host: "test-host".into(),
            job_id: JobId::new(),
            attempt: 1,
            worker_id: "sandbox-tests".into(),
            created_at: now,
            expires_at: now + chrono::Duration::minutes(10),
        },
    }
}

fn opts(timeout_ms: u64, grace_ms: u64) -> RunOptions {
    RunOptions {
        timeout: Duration::from_millis(timeout_ms),
        stop_grace: Duration::from_millis(grace_ms),
    }
}

/// Runs to the end; returns how it finished and every output line.
async fn run(
    rt: &Runtime,
    spec: &SandboxSpec,
    opts: RunOptions,
    cancel: CancellationToken,
) -> (Finished, Vec<LogLine>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let finished = rt.run(spec, opts, tx, cancel).await.expect("sandbox runs");
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    (finished, lines)
}

fn stdout(lines: &[LogLine]) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.text.as_str())
        .collect()
}

async fn gone(rt: &Runtime, name: &str) -> bool {
    !rt.list_ours(DEPLOYMENT)
        .await
        .expect("list")
        .iter()
        .any(|c| c.name == name)
}

#[tokio::test]
async fn hardening_holds_inside_the_container() {
    let rt = docker().await;
    let s = spec(
        "id -u; id -g; grep CapEff /proc/self/status; \
         if touch /escape 2>/dev/null; then echo root-writable; else echo root-readonly; fi; \
         echo ok > /tmp/t && cat /tmp/t; \
         tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; \
         ls /var/run/docker.sock 2>/dev/null || echo no-docker-socket",
    );
    let (f, lines) = run(&rt, &s, opts(30_000, 1_000), CancellationToken::new()).await;
    assert_eq!(f.outcome, Outcome::Exited { code: 0 }, "{lines:?}");
    let out = stdout(&lines);
    assert_eq!(out[0], "1000", "uid");
    assert_eq!(out[1], "1000", "gid");
    assert_eq!(out[2], "CapEff:\t0000000000000000");
    assert_eq!(out[3], "root-readonly");
    assert_eq!(out[4], "ok", "/tmp is writable");
    assert_eq!(out[5], "lo", "only loopback under network none");
    assert_eq!(out.len(), 7, "{out:?}");
    assert_eq!(out[6], "no-docker-socket");
    assert!(gone(&rt, &s.name).await, "removed after the run");
}

#[tokio::test]
async fn exceeding_memory_is_reported_as_oom() {
    let rt = docker().await;
    let mut s = spec("head -c 200m /dev/zero | tail > /dev/null; echo survived");
    s.limits.memory_bytes = 32 * 1024 * 1024;
    let (f, lines) = run(&rt, &s, opts(60_000, 1_000), CancellationToken::new()).await;
    assert_eq!(f.outcome, Outcome::OomKilled, "{lines:?}");
}

#[tokio::test]
async fn a_fork_bomb_hits_the_pids_limit() {
    let rt = docker().await;
    let mut s = spec("i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; echo spawned-all");
    s.limits.pids = 20;
    let (f, lines) = run(&rt, &s, opts(60_000, 500), CancellationToken::new()).await;
    assert!(
        !stdout(&lines).contains(&"spawned-all"),
        "200 processes started under a limit of 20: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.stream == LogStream::Stderr && l.text.contains("fork")),
        "the shell reports it cannot fork: {lines:?}"
    );
    assert!(!f.outcome.succeeded());
    assert!(gone(&rt, &s.name).await);
}

#[tokio::test]
async fn a_timeout_is_its_own_outcome_and_the_container_is_gone() {
    let rt = docker().await;
    let s = spec("echo started; sleep 60");
    let (f, lines) = run(&rt, &s, opts(1_500, 500), CancellationToken::new()).await;
    assert_eq!(f.outcome, Outcome::TimedOut);
    assert!(f.duration < Duration::from_secs(10), "{:?}", f.duration);
    assert_eq!(stdout(&lines), vec!["started"]);
    assert!(gone(&rt, &s.name).await);
}

/// Runs `spec` and stops it once it prints `ready` (after its trap is
/// set: a stop before that meets a shell that has not chosen yet what
/// SIGTERM does). Returns how it finished, its lines, and how long it took
/// from the stop to the end.
async fn run_stopped_when_ready(
    rt: &Runtime,
    spec: &SandboxSpec,
    opts: RunOptions,
) -> (Finished, Vec<LogLine>, Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let mut lines = Vec::new();
    let mut stopped_at = None;
    let run = rt.run(spec, opts, tx, cancel.clone());
    tokio::pin!(run);
    let finished = loop {
        tokio::select! {
            finished = &mut run => break finished.expect("sandbox runs"),
            Some(line) = rx.recv() => {
                if stopped_at.is_none() && line.stream == LogStream::Stdout && line.text == "ready" {
                    cancel.cancel();
                    stopped_at = Some(std::time::Instant::now());
                }
                lines.push(line);
            }
        }
    };
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    let stopped_at = stopped_at.unwrap_or_else(|| panic!("never printed ready: {lines:?}"));
    (finished, lines, stopped_at.elapsed())
}

async fn stop_behaviour(rt: Runtime) {
    // Traps SIGTERM: exits cleanly within the grace period.
    let s = spec("trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.2; done");
    let (f, lines, after_stop) = run_stopped_when_ready(&rt, &s, opts(60_000, 5_000)).await;
    assert_eq!(f.outcome, Outcome::Stopped { code: 0 }, "{lines:?}");
    assert!(stdout(&lines).contains(&"got-term"), "{lines:?}");
    assert!(after_stop < Duration::from_millis(4_000), "{after_stop:?}");

    // Ignores SIGTERM: killed once the grace period is over.
    let s = spec("trap '' TERM; echo ready; while true; do sleep 0.2; done");
    let (f, lines, after_stop) = run_stopped_when_ready(&rt, &s, opts(60_000, 2_000)).await;
    assert_eq!(
        f.outcome,
        Outcome::Stopped { code: 137 },
        "SIGKILL: {lines:?}"
    );
    assert!(after_stop >= Duration::from_millis(1_900), "{after_stop:?}");
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    stop_behaviour(docker().await).await;
}

/// A stop asked for as containers start (a kill-all just after many
/// claims) must not wait out the grace period. With a 60 s grace period, a
/// lost SIGTERM shows as SIGKILL (137); what else the shell answers with,
/// interrupted that early, varies (143 mostly, 2 once under load).
/// (`bench cancel` without its settle time lost one SIGTERM in about seven
/// on this machine; the runtime now signals a young container twice. This
/// test did not catch that loss here.)
#[tokio::test]
async fn a_stop_right_at_start_does_not_wait_out_the_grace_period() {
    let rt = docker().await;
    let cancel = CancellationToken::new();
    let mut runs = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    for _ in 0..20 {
        let (rt, cancel) = (rt.clone(), cancel.clone());
        let s = spec("sleep 600");
        names.push(s.name.clone());
        runs.spawn(async move { run(&rt, &s, opts(120_000, 60_000), cancel).await });
    }
    // Stop them all the moment the last one exists, as kill-all would.
    while rt
        .list_ours(DEPLOYMENT)
        .await
        .expect("list")
        .iter()
        .filter(|c| names.contains(&c.name))
        .count()
        < names.len()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    while let Some(done) = runs.join_next().await {
        let (f, lines) = done.expect("run");
        assert!(
            matches!(f.outcome, Outcome::Stopped { code } if code != 137),
            "{:?} {lines:?}",
            f.outcome
        );
    }
    for name in &names {
        assert!(gone(&rt, name).await);
    }
}

#[tokio::test]
async fn local_runtime_stops_the_same_way() {
    stop_behaviour(Runtime::Local(LocalRuntime)).await;
}

async fn logs_and_secrets(rt: Runtime) {
    let mut s = spec(
        "i=1; while [ $i -le 300 ]; do echo \"line $i\"; i=$((i+1)); done; echo oops >&2; \
         case \"$API_KEY\" in sk-test-*) [ ${#API_KEY} -eq 20 ] && echo secret-received;; esac; \
         echo \"leak:$API_KEY\"; \
         echo \"b64:$(printf %s \"$API_KEY\" | base64)\"; \
         echo \"b64-in-env:$(printf 'KEY=%s' \"$API_KEY\" | base64)\"; \
         echo \"hex:$(printf %s \"$API_KEY\" | od -An -tx1 | tr -d ' \\n')\"",
    );
    s.secrets
        .insert("API_KEY".into(), Secret::new("sk-test-9f8e7d6c5b4a"));
    s.env.insert("PLAIN".into(), "visible".into());
    assert!(
        !format!("{s:?}").contains("sk-test-9f8e7d6c5b4a"),
        "a spec never prints its secrets"
    );
    let (f, lines) = run(&rt, &s, opts(60_000, 1_000), CancellationToken::new()).await;
    assert_eq!(f.outcome, Outcome::Exited { code: 0 });
    let out = stdout(&lines);
    let numbered: Vec<&str> = out
        .iter()
        .copied()
        .filter(|l| l.starts_with("line "))
        .collect();
    let expected: Vec<String> = (1..=300).map(|i| format!("line {i}")).collect();
    assert_eq!(
        numbered,
        expected.iter().map(String::as_str).collect::<Vec<_>>(),
        "in order, none lost"
    );
    assert!(lines
        .iter()
        .any(|l| l.stream == LogStream::Stderr && l.text == "oops"));
    assert!(
        out.contains(&"secret-received"),
        "the secret reached the sandbox"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.text.contains("sk-test-9f8e7d6c5b4a")),
        "a secret the agent prints is masked in its logs: {:?}",
        out.iter().find(|l| l.starts_with("leak"))
    );
    assert!(out.contains(&"leak:***"));
    // Encoded forms of the worker's own secrets are masked too.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    for encoded in [
        b64.encode("sk-test-9f8e7d6c5b4a"),
        b64.encode("KEY=sk-test-9f8e7d6c5b4a"),
        "736b2d746573742d396638653764366335623461".to_owned(),
    ] {
        let probe = &encoded[4..encoded.len() - 4];
        assert!(
            lines.iter().all(|l| !l.text.contains(probe)),
            "{probe} (of {encoded}) is in {out:?}"
        );
    }
    for prefix in ["b64:", "b64-in-env:", "hex:"] {
        assert!(
            out.iter()
                .any(|l| l.starts_with(prefix) && l.contains("***")),
            "{prefix} masked: {out:?}"
        );
    }

    // The cap keeps the tail and counts what it dropped.
    let mut cap = LogCap::new(1_000, 200);
    let passed = lines.iter().cloned().filter_map(|l| cap.accept(l)).count();
    let summary = cap.finish();
    assert!(
        (80..=160).contains(&passed),
        "{passed} lines fit in 1000 bytes"
    );
    assert!(summary.dropped_bytes > 0);
    // Order holds within a stream (stdout and stderr are separate pipes).
    assert_eq!(
        summary
            .tail
            .iter()
            .rev()
            .find(|l| l.stream == LogStream::Stdout)
            .map(|l| l.text.as_str()),
        Some("hex:***")
    );
}

#[tokio::test]
async fn logs_arrive_in_order_capped_and_without_secrets() {
    logs_and_secrets(docker().await).await;
}

#[tokio::test]
async fn local_runtime_logs_and_secrets() {
    logs_and_secrets(Runtime::Local(LocalRuntime)).await;
}

#[tokio::test]
async fn local_runtime_times_out_and_reports_exit_codes() {
    let rt = Runtime::Local(LocalRuntime);
    let (f, _) = run(
        &rt,
        &spec("exit 3"),
        opts(10_000, 500),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(f.outcome, Outcome::Exited { code: 3 });
    // A child in the background must die with its group too.
    let (f, _) = run(
        &rt,
        &spec("sleep 30 & sleep 30"),
        opts(800, 500),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(f.outcome, Outcome::TimedOut);
    assert!(f.duration < Duration::from_secs(5));
}
