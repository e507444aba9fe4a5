//! Agent jobs on a repository, end to end: worktree, agent in its sandbox,
//! commit with secret scan, conflict check, push; real Docker, git,
//! Postgres and Valkey.

use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrator::job::{JobId, Status};
use serde_json::json;

use crate::support::git::git;
use crate::support::{request, unique_queue, TestEnv};

fn origin(dir: &Path) -> PathBuf {
    crate::support::git::bare_origin(dir, &[("README.md", "# app\nline two\n")])
}

pub(crate) struct Fixture {
    pub(crate) env: TestEnv,
    pub(crate) bare: PathBuf,
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) queue: String,
}

pub(crate) async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

/// A bare origin on this machine and a test environment whose git stage
/// uses it, with `adjust` applied to the settings.
pub(crate) async fn fixture_with(
    adjust: impl FnOnce(&mut orchestrator::config::Settings) + Send + 'static,
) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let data = tmp.path().join("git-data");
    let env = TestEnv::with_settings(move |s| {
        s.git.allow_local = true;
        s.git.data_dir = data;
        adjust(s);
    })
    .await;
    Fixture {
        env,
        bare,
        tmp,
        queue: unique_queue(),
    }
}

impl Fixture {
    /// One `script-agent` job with `payload` (one attempt), through a pool
    /// of its own, to its end.
    pub(crate) async fn run(&self, payload: serde_json::Value) -> orchestrator::job::Job {
        let pool = self.env.start_pool(self.env.pool_config(&self.queue, 2));
        let done = self.finish(payload, Duration::from_secs(90)).await;
        pool.shutdown().await;
        done
    }

    /// One `script-agent` job with `payload` (one attempt) on the pool
    /// already running, to its end (within `limit`).
    pub(crate) async fn finish(
        &self,
        payload: serde_json::Value,
        limit: Duration,
    ) -> orchestrator::job::Job {
        let mut r = request("script-agent", &self.queue, payload);
        r.max_attempts = Some(1);
        let job = self.env.enqueue(vec![r]).await.remove(0);
        self.env.wait_terminal(&[job.id], limit).await.remove(0)
    }

    pub(crate) fn remote_branches(&self) -> String {
        git(
            &self.bare,
            &["for-each-ref", "--format=%(refname:short)", "refs/heads"],
        )
    }

    pub(crate) async fn event_types(&self, id: JobId) -> Vec<String> {
        self.env.event_types(id).await
    }

    /// Where the git stage keeps the jobs' worktrees.
    fn worktrees(&self) -> PathBuf {
        self.tmp.path().join("git-data").join("worktrees")
    }

    /// What the sandbox of `id` sees at /workspace.
    fn workspace(&self, id: JobId) -> PathBuf {
        self.worktrees().join(id.to_string()).join("workspace")
    }

