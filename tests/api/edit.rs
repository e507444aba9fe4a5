//! `PATCH /v1/jobs/{id}`: versioned edits of jobs that have not started,
//! raced against each other and against claims.

use std::collections::HashMap;
use std::time::Duration;

use orchestrator::job::{JobId, QueueName, Status};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::api::{json as body_of, problem, TestApi, ENQUEUE, READ};
use crate::support::{request, unique_queue};

async fn patch(api: &TestApi, id: JobId, version: Option<&str>, body: Value) -> reqwest::Response {
    let mut r = api
        .request(Method::PATCH, &format!("/v1/jobs/{id}"), Some(ENQUEUE))
        .json(&body);
    if let Some(v) = version {
        r = r.header("if-match", v);
    }
    r.send().await.expect("request")
}

fn etag(r: &reqwest::Response) -> String {
    r.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned()
}

async fn edited_events(api: &TestApi, id: JobId) -> Vec<Value> {
    api.env
        .app
        .job_events(id, None)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "edited")
        .map(|e| json!({ "actor": e.actor, "data": e.data }))
        .collect()
}

#[tokio::test]
async fn an_edit_needs_the_current_version_and_moves_the_job_in_its_queue() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let queue: QueueName = q.parse().expect("queue");
    let r = api
        .post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "noop", "queue": q, "metadata": { "team": "a" } }),
        )
        .await;
    let (status, created) = body_of(r).await;
    assert_eq!(status, 201, "{created}");
    let id: JobId = created["id"].as_str().expect("id").parse().expect("uuid");
    assert_eq!(created["metadata"], json!({ "team": "a" }));
    let r = api.get(&format!("/v1/jobs/{id}"), READ).await;
    let tag = etag(&r);
    let (_, job) = body_of(r).await;
    assert_eq!(
        tag,
        format!("\"{}\"", job["version"]),
        "the ETag is the version"
    );

    // Without If-Match, with another version, weak or a wildcard: nothing
    // changes.
    problem(patch(&api, id, None, json!({ "priority": 9 })).await, 428).await;
    problem(
        patch(&api, id, Some("\"999999\""), json!({ "priority": 9 })).await,
        412,
    )
    .await;
    problem(
        patch(
            &api,
            id,
            Some(&format!("W/{tag}")),
            json!({ "priority": 9 }),
        )
        .await,
        400,
    )
    .await;
    problem(
        patch(&api, id, Some("*"), json!({ "priority": 9 })).await,
        400,
    )
    .await;
    for bad in [
        json!({}),
        json!({ "priority": 11 }),
        json!({ "max_attempts": 0 }),
        json!({ "metadata": "not an object" }),
        json!({ "metadata": { "k": "nul\u{0}byte" } }),
        json!({ "metadata": { "k": "x".repeat(9000) } }),
        json!({ "run_at": "2000-01-01T00:00:00Z" }),
    ] {
        problem(patch(&api, id, Some(&tag), bad.clone()).await, 422).await;
    }
    let r = api
        .request(Method::PATCH, &format!("/v1/jobs/{id}"), Some(READ))
        .header("if-match", &tag)
        .json(&json!({ "priority": 9 }))
        .send()
        .await
        .expect("request");
    problem(r, 403).await;
    let unchanged = api.env.job(id).await;
    assert_eq!(
        (unchanged.priority, unchanged.version),
        (5, job["version"].as_i64().expect("v"))
    );
    assert!(edited_events(&api, id).await.is_empty());

    // The current version: applied, audited, and the job moves to its new
    // priority in Valkey.
    let r = patch(
        &api,
        id,
        Some(&tag),
        json!({ "priority": 9, "metadata": { "team": "b" } }),
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
    let tag2 = etag(&r);
    let (_, edited) = body_of(r).await;
    assert_ne!(tag2, tag);
    assert_eq!(tag2, format!("\"{}\"", edited["version"]));
    assert_eq!(
        (edited["priority"].clone(), edited["metadata"].clone()),
        (json!(9), json!({ "team": "b" }))
    );
    let depth = api.env.app.queue().depth(&queue).await.expect("depth");
    assert_eq!(depth.pending_by_priority[8], 1, "{depth:?}");
    assert_eq!(depth.pending_by_priority[4], 0, "{depth:?}");
    let events = edited_events(&api, id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["actor"], "enqueuer");
    assert_eq!(
        events[0]["data"]["changes"]["priority"],
        json!({ "from": 5, "to": 9 })
    );
    // The old version is spent.
    problem(
        patch(&api, id, Some(&tag), json!({ "priority": 1 })).await,
        412,
    )
    .await;

    // Later: scheduled and delayed in the index; back to now: queued.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let r = patch(&api, id, Some(&tag2), json!({ "run_at": later })).await;
    assert_eq!(r.status().as_u16(), 200);
    let tag3 = etag(&r);
    assert_eq!(api.env.job(id).await.status, Status::Scheduled);
    let depth = api.env.app.queue().depth(&queue).await.expect("depth");
    assert_eq!((depth.pending(), depth.delayed), (0, 1), "{depth:?}");
    let now = chrono::Utc::now().to_rfc3339();
    let r = patch(&api, id, Some(&tag3), json!({ "run_at": now })).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(api.env.job(id).await.status, Status::Queued);
    let depth = api.env.app.queue().depth(&queue).await.expect("depth");
    assert_eq!((depth.pending(), depth.delayed), (1, 0), "{depth:?}");
}

