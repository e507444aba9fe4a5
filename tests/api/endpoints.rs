//! Every endpoint against a real server.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::json;

use crate::support::api::{json, problem, TestApi, ADMIN, CANCEL, ENQUEUE, READ};

#[tokio::test]
async fn enqueue_read_and_replay_a_job() {
    let api = TestApi::spawn().await;
    let body = json!({ "kind": "sleep", "queue": "web", "priority": 8, "payload": { "ms": 5 },
                       "max_attempts": 3, "timeout_secs": 60, "idempotency_key": "order-17" });
    let (status, job) = json(api.post_json("/v1/jobs", ENQUEUE, body.clone()).await).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["priority"], 8);
    assert_eq!(job["queue"], "web");
    assert_eq!(job["max_attempts"], 3);
    let id = job["id"].as_str().expect("id").to_owned();

    // Same key again: the same job, 200, nothing new.
    let (status, again) = json(api.post_json("/v1/jobs", ENQUEUE, body.clone()).await).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id.as_str())));
    // The key may come as a header too.
    let r = api
        .request(Method::POST, "/v1/jobs", Some(ENQUEUE))
        .header("Idempotency-Key", "order-17")
        .json(&json!({ "kind": "sleep", "queue": "web", "priority": 8, "payload": { "ms": 5 } }))
        .send()
        .await
        .expect("request");
    let (status, again) = json(r).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id.as_str())));
    // The same key for another job is a conflict.
    let r = api
        .post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "noop", "idempotency_key": "order-17" }),
        )
        .await;
    problem(r, 409).await;
    assert_eq!(api.footprint().await.0, 1);

    let (status, read) = json(api.get(&format!("/v1/jobs/{id}"), READ).await).await;
    assert_eq!(status, 200);
    assert_eq!(read["id"], id);
    assert_eq!(read["payload"], json!({ "ms": 5 }));

    let (status, events) = json(api.get(&format!("/v1/jobs/{id}/events"), READ).await).await;
    assert_eq!(status, 200);
    assert_eq!(events["events"][0]["type"], "enqueued");
    assert_eq!(
        events["events"][0]["actor"], "enqueuer",
        "the token's name is the actor"
    );
}

#[tokio::test]
async fn twenty_parallel_requests_with_one_key_make_one_job() {
    let api = TestApi::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = api.client.clone();
        let url = format!("{}/v1/jobs", api.base);
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(ENQUEUE)
                .header("Idempotency-Key", "same-key")
                .json(&json!({ "kind": "noop" }))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.expect("body");
            (status, body["id"].as_str().unwrap_or_default().to_owned())
        }));
    }
    let mut statuses = Vec::new();
    let mut ids = HashSet::new();
    for t in tasks {
        let (status, id) = t.await.expect("task");
        statuses.push(status);
        ids.insert(id);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(ids.len(), 1);
    let (rows, events, indexed) = api.footprint().await;
    assert_eq!((rows, events, indexed), (1, 1, 1));
}