    pub(crate) fn worktrees_left(&self) -> usize {
        std::fs::read_dir(self.worktrees())
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn an_agent_change_is_committed_scanned_and_pushed() {
    let f = fixture().await;
    let done = f
        .run(json!({
            "script": "echo 'hello from the agent' > hello.txt && id -u > uid.txt",
            "repo": f.bare.to_str().expect("utf-8"),
            "push": true,
        }))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let result = done.result.clone().expect("result");
    assert_eq!(result["pushed"], true);
    let branch = format!("orchestrator/{}", done.id);
    assert_eq!(result["branch"], branch);
    assert!(
        f.remote_branches().contains(&branch),
        "{}",
        f.remote_branches()
    );
    assert_eq!(
        git(&f.bare, &["show", &format!("{branch}:hello.txt")]),
        "hello from the agent"
    );
    assert_eq!(
        git(&f.bare, &["show", &format!("{branch}:uid.txt")]),
        "1000",
        "the agent ran as 1000"
    );
    assert_eq!(
        git(&f.bare, &["rev-parse", &branch]),
        result["commit"].as_str().expect("sha")
    );
    for key in ["spawn_ms", "git_ms", "complete_ms"] {
        assert!(result["stages"][key].is_u64(), "{key} missing: {result}");
    }
    let types = f.event_types(done.id).await;
    let stages: Vec<&String> = types.iter().filter(|t| t.starts_with("stage_")).collect();
    assert_eq!(stages.len(), 6, "{types:?}");
    assert_eq!(f.worktrees_left(), 0, "the worktree is cleaned up");
}

#[tokio::test]
async fn a_secret_written_by_the_agent_fails_the_job_and_nothing_is_pushed() {
    let f = fixture().await;
    let secret = "ghp_aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zAB";
    let done = f
        .run(json!({
            // Assembled by the agent, so the payload itself does not hold it.
            "script": "a=aB3dE5fG7hJ9kL2mN4pQ6rS8; b=tU0vW1xY3zAB; printf 'TOKEN=ghp_%s%s\\n' $a $b > .env.local",
            "repo": f.bare.to_str().expect("utf-8"),
            "push": true,
        }))
        .await;
    assert_eq!(done.status, Status::Dead);
    let error = done.last_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("secret_detected: github-pat in .env.local:1"),
        "{error}"
    );
    assert!(
        !f.remote_branches().contains(&done.id.to_string()),
        "nothing pushed"
    );
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    let found = events
        .iter()
        .find(|e| e.kind == "secret_detected")
        .expect("a secret_detected event");
    assert_eq!(found.data["findings"][0]["file"], ".env.local");
    let result = done
        .result
        .clone()
        .expect("a failed job keeps its findings");
    assert_eq!(result["outcome"], "secret_detected");
    assert_eq!(result["findings"][0]["rule_id"], "github-pat");
    let all = serde_json::to_string(&(events, done)).expect("json");
    assert!(!all.contains(secret), "the secret leaked into the trail");
    assert_eq!(f.worktrees_left(), 0);
}

#[tokio::test]
async fn a_conflicting_change_on_the_target_is_reported_and_nothing_is_pushed() {
    let f = fixture().await;
    let mut r = request(
        "script-agent",
        &f.queue,
        json!({
            // Waits for the human's push below (the `go` file), however
            // long it takes.
            "script": "printf '# app\\nline two, by the agent\\n' > README.md; echo edited; \
                       while [ ! -f go ]; do sleep 0.1; done; rm go",
            "repo": f.bare.to_str().expect("utf-8"),
            "base": "main",
            "push": true,
        }),
    );
    r.max_attempts = Some(1);
    let job = f.env.enqueue(vec![r]).await.remove(0);
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    // While the agent works, a human changes the same line on main.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = f
            .env
            .app
            .store()
            .job_events(job.id, None)
            .await
            .expect("events");
        if events.iter().any(|e| e.data["line"] == "edited") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Off the runtime's thread, which the pool's heartbeats share.
    let (tmp, bare) = (f.tmp.path().to_owned(), f.bare.clone());
    tokio::task::spawn_blocking(move || {
        let human = tmp.join("human");
        git(
            &tmp,
            &[
                "clone",
                "-q",
                bare.to_str().expect("utf-8"),
                human.to_str().expect("utf-8"),
            ],
        );
        std::fs::write(human.join("README.md"), "# app\nline two, by a human\n").expect("write");
        git(&human, &["commit", "-qam", "human"]);
        git(&human, &["push", "-q", "origin", "HEAD:main"]);
    })
    .await
    .expect("the human's push");
    std::fs::write(f.workspace(job.id).join("go"), "").expect("signal the agent");

    let done = f
        .env
        .wait_terminal(&[job.id], Duration::from_secs(60))
        .await
        .remove(0);
    pool.shutdown().await;
    assert_eq!(done.status, Status::Dead);
    assert!(
        done.last_error
            .as_deref()
            .unwrap_or_default()
            .starts_with("conflict:"),
        "{:?}",
        done.last_error
    );
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    let conflict = events
        .iter()
        .find(|e| e.kind == "conflict")
        .expect("a conflict event");
    assert_eq!(conflict.data["paths"], json!(["README.md"]));
    let result = done
        .result
        .clone()
        .expect("a failed job keeps its conflict");
    assert_eq!(
        (result["outcome"].as_str(), &result["paths"]),
        (Some("conflict"), &json!(["README.md"]))
    );
    assert!(
        !f.remote_branches().contains(&done.id.to_string()),
        "nothing pushed"
    );
    assert_eq!(f.worktrees_left(), 0);
}

#[tokio::test]
async fn hostile_agent_payloads_are_refused_at_enqueue() {
    let f = fixture().await;
    let cases = [
        json!({ "script": "true", "repo": "https://127.0.0.1/x.git" }),
        json!({ "script": "true", "repo": f.bare.to_str().expect("utf-8"), "branch": "../../etc" }),
        json!({ "script": "true", "repo": f.bare.to_str().expect("utf-8"), "branch": "-rf" }),
        json!({ "script": "true", "repo": f.bare.to_str().expect("utf-8"), "base": "a..b" }),
        json!({ "script": "true", "push": true }),
        json!({ "script": "true", "task": "both" }),
        json!({ "script": "true", "repo": f.bare.to_str().expect("utf-8"), "gates": "everything" }),
    ];
    for payload in cases {
        let r = request("script-agent", &f.queue, payload.clone());
        let err = f
            .env
            .app
            .validate(vec![r], "test")
            .expect_err(&payload.to_string());
        assert!(err.to_string().contains("payload"), "{payload}: {err}");
    }
}

#[tokio::test]
async fn a_sigkilled_workers_worktree_and_container_are_reaped() {
    let f = fixture().await;
    let mut r = request(
        "script-agent",
        &f.queue,
        json!({ "script": "echo working; sleep 30", "repo": f.bare.to_str().expect("utf-8") }),
    );
    r.max_attempts = Some(1);
    let job = f.env.enqueue(vec![r]).await.remove(0);
    let data = f.tmp.path().join("git-data");
    let vars = [
        ("ORCH_GIT_ALLOW_LOCAL", "true"),
        ("ORCH_GIT__DATA_DIR", data.to_str().expect("utf-8")),
        ("ORCH_SANDBOX__ORPHAN_REAP_INTERVAL_SECS", "1"),
    ];
    let mut victim = crate::support::WorkerProcess::spawn_with(&f.env, &f.queue, 1, &vars);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = f
            .env
            .app
            .store()
            .job_events(job.id, None)
            .await
            .expect("events");
        if events.iter().any(|e| e.data["line"] == "working") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    victim.kill9();
    assert_eq!(
        f.worktrees_left(),
        1,
        "the dead worker's worktree is still there"
    );

    // Another worker on this machine: its reapers end the lease (the job
    // had one attempt: dead), remove the container and the worktree.
    let rescuer = crate::support::WorkerProcess::spawn_with(&f.env, &f.queue, 1, &vars);
    let done = f
        .env
        .wait_terminal(&[job.id], Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(done.status, Status::Dead);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let types = f.event_types(job.id).await;
        let recorded = ["sandbox_removed", "worktree_removed"]
            .iter()
            .all(|t| types.iter().any(|x| x == t));
        if recorded && f.worktrees_left() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "orphans left: {types:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(rescuer);
    let mirror_branches = std::fs::read_dir(data.join("mirrors"))
        .expect("mirrors")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "git"))
        .map(|e| git(&e.path(), &["for-each-ref", "--format=%(refname)"]))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        !mirror_branches.contains(&job.id.to_string()),
        "no ref of the job is left in the mirror: {mirror_branches}"
    );
}

