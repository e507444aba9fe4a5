//! `/v1/schedules` over HTTP, `unique` on `POST /v1/jobs`, and the CLI's
//! `schedules` verbs.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::api::{json as body_of, problem, TestApi, ADMIN, ENQUEUE, READ};
use crate::support::processes::cli;
use crate::support::unique_queue;

fn schedule(q: &str) -> Value {
    json!({
        "name": format!("nightly-{q}"),
        "cron": "0 3 * * *",
        "timezone": "Europe/Paris",
        "job": { "kind": "noop", "queue": q },
    })
}

#[tokio::test]
async fn schedules_are_created_read_changed_and_deleted() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    // Writing needs admin.
    problem(
        api.post_json("/v1/schedules", ENQUEUE, schedule(&q)).await,
        403,
    )
    .await;
    let (status, created) =
        body_of(api.post_json("/v1/schedules", ADMIN, schedule(&q)).await).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["overlap"], "skip");
    assert_eq!(created["catch_up"], "none");
    assert_eq!(created["paused"], false);
    // 03:00 in Paris is 01:00 or 02:00 UTC.
    let next = created["next_tick"].as_str().expect("next tick");
    assert!(
        next.contains("T01:00:00") || next.contains("T02:00:00"),
        "{next}"
    );
    let id = created["id"].as_str().expect("id").to_owned();

    // The same name again: 409, naming the field.
    let p = problem(
        api.post_json("/v1/schedules", ADMIN, schedule(&q)).await,
        409,
    )
    .await;
    assert_eq!(p["field"], "name", "{p}");

    let (status, list) = body_of(api.get("/v1/schedules", READ).await).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"].as_array().map(Vec::len), Some(1));

    let patch = |body: Value| {
        api.request(Method::PATCH, &format!("/v1/schedules/{id}"), Some(ADMIN))
            .json(&body)
            .send()
    };
    let (status, paused) = body_of(
        patch(json!({ "paused": true, "cron": "*/10 * * * * *" }))
            .await
            .expect("patch"),
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["cron"], "*/10 * * * * *");
    assert_eq!(paused["timezone"], "Europe/Paris", "absent fields stay");
    assert!(paused["version"].as_i64() > created["version"].as_i64());
    let p = problem(
        patch(json!({ "cron": "every day" })).await.expect("patch"),
        422,
    )
    .await;
    assert_eq!(p["field"], "cron", "{p}");
    let (_, still) = body_of(api.get(&format!("/v1/schedules/{id}"), READ).await).await;
    assert_eq!(
        still["cron"], "*/10 * * * * *",
        "a refused patch changes nothing"
    );

    let r = api
        .request(Method::DELETE, &format!("/v1/schedules/{id}"), Some(ADMIN))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    problem(api.get(&format!("/v1/schedules/{id}"), READ).await, 404).await;
    problem(api.get("/v1/schedules/not-a-uuid", READ).await, 400).await;
}

#[tokio::test]
async fn a_scheduled_job_names_its_schedule_and_tick_over_http() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let mut body = schedule(&q);
    body["cron"] = json!("* * * * * *");
    body["timezone"] = json!("UTC");
    let (status, created) = body_of(api.post_json("/v1/schedules", ADMIN, body).await).await;
    assert_eq!(status, 201, "{created}");
    let schedule_id = created["id"].as_str().expect("id").to_owned();
    // This replica's scheduler, one pass at a time, until the tick's job is
    // there.
    let maintenance = api.env.maintenance(&q);
    let cfg = api.env.app.scheduler_config();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let job_id = loop {
        maintenance.schedule_once(&cfg).await.expect("pass");
        let (_, list) = body_of(api.get(&format!("/v1/jobs?queue={q}"), READ).await).await;
        if let Some(id) = list["jobs"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tick enqueued: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (status, job) = body_of(api.get(&format!("/v1/jobs/{job_id}"), READ).await).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["schedule_id"], json!(schedule_id), "{job}");
    let tick = job["scheduled_for"].as_str().expect("scheduled_for");
    let parsed = chrono::DateTime::parse_from_rfc3339(tick).expect("RFC 3339");
    assert_eq!(
        parsed.timestamp_subsec_nanos(),
        0,
        "a whole-second tick: {tick}"
    );
    let stored: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT scheduled_for FROM jobs WHERE id = $1::uuid")
            .bind(&job_id)
            .fetch_one(api.env.app.store().pool())
            .await
            .expect("tick");
    assert_eq!(parsed, stored, "the tick as Postgres holds it");
    // The schedule's own view agrees: its last tick and job.
    let (_, s) = body_of(api.get(&format!("/v1/schedules/{schedule_id}"), READ).await).await;
    assert_eq!(s["last_job_id"], json!(job_id), "{s}");
}

