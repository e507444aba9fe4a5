//! apalis workers and producers on orchestrator (feature `apalis`): the
//! example `examples/apalis_worker.rs` as separate processes, against a
//! real Valkey and a real PostgreSQL. Run with `scripts/test.sh`, which
//! builds the example first.
#![cfg(feature = "apalis")]

#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator::job::{Job, JobId, Status};

use crate::support::{unique_queue, TestEnv, ValkeyServer};

/// The example's binary, next to this test's in the target directory.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("examples").join("apalis_worker");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --features apalis --example apalis_worker` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The example with `env`'s services and the test timings the binary's
/// worker processes get.
fn command(env: &TestEnv, args: &[&str]) -> Command {
    let s = env.app.settings();
    let mut cmd = Command::new(example());
    cmd.args(args)
        .env("ORCH_DATABASE_URL", &env.database_url)
        .env("ORCH_VALKEY_URL", &env.valkey_url)
        .env("ORCH_KEY_PREFIX", &s.key_prefix)
        .env("ORCH_WORKER__LEASE_MS", s.worker.lease_ms.to_string())
        .env("ORCH_WORKER__POLL_INTERVAL_MS", "100")
        .env("ORCH_MAINTENANCE__REAP_INTERVAL_MS", "200")
        .env("ORCH_MAINTENANCE__PROMOTE_INTERVAL_MS", "100")
        .env("ORCH_RETRY__BACKOFF_BASE_MS", "100")
        .env("ORCH_RETRY__BACKOFF_CAP_MS", "1000")
        .env("ORCH_METRICS_ADDR", "127.0.0.1:0")
        .env("ORCH_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::inherit());
    cmd
}

/// Pushes tasks through the example's producer (apalis's `TaskSink`).
fn produce(env: &TestEnv, queue: &str, args: &[&str]) {
    let mut all = vec!["produce", "--queue", queue];
    all.extend_from_slice(args);
    let out = command(env, &all).output().expect("run the producer");
    assert!(
        out.status.success(),
        "the producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An apalis worker process, killed on drop. Its stdout lines (the
/// handler's `start`, `done` and `cancelled`) are collected as it runs.
struct Worker {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn spawn(env: &TestEnv, queue: &str, name: &str, concurrency: usize) -> Worker {
        Self::spawn_with(env, queue, name, concurrency, &[])
    }

    fn spawn_with(
        env: &TestEnv,
        queue: &str,
        name: &str,
        concurrency: usize,
        vars: &[(&str, &str)],
    ) -> Worker {
        let mut child = command(
            env,
            &[
                "work",
                "--queue",
                queue,
                "--name",
                name,
                "--concurrency",
                &concurrency.to_string(),
            ],
        )
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the apalis worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Worker {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The job ids of this worker's lines that start with `word`.
    fn ids(&self, word: &str) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                (parts.next() == Some(word))
                    .then(|| parts.next().map(str::to_owned))
                    .flatten()
            })
            .collect()
    }

    /// Waits until this worker has printed `n` lines that start with `word`.
    async fn wait_for(&self, word: &str, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let ids = self.ids(word);
            if ids.len() >= n {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} of {n} `{word}` lines within {limit:?}; it printed {:?}",
                self.name,
                ids.len(),
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not stop", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The queue's jobs by their task's label.
async fn jobs_by_label(env: &TestEnv, queue: &str) -> HashMap<String, Job> {
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, payload->'args'->>'label' FROM jobs WHERE queue = $1 ORDER BY created_at",
    )
    .bind(queue)
    .fetch_all(env.app.store().pool())
    .await
    .expect("jobs");
    let mut jobs = HashMap::new();
    for (id, label) in rows {
        let job = env.job(JobId(id)).await;
        assert!(
            jobs.insert(label.clone(), job).is_none(),
            "two jobs {label}"
        );
    }
    jobs
}

/// Waits for `count` jobs in the queue, all finished.
async fn wait_done(env: &TestEnv, queue: &str, count: usize) -> HashMap<String, Job> {
    let jobs = jobs_by_label(env, queue).await;
    assert_eq!(jobs.len(), count, "jobs in {queue}");
    let ids: Vec<JobId> = jobs.values().map(|j| j.id).collect();
    env.wait_terminal(&ids, Duration::from_secs(90)).await;
    jobs_by_label(env, queue).await
}

async fn assert_succeeded_once(env: &TestEnv, job: &Job) {
    assert_eq!(job.status, Status::Succeeded, "{job:?}");
    assert_eq!(env.terminal_events(job.id).await, 1, "job {}", job.id);
    assert_eq!(
        env.event_counts(job.id, "succeeded").await,
        1,
        "job {}",
        job.id
    );
}

fn result_of(job: &Job) -> String {
    job.result
        .as_ref()
        .and_then(|r| r.as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn every_outcome_of_an_apalis_task_is_a_fenced_audited_transition() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    produce(&env, &q, &["--count", "2", "--label", "ok"]);
    produce(&env, &q, &["--behaviour", "fail-once", "--label", "err"]);
    produce(&env, &q, &["--behaviour", "panic-once", "--label", "panic"]);
    produce(&env, &q, &["--behaviour", "abort", "--label", "abort"]);
    // One idempotency key, pushed twice: one job.
    for _ in 0..2 {
        produce(&env, &q, &["--label", "once", "--idempotency-key", "k1"]);
    }
    let mut worker = Worker::spawn(&env, &q, "w1", 4);
    let jobs = wait_done(&env, &q, 6).await;
    worker.stop();

    for label in ["ok-0", "ok-1", "once-0"] {
        let job = &jobs[label];
        assert_succeeded_once(&env, job).await;
        assert_eq!(job.attempt, 1);
        assert_eq!(
            result_of(job),
            format!("{label} by w1"),
            "the handler's response"
        );
        assert_eq!(
            env.event_types(job.id).await,
            ["enqueued", "started", "succeeded"]
        );
    }
    // An `Err` and a panic are failed attempts, retried with backoff.
    for (label, error) in [
        ("err-0", "failing the first attempt"),
        (
            "panic-0",
            "the task's handler panicked: panicking on the first attempt",
        ),
    ] {
        let job = &jobs[label];
        assert_succeeded_once(&env, job).await;
        assert_eq!(job.attempt, 2, "{label}");
        assert_eq!(job.last_error.as_deref(), Some(error), "{label}");
        assert_eq!(
            env.event_types(job.id).await,
            ["enqueued", "started", "failed", "started", "succeeded"],
            "{label}"
        );
    }
    // AbortError: dead at once.
    let abort = &jobs["abort-0"];
    assert_eq!(abort.status, Status::Dead);
    assert_eq!(abort.attempt, 1);
    assert!(
        abort
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("this chore cannot succeed"),
        "{abort:?}"
    );
    assert_eq!(
        env.event_types(abort.id).await,
        ["enqueued", "started", "dead"]
    );

    // The handler saw our attempt numbers, and the producer is the actor.
    let err = jobs["err-0"].id.to_string();
    let attempts: Vec<String> = worker
        .lines()
        .iter()
        .filter(|l| l.starts_with(&format!("start {err} ")))
        .map(|l| l.split(' ').nth(3).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT e.actor FROM job_events e JOIN jobs j ON j.id = e.job_id
         WHERE j.queue = $1 AND e.type = 'enqueued'",
    )
    .bind(&q)
    .fetch_all(env.app.store().pool())
    .await
    .expect("actors");
    assert_eq!(actors, ["apalis"]);
}

#[tokio::test]
async fn a_timed_out_apalis_task_is_a_failed_attempt_and_its_handler_is_told() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let limits = ["--timeout-secs", "1", "--max-attempts", "1"];
    let mut args = vec!["--behaviour", "wait-for-cancel", "--label", "slow"];
    args.extend_from_slice(&limits);
    produce(&env, &q, &args);
    let worker = Worker::spawn(&env, &q, "w1", 2);
    let jobs = wait_done(&env, &q, 1).await;
    let job = &jobs["slow-0"];
    assert_eq!(job.status, Status::Dead);
    assert_eq!(job.last_error.as_deref(), Some("timed out after 1s"));
    assert_eq!(
        env.event_types(job.id).await,
        ["enqueued", "started", "dead"]
    );
    worker
        .wait_for("cancelled", 1, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn an_apalis_worker_killed_mid_task_is_recovered_and_each_task_completes_once() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    produce(
        &env,
        &q,
        &["--count", "6", "--behaviour", "sleep", "--ms", "4000"],
    );
    let mut victim = Worker::spawn(&env, &q, "victim", 6);
    victim.wait_for("start", 6, Duration::from_secs(30)).await;
    victim.kill9();
    assert!(victim.ids("done").is_empty(), "the victim finished a task");

    let rescuer = Worker::spawn(&env, &q, "rescuer", 6);
    let jobs = wait_done(&env, &q, 6).await;
    let mut done = rescuer.ids("done");
    done.sort();
    let mut ids: Vec<String> = jobs.values().map(|j| j.id.to_string()).collect();
    ids.sort();
    assert_eq!(done, ids, "the rescuer ran each task to its end once");
    for job in jobs.values() {
        assert_succeeded_once(&env, job).await;
        assert_eq!(job.attempt, 2, "the killed run counted");
        assert!(result_of(job).ends_with(" by rescuer"), "{job:?}");
        assert_eq!(env.event_counts(job.id, "lease_expired").await, 1);
    }
}

#[tokio::test]
async fn two_apalis_workers_never_run_one_task_at_once() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    produce(
        &env,
        &q,
        &["--count", "120", "--behaviour", "sleep", "--ms", "30"],
    );
    let a = Worker::spawn(&env, &q, "a", 6);
    let b = Worker::spawn(&env, &q, "b", 6);
    let jobs = wait_done(&env, &q, 120).await;

    let mut starts: HashMap<String, usize> = HashMap::new();
    for id in a.ids("start").into_iter().chain(b.ids("start")) {
        *starts.entry(id).or_default() += 1;
    }
    assert!(
        !a.ids("start").is_empty() && !b.ids("start").is_empty(),
        "both workers ran tasks"
    );
    for job in jobs.values() {
        assert_eq!(
            starts.get(&job.id.to_string()),
            Some(&1),
            "job {} ran once",
            job.id
        );
        assert_succeeded_once(&env, job).await;
        assert_eq!(env.event_counts(job.id, "started").await, 1);
        assert_eq!(job.attempt, 1);
    }
}

#[tokio::test]
async fn an_apalis_worker_respects_priorities_and_delays() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let sleep = ["--behaviour", "sleep", "--ms", "100", "--count", "4"];
    for (label, priority) in [("low", "1"), ("mid", "5"), ("high", "10")] {
        let mut args = vec!["--label", label, "--priority", priority];
        args.extend_from_slice(&sleep);
        produce(&env, &q, &args);
    }
    produce(
        &env,
        &q,
        &[
            "--label",
            "late",
            "--priority",
            "10",
            "--count",
            "2",
            "--delay-secs",
            "2",
        ],
    );
    // One at a time, nothing claimed ahead: the start order is the claim
    // order.
    let _worker = Worker::spawn_with(&env, &q, "w1", 1, &[("ORCH_WORKER__PREFETCH", "0")]);
    let jobs = wait_done(&env, &q, 14).await;

    for (label, priority) in [("low-0", 1), ("mid-0", 5), ("high-0", 10), ("late-0", 10)] {
        assert_eq!(jobs[label].priority, priority, "{label}");
    }
    let started: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT e.job_id FROM job_events e JOIN jobs j ON j.id = e.job_id
         WHERE j.queue = $1 AND e.type = 'started' ORDER BY e.id",
    )
    .bind(&q)
    .fetch_all(env.app.store().pool())
    .await
    .expect("started events");
    let label_of = |id: &uuid::Uuid| {
        jobs.iter()
            .find(|(_, j)| j.id.0 == *id)
            .map(|(l, _)| l.split('-').next().unwrap_or_default().to_owned())
            .expect("a job of the queue")
    };
    let order: Vec<String> = started
        .iter()
        .map(label_of)
        .filter(|l| l != "late")
        .collect();
    let expected: Vec<&str> = ["high"; 4]
        .into_iter()
        .chain(["mid"; 4])
        .chain(["low"; 4])
        .collect();
    assert_eq!(order, expected, "highest priority first");
    for label in ["late-0", "late-1"] {
        let job = &jobs[label];
        let run_at = job.run_at;
        // apalis keeps times in whole seconds: a 2 s delay is due more
        // than 1 s after the push.
        assert!(
            run_at - job.created_at > chrono::Duration::seconds(1),
            "{label}: run_at {run_at} is its delay after {}",
            job.created_at
        );
        let started_at = job.started_at.expect("started");
        assert!(
            started_at >= run_at,
            "{label} started at {started_at}, before {run_at}"
        );
        assert_succeeded_once(&env, job).await;
    }
}

#[tokio::test]
async fn a_cancel_and_the_kill_switch_reach_the_apalis_handler() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    produce(
        &env,
        &q,
        &[
            "--count",
            "3",
            "--behaviour",
            "wait-for-cancel",
            "--label",
            "c",
        ],
    );
    let worker = Worker::spawn(&env, &q, "w1", 4);
    worker.wait_for("start", 3, Duration::from_secs(30)).await;
    let jobs = jobs_by_label(&env, &q).await;

    let one = jobs["c-0"].id;
    env.app.cancel(one, "test", "enough").await.expect("cancel");
    let cancelled = env.wait_terminal(&[one], Duration::from_secs(30)).await;
    assert_eq!(cancelled[0].status, Status::Cancelled);
    let heard = worker
        .wait_for("cancelled", 1, Duration::from_secs(10))
        .await;
    assert_eq!(heard, [one.to_string()], "the handler heard its own cancel");
    assert_eq!(env.cancelled_event(one).await["reason"], "enough");

    env.app
        .kill_all("test", "stop everything")
        .await
        .expect("kill all");
    let rest: Vec<JobId> = ["c-1", "c-2"].iter().map(|l| jobs[*l].id).collect();
    for job in env.wait_terminal(&rest, Duration::from_secs(30)).await {
        assert_eq!(job.status, Status::Cancelled);
        assert_eq!(env.terminal_events(job.id).await, 1);
    }
    let mut heard = worker
        .wait_for("cancelled", 3, Duration::from_secs(10))
        .await;
    heard.sort();
    let mut all: Vec<String> = jobs.values().map(|j| j.id.to_string()).collect();
    all.sort();
    assert_eq!(heard, all);

    // The worker lives on: after the switch is lifted it runs new tasks.
    env.app.resume("test", "carry on").await.expect("resume");
    produce(&env, &q, &["--label", "after"]);
    let jobs = wait_done(&env, &q, 4).await;
    assert_succeeded_once(&env, &jobs["after-0"]).await;
}