#[tokio::test]
async fn ten_agent_jobs_across_two_worker_processes_do_not_cross_talk() {
    let f = fixture().await;
    let mut requests = Vec::new();
    for i in 0..10 {
        let mut r = request(
            "script-agent",
            &f.queue,
            json!({
                "script": format!("echo \"job {i} $ORCH_JOB_ID\" > mine-{i}.txt; ls | grep -c mine- > count.txt"),
                "repo": f.bare.to_str().expect("utf-8"),
                "push": true,
            }),
        );
        r.max_attempts = Some(2);
        requests.push(r);
    }
    let jobs = f.env.enqueue(requests).await;
    let data = f.tmp.path().join("git-data");
    let vars = [
        ("ORCH_GIT_ALLOW_LOCAL", "true"),
        ("ORCH_GIT__DATA_DIR", data.to_str().expect("utf-8")),
    ];
    let a = crate::support::WorkerProcess::spawn_with(&f.env, &f.queue, 5, &vars);
    let b = crate::support::WorkerProcess::spawn_with(&f.env, &f.queue, 5, &vars);
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let done = f.env.wait_terminal(&ids, Duration::from_secs(120)).await;
    drop((a, b));
    let workers: std::collections::HashSet<String> = {
        let mut set = std::collections::HashSet::new();
        for id in &ids {
            for e in f
                .env
                .app
                .store()
                .job_events(*id, None)
                .await
                .expect("events")
            {
                if e.kind == "started" {
                    set.insert(e.actor);
                }
            }
        }
        set
    };
    assert_eq!(workers.len(), 2, "both workers took jobs: {workers:?}");
    for (i, job) in done.iter().enumerate() {
        assert_eq!(
            job.status,
            Status::Succeeded,
            "job {i}: {:?}",
            job.last_error
        );
        let branch = format!("orchestrator/{}", job.id);
        assert_eq!(
            git(&f.bare, &["show", &format!("{branch}:mine-{i}.txt")]),
            format!("job {i} {}", job.id)
        );
        // Each worktree held only its own file: no cross-talk.
        assert_eq!(git(&f.bare, &["show", &format!("{branch}:count.txt")]), "1");
    }
    assert_eq!(f.worktrees_left(), 0);
}

