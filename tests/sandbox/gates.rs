//! Quality gates through the real lifecycle: fresh sandboxes on the
//! committed tree, required and advisory gates, coverage, and an AI review
//! gate run by a reviewer image (a MOCK standing in for a hosted LLM).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use orchestrator::job::{Job, Status};
use serde_json::{json, Value};

use crate::support::{request, unique_queue, TestEnv};

const KIND: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 60
stop_grace_secs = 2

[gates]
default_profile = "standard"

[[gates.gate]]
name = "tests"
type = "command"
command = ["sh", "-c", "echo running tests; test -f hello.txt && test ! -e .git && test ! -e ignored.tmp && echo tests pass"]
profiles = ["standard", "strict"]

[[gates.gate]]
name = "style"
type = "command"
command = ["sh", "-c", "echo 'style: 3 nits'; touch /workspace/x 2>/dev/null && echo WROTE; exit 1"]
required = false
profiles = ["standard", "strict"]

[[gates.gate]]
name = "coverage"
type = "coverage"
command = ["sh", "-c", "echo 'TOTAL 100 20 80.0%'"]
threshold = 90.0
profiles = ["strict"]

[[gates.gate]]
name = "review"
type = "ai-review"
image = "orchestrator/review-stub:latest"
command = ["sh", "-c", "if grep -q '^+hello' /review/diff.patch; then echo '{\"approved\": true, \"confidence\": 0.95, \"summary\": \"adds the greeting\"}'; else echo '{\"approved\": true, \"confidence\": 0.4, \"summary\": \"not sure what this does\"}'; fi"]
profiles = ["strict"]
"#;

struct Fixture {
    env: TestEnv,
    bare: PathBuf,
    _tmp: tempfile::TempDir,
    queue: String,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = crate::support::git::bare_origin(tmp.path(), &[("README.md", "# app\n")]);
    let workers = tmp.path().join("workers");
    std::fs::create_dir_all(workers.join("gated-agent")).expect("mkdir");
    std::fs::write(workers.join("gated-agent").join("worker.toml"), KIND).expect("kind");
    let data = tmp.path().join("git-data");
    let env = TestEnv::with_settings(move |s| {
        s.git.allow_local = true;
        s.git.data_dir = data;
        s.sandbox.workers_dir = workers;
    })
    .await;
    Fixture {
        env,
        bare,
        _tmp: tmp,
        queue: unique_queue(),
    }
}

impl Fixture {
    async fn run(&self, script: &str, gates: Option<Value>) -> Job {
        let mut payload =
            json!({ "script": script, "repo": self.bare.to_str().expect("utf-8"), "push": true });
        if let Some(g) = gates {
            payload["gates"] = g;
        }
        let mut r = request("gated-agent", &self.queue, payload);
        r.max_attempts = Some(1);
        let job = self.env.enqueue(vec![r]).await.remove(0);
        let pool = self.env.start_pool(self.env.pool_config(&self.queue, 1));
        let done = self
            .env
            .wait_terminal(&[job.id], Duration::from_secs(90))
            .await
            .remove(0);
        pool.shutdown().await;
        done
    }

    fn pushed(&self, job: &Job) -> bool {
        Command::new("git")
            .args([
                "rev-parse",
                "--verify",
                "-q",
                &format!("orchestrator/{}", job.id),
            ])
            .current_dir(&self.bare)
            .status()
            .expect("git")
            .success()
    }
}

#[tokio::test]
async fn an_advisory_failure_is_recorded_and_does_not_stop_the_job() {
    let f = fixture().await;
    let done = f.run("echo hello > hello.txt", None).await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let gates = &done.result.as_ref().expect("result")["gates"];
    assert_eq!(gates["tests"]["passed"], true);
    assert_eq!(gates["style"]["passed"], false);
    assert_eq!(gates["style"]["required"], false);
    let tail: Vec<&str> = gates["style"]["output_tail"]
        .as_array()
        .expect("tail")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(tail.contains(&"style: 3 nits"), "{tail:?}");
    assert!(!tail.contains(&"WROTE"), "gates see the tree read-only");
    assert!(
        gates.get("coverage").is_none(),
        "not in the standard profile"
    );
    assert!(f.pushed(&done));
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    assert_eq!(
        events.iter().filter(|e| e.kind == "gate_finished").count(),
        2
    );
}

