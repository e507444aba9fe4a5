//! Cancels in every stage and the kill switch, against real Docker, git,
//! Postgres and Valkey: the sandbox and worktree are gone, the job ends
//! `cancelled` with who asked and why, and nothing is pushed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator::app::Cancel;
use orchestrator::job::{Job, JobId, JobRequest, Status};
use orchestrator::sandbox::{DockerRuntime, Runtime};
use orchestrator::worker::PoolEvent;
use serde_json::{json, Value};

use crate::support::git::git;
use crate::support::{
    env_var, request, unique_queue, PgServer, RunningPool, TestEnv, WorkerProcess,
};

const AGENT: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 120
stop_grace_secs = 2
"#;

const GATED: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 120
stop_grace_secs = 2

[gates]
default_profile = "standard"

[[gates.gate]]
name = "slow-tests"
type = "command"
command = ["sh", "-c", "echo testing; sleep 600"]
timeout_secs = 900
profiles = ["standard"]
"#;

/// Ignores SIGTERM and has a long grace period: its worker sits in the stop
/// for a minute, long enough to be killed there.
const STUBBORN: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 300
stop_grace_secs = 60
"#;

/// A bare origin, the git stage's data dir and a workers dir with our kinds.
struct Fixture {
    env: TestEnv,
    tmp: tempfile::TempDir,
    bare: PathBuf,
    queue: String,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = crate::support::git::bare_origin(tmp.path(), &[("README.md", "# app\n")]);
    let workers = tmp.path().join("workers");
    for (kind, def) in [("agent", AGENT), ("gated", GATED), ("stubborn", STUBBORN)] {
        std::fs::create_dir_all(workers.join(kind)).expect("mkdir");
        std::fs::write(workers.join(kind).join("worker.toml"), def).expect("kind");
    }
    let data = tmp.path().join("git-data");
    let env = TestEnv::with_settings(move |s| {
        s.git.allow_local = true;
        s.git.data_dir = data;
        s.sandbox.workers_dir = workers;
    })
    .await;
    Fixture {
        env,
        tmp,
        bare,
        queue: unique_queue(),
    }
}

impl Fixture {
    fn data(&self) -> PathBuf {
        self.tmp.path().join("git-data")
    }

    fn job(&self, kind: &str, script: &str) -> JobRequest {
        let mut r = request(
            kind,
            &self.queue,
            json!({ "script": script, "repo": self.bare.to_str().expect("utf-8"), "push": true }),
        );
        r.max_attempts = Some(3);
        r
    }

    /// The job's directory on the host (its workspace and the host's record).
    fn worktree(&self, id: JobId) -> PathBuf {
        self.data().join("worktrees").join(id.to_string())
    }

    /// What the sandbox sees at /workspace.
    fn workspace(&self, id: JobId) -> PathBuf {
        self.worktree(id).join("workspace")
    }

    fn pushed(&self, id: JobId) -> bool {
        !git(
            &self.bare,
            &["branch", "--list", &format!("orchestrator/{id}")],
        )
        .is_empty()
    }

    /// Cancels a running job (its worker is told; the job ends later).
    async fn cancel_running(&self, id: JobId, reason: &str) {
        let outcome = self.env.app.cancel(id, "operator", reason).await;
        assert!(matches!(outcome, Ok(Cancel::Requested(_))), "{outcome:?}");
    }

    /// Waits for a cancelled job to end, stops `pool`, and returns the job
    /// (checked `cancelled`) with its `cancelled` event's data.
    async fn cancelled(&self, id: JobId, pool: RunningPool) -> (Job, Value) {
        let done = self
            .env
            .wait_terminal(&[id], Duration::from_secs(60))
            .await
            .remove(0);
        pool.shutdown().await;
        assert_eq!(done.status, Status::Cancelled, "{:?}", done.last_error);
        (done, self.env.cancelled_event(id).await)
    }

