//! Sandboxed job kinds through the worker pool: output as events, secrets
//! from the worker's environment, and orphaned containers reaped.

use std::time::Duration;

use orchestrator::job::{JobId, Status};
use orchestrator::sandbox::{DockerRuntime, Runtime};
use serde_json::json;

use crate::support::{request, unique_queue, TestEnv, WorkerProcess};

const SECRET_VAR: &str = "ORCH_TEST_AGENT_KEY";
const SECRET: &str = "sk-agent-7d1e3c9b2a";

/// A workers dir with script-agent plus a kind that receives a secret.
fn workers_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (kind, extra) in [
        ("script-agent", ""),
        ("secret-agent", "secrets = [\"ORCH_TEST_AGENT_KEY\"]\n"),
        // Asked delays are kept as asked (above the floor): the kind's default
        // would be an hour.
        (
            "throttled-agent",
            "[throttle]\ndelay_secs = 3600\nmin_delay_secs = 1\n",
        ),
        (
            "counted-agent",
            "[throttle]\nexit_code = 75\ndelay_secs = 1\ncounts_attempt = true\n",
        ),
    ] {
        let path = dir.path().join(kind);
        std::fs::create_dir_all(&path).expect("mkdir");
        std::fs::write(
            path.join("worker.toml"),
            format!(
                "image = \"orchestrator/script-agent:latest\"\ncommand = [\"sh\", \"-c\", \"{{script}}\"]\n\
                 timeout_secs = 60\nstop_grace_secs = 2\n{extra}"
            ),
        )
        .expect("write worker.toml");
    }
    dir
}

async fn env_with_kinds(dir: &tempfile::TempDir) -> TestEnv {
    let path = dir.path().to_owned();
    TestEnv::with_settings(move |s| {
        s.sandbox.workers_dir = path;
        s.sandbox.log_budget_bytes = 2_000;
        s.sandbox.log_tail_bytes = 200;
    })
    .await
}

async fn events(env: &TestEnv, id: JobId) -> Vec<orchestrator::job::JobEvent> {
    env.app.store().job_events(id, None).await.expect("events")
}

#[tokio::test]
async fn output_becomes_capped_log_events_and_secrets_stay_secret() {
    std::env::set_var(SECRET_VAR, SECRET);
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let q = unique_queue();
    let script = "i=1; while [ $i -le 400 ]; do echo \"out $i\"; i=$((i+1)); done; \
                  echo \"key=$ORCH_TEST_AGENT_KEY\"; echo bad >&2";
    let jobs = env
        .enqueue(vec![request(
            "secret-agent",
            &q,
            json!({ "script": script }),
        )])
        .await;
    let pool = env.start_pool(env.pool_config(&q, 2));
    let done = env
        .wait_terminal(&[jobs[0].id], Duration::from_secs(60))
        .await;
    pool.shutdown().await;
    assert_eq!(
        done[0].status,
        Status::Succeeded,
        "{:?}",
        done[0].last_error
    );

    let events = events(&env, jobs[0].id).await;
    // Order holds within a stream; stdout and stderr are separate pipes.
    let lines: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "log" && e.data["stream"] == "stdout")
        .filter_map(|e| e.data["line"].as_str())
        .collect();
    assert_eq!(lines[0], "out 1");
    assert!(lines.windows(2).all(|w| w[0] != w[1]), "no line twice");
    let numbered: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("out "))
        .collect();
    let expected: Vec<String> = (1..=numbered.len()).map(|i| format!("out {i}")).collect();
    assert_eq!(
        numbered,
        expected.iter().map(String::as_str).collect::<Vec<_>>(),
        "in order"
    );
    assert!(numbered.len() < 400, "the budget cut the log");
    let truncated = events
        .iter()
        .find(|e| e.kind == "log_truncated")
        .expect("a log_truncated event");
    assert!(truncated.data["dropped_bytes"].as_u64().unwrap_or(0) > 0);
    let tail: Vec<&str> = truncated.data["tail"]
        .as_array()
        .expect("tail")
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    // stdout and stderr are separate pipes: only the order within one holds.
    let tail_out: Vec<&str> = tail.iter().copied().filter(|l| *l != "bad").collect();
    assert_eq!(
        tail_out.last(),
        Some(&"key=***"),
        "the tail ends with the last line, the secret masked: {tail:?}"
    );

    // The secret is nowhere: not in events, not in the job (payload, result).
    let everything = serde_json::to_string(&(events, env.job(jobs[0].id).await)).expect("json");
    assert!(!everything.contains(SECRET), "the secret leaked");
}

