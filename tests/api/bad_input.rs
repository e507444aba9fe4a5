//! Hostile and broken input: a clear problem+json error, and nothing changed.

use reqwest::Method;
use serde_json::json;

use crate::support::api::{problem, TestApi, ADMIN, CANCEL, ENQUEUE, READ};

/// Sends `body` (raw bytes) with `content_type` to POST /v1/jobs.
async fn post_raw(api: &TestApi, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    api.request(Method::POST, "/v1/jobs", Some(ENQUEUE))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn bad_job_requests_are_refused_and_change_nothing() {
    let api = TestApi::spawn().await;
    let before = api.footprint().await;
    let past = (chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339();
    let future = (chrono::Utc::now() + chrono::Duration::days(800)).to_rfc3339();
    let mut deep = json!({});
    for _ in 0..60 {
        deep = json!({ "a": deep });
    }
    // Deeper than the JSON parser follows at all.
    let abyss = format!(
        "{{\"kind\": \"noop\", \"payload\": {}{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let json_cases: Vec<(serde_json::Value, u16, Option<&str>)> = vec![
        (json!({ "kind": "rm -rf /" }), 422, Some("kind")),
        (json!({ "kind": "nope" }), 422, Some("kind")),
        (
            json!({ "kind": "noop", "priority": 11 }),
            422,
            Some("priority"),
        ),
        (
            json!({ "kind": "noop", "priority": -1 }),
            422,
            Some("priority"),
        ),
        (json!({ "kind": "noop", "priority": "high" }), 422, None),
        (
            json!({ "kind": "noop", "timeout_secs": -5 }),
            422,
            Some("timeout_secs"),
        ),
        (
            json!({ "kind": "noop", "timeout_secs": 100000000 }),
            422,
            Some("timeout_secs"),
        ),
        (
            json!({ "kind": "noop", "max_attempts": 0 }),
            422,
            Some("max_attempts"),
        ),
        (
            json!({ "kind": "noop", "max_attempts": 99999999 }),
            422,
            Some("max_attempts"),
        ),
        (json!({ "kind": "noop", "surprise": true }), 422, None),
        (
            json!({ "kind": "noop", "payload": [1, 2] }),
            422,
            Some("payload"),
        ),
        (
            json!({ "kind": "noop", "payload": { "x": 1 } }),
            422,
            Some("payload"),
        ),
        (
            json!({ "kind": "sleep", "payload": { "ms": "; rm -rf /" } }),
            422,
            Some("payload"),
        ),
        (
            json!({ "kind": "noop", "payload": deep }),
            422,
            Some("payload"),
        ),
        (
            json!({ "kind": "noop", "run_at": past }),
            422,
            Some("run_at"),
        ),
        (
            json!({ "kind": "noop", "run_at": future }),
            422,
            Some("run_at"),
        ),
        (json!({ "kind": "noop", "run_at": "yesterday" }), 422, None),
        (
            json!({ "kind": "noop", "delay_secs": -1 }),
            422,
            Some("delay_secs"),
        ),
        (
            json!({ "kind": "noop", "queue": "../../etc" }),
            422,
            Some("queue"),
        ),
        (
            json!({ "kind": "noop", "queue": "q{x}" }),
            422,
            Some("queue"),
        ),
        (
            json!({ "kind": "noop", "queue": "ünïcödé" }),
            422,
            Some("queue"),
        ),
        (
            json!({ "kind": "noop", "idempotency_key": "a\u{0007}b" }),
            422,
            Some("idempotency_key"),
        ),
        (
            json!({ "kind": "noop", "idempotency_key": "k".repeat(300) }),
            422,
            Some("idempotency_key"),
        ),
        (
            json!({ "kind": "sleep", "payload": { "ms": 1, "blob": "x".repeat(40_000) } }),
            422,
            Some("payload"),
        ),
        (json!([]), 422, None),
        (json!(null), 422, None),
    ];
    for (body, status, field) in json_cases {
        let shown = body.to_string().chars().take(80).collect::<String>();
        let r = api.post_json("/v1/jobs", ENQUEUE, body).await;
        let p = problem(r, status).await;
        if let Some(field) = field {
            assert_eq!(p["field"], field, "{shown}: {p}");
        }
    }
    let raw_cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("application/json", b"{\"kind\": \"noop\"".to_vec(), 400),
        ("application/json", b"".to_vec(), 400),
        (
            "application/json",
            b"{\"kind\": \"no\xff\xfeop\"}".to_vec(),
            400,
        ),
        ("text/plain", b"{\"kind\": \"noop\"}".to_vec(), 415),
        (
            "application/x-www-form-urlencoded",
            b"kind=noop".to_vec(),
            415,
        ),
        ("application/json", vec![b' '; 70 * 1024], 413),
        ("application/json", abyss.into_bytes(), 400),
    ];
    for (content_type, body, status) in raw_cases {
        problem(post_raw(&api, content_type, body).await, status).await;
    }
    let r = api
        .request(Method::POST, "/v1/jobs", Some(ENQUEUE))
        .header("Idempotency-Key", "one")
        .json(&json!({ "kind": "noop", "idempotency_key": "two" }))
        .send()
        .await
        .expect("request");
    problem(r, 422).await;
    assert_eq!(
        api.footprint().await,
        before,
        "a rejected request changed something"
    );
}

#[tokio::test]
async fn bad_ids_cursors_and_filters() {
    let api = TestApi::spawn().await;
    let unknown = uuid::Uuid::now_v7();
    problem(api.get(&format!("/v1/jobs/{unknown}"), READ).await, 404).await;
    problem(
        api.get(&format!("/v1/jobs/{unknown}/events"), READ).await,
        404,
    )
    .await;
    problem(api.get("/v1/jobs/not-a-uuid", READ).await, 400).await;
    problem(api.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd", READ).await, 400).await;
    problem(api.get("/v1/jobs?cursor=garbage", READ).await, 400).await;
    problem(api.get("/v1/jobs?status=bogus", READ).await, 400).await;
    problem(api.get("/v1/jobs?limit=0", READ).await, 400).await;
    problem(api.get("/v1/jobs?limit=100000", READ).await, 400).await;
    problem(api.get("/v1/jobs?limit=-3", READ).await, 400).await;
    // Found by schemathesis: a NUL byte in a filter once reached Postgres.
    let body = problem(api.get("/v1/jobs?queue=a%00b", READ).await, 400).await;
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("queue name"), "{detail}");
    problem(api.get("/v1/jobs?kind=..%2Fetc", READ).await, 400).await;
    problem(api.get("/v1/jobs?unknown=1", READ).await, 400).await;
    problem(
        api.post_json(
            &format!("/v1/jobs/{unknown}/cancel"),
            CANCEL,
            json!({ "reason": "x" }),
        )
        .await,
        404,
    )
    .await;
    problem(
        api.post_json(
            &format!("/v1/jobs/{unknown}/cancel"),
            CANCEL,
            json!({ "reason": "  " }),
        )
        .await,
        422,
    )
    .await;
    problem(
        api.post_json(&format!("/v1/jobs/{unknown}/cancel"), CANCEL, json!({}))
            .await,
        422,
    )
    .await;
    problem(api.get("/v1/nothing-here", READ).await, 404).await;
    let r = api
        .request(Method::PUT, "/v1/jobs", Some(READ))
        .send()
        .await
        .expect("request");
    problem(r, 405).await;
}

#[tokio::test]
async fn the_admission_policy_refuses_tasks_too_large_for_their_model() {
    let api = TestApi::spawn().await;
    let before = api.footprint().await;
    let job = |tokens: u64, model: &str| json!({ "kind": "claude-code", "payload": { "task": "refactor the parser", "estimated_tokens": tokens, "model": model } });
    // 50% of claude-sonnet-4's 200,000-token window is 100,000.
    let p = problem(
        api.post_json("/v1/jobs", ENQUEUE, job(150_000, "claude-sonnet-4"))
            .await,
        422,
    )
    .await;
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("50%") && detail.contains("100000"),
        "{detail}"
    );
    assert_eq!(p["field"], "payload");
    let p = problem(
        api.post_json("/v1/jobs", ENQUEUE, job(10, "no-such-model"))
            .await,
        422,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap_or_default().contains("unknown"),
        "{p}"
    );
    let no_model =
        json!({ "kind": "claude-code", "payload": { "task": "x", "estimated_tokens": 10 } });
    problem(api.post_json("/v1/jobs", ENQUEUE, no_model).await, 422).await;
    assert_eq!(
        api.footprint().await,
        before,
        "refused jobs changed nothing"
    );
    let r = api
        .post_json("/v1/jobs", ENQUEUE, job(100_000, "claude-sonnet-4"))
        .await;
    assert_eq!(r.status().as_u16(), 201, "exactly at the limit is admitted");
}