    /// A worker process that sees our kinds, data dir and local origin.
    fn worker(&self, concurrency: usize) -> WorkerProcess {
        let (data, workers) = (
            path_str(&self.data()),
            path_str(&self.tmp.path().join("workers")),
        );
        let vars = [
            ("ORCH_GIT_ALLOW_LOCAL", "true"),
            ("ORCH_GIT__DATA_DIR", data.as_str()),
            ("ORCH_SANDBOX__WORKERS_DIR", workers.as_str()),
        ];
        WorkerProcess::spawn_with(&self.env, &self.queue, concurrency, &vars)
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// Containers of this test's deployment (its key prefix), running or not.
async fn containers(env: &TestEnv) -> usize {
    let rt = Runtime::Docker(DockerRuntime::connect().await.expect("docker"));
    rt.list_ours(&env.app.settings().key_prefix)
        .await
        .expect("list")
        .len()
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_stage(env: &TestEnv, id: JobId, stage: &str) {
    wait_until(
        &format!("stage {stage}"),
        Duration::from_secs(60),
        || async { env.job(id).await.stage.as_deref() == Some(stage) },
    )
    .await;
}

fn cli_json(env: &TestEnv, args: &[&str]) -> Value {
    let out = crate::support::cli(env, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[tokio::test]
async fn a_job_waiting_in_its_queue_or_for_its_time_is_cancelled_at_once() {
    let f = fixture().await;
    let queued = f.env.enqueue(vec![f.job("agent", "true")]).await.remove(0);
    let mut later = f.job("agent", "true");
    later.delay_secs = Some(600);
    let scheduled = f.env.enqueue(vec![later]).await.remove(0);
    for (job, from) in [(queued, "queued"), (scheduled, "scheduled")] {
        let outcome = f.env.app.cancel(job.id, "operator", "not today").await;
        assert!(matches!(outcome, Ok(Cancel::Done(_))), "{outcome:?}");
        let done = f.env.job(job.id).await;
        assert_eq!(done.status, Status::Cancelled);
        let data = f.env.cancelled_event(job.id).await;
        assert_eq!(data["from"], from);
        assert_eq!(data["reason"], "not today");
    }
    let depth = f
        .env
        .app
        .queue()
        .depth(&f.queue.parse().expect("queue"))
        .await
        .expect("depth");
    assert_eq!(depth.pending() + depth.delayed, 0, "both left the index");
}

#[tokio::test]
async fn a_cancel_while_the_agent_runs_removes_its_sandbox_and_worktree() {
    let f = fixture().await;
    let job = f
        .env
        .enqueue(vec![f.job("agent", "echo working; sleep 600")])
        .await
        .remove(0);
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    wait_until("the agent", Duration::from_secs(60), || async {
        containers(&f.env).await == 1
    })
    .await;
    assert!(f.worktree(job.id).exists());

    f.cancel_running(job.id, "wrong task").await;
    let (_, data) = f.cancelled(job.id, pool).await;
    assert_eq!(
        (&data["stage"], &data["requested_by"], &data["reason"]),
        (&json!("spawn"), &json!("operator"), &json!("wrong task"))
    );
    assert_eq!(containers(&f.env).await, 0, "the sandbox is gone");
    assert!(!f.worktree(job.id).exists(), "the worktree is gone");
    assert!(!f.pushed(job.id));
}

/// The git stage is held on the mirror's lock (taken here, as another
/// job's push would); the cancel lands while the commit waits, and takes
/// effect when that step ends: nothing after it runs, nothing is pushed.
#[tokio::test]
async fn a_cancel_in_the_git_stage_stops_it_before_anything_is_pushed() {
    let f = fixture().await;
    let script = "while [ ! -f go ]; do sleep 0.1; done; rm go; echo hi > hi.txt";
    let job = f.env.enqueue(vec![f.job("agent", script)]).await.remove(0);
    let mut pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    wait_until("the agent", Duration::from_secs(60), || async {
        containers(&f.env).await == 1
    })
    .await;
    let mirrors = f.data().join("mirrors");
    let lock_path = std::fs::read_dir(&mirrors)
        .expect("mirrors")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "lock"))
        .expect("the mirror's lock file");
    let file = std::fs::File::open(&lock_path).expect("open lock");
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    std::fs::write(f.workspace(job.id).join("go"), "").expect("signal the agent");
    wait_stage(&f.env, job.id, "git").await;

    f.cancel_running(job.id, "wrong repo").await;
    // The pool has taken the cancel in while the commit still waits.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match pool.events.recv().await {
                Some(PoolEvent::CancelSeen(id)) if id == job.id => break,
                Some(_) => {}
                None => panic!("the pool stopped"),
            }
        }
    })
    .await
    .expect("the pool never saw the cancel");
    assert_eq!(
        f.env.job(job.id).await.status,
        Status::Running,
        "still in the commit"
    );
    drop(lock);

    let (done, data) = f.cancelled(job.id, pool).await;
    assert_eq!(done.attempt, 1);
    assert_eq!(
        (&data["stage"], &data["requested_by"], &data["reason"]),
        (&json!("git"), &json!("operator"), &json!("wrong repo"))
    );
    assert!(!f.pushed(job.id), "nothing pushed");
    assert!(!f.worktree(job.id).exists(), "worktree removed");
    assert_eq!(containers(&f.env).await, 0);
    assert_eq!(f.env.terminal_events(job.id).await, 1);
}