#[tokio::test]
async fn batch_is_ordered_and_all_or_nothing() {
    let api = TestApi::spawn().await;
    let jobs: Vec<_> = (1..=5)
        .map(|p| json!({ "kind": "noop", "priority": p * 2 }))
        .collect();
    let (status, body) = json(
        api.post_json("/v1/jobs/batch", ENQUEUE, json!({ "jobs": jobs }))
            .await,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let priorities: Vec<i64> = body["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["priority"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(priorities, vec![2, 4, 6, 8, 10]);
    let before = api.footprint().await;
    // One bad job spoils the batch: nothing is written.
    let bad = json!({ "jobs": [ { "kind": "noop" }, { "kind": "noop", "priority": 0 }, { "kind": "noop" } ] });
    let p = problem(api.post_json("/v1/jobs/batch", ENQUEUE, bad).await, 422).await;
    assert_eq!(p["index"], 1);
    assert_eq!(p["field"], "priority");
    problem(
        api.post_json("/v1/jobs/batch", ENQUEUE, json!({ "jobs": [] }))
            .await,
        422,
    )
    .await;
    let dup = json!({ "jobs": [ { "kind": "noop", "idempotency_key": "k" }, { "kind": "noop", "idempotency_key": "k" } ] });
    problem(api.post_json("/v1/jobs/batch", ENQUEUE, dup).await, 422).await;
    assert_eq!(api.footprint().await, before);
}

#[tokio::test]
async fn listing_pages_newest_first_with_a_cursor() {
    let api = TestApi::spawn().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let kind = if i % 2 == 0 { "noop" } else { "sleep" };
        let payload = if kind == "sleep" {
            json!({ "ms": 1 })
        } else {
            json!({})
        };
        let (_, job) = json(
            api.post_json(
                "/v1/jobs",
                ENQUEUE,
                json!({ "kind": kind, "payload": payload, "queue": "list" }),
            )
            .await,
        )
        .await;
        ids.push(job["id"].as_str().expect("id").to_owned());
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?queue=list&limit=3&cursor={c}"),
            None => "/v1/jobs?queue=list&limit=3".to_owned(),
        };
        let (status, page) = json(api.get(&path, READ).await).await;
        assert_eq!(status, 200, "{page}");
        for j in page["jobs"].as_array().expect("jobs") {
            seen.push(j["id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every job once, newest first");
    let (_, page) = json(
        api.get("/v1/jobs?queue=list&kind=sleep&status=queued", READ)
            .await,
    )
    .await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn the_event_stream_delivers_in_order_and_closes_when_the_job_finishes() {
    let api = TestApi::spawn().await;
    let (_, job) = json(
        api.post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "flaky", "payload": { "fail_times": 1 }, "backoff_base_ms": 100 }),
        )
        .await,
    )
    .await;
    let id = job["id"].as_str().expect("id").to_owned();
    let response = api
        .request(Method::GET, &format!("/v1/jobs/{id}/events"), Some(READ))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("text/event-stream"));
    let pool = api.env.start_pool(api.env.pool_config("default", 2));
    let mut body = String::new();
    let mut stream = response.bytes_stream();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        }
    })
    .await;
    pool.shutdown().await;
    assert!(
        read.is_ok(),
        "the stream did not close after the job finished: {body}"
    );
    let types: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        types,
        vec!["enqueued", "started", "failed", "started", "succeeded"]
    );
    let ids: Vec<i64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");

    // Resuming after the third event replays only the rest.
    let r = api
        .request(Method::GET, &format!("/v1/jobs/{id}/events"), Some(READ))
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", ids[2].to_string())
        .send()
        .await
        .expect("request");
    let rest = r.text().await.expect("body");
    let types: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(types, vec!["started", "succeeded"]);
}

#[tokio::test]
async fn cancel_and_retry() {
    let api = TestApi::spawn().await;
    let (_, job) = json(
        api.post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "noop", "delay_secs": 600 }),
        )
        .await,
    )
    .await;
    let id = job["id"].as_str().expect("id").to_owned();
    assert_eq!(job["status"], "scheduled");
    let path = format!("/v1/jobs/{id}/cancel");
    let (status, cancelled) = json(
        api.post_json(&path, CANCEL, json!({ "reason": "not needed" }))
            .await,
    )
    .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    // Idempotent.
    let (status, _) = json(
        api.post_json(&path, CANCEL, json!({ "reason": "again" }))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let (_, events) = json(api.get(&format!("/v1/jobs/{id}/events"), READ).await).await;
    let last = events["events"]
        .as_array()
        .and_then(|e| e.last().cloned())
        .unwrap_or_default();
    assert_eq!(last["type"], "cancelled");
    assert_eq!(last["actor"], "canceller");
    assert_eq!(last["data"]["reason"], "not needed");
    assert_eq!(last["data"]["from"], "scheduled");
    assert_eq!(api.footprint().await.2, 0, "no longer indexed");

    // A finished job cannot be cancelled; only a dead one can be retried.
    let (_, done) = json(
        api.post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "flaky", "payload": { "fail_times": 5 }, "max_attempts": 1 }),
        )
        .await,
    )
    .await;
    let done_id = done["id"].as_str().expect("id").to_owned();
    let pool = api.env.start_pool(api.env.pool_config("default", 2));
    let job_id = done_id.parse().expect("job id");
    api.env
        .wait_terminal(&[job_id], Duration::from_secs(20))
        .await;
    // Stopped, so the retried job stays queued while we look at it.
    pool.shutdown().await;
    let p = problem(
        api.post_json(
            &format!("/v1/jobs/{done_id}/cancel"),
            CANCEL,
            json!({ "reason": "late" }),
        )
        .await,
        409,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap_or_default().contains("dead"),
        "{p}"
    );
    problem(
        api.post_json(&format!("/v1/jobs/{id}/retry"), ADMIN, json!({}))
            .await,
        409,
    )
    .await;
    let (status, retried) = json(
        api.post_json(&format!("/v1/jobs/{done_id}/retry"), ADMIN, json!({}))
            .await,
    )
    .await;
    assert_eq!(
        (
            status,
            retried["status"].as_str(),
            retried["attempt"].as_i64()
        ),
        (200, Some("queued"), Some(0))
    );
}