#[tokio::test]
async fn gates_see_the_commit_not_what_it_left_out() {
    let f = fixture().await;
    // An ignored file and the sandbox's own .git stay in the workspace;
    // the "tests" gate fails if it can see either.
    let done = f
        .run(
            "printf '*.tmp\\n' > .gitignore && echo x > ignored.tmp && echo hello > hello.txt",
            None,
        )
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let gates = &done.result.as_ref().expect("result")["gates"];
    assert_eq!(gates["tests"]["passed"], true, "{gates}");
}

#[tokio::test]
async fn a_failing_required_gate_fails_the_job_with_its_output_and_nothing_is_pushed() {
    let f = fixture().await;
    let done = f.run("echo nothing useful > other.txt", None).await;
    assert_eq!(done.status, Status::Dead);
    assert_eq!(
        done.last_error.as_deref(),
        Some("gate_failed: tests: exit code 1")
    );
    let result = done
        .result
        .clone()
        .expect("a failed job keeps its gate results");
    assert_eq!(result["outcome"], "gate_failed");
    assert_eq!(result["gates"]["tests"]["passed"], false);
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    let tests = events
        .iter()
        .find(|e| e.kind == "gate_finished" && e.data["name"] == "tests")
        .expect("gate event");
    assert_eq!(tests.data["passed"], false);
    assert_eq!(tests.data["output_tail"], json!(["running tests"]));
    assert!(
        !events
            .iter()
            .any(|e| e.kind == "gate_finished" && e.data["name"] == "style"),
        "stopped at the first failure"
    );
    assert!(!f.pushed(&done), "nothing pushed");
}

#[tokio::test]
async fn coverage_below_the_threshold_fails() {
    let f = fixture().await;
    let done = f
        .run("echo hello > hello.txt", Some(json!(["coverage"])))
        .await;
    assert_eq!(done.status, Status::Dead);
    assert_eq!(
        done.last_error.as_deref(),
        Some("gate_failed: coverage: coverage 80.0% is below the threshold of 90%")
    );
}

#[tokio::test]
async fn the_ai_review_gate_runs_a_different_container_and_needs_confidence() {
    let f = fixture().await;
    let approved = f
        .run("echo hello > hello.txt", Some(json!(["review"])))
        .await;
    assert_eq!(
        approved.status,
        Status::Succeeded,
        "{:?}",
        approved.last_error
    );
    let review = &approved.result.as_ref().expect("result")["gates"]["review"];
    assert_eq!(review["passed"], true);
    assert_eq!(
        review["image"], "orchestrator/review-stub:latest",
        "the reviewer is not the agent's image"
    );
    assert!(review["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("0.95"));

    let doubtful = f
        .run("echo something else > other.txt", Some(json!(["review"])))
        .await;
    assert_eq!(doubtful.status, Status::Dead);
    let error = doubtful.last_error.unwrap_or_default();
    assert!(
        error.starts_with("gate_failed: review: approved, but with confidence 0.40 below 0.9"),
        "{error}"
    );
}

#[tokio::test]
async fn gate_choices_are_checked_at_enqueue() {
    let f = fixture().await;
    for gates in [json!("yolo"), json!(["no-such-gate"]), json!(42)] {
        let payload =
            json!({ "script": "true", "repo": f.bare.to_str().expect("utf-8"), "gates": gates });
        let err = f
            .env
            .app
            .validate(vec![request("gated-agent", &f.queue, payload)], "t")
            .expect_err("refused");
        assert!(err.to_string().contains("payload.gates"), "{err}");
    }
}

#[tokio::test]
async fn yolo_skips_the_gates_loudly() {
    let f = fixture().await;
    let payload = json!({ "script": "echo no hello here > other.txt", "repo": f.bare.to_str().expect("utf-8"), "yolo": true });
    let mut r = request("gated-agent", &f.queue, payload);
    r.max_attempts = Some(1);
    let job = f.env.enqueue(vec![r]).await.remove(0);
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    let done = f
        .env
        .wait_terminal(&[job.id], Duration::from_secs(90))
        .await
        .remove(0);
    pool.shutdown().await;
    // The required "tests" gate would fail; YOLO skipped it.
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    assert_eq!(done.result.as_ref().expect("result")["yolo"], true);
    let events = f
        .env
        .app
        .store()
        .job_events(done.id, None)
        .await
        .expect("events");
    assert_eq!(events[0].data["yolo"], true, "marked when enqueued");
    let skipped = events
        .iter()
        .find(|e| e.kind == "gates_skipped")
        .expect("a gates_skipped event");
    assert_eq!(skipped.data["gates"], json!(["tests", "style"]));
    assert!(!events.iter().any(|e| e.kind == "gate_finished"));
}