#[tokio::test]
async fn a_cancel_in_the_gates_stage_stops_the_gate_sandbox() {
    let f = fixture().await;
    let job = f
        .env
        .enqueue(vec![f.job("gated", "echo hi > hi.txt")])
        .await
        .remove(0);
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    wait_stage(&f.env, job.id, "gates").await;
    wait_until("the gate's sandbox", Duration::from_secs(60), || async {
        containers(&f.env).await == 1
    })
    .await;

    f.cancel_running(job.id, "gate hangs").await;
    let (_, data) = f.cancelled(job.id, pool).await;
    assert_eq!(
        (&data["stage"], &data["requested_by"]),
        (&json!("gates"), &json!("operator"))
    );
    assert_eq!(containers(&f.env).await, 0, "the gate's sandbox is gone");
    assert!(!f.worktree(job.id).exists(), "worktree removed");
    assert!(!f.pushed(job.id), "nothing pushed");
}

/// The worker is SIGKILLed while it waits out the agent's grace period
/// (after its SIGTERM reached the agent):
/// the sandbox and worktree outlive it. The reaper of another worker
/// finds the expired lease with the cancel request still standing and
/// finishes the cancel.
#[tokio::test]
async fn the_reaper_completes_a_cancel_whose_worker_died_midway() {
    let f = fixture().await;
    // Notes the SIGTERM in the worktree, and carries on; `trapped` says the
    // trap is set (a SIGTERM before that would end the shell).
    let script = "trap 'touch /workspace/got-term' TERM; touch /workspace/trapped; \
                  echo started; while true; do sleep 1; done";
    let job = f
        .env
        .enqueue(vec![f.job("stubborn", script)])
        .await
        .remove(0);
    let mut worker = f.worker(1);
    let trapped = f.workspace(job.id).join("trapped");
    wait_until("the agent's trap", Duration::from_secs(60), || async {
        trapped.exists() && f.env.job(job.id).await.status == Status::Running
    })
    .await;
    f.cancel_running(job.id, "stuck").await;
    // The worker has sent SIGTERM (noted, not obeyed) and waits out the
    // grace period: kill it there.
    let mark = f.workspace(job.id).join("got-term");
    wait_until("the SIGTERM", Duration::from_secs(30), || async {
        mark.exists()
    })
    .await;
    worker.kill9();
    assert_eq!(
        containers(&f.env).await,
        1,
        "the sandbox outlived its worker"
    );
    assert!(f.worktree(job.id).exists(), "so did the worktree");
    assert_eq!(f.env.job(job.id).await.status, Status::Running);

    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    let done = f
        .env
        .wait_terminal(&[job.id], Duration::from_secs(60))
        .await;
    assert_eq!(
        done[0].status,
        Status::Cancelled,
        "{:?}",
        done[0].last_error
    );
    assert_eq!(done[0].attempt, 1, "not retried");
    let data = f.env.cancelled_event(job.id).await;
    assert_eq!(data["requested_by"], "operator");
    assert_eq!(data["reason"], "stuck");
    assert!(data["completed_by"].is_string(), "{data}");
    wait_until("the cleanup", Duration::from_secs(30), || async {
        containers(&f.env).await == 0 && !f.worktree(job.id).exists()
    })
    .await;
    pool.shutdown().await;
    assert_eq!(f.env.terminal_events(job.id).await, 1);
}