#[tokio::test]
async fn bad_schedules_get_a_clear_error_and_create_nothing() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "cron": "* * * *" }), "cron"),
        (json!({ "cron": "* * * * * * *" }), "cron"),
        (json!({ "cron": "61 * * * *" }), "cron"),
        (json!({ "cron": "0 0 30 2 *" }), "cron"),
        (json!({ "cron": "* * * * *\u{0}" }), "cron"),
        (json!({ "timezone": "Mars/Olympus" }), "timezone"),
        (json!({ "timezone": "../../etc/passwd" }), "timezone"),
        (json!({ "name": "" }), "name"),
        (json!({ "name": "a\u{7}b" }), "name"),
        (json!({ "name": "x".repeat(201) }), "name"),
        (
            json!({ "job": { "kind": "no-such-kind", "queue": q } }),
            "job.kind",
        ),
        (
            json!({ "job": { "kind": "noop", "queue": "a b" } }),
            "job.queue",
        ),
        (
            json!({ "job": { "kind": "noop", "idempotency_key": "k" } }),
            "job.idempotency_key",
        ),
        (
            json!({ "job": { "kind": "noop", "delay_secs": 5 } }),
            "job.delay_secs",
        ),
        (json!({ "catch_up_limit": 0 }), "catch_up_limit"),
        (json!({ "catch_up_limit": 1001 }), "catch_up_limit"),
    ];
    for (change, field) in cases {
        let mut body = schedule(&q);
        for (k, v) in change.as_object().expect("object") {
            body[k] = v.clone();
        }
        let p = problem(
            api.post_json("/v1/schedules", ADMIN, body.clone()).await,
            422,
        )
        .await;
        assert_eq!(p["field"], field, "{body}: {p}");
    }
    for body in [
        json!({ "name": "x", "cron": "* * * * *", "job": { "kind": "noop" }, "overlap": "sometimes" }),
        json!({ "name": "x", "cron": "* * * * *", "job": { "kind": "noop" }, "extra": 1 }),
        json!({ "name": "x", "cron": "* * * * *", "job": { "kind": "noop" }, "catch_up": "ALL" }),
    ] {
        let r = api.post_json("/v1/schedules", ADMIN, body.clone()).await;
        assert!(
            matches!(r.status().as_u16(), 400 | 422),
            "{body}: {}",
            r.status()
        );
    }
    let (_, list) = body_of(api.get("/v1/schedules", READ).await).await;
    assert_eq!(list["schedules"], json!([]), "nothing was created");
}