#[tokio::test]
async fn a_failing_script_fails_the_attempt_with_its_exit_code() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let q = unique_queue();
    let mut r = request(
        "script-agent",
        &q,
        json!({ "script": "echo about to fail; exit 7" }),
    );
    r.max_attempts = Some(1);
    let jobs = env.enqueue(vec![r]).await;
    let pool = env.start_pool(env.pool_config(&q, 1));
    let done = env
        .wait_terminal(&[jobs[0].id], Duration::from_secs(60))
        .await;
    pool.shutdown().await;
    assert_eq!(done[0].status, Status::Dead);
    assert_eq!(
        done[0].last_error.as_deref(),
        Some("the script exited with code 7")
    );
    assert!(events(&env, jobs[0].id)
        .await
        .iter()
        .any(|e| e.data["line"] == "about to fail"));
}

#[tokio::test]
async fn local_runtime_is_used_when_configured() {
    let dir = workers_dir();
    let path = dir.path().to_owned();
    let env = TestEnv::with_settings(move |s| {
        s.sandbox.workers_dir = path;
        s.sandbox.runtime = orchestrator::sandbox::RuntimeChoice::Local;
    })
    .await;
    let q = unique_queue();
    let jobs = env
        .enqueue(vec![request(
            "script-agent",
            &q,
            json!({ "script": "echo on the host" }),
        )])
        .await;
    let pool = env.start_pool(env.pool_config(&q, 1));
    let done = env
        .wait_terminal(&[jobs[0].id], Duration::from_secs(60))
        .await;
    pool.shutdown().await;
    assert_eq!(
        done[0].status,
        Status::Succeeded,
        "{:?}",
        done[0].last_error
    );
    assert_eq!(
        done[0].result.as_ref().map(|r| r["runtime"].clone()),
        Some(json!("local"))
    );
}

async fn container_exists(env: &TestEnv, name: &str) -> bool {
    let rt = Runtime::Docker(DockerRuntime::connect().await.expect("docker"));
    rt.list_ours(&env.app.settings().key_prefix)
        .await
        .expect("list")
        .iter()
        .any(|c| c.name == name)
}

/// Polls Docker until the container `name` exists, or panics after 30 s.
async fn wait_for_container(env: &TestEnv, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !container_exists(env, name).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sigkilled_workers_container_is_reaped_and_its_job_recovered() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let q = unique_queue();
    let mut r = request(
        "script-agent",
        &q,
        // The first attempt runs until it is reaped, however long the
        // checks below take; the next one finishes at once.
        json!({ "script": "echo working; if [ \"$ORCH_ATTEMPT\" = 1 ]; then sleep 600; fi; echo done" }),
    );
    r.max_attempts = Some(3);
    let job = env.enqueue(vec![r]).await.remove(0);
    let name = format!("orch-{}-1", job.id);

    let mut victim = WorkerProcess::spawn_with(
        &env,
        &q,
        1,
        &[(
            "ORCH_SANDBOX__WORKERS_DIR",
            dir.path().to_str().expect("utf-8"),
        )],
    );
    wait_for_container(&env, &name).await;
    let label = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{index .Config.Labels \"dev.orchestrator.host\"}}",
            &name,
        ])
        .output()
        .expect("inspect");
    assert_eq!(
        String::from_utf8_lossy(&label.stdout).trim(),
        env.app.settings().host_name(),
        "the sandbox carries its host's label"
    );
    victim.kill9();
    assert!(
        container_exists(&env, &name).await,
        "the container outlives its worker"
    );

    // Another worker: its reaper removes the orphan once the lease is gone,
    // and the job runs again and succeeds.
    let rescuer = WorkerProcess::spawn_with(
        &env,
        &q,
        1,
        &[
            (
                "ORCH_SANDBOX__WORKERS_DIR",
                dir.path().to_str().expect("utf-8"),
            ),
            ("ORCH_SANDBOX__ORPHAN_REAP_INTERVAL_SECS", "1"),
        ],
    );
    let done = env.wait_terminal(&[job.id], Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Gone, and the removal recorded (the event follows the removal).
    while container_exists(&env, &name).await
        || !events(&env, job.id)
            .await
            .iter()
            .any(|e| e.kind == "sandbox_removed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan was never removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(rescuer);
    assert_eq!(
        done[0].status,
        Status::Succeeded,
        "{:?}",
        done[0].last_error
    );
    let events = events(&env, job.id).await;
    let removed = events
        .iter()
        .find(|e| e.kind == "sandbox_removed")
        .expect("a sandbox_removed event");
    assert_eq!(removed.data["container"], name);
    assert_eq!(env.terminal_events(job.id).await, 1);
}

#[tokio::test]
async fn the_reaper_never_touches_containers_that_are_not_ours() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let name = format!(
        "not-ours-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let status = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "orchestrator/script-agent:latest",
            "sleep",
            "30",
        ])
        .output()
        .expect("docker run");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let m = env
        .maintenance("default")
        .with_sandboxes(Some(env.app.sandboxes().clone()));
    let report = m.reap_sandboxes_once().await.expect("reap");
    assert!(!report.removed.contains(&name));
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", &name])
        .output()
        .expect("inspect");
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &name])
        .output();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "true",
        "someone else's container was touched"
    );
}