/// 20 running `sleep` agents across 2 worker processes, and 3 queued jobs
/// behind them: kill-all stops every agent and leaves the queued jobs
/// alone; after resume those run to completion.
#[tokio::test]
async fn kill_all_stops_twenty_agents_on_two_workers_and_resume_runs_the_queued_ones() {
    let f = fixture().await;
    let env = &f.env;
    let mut requests = Vec::new();
    for _ in 0..20 {
        let mut r = request("agent", &f.queue, json!({ "script": "sleep 600" }));
        r.priority = Some(9);
        requests.push(r);
    }
    for i in 0..3 {
        let mut r = request("agent", &f.queue, json!({ "script": format!("echo {i}") }));
        r.priority = Some(1);
        requests.push(r);
    }
    let jobs = env.enqueue(requests).await;
    let (agents, queued) = jobs.split_at(20);
    let _a = f.worker(10);
    let _b = f.worker(10);
    wait_until("20 running agents", Duration::from_secs(120), || async {
        containers(env).await == 20
    })
    .await;

    let t0 = Instant::now();
    let report = cli_json(env, &["kill-all", "--reason", "incident 42"]);
    eprintln!("kill-all with 20 running agents: {:?}", t0.elapsed());
    assert_eq!(report["engaged"], true);
    assert_eq!(report["actor"], "cli");
    assert_eq!(
        (&report["cancelled"], &report["failed"]),
        (&json!(20), &json!(0)),
        "{report}"
    );
    assert_eq!(containers(env).await, 0, "every sandbox is gone");
    let ids: Vec<JobId> = agents.iter().map(|j| j.id).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    crate::support::assert_status(&done, Status::Cancelled);
    let mut workers = std::collections::HashSet::new();
    for id in &ids {
        for e in env.app.store().job_events(*id, None).await.expect("events") {
            if e.kind == "started" {
                workers.insert(e.actor);
            }
        }
        let data = env.cancelled_event(*id).await;
        assert_eq!(
            (&data["requested_by"], &data["stage"]),
            (&json!("cli"), &json!("spawn"))
        );
    }
    assert_eq!(workers.len(), 2, "both workers ran agents");

    tokio::time::sleep(Duration::from_secs(1)).await;
    for j in queued {
        assert_eq!(env.job(j.id).await.status, Status::Queued, "untouched");
    }
    let state = cli_json(env, &["kill-switch"]);
    assert_eq!(
        (&state["engaged"], &state["reason"]),
        (&json!(true), &json!("incident 42"))
    );

    let resumed = cli_json(env, &["resume"]);
    assert_eq!(resumed["engaged"], false);
    let ids: Vec<JobId> = queued.iter().map(|j| j.id).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    crate::support::assert_status(&done, Status::Succeeded);
    let trail = env.app.store().control_events(10).await.expect("trail");
    let kinds: Vec<&str> = trail.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["resume", "kill_all"]);
    assert_eq!(trail[1].actor, "cli");
}

/// Three running agents under a worker process, on a private Postgres the
/// test may stop or hang.
struct AgentsOnOwnPostgres {
    pg: PgServer,
    env: TestEnv,
    ids: Vec<JobId>,
    _worker: WorkerProcess,
}