#[tokio::test]
async fn inventing_queues_past_max_queues_is_refused_and_writes_nothing() {
    let api = TestApi::spawn_with(|s| s.api.max_queues = 2).await;
    let job = |queue: &str| json!({ "kind": "noop", "queue": queue, "delay_secs": 600 });
    for queue in ["first", "second"] {
        let r = api.post_json("/v1/jobs", ADMIN, job(queue)).await;
        assert_eq!(r.status().as_u16(), 201, "{queue}");
    }
    let before = api.footprint().await;
    let r = api.post_json("/v1/jobs", ADMIN, job("third")).await;
    assert_eq!(r.status().as_u16(), 422);
    let body: serde_json::Value = r.json().await.expect("problem");
    assert_eq!(body["field"], "queue", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("api.max_queues"),
        "{body}"
    );
    // A batch naming a new queue anywhere is refused whole, with its index.
    let r = api
        .post_json(
            "/v1/jobs/batch",
            ADMIN,
            json!({ "jobs": [job("first"), job("fourth")] }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 422);
    let body: serde_json::Value = r.json().await.expect("problem");
    assert_eq!(body["index"], 1, "{body}");
    assert_eq!(api.footprint().await, before, "refused, nothing written");
    // Known queues still take jobs.
    let r = api.post_json("/v1/jobs", ADMIN, job("second")).await;
    assert_eq!(r.status().as_u16(), 201);
}