/// Each host reaps only the sandboxes its own workers started (by the host
/// label): another host's mount worktrees on that host's disk.
#[tokio::test]
async fn each_hosts_reaper_removes_only_its_own_orphans() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let here = env.app.settings().host_name();
    assert!(!here.is_empty());
    let elsewhere = format!(
        "other-host-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let deployment = env.app.settings().key_prefix.clone();
    // Orphans for certain: their job does not exist.
    let start = |host: &str| {
        let name = format!(
            "orch-hosttest-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let out = std::process::Command::new("docker")
            .args(["run", "-d", "--name", &name, "--network", "none"])
            .args([
                "--label",
                &format!("dev.orchestrator.deployment={deployment}"),
            ])
            .args([
                "--label",
                &format!("dev.orchestrator.job-id={}", JobId::new()),
            ])
            .args(["--label", &format!("dev.orchestrator.host={host}")])
            .args(["orchestrator/script-agent:latest", "sleep", "30"])
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        name
    };
    let mine = start(&here);
    let theirs = start(&elsewhere);

    let reaper = |host: &str| {
        env.maintenance("default").with_sandboxes(Some(
            env.app.sandboxes().clone().with_host_name(host.to_owned()),
        ))
    };
    let report = reaper(&here)
        .reap_sandboxes_once()
        .await
        .expect("reap here");
    assert!(report.removed.contains(&mine), "{report:?}");
    assert!(!report.removed.contains(&theirs), "{report:?}");
    assert!(
        container_exists(&env, &theirs).await,
        "another host's sandbox was touched"
    );
    assert!(!container_exists(&env, &mine).await);

    let report = reaper(&elsewhere)
        .reap_sandboxes_once()
        .await
        .expect("reap there");
    assert_eq!(report.removed, vec![theirs.clone()]);
    assert!(!container_exists(&env, &theirs).await);
}

#[tokio::test]
async fn cancelling_a_running_agent_stops_and_removes_its_sandbox() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let q = unique_queue();
    // An agent that answers SIGTERM with a failure exit code: the job is
    // still cancelled, not retried.
    let mut r = request(
        "script-agent",
        &q,
        json!({ "script": "trap 'exit 1' TERM; echo working; while true; do sleep 1; done" }),
    );
    r.max_attempts = Some(3);
    let job = env.enqueue(vec![r]).await.remove(0);
    let name = format!("orch-{}-1", job.id);
    let pool = env.start_pool(env.pool_config(&q, 1));
    wait_for_container(&env, &name).await;

    let outcome = env
        .app
        .cancel(job.id, "operator", "not needed")
        .await
        .expect("cancel");
    assert!(matches!(outcome, orchestrator::app::Cancel::Requested(_)));
    let done = env.wait_terminal(&[job.id], Duration::from_secs(30)).await;
    pool.shutdown().await;
    assert_eq!(
        done[0].status,
        Status::Cancelled,
        "{:?}",
        done[0].last_error
    );
    assert_eq!(done[0].attempt, 1, "a cancelled job is never retried");
    assert!(
        !container_exists(&env, &name).await,
        "the sandbox is removed"
    );
    assert_eq!(env.terminal_events(job.id).await, 1);
    let events = events(&env, job.id).await;
    let last = events.last().expect("events");
    assert_eq!(last.kind, "cancelled");
    assert_eq!(last.data["requested_by"], "operator");
}