async fn three_agents_on_own_postgres() -> AgentsOnOwnPostgres {
    let pg = PgServer::start();
    let database_url = crate::support::fresh_database(&pg.url()).await;
    let env = TestEnv::with_services(&database_url, &env_var("ORCH_VALKEY_URL")).await;
    let queue = unique_queue();
    let requests = (0..3)
        .map(|_| {
            request(
                "script-agent",
                &queue,
                json!({ "script": "echo working; sleep 600" }),
            )
        })
        .collect();
    let ids: Vec<JobId> = env.enqueue(requests).await.iter().map(|j| j.id).collect();
    let worker = WorkerProcess::spawn(&env, &queue, 3);
    wait_until("3 running agents", Duration::from_secs(60), || async {
        containers(&env).await == 3
    })
    .await;
    AgentsOnOwnPostgres {
        pg,
        env,
        ids,
        _worker: worker,
    }
}

/// What kill-all answers with Postgres unreachable: every agent stopped,
/// the audit kept for later, Postgres named in the errors.
async fn assert_killed_without_postgres(env: &TestEnv, reason: &str) {
    let t0 = Instant::now();
    let report = cli_json(env, &["kill-all", "--reason", reason]);
    eprintln!("kill-all without Postgres ({reason}): {:?}", t0.elapsed());
    assert_eq!(
        (&report["cancelled"], &report["failed"]),
        (&json!(3), &json!(0)),
        "{report}"
    );
    assert_eq!(report["audit"], "pending", "{report}");
    assert!(
        report["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("Postgres")),
        "{report}"
    );
    assert_eq!(containers(env).await, 0, "every sandbox is gone");
    assert_eq!(cli_json(env, &["kill-switch"])["engaged"], true);
}

/// Once Postgres is back: every job cancelled once, by whom and why, and
/// the kill-all's record written from the outbox, naming every job.
async fn assert_records_caught_up(env: &TestEnv, ids: &[JobId], reason: &str) {
    let done = env.wait_terminal(ids, Duration::from_secs(60)).await;
    crate::support::assert_status(&done, Status::Cancelled);
    for id in ids {
        assert_eq!(env.terminal_events(*id).await, 1);
        let data = env.cancelled_event(*id).await;
        assert_eq!(data["requested_by"], "cli");
        assert_eq!(data["reason"], reason);
    }
    wait_until("the audit record", Duration::from_secs(30), || async {
        env.app
            .store()
            .control_events(10)
            .await
            .is_ok_and(|t| t.len() == 1)
    })
    .await;
    let trail = env.app.store().control_events(10).await.expect("trail");
    assert_eq!(trail[0].kind, "kill_all");
    assert_eq!(trail[0].reason, reason);
    let mut listed: Vec<String> = trail[0].data["jobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    listed.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "the record names every job it stopped");
    let outbox: Vec<String> = env.app.queue().outbox_peek(10).await.expect("outbox");
    assert!(outbox.is_empty(), "the outbox is drained");
}

/// Postgres is down (connections refused): the kill switch still stops
/// every sandbox (Valkey flags and signals); once Postgres is back, the
/// records are complete.
#[tokio::test]
async fn kill_all_while_postgres_is_down_stops_sandboxes_and_records_catch_up() {
    let t = three_agents_on_own_postgres().await;
    t.pg.halt();
    assert_killed_without_postgres(&t.env, "database incident").await;
    t.pg.resume();
    assert_records_caught_up(&t.env, &t.ids, "database incident").await;
}

/// Postgres hangs rather than refuses (every process stopped with SIGSTOP):
/// kill-all still stops every sandbox and answers within its bounds; the
/// records follow once Postgres wakes.
#[tokio::test]
async fn kill_all_while_postgres_hangs_answers_and_records_catch_up() {
    let t = three_agents_on_own_postgres().await;
    let frozen = t.pg.freeze();
    assert_killed_without_postgres(&t.env, "database hangs").await;
    drop(frozen);
    assert_records_caught_up(&t.env, &t.ids, "database hangs").await;
}
