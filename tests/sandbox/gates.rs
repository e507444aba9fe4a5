//! Quality gates through the real lifecycle: fresh sandboxes on the
//! committed tree, required and advisory gates, coverage, and an AI review
//! gate run by a reviewer image (a MOCK standing in for a hosted LLM), and
//! an `http` gate asking a coordinator on 127.0.0.1 (a test receiver
//! standing in for the control plane).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use orchestrator::job::{Job, Status};
use serde_json::{json, Value};

use crate::support::receiver::{Answer, Receiver, Signing};
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
    fixture_with(KIND, |_| {}).await
}

/// A repository, the `gated-agent` kind defined by `kind`, and settings
/// adjusted by `adjust`.
async fn fixture_with(
    kind: &str,
    adjust: impl FnOnce(&mut orchestrator::config::Settings),
) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = crate::support::git::bare_origin(tmp.path(), &[("README.md", "# app\n")]);
    let workers = tmp.path().join("workers");
    std::fs::create_dir_all(workers.join("gated-agent")).expect("mkdir");
    std::fs::write(workers.join("gated-agent").join("worker.toml"), kind).expect("kind");
    let data = tmp.path().join("git-data");
    let env = TestEnv::with_settings(move |s| {
        s.git.allow_local = true;
        s.git.data_dir = data;
        s.sandbox.workers_dir = workers;
        adjust(s);
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

/// A kind whose one gate is an `http` gate asking `url`.
const COORDINATED: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 60
stop_grace_secs = 2

[gates]
default_profile = "standard"

[[gates.gate]]
name = "coordinator"
type = "http"
url = "{url}"
timeout_secs = 5
threshold = 0.8
profiles = ["standard"]
"#;

async fn coordinated(url: &str, secret: &str) -> Fixture {
    let secret = secret.to_owned();
    fixture_with(&COORDINATED.replace("{url}", url), move |s| {
        s.gates.coordinator_secrets = vec![orchestrator::secret::Secret::new(secret)];
        s.webhooks.allow_local = true;
    })
    .await
}

fn verdict(pass: bool, confidence: f64, sign: Signing) -> Answer {
    Answer::Body {
        body: json!({ "pass": pass, "confidence": confidence, "reason": "checked by the test coordinator" }),
        sign,
        delay: Duration::ZERO,
        status: 200,
    }
}

#[tokio::test]
async fn an_http_gate_sends_the_change_signed_and_takes_only_a_signed_answer() {
    let secret = orchestrator::app::new_webhook_secret().expect("randomness");
    let rx = Receiver::start(&secret).await;
    rx.answer(verdict(true, 0.95, Signing::Good));
    let f = coordinated(&rx.url, &secret).await;
    let done = f.run("echo hello > hello.txt", None).await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let result = done.result.as_ref().expect("result");
    let gate = &result["gates"]["coordinator"];
    assert_eq!(gate["passed"], true, "{gate}");
    assert_eq!(gate["type"], "http");
    assert!(gate["detail"].as_str().expect("detail").contains("0.95"));
    assert!(f.pushed(&done));
    // What the coordinator was sent, checked with the receiver's own
    // implementation of the signature.
    let asked = rx.received();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].valid, "the request was not signed");
    let review = &asked[0].body;
    assert_eq!(review["commit"], result["commit"]);
    assert_eq!(review["diff"]["paths"], json!(["hello.txt"]));
    assert_eq!(review["diff"]["files_changed"], 1);
    assert_eq!(review["diff"]["insertions"], 1);
    assert_eq!(review["job"]["id"], json!(done.id.to_string()));
    assert_eq!(review["job"]["payload"]["script"], "echo hello > hello.txt");
    assert_eq!(review["gates"], json!([]), "no gate ran before it");

    // A forged answer (another secret) fails the required gate: nothing is
    // pushed.
    rx.answer(verdict(
        true,
        0.99,
        Signing::Forged(orchestrator::app::new_webhook_secret().expect("randomness")),
    ));
    let done = f.run("echo hello > hello.txt", None).await;
    assert_eq!(done.status, Status::Dead);
    let error = done.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("gate_failed: coordinator") && error.contains("no signature"),
        "{error}"
    );
    assert!(!f.pushed(&done));
}