#[tokio::test]
async fn queues_pause_and_resume() {
    let api = TestApi::spawn().await;
    api.post_json(
        "/v1/jobs",
        ENQUEUE,
        json!({ "kind": "noop", "queue": "mail", "priority": 9 }),
    )
    .await;
    api.post_json(
        "/v1/jobs",
        ENQUEUE,
        json!({ "kind": "noop", "queue": "mail", "delay_secs": 60 }),
    )
    .await;
    let (status, body) = json(api.get("/v1/queues", READ).await).await;
    assert_eq!(status, 200);
    let mail = body["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "mail").cloned())
        .expect("mail queue");
    assert_eq!(
        (mail["pending"].as_u64(), mail["delayed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(mail["pending_by_priority"]["9"], 1);
    assert_eq!(
        (
            mail["jobs"]["queued"].as_i64(),
            mail["jobs"]["scheduled"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let (status, paused) = json(
        api.post_json("/v1/queues/mail/pause", ADMIN, json!({}))
            .await,
    )
    .await;
    assert_eq!((status, paused["paused"].as_bool()), (200, Some(true)));
    let (status, resumed) = json(
        api.post_json("/v1/queues/mail/resume", ADMIN, json!({}))
            .await,
    )
    .await;
    assert_eq!((status, resumed["paused"].as_bool()), (200, Some(false)));
    problem(
        api.post_json("/v1/queues/bad%20name/pause", ADMIN, json!({}))
            .await,
        400,
    )
    .await;
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let api = TestApi::spawn().await;
    let r = api
        .request(Method::GET, "/healthz", None)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let (status, ready) = json(
        api.request(Method::GET, "/readyz", None)
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["migrations"], "ok");
    api.post_json("/v1/jobs", ENQUEUE, json!({ "kind": "noop" }))
        .await;
    let text = api
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(
            "orchestrator_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"}"
        ),
        "{text}"
    );
    assert!(text.contains("orchestrator_jobs_enqueued_total"), "{text}");
    let (status, doc) = json(
        api.request(Method::GET, "/v1/openapi.json", None)
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let api = TestApi::spawn_with(|s| s.api.metrics_public = false).await;
    problem(
        api.request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("request"),
        401,
    )
    .await;
    let r = api.get("/metrics", READ).await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_and_records_who_asked() {
    let api = TestApi::spawn().await;
    let q = crate::support::unique_queue();
    let job = api
        .env
        .enqueue(vec![crate::support::request(
            "sleep",
            &q,
            json!({ "ms": 600_000 }),
        )])
        .await
        .remove(0);
    let mut pool = api.env.start_pool(api.env.pool_config(&q, 1));
    pool.wait_started(1, std::time::Duration::from_secs(30))
        .await;

    let path = format!("/v1/jobs/{}/cancel", job.id);
    let (status, body) = json(
        api.post_json(&path, CANCEL, json!({ "reason": "wrong branch" }))
            .await,
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("running")));

    let done = api
        .env
        .wait_terminal(&[job.id], std::time::Duration::from_secs(30))
        .await;
    pool.shutdown().await;
    assert_eq!(done[0].status, orchestrator::job::Status::Cancelled);
    assert_eq!(api.env.terminal_events(job.id).await, 1);

    let (_, events) = json(api.get(&format!("/v1/jobs/{}/events", job.id), READ).await).await;
    let events = events["events"].as_array().cloned().unwrap_or_default();
    let requested = events
        .iter()
        .find(|e| e["type"] == "cancel_requested")
        .expect("a cancel_requested event");
    assert_eq!(requested["actor"], "canceller");
    let cancelled = events.last().expect("events");
    assert_eq!(cancelled["type"], "cancelled");
    assert_eq!(cancelled["data"]["requested_by"], "canceller");
    assert_eq!(cancelled["data"]["reason"], "wrong branch");
    assert_eq!(cancelled["data"]["from"], "running");

    // How long stopping took is measured, per queue.
    let text = api
        .get("/metrics", READ)
        .await
        .text()
        .await
        .expect("metrics");
    let count = format!("orchestrator_cancel_duration_seconds_count{{queue=\"{q}\"}} 1");
    assert!(
        text.lines().any(|l| l == count),
        "no {count} in the metrics"
    );

    // Once cancelled, asking again is a no-op.
    let (status, body) = json(
        api.post_json(&path, CANCEL, json!({ "reason": "again" }))
            .await,
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")));
}