#[tokio::test]
async fn a_running_or_finished_job_cannot_be_edited() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let job = api
        .env
        // Runs until it is cancelled below, however slow the edit is.
        .enqueue(vec![request("sleep", &q, json!({ "ms": 600_000 }))])
        .await
        .remove(0);
    let mut pool = api.env.start_pool(api.env.pool_config(&q, 1));
    pool.wait_started(1, Duration::from_secs(20)).await;
    let running = api.env.job(job.id).await;
    let tag = format!("\"{}\"", running.version);
    let detail = problem(
        patch(&api, job.id, Some(&tag), json!({ "priority": 9 })).await,
        409,
    )
    .await;
    assert!(detail.to_string().contains("running"), "{detail}");
    api.env
        .app
        .cancel(job.id, "test", "to finish it")
        .await
        .expect("cancel");
    let done = api
        .env
        .wait_terminal(&[job.id], Duration::from_secs(20))
        .await
        .remove(0);
    let tag = format!("\"{}\"", done.version);
    problem(
        patch(&api, job.id, Some(&tag), json!({ "priority": 9 })).await,
        409,
    )
    .await;
    assert_eq!(
        api.env.job(job.id).await.version,
        done.version,
        "nothing written"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn of_two_edits_with_one_version_exactly_one_wins() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let jobs = api
        .env
        .enqueue((0..20).map(|_| request("noop", &q, json!({}))).collect())
        .await;
    let races = jobs.iter().map(|job| {
        let tag = format!("\"{}\"", job.version);
        let api = &api;
        async move {
            let (a, b) = tokio::join!(
                patch(
                    api,
                    job.id,
                    Some(&tag),
                    json!({ "priority": 2, "metadata": { "by": "a" } })
                ),
                patch(
                    api,
                    job.id,
                    Some(&tag),
                    json!({ "priority": 8, "metadata": { "by": "b" } })
                ),
            );
            (job.id, a.status().as_u16(), b.status().as_u16())
        }
    });
    for (id, a, b) in futures_util::future::join_all(races).await {
        let mut codes = [a, b];
        codes.sort_unstable();
        assert_eq!(codes, [200, 412], "job {id}");
        let job = api.env.job(id).await;
        let winner = if a == 200 { ("a", 2) } else { ("b", 8) };
        assert_eq!(job.metadata["by"], winner.0, "the winner's edit, whole");
        assert_eq!(job.priority, winner.1, "the winner's edit, whole");
        assert_eq!(edited_events(&api, id).await.len(), 1, "one edit recorded");
    }
}

#[tokio::test]
async fn an_edit_racing_a_claim_is_applied_wholly_before_it_or_not_at_all() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let jobs = api
        .env
        .enqueue((0..500).map(|_| request("noop", &q, json!({}))).collect())
        .await;
    // The pool is claiming already when the edits go out, so both sides of
    // the race happen.
    let mut pool = api.env.start_pool(api.env.pool_config(&q, 4));
    pool.wait_started(1, Duration::from_secs(20)).await;
    let edits = jobs.iter().map(|job| {
        let tag = format!("\"{}\"", job.version);
        let api = &api;
        async move {
            let r = patch(
                api,
                job.id,
                Some(&tag),
                json!({ "max_attempts": 7, "metadata": { "edited": true } }),
            )
            .await;
            (job.id, r.status().as_u16())
        }
    });
    let outcomes: HashMap<JobId, u16> = futures_util::future::join_all(edits)
        .await
        .into_iter()
        .collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let done = api.env.wait_terminal(&ids, Duration::from_secs(60)).await;
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for job in &done {
        let code = outcomes[&job.id];
        *counts.entry(code).or_default() += 1;
        assert_eq!(job.status, Status::Succeeded);
        let events = api.env.app.job_events(job.id, None).await.expect("events");
        let position = |kind: &str| events.iter().position(|e| e.kind == kind);
        match code {
            200 => {
                assert_eq!(
                    (job.max_attempts, job.metadata["edited"].clone()),
                    (7, json!(true))
                );
                assert!(
                    position("edited") < position("started"),
                    "edited before it started"
                );
            }
            409 => {
                assert_ne!(job.max_attempts, 7, "a refused edit left nothing behind");
                assert_eq!(job.metadata, json!({}));
                assert_eq!(position("edited"), None);
            }
            other => panic!("job {}: unexpected {other}", job.id),
        }
        assert_eq!(api.env.terminal_events(job.id).await, 1, "finished once");
    }
    eprintln!(
        "edits won {:?} / refused as started {:?}",
        counts.get(&200),
        counts.get(&409)
    );
    pool.shutdown().await;
}