#[tokio::test]
async fn an_http_gate_fails_closed_on_every_bad_answer() {
    let secret = orchestrator::app::new_webhook_secret().expect("randomness");
    let rx = Receiver::start(&secret).await;
    let env = TestEnv::with_settings(|s| {
        s.gates.coordinator_secrets = vec![orchestrator::secret::Secret::new(secret.clone())];
        // The webhook secret is not the coordinator's: an answer signed
        // with it is forged.
        s.webhooks.secrets = vec![orchestrator::secret::Secret::new(
            orchestrator::app::new_webhook_secret().expect("randomness"),
        )];
        s.webhooks.allow_local = true;
    })
    .await;
    let settings = env.app.settings();
    let coordinator = settings
        .webhooks
        .coordinator(&settings.gates)
        .expect("coordinator");
    let gate: orchestrator::pipeline::gates::GateDef = serde_json::from_value(json!({
        "name": "coordinator", "type": "http", "url": rx.url, "timeout_secs": 1, "threshold": 0.8,
    }))
    .expect("gate");
    let review = json!({ "commit": "abc" });
    let body = |pass: bool, confidence: f64| json!({ "pass": pass, "confidence": confidence, "reason": "r" });
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "passes",
            verdict(true, 0.9, Signing::Good),
            "passed with confidence 0.90",
        ),
        (
            "fails",
            verdict(false, 0.9, Signing::Good),
            "failed (confidence 0.90)",
        ),
        (
            "below the threshold",
            verdict(true, 0.5, Signing::Good),
            "below 0.8",
        ),
        (
            "forged",
            verdict(
                true,
                0.9,
                Signing::Forged(orchestrator::app::new_webhook_secret().expect("randomness")),
            ),
            "no signature",
        ),
        ("unsigned", verdict(true, 0.9, Signing::None), "not signed"),
        (
            "replayed",
            verdict(true, 0.9, Signing::OtherId),
            "not this request's",
        ),
        (
            "times out",
            Answer::Body {
                body: body(true, 0.9),
                sign: Signing::Good,
                delay: Duration::from_secs(3),
                status: 200,
            },
            "did not answer within 1s",
        ),
        (
            "non-2xx",
            Answer::Body {
                body: body(true, 0.9),
                sign: Signing::Good,
                delay: Duration::ZERO,
                status: 503,
            },
            "HTTP 503",
        ),
        (
            "garbled",
            Answer::Body {
                body: json!({ "pass": "yes" }),
                sign: Signing::Good,
                delay: Duration::ZERO,
                status: 200,
            },
            "is not {\"pass\"",
        ),
        (
            "confidence out of range",
            verdict(true, 1.5, Signing::Good),
            "not between 0 and 1",
        ),
    ];
    for (i, (case, answer, expected)) in cases.into_iter().enumerate() {
        rx.answer(answer);
        let (passed, detail) = coordinator
            .ask(&gate, &format!("gate_test_{i}"), &review)
            .await;
        assert_eq!(passed, case == "passes", "{case}: {detail}");
        assert!(detail.contains(expected), "{case}: {detail}");
    }
    assert!(
        rx.received().iter().all(|r| r.valid),
        "a request was not signed"
    );
    // Nowhere to ask, or nothing to sign with: fails too.
    let mut nowhere = gate.clone();
    nowhere.url = None;
    let (passed, detail) = coordinator.ask(&nowhere, "gate_x", &review).await;
    assert!(!passed && detail.contains("no coordinator"), "{detail}");
    // A coordinator answering with the webhook secret (which every webhook
    // receiver knows) is refused.
    let webhook_secret = settings.webhooks.secrets[0].expose().to_owned();
    rx.answer(verdict(true, 0.99, Signing::Forged(webhook_secret)));
    let (passed, detail) = coordinator.ask(&gate, "gate_w", &review).await;
    assert!(!passed && detail.contains("no signature"), "{detail}");
    let mut unsigned = settings.gates.clone();
    unsigned.coordinator_secrets.clear();
    let (passed, detail) = settings
        .webhooks
        .coordinator(&unsigned)
        .expect("coordinator")
        .ask(&gate, "gate_y", &review)
        .await;
    assert!(
        !passed && detail.contains("no coordinator secret"),
        "{detail}"
    );
}
