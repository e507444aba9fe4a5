//! `/v1/killswitch` over HTTP: validation, engage, inspect, lift, with a
//! real worker pool running `sleep` jobs (no Docker needed; the sandboxed
//! kill tests are in tests/sandbox/kill.rs).

use std::time::Duration;

use orchestrator::job::Status;
use reqwest::Method;
use serde_json::json;

use crate::support::api::{json, problem, TestApi, ADMIN, ENQUEUE, READ};
use crate::support::{request, unique_queue};

#[tokio::test]
async fn bad_kill_requests_are_refused_and_engage_nothing() {
    let api = TestApi::spawn().await;
    let long = "x".repeat(1001);
    for (body, field) in [
        (json!({}), None),
        (json!({ "reason": "" }), Some("reason")),
        (json!({ "reason": "   " }), Some("reason")),
        (json!({ "reason": long }), Some("reason")),
        (json!({ "reason": "nul \u{0} byte" }), Some("reason")),
        (json!({ "reason": "bell \u{7}" }), Some("reason")),
        (json!({ "reason": 42 }), None),
        (json!({ "reason": "ok", "extra": true }), None),
    ] {
        let p = problem(
            api.post_json("/v1/killswitch", ADMIN, body.clone()).await,
            422,
        )
        .await;
        if let Some(field) = field {
            assert_eq!(p["field"], field, "{body}: {p}");
        }
    }
    let r = api
        .request(Method::POST, "/v1/killswitch", Some(ADMIN))
        .body("{\"reason\": ")
        .header("content-type", "application/json")
        .send()
        .await
        .expect("request");
    problem(r, 400).await;
    let r = api
        .request(Method::POST, "/v1/killswitch", Some(ADMIN))
        .body("reason=now")
        .send()
        .await
        .expect("request");
    problem(r, 415).await;
    let r = api
        .request(Method::DELETE, "/v1/killswitch?reason=%00bad", Some(ADMIN))
        .send()
        .await
        .expect("request");
    problem(r, 422).await;

    let (status, state) = json(api.get("/v1/killswitch", ADMIN).await).await;
    assert_eq!(status, 200);
    assert_eq!(
        state,
        json!({ "engaged": false, "actor": null, "reason": null, "since": null })
    );
    let (_, trail) = json(api.get("/v1/killswitch/events", ADMIN).await).await;
    assert_eq!(trail["events"], json!([]), "nothing was recorded");
}

#[tokio::test]
async fn kill_all_stops_running_jobs_keeps_queued_ones_and_resume_runs_them() {
    let api = TestApi::spawn().await;
    let env = &api.env;
    let q = unique_queue();
    let mut sleepers = Vec::new();
    for _ in 0..2 {
        let mut r = request("sleep", &q, json!({ "ms": 600_000 }));
        r.priority = Some(9);
        sleepers.push(r);
    }
    let mut waiting = request("noop", &q, json!({}));
    waiting.priority = Some(1);
    sleepers.push(waiting);
    let jobs = env.enqueue(sleepers).await;
    let mut pool = env.start_pool(env.pool_config(&q, 2));
    pool.wait_started(2, Duration::from_secs(30)).await;

    let (status, report) = json(
        api.post_json(
            "/v1/killswitch",
            ADMIN,
            json!({ "reason": "runaway agents" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["engaged"], true);
    assert_eq!(report["actor"], "admin");
    assert_eq!(report["reason"], "runaway agents");
    assert_eq!(
        (&report["cancelled"], &report["failed"]),
        (&json!(2), &json!(0)),
        "{report}"
    );
    assert_eq!(report["audit"], "recorded");
    assert!(
        report["queues_paused"]
            .as_array()
            .is_some_and(|a| a.contains(&json!(q))),
        "{report}"
    );
    // Confirmed stopped (in Valkey) comes first; Postgres follows.
    let ids: Vec<_> = jobs[..2].iter().map(|j| j.id).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    crate::support::assert_status(&done, Status::Cancelled);
    for j in &jobs[..2] {
        let last = env.cancelled_event(j.id).await;
        assert_eq!(last["requested_by"], "admin");
        assert_eq!(last["reason"], "runaway agents");
        assert_eq!(last["from"], "running");
    }

    let (_, state) = json(api.get("/v1/killswitch", ADMIN).await).await;
    assert_eq!(state["engaged"], true);
    assert_eq!(state["actor"], "admin");
    assert!(state["since"].as_str().is_some_and(|s| s.contains('T')));
    let metrics = api.get("/metrics", READ).await.text().await.expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l == "orchestrator_kill_switch_engaged 1"),
        "engaged gauge"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orchestrator_cancellations_total")
                && l.contains(&format!("queue=\"{q}\""))
                && l.ends_with(" 2")),
        "cancellations by stage:\n{metrics}"
    );

    // Enqueues go on while engaged; nothing runs, nothing is lost.
    let (status, late) = json(
        api.post_json("/v1/jobs", ENQUEUE, json!({ "kind": "noop", "queue": q }))
            .await,
    )
    .await;
    assert_eq!(status, 201, "{late}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.job(jobs[2].id).await.status, Status::Queued);
    let (_, queues) = json(api.get("/v1/queues", READ).await).await;
    let info = queues["queues"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == q.as_str()).cloned())
        .expect("queue listed");
    assert_eq!(
        (&info["halted"], &info["paused"]),
        (&json!(true), &json!(false))
    );

    let r = api
        .request(
            Method::DELETE,
            "/v1/killswitch?reason=all%20clear",
            Some(ADMIN),
        )
        .send()
        .await
        .expect("request");
    let (status, lifted) = json(r).await;
    assert_eq!(status, 200, "{lifted}");
    assert_eq!(lifted["engaged"], false);
    assert_eq!(lifted["lifted"]["actor"], "admin");
    let late_id: orchestrator::job::JobId = late["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let done = env
        .wait_terminal(&[jobs[2].id, late_id], Duration::from_secs(30))
        .await;
    pool.shutdown().await;
    crate::support::assert_status(&done, Status::Succeeded);

    let (_, trail) = json(api.get("/v1/killswitch/events", ADMIN).await).await;
    let kinds: Vec<&str> = trail["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds, ["resume", "kill_all"], "{trail}");
    assert_eq!(trail["events"][0]["reason"], "all clear");
    assert_eq!(trail["events"][1]["actor"], "admin");
    assert_eq!(
        trail["events"][1]["data"]["jobs"].as_array().map(Vec::len),
        Some(2),
        "{trail}"
    );
}