#[tokio::test]
async fn an_agent_past_its_timeout_fails_and_leaves_no_container_or_worktree() {
    let f = fixture().await;
    let mut r = request(
        "script-agent",
        &f.queue,
        json!({ "script": "echo started; sleep 60", "repo": f.bare.to_str().expect("utf-8") }),
    );
    r.max_attempts = Some(1);
    r.timeout_secs = Some(3);
    let job = f.env.enqueue(vec![r]).await.remove(0);
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    let done = f
        .env
        .wait_terminal(&[job.id], Duration::from_secs(60))
        .await
        .remove(0);
    pool.shutdown().await;
    assert_eq!(done.status, Status::Dead, "one attempt, by policy");
    assert!(
        done.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out after 3s"),
        "{:?}",
        done.last_error
    );
    assert_eq!(f.worktrees_left(), 0, "the worktree is gone");
    let rt = orchestrator::sandbox::Runtime::Docker(
        orchestrator::sandbox::DockerRuntime::connect()
            .await
            .expect("docker"),
    );
    let left = rt
        .list_ours(&f.env.app.settings().key_prefix)
        .await
        .expect("list");
    assert!(left.is_empty(), "containers left: {left:?}");
}

#[tokio::test]
async fn progress_lines_become_the_jobs_progress_not_log_lines() {
    let f = fixture().await;
    let done = f
        .run(json!({
            "script": "echo '::progress::10 cloning'; echo working; echo '::progress::abc not progress'; \
                       sleep 1.2; echo '::progress::60 tests pass'; echo '::progress::90 almost'",
        }))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let progress = done.progress.clone().expect("progress recorded");
    assert_eq!(progress.percent, 90, "the last report is always kept");
    assert_eq!(progress.message, "almost");
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    let logged: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "log")
        .filter_map(|e| e.data["line"].as_str())
        .collect();
    assert_eq!(logged, vec!["working", "::progress::abc not progress"]);
    let reported: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == "progress")
        .filter_map(|e| e.data["percent"].as_u64())
        .collect();
    // Coalesced to one write a second: 10 at once, then (after the pause)
    // 60 or straight to 90, and 90 last.
    assert_eq!(reported.first(), Some(&10), "{reported:?}");
    assert_eq!(reported.last(), Some(&90), "{reported:?}");
    assert!(reported.len() <= 3, "{reported:?}");
    let result = done.result.clone().expect("result");
    assert_eq!(result["log"]["progress_lines"], 3, "{result}");
    let view = serde_json::to_value(&done).expect("json");
    assert_eq!(view["progress"]["percent"], 90);
    assert!(view["version"].as_i64().is_some_and(|v| v > 0), "{view}");
}

#[tokio::test]
async fn an_agent_job_is_keyed_by_repository_and_branch_under_its_queues_limit() {
    let q = unique_queue();
    let limited = q.clone();
    let f = fixture_with(move |s| {
        s.admission.max_per_key.insert(limited, 2);
    })
    .await;
    let repo = f.bare.to_str().expect("utf-8").to_owned();
    let job = |extra: serde_json::Value| {
        let mut payload = json!({ "script": "true", "repo": repo });
        for (k, v) in extra.as_object().expect("object") {
            payload[k] = v.clone();
        }
        request("script-agent", &q, payload)
    };
    let jobs = f
        .env
        .enqueue(vec![
            job(json!({ "branch": "feature-x" })),
            job(json!({ "branch": "feature-x" })),
            job(json!({ "branch": "feature-x" })),
            job(json!({ "base": "main" })),
            job(json!({})),
        ])
        .await;
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.concurrency_key.as_deref()).collect();
    let (x, main, head) = (
        format!("{repo}#feature-x"),
        format!("{repo}#main"),
        format!("{repo}#HEAD"),
    );
    assert_eq!(
        keys,
        vec![
            Some(x.as_str()),
            Some(x.as_str()),
            Some(x.as_str()),
            Some(main.as_str()),
            Some(head.as_str())
        ],
        "its branch, else its base, else the remote's default"
    );
    // script-agent names no max_per_key: the queue's admission setting.
    assert!(
        jobs.iter().all(|j| j.concurrency_limit == Some(2)),
        "{:?}",
        jobs.iter().map(|j| j.concurrency_limit).collect::<Vec<_>>()
    );
    // The claim script keeps to it: two of feature-x start, the third is
    // held while the other keys start.
    let queue: orchestrator::job::QueueName = q.parse().expect("queue");
    let claimed = f
        .env
        .app
        .queue()
        .claim(
            &queue,
            10,
            Duration::from_secs(60),
            orchestrator::queue::Rates::default(),
        )
        .await
        .expect("claim");
    let orchestrator::queue::Claimed::Ids(ids) = claimed else {
        panic!("nothing claimed: {claimed:?}");
    };
    let ids: Vec<JobId> = ids.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert!(!ids.contains(&jobs[2].id), "the third of one key waits");
    assert_eq!(
        f.env.app.queue().depth(&queue).await.expect("depth").held,
        1
    );
}