#[tokio::test]
async fn a_stale_apalis_worker_cannot_complete_its_task() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    produce(
        &env,
        &q,
        &["--behaviour", "sleep", "--ms", "3000", "--label", "s"],
    );
    let mut stale = Worker::spawn(&env, &q, "stale", 1);
    let ids = stale.wait_for("start", 1, Duration::from_secs(30)).await;
    // Frozen mid-task: no heartbeat, so its lease expires and another
    // worker takes the job.
    stale.signal("-STOP");
    let fresh = Worker::spawn(&env, &q, "fresh", 1);
    assert_eq!(
        fresh.wait_for("start", 1, Duration::from_secs(30)).await,
        ids
    );
    // Thawed, the stale worker's handler ends and it tries to succeed the
    // job with its old lease.
    stale.signal("-CONT");
    stale.wait_for("done", 1, Duration::from_secs(30)).await;
    stale.stop();

    let jobs = wait_done(&env, &q, 1).await;
    let job = &jobs["s-0"];
    assert_succeeded_once(&env, job).await;
    assert_eq!(
        result_of(job),
        "s-0 by fresh",
        "only the fresh worker's outcome stands"
    );
    assert_eq!(env.event_counts(job.id, "lease_expired").await, 1);
    assert_eq!(env.event_counts(job.id, "started").await, 2);
}