#[tokio::test]
async fn a_throttled_agent_runs_again_after_its_delay_and_uses_attempts_only_if_the_kind_says() {
    let dir = workers_dir();
    let env = env_with_kinds(&dir).await;
    let q = unique_queue();
    let mut asks = request(
        "throttled-agent",
        &q,
        json!({ "script": "echo '::retry-after::2'; exit 1" }),
    );
    asks.max_attempts = Some(1);
    let mut counted = request("counted-agent", &q, json!({ "script": "exit 75" }));
    counted.max_attempts = Some(2);
    // A kind without [throttle] ignores the line: its output is data.
    let mut plain = request(
        "script-agent",
        &q,
        json!({ "script": "echo '::retry-after::1'; exit 1" }),
    );
    plain.max_attempts = Some(1);
    let jobs = env.enqueue(vec![asks, counted, plain]).await;
    let pool = env.start_pool(env.pool_config(&q, 2));
    // The counted one: throttled once (by its exit code, after the kind's
    // delay), then its second and last attempt is spent: dead.
    let done = env
        .wait_terminal(&[jobs[1].id], Duration::from_secs(60))
        .await;
    assert_eq!(done[0].status, Status::Dead, "{:?}", done[0].last_error);
    let trail = events(&env, jobs[1].id).await;
    let throttled: Vec<_> = trail.iter().filter(|e| e.kind == "throttled").collect();
    assert_eq!(throttled.len(), 1, "{trail:?}");
    assert_eq!(throttled[0].data["delay_ms"], 1000);
    assert_eq!(throttled[0].data["counts_attempt"], true);
    let retry_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(throttled[0].data["retry_at"].clone()).expect("retry_at");
    let second_start = trail
        .iter()
        .filter(|e| e.kind == "started")
        .nth(1)
        .expect("a second start");
    assert!(second_start.at >= retry_at, "ran again before its delay");

    // The one that asks for 2 s gets 2 s, not its kind's hour: with one
    // attempt, a failure would be dead at once; throttled, it keeps its
    // attempt and runs again, and again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let trail = events(&env, jobs[0].id).await;
        if trail.iter().filter(|e| e.kind == "throttled").count() >= 2 {
            assert!(trail.iter().all(|e| e.kind != "dead"));
            assert!(
                trail
                    .iter()
                    .filter(|e| e.kind == "throttled")
                    .all(|e| e.data["delay_ms"] == 2000 && e.data["counts_attempt"] == false),
                "{trail:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not throttled twice: {trail:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every run was attempt 1: each throttle gave its attempt back.
    let starts: Vec<_> = events(&env, jobs[0].id)
        .await
        .into_iter()
        .filter(|e| e.kind == "started")
        .map(|e| e.data["attempt"].clone())
        .collect();
    assert!(
        starts.len() >= 2 && starts.iter().all(|a| a == 1),
        "{starts:?}"
    );
    let job = env.job(jobs[0].id).await;
    assert!(!job.status.is_terminal());
    let plain = env
        .wait_terminal(&[jobs[2].id], Duration::from_secs(60))
        .await;
    assert_eq!(plain[0].status, Status::Dead, "{:?}", plain[0].last_error);
    assert!(events(&env, jobs[2].id)
        .await
        .iter()
        .all(|e| e.kind != "throttled"));
    env.app
        .cancel(jobs[0].id, "test", "enough")
        .await
        .expect("cancel");
    pool.shutdown().await;
}