#[tokio::test]
async fn a_unique_duplicate_answers_200_with_the_existing_job_and_says_so() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let body =
        json!({ "kind": "noop", "queue": q, "unique": { "key": "review:7", "for_secs": 600 } });
    let (status, first) = body_of(api.post_json("/v1/jobs", ENQUEUE, body.clone()).await).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["unique_key"], "review:7");
    let r = api
        .post_json("/v1/jobs", ENQUEUE, json!({ "kind": "noop", "queue": q, "metadata": { "other": true }, "unique": { "key": "review:7" } }))
        .await;
    assert_eq!(
        r.headers()
            .get("orchestrator-duplicate")
            .and_then(|v| v.to_str().ok()),
        Some("unique")
    );
    let (status, dup) = body_of(r).await;
    assert_eq!(status, 200);
    assert_eq!(dup["id"], first["id"]);
    // An idempotent replay says so too, differently.
    let keyed = json!({ "kind": "noop", "queue": q, "idempotency_key": "k-1" });
    assert_eq!(
        api.post_json("/v1/jobs", ENQUEUE, keyed.clone())
            .await
            .status(),
        201
    );
    let r = api.post_json("/v1/jobs", ENQUEUE, keyed).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("orchestrator-duplicate")
            .and_then(|v| v.to_str().ok()),
        Some("idempotency_key")
    );
    for (unique, field) in [
        (json!({ "key": "" }), "unique.key"),
        (json!({ "key": "a\u{0}" }), "unique.key"),
        (json!({ "key": "k", "for_secs": 0 }), "unique.for_secs"),
        (json!({ "key": "k", "states": [] }), "unique.states"),
        (
            json!({ "key": "k", "states": ["finished"] }),
            "unique.states",
        ),
    ] {
        let p = problem(
            api.post_json(
                "/v1/jobs",
                ENQUEUE,
                json!({ "kind": "noop", "queue": q, "unique": unique }),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(p["field"], field, "{unique}: {p}");
    }
    for (key, why) in [
        (json!(""), "empty"),
        (json!("a\u{1b}[31m"), "control"),
        (json!("k".repeat(1025)), "long"),
        (json!(7), "number"),
    ] {
        let r = api
            .post_json(
                "/v1/jobs",
                ENQUEUE,
                json!({ "kind": "noop", "queue": q, "concurrency_key": key }),
            )
            .await;
        assert!(
            matches!(r.status().as_u16(), 400 | 422),
            "{why}: {}",
            r.status()
        );
    }
    let (status, keyed) = body_of(
        api.post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "noop", "queue": q, "concurrency_key": "repo#main" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(keyed["concurrency_key"], "repo#main");
    assert_eq!(keyed["concurrency_limit"], 1);
    // One key twice in a batch: refused, nothing stored.
    let batch = json!({ "jobs": [
        { "kind": "noop", "queue": q, "unique": { "key": "twice" } },
        { "kind": "noop", "queue": q, "unique": { "key": "twice" } },
    ]});
    let p = problem(api.post_json("/v1/jobs/batch", ENQUEUE, batch).await, 422).await;
    assert_eq!(p["field"], "unique.key", "{p}");

    // A batch says per job which ones existed, and why.
    let batch = json!({ "jobs": [
        { "kind": "noop", "queue": q, "unique": { "key": "review:7" } },
        { "kind": "noop", "queue": q },
        { "kind": "noop", "queue": q, "idempotency_key": "k-1" },
    ]});
    let (status, answer) = body_of(api.post_json("/v1/jobs/batch", ENQUEUE, batch).await).await;
    assert_eq!(status, 201, "one job is new: {answer}");
    let jobs = answer["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 3, "{answer}");
    assert_eq!(jobs[0]["id"], first["id"]);
    assert_eq!(jobs[0]["duplicate"], "unique");
    assert!(jobs[1].get("duplicate").is_none(), "{answer}");
    assert_ne!(jobs[1]["id"], first["id"]);
    assert_eq!(jobs[2]["duplicate"], "idempotency_key");
    let replayed = jobs[2]["id"].clone();
    let again = json!({ "jobs": [{ "kind": "noop", "queue": q, "idempotency_key": "k-1" }] });
    let (status, answer) = body_of(api.post_json("/v1/jobs/batch", ENQUEUE, again).await).await;
    assert_eq!(status, 200, "nothing new: {answer}");
    assert_eq!(answer["jobs"][0]["duplicate"], "idempotency_key");
    assert_eq!(answer["jobs"][0]["id"], replayed, "the same job each time");
}

#[tokio::test]
async fn the_cli_adds_lists_pauses_and_removes_schedules() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let job = json!({ "kind": "noop", "queue": q }).to_string();
    let added = cli(
        &api.env,
        &[
            "schedules",
            "add",
            "cli-nightly",
            "--cron",
            "30 2 * * 1-5",
            "--job",
            &job,
            "--catch-up",
            "latest",
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let schedule: Value = serde_json::from_slice(&added.stdout).expect("json");
    assert_eq!(schedule["catch_up"], "latest");
    let id = schedule["id"].as_str().expect("id");
    let paused = cli(&api.env, &["schedules", "pause", id]);
    assert!(paused.status.success());
    let shown: Value =
        serde_json::from_slice(&cli(&api.env, &["schedules", "show", id]).stdout).expect("json");
    assert_eq!(shown["paused"], true);
    // Edit changes what it is given and keeps the rest.
    let other = unique_queue();
    let new_job = json!({ "kind": "noop", "queue": other, "priority": 9 }).to_string();
    let edited = cli(
        &api.env,
        &[
            "schedules",
            "edit",
            id,
            "--cron",
            "0 4 * * *",
            "--timezone",
            "Asia/Tokyo",
            "--job",
            &new_job,
        ],
    );
    assert!(
        edited.status.success(),
        "{}",
        String::from_utf8_lossy(&edited.stderr)
    );
    let edited: Value = serde_json::from_slice(&edited.stdout).expect("json");
    assert_eq!(edited["cron"], "0 4 * * *");
    assert_eq!(edited["timezone"], "Asia/Tokyo");
    assert_eq!(edited["job"]["queue"], json!(other));
    assert_eq!(edited["job"]["priority"], 9);
    assert_eq!(edited["catch_up"], "latest", "kept");
    assert_eq!(edited["paused"], true, "kept");
    assert_eq!(edited["name"], "cli-nightly", "kept");
    let bad_edit = cli(
        &api.env,
        &["schedules", "edit", id, "--timezone", "Mars/Olympus"],
    );
    assert!(!bad_edit.status.success());
    assert!(
        String::from_utf8_lossy(&bad_edit.stderr).contains("timezone"),
        "{}",
        String::from_utf8_lossy(&bad_edit.stderr)
    );
    let unchanged: Value =
        serde_json::from_slice(&cli(&api.env, &["schedules", "show", id]).stdout).expect("json");
    assert_eq!(
        unchanged["timezone"], "Asia/Tokyo",
        "a refused edit changes nothing"
    );
    let bad = cli(
        &api.env,
        &["schedules", "add", "bad", "--cron", "nope", "--job", &job],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("cron"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(cli(&api.env, &["schedules", "remove", id]).status.success());
    let list: Value =
        serde_json::from_slice(&cli(&api.env, &["schedules", "list"]).stdout).expect("json");
    assert_eq!(list, json!([]));
}