#[tokio::test]
async fn flushing_valkey_under_an_apalis_worker_loses_no_task() {
    let valkey = ValkeyServer::start();
    let env = TestEnv::with_valkey(&valkey.url()).await;
    let q = unique_queue();
    produce(
        &env,
        &q,
        &["--count", "150", "--behaviour", "sleep", "--ms", "20"],
    );
    let worker = Worker::spawn(&env, &q, "w1", 8);
    worker.wait_for("done", 20, Duration::from_secs(30)).await;
    valkey.flushall().await;
    let jobs = wait_done(&env, &q, 150).await;
    for job in jobs.values() {
        assert_succeeded_once(&env, job).await;
    }
}

#[tokio::test]
async fn the_storage_pushes_fetches_and_waits_for_its_tasks_in_process() {
    use apalis_core::backend::{FetchById, TaskResult, WaitForCompletion};
    use apalis_core::task::builder::TaskBuilder;
    use apalis_core::task::status::Status as ApalisStatus;
    use apalis_core::task::task_id::TaskId;
    use futures_util::StreamExt;
    use orchestrator::apalis::{Config, OrchestratorStorage};
    use serde_json::{json, Value};

    let env = TestEnv::new().await;
    let q = unique_queue();
    let config = Config::new("apalis-chore")
        .and_then(|c| c.queue(&q))
        .expect("config");
    let mut storage = OrchestratorStorage::<Value>::new(env.app.clone(), config);
    let chore =
        |label: &str, behaviour: &str| json!({"label": label, "behaviour": behaviour, "ms": 200});
    let tasks = vec![
        TaskBuilder::new(chore("a", "sleep")).priority(7).build(),
        TaskBuilder::new(chore("b", "abort")).build(),
        // Not a `Chore`: the worker cannot decode it.
        TaskBuilder::new(json!({"label": "c", "behaviour": "no-such-thing"})).build(),
    ];
    let ids = storage.enqueue_tasks(tasks).await.expect("enqueue");
    assert_eq!(ids.len(), 3);
    let task_ids: Vec<TaskId> = ids.iter().map(|id| TaskId::from_uuid(id.0)).collect();

    // Before any worker: queued, fetched as they were pushed.
    let now: Vec<TaskResult<String>> = storage
        .check_status(task_ids.clone())
        .await
        .expect("status");
    assert!(
        now.iter().all(|r| *r.status() == ApalisStatus::Queued),
        "{now:?}"
    );
    let fetched = storage
        .fetch_by_id(&task_ids[0])
        .await
        .expect("fetch")
        .expect("the job exists");
    assert_eq!(fetched.args, chore("a", "sleep"));
    assert_eq!(fetched.ctx().priority(), Some(7));
    let nobody = TaskId::from_uuid(uuid::Uuid::now_v7());
    assert!(storage.fetch_by_id(&nobody).await.expect("fetch").is_none());

    let _worker = Worker::spawn(&env, &q, "w1", 2);
    let results: Vec<_> = storage.wait_for(task_ids.clone()).collect().await;
    let mut by_id: HashMap<String, TaskResult<String>> = HashMap::new();
    for r in results {
        let r = r.expect("a result");
        by_id.insert(r.task_id().to_string(), r);
    }
    assert_eq!(by_id.len(), 3);
    let a = &by_id[&ids[0].to_string()];
    assert_eq!(*a.status(), ApalisStatus::Done);
    assert_eq!(
        a.result(),
        &Ok("a by w1".to_owned()),
        "the handler's response"
    );
    let b = &by_id[&ids[1].to_string()];
    assert_eq!(*b.status(), ApalisStatus::Failed);
    assert!(b
        .result()
        .as_ref()
        .is_err_and(|e| e.contains("this chore cannot succeed")));
    let c = &by_id[&ids[2].to_string()];
    assert_eq!(*c.status(), ApalisStatus::Failed);
    let error = c.result().clone().expect_err("dead");
    assert!(
        error.contains("do not decode as") && error.contains("Chore"),
        "a clear error: {error}"
    );
    assert_eq!(
        env.event_types(ids[2]).await,
        ["enqueued", "started", "dead"]
    );

    // Bad input is a clear error and writes nothing: a priority out of
    // range fails the whole batch, and a task id that is not a job's.
    let before = jobs_by_label(&env, &q).await.len();
    let bad = vec![
        TaskBuilder::new(chore("d", "noop")).build(),
        TaskBuilder::new(chore("e", "noop")).priority(11).build(),
    ];
    let error = storage.enqueue_tasks(bad).await.expect_err("priority 11");
    assert!(error.to_string().contains("priority"), "{error}");
    assert_eq!(
        jobs_by_label(&env, &q).await.len(),
        before,
        "nothing written"
    );
    let not_a_job: Result<Vec<TaskResult<String>>, _> = storage
        .check_status([TaskId::String("../../etc/passwd".into())])
        .await;
    assert!(
        matches!(not_a_job, Err(orchestrator::apalis::Error::NotAJob(ref s)) if s == "../../etc/passwd"),
        "{not_a_job:?}"
    );

    // An id that names no job is an error in the stream, not a hang.
    let missing: Vec<Result<TaskResult<String>, _>> = storage.wait_for([nobody]).collect().await;
    assert!(matches!(
        missing.as_slice(),
        [Err(orchestrator::apalis::Error::NotFound(_))]
    ));
}
