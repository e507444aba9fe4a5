//! Webhooks end to end: the outbox, signatures checked by an independent
//! implementation, retries through failures and an outage, order per job,
//! crash recovery with stable webhook-ids, and the address policy.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use orchestrator::config::Settings;
use orchestrator::job::{JobId, JobRequest, Status};
use orchestrator::secret::Secret;
use orchestrator::store::FanOutPass;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::api::{json as body_of, problem, TestApi, ADMIN, ENQUEUE, READ};
use crate::support::receiver::{Received, Receiver};
use crate::support::{free_port, request, unique_queue, TestEnv, WorkerProcess};

/// The job events webhooks report, as the issue names them (the domain's
/// list is checked against it).
const REPORTED: [&str; 6] = [
    "started",
    "progress",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
];

fn webhooks_on(s: &mut Settings, secret: &str) {
    s.webhooks.secrets = vec![Secret::new(secret)];
    s.webhooks.allow_local = true;
    s.webhooks.max_attempts = 40;
    s.webhooks.backoff_base_ms = 100;
    s.webhooks.backoff_cap_ms = 1_000;
    s.webhooks.timeout_ms = 2_000;
    s.webhooks.poll_interval_ms = 50;
}

/// The same settings for a process of the binary.
fn webhook_vars(secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ORCH_WEBHOOK_SECRET", secret.to_owned()),
        ("ORCH_WEBHOOKS__ALLOW_LOCAL", "true".to_owned()),
        ("ORCH_WEBHOOKS__MAX_ATTEMPTS", "40".to_owned()),
        ("ORCH_WEBHOOKS__BACKOFF_BASE_MS", "100".to_owned()),
        ("ORCH_WEBHOOKS__BACKOFF_CAP_MS", "1000".to_owned()),
        ("ORCH_WEBHOOKS__TIMEOUT_MS", "3000".to_owned()),
        ("ORCH_WEBHOOKS__POLL_INTERVAL_MS", "50".to_owned()),
    ]
}

fn secret() -> String {
    orchestrator::app::new_webhook_secret().expect("randomness")
}

async fn scalar(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(env.app.store().pool())
        .await
        .expect(sql)
}

/// Waits until the outbox has nothing left to send.
async fn wait_outbox_empty(env: &TestEnv, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = env
            .app
            .store()
            .undelivered_webhooks()
            .await
            .expect("undelivered webhooks");
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} deliveries still undelivered after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reported events of `id` in the audit trail, in order.
async fn reported_events(env: &TestEnv, id: JobId) -> Vec<String> {
    env.app
        .job_events(id, None)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| REPORTED.contains(&e.kind.as_str()))
        .map(|e| e.kind)
        .collect()
}

/// Checks what one receiver got for `jobs`: every signature valid, every
/// reported event delivered once at least, and per job no event's first
/// arrival before the last attempt of the one it follows.
async fn check_receiver(env: &TestEnv, rx: &Receiver, jobs: &[JobId]) -> Vec<Received> {
    let got = rx.received();
    assert!(got.iter().all(|r| r.valid), "an invalid signature arrived");
    for id in jobs {
        let expected = reported_events(env, *id).await;
        let mine: Vec<&Received> = got
            .iter()
            .filter(|r| r.body["data"]["id"] == json!(id.to_string()))
            .collect();
        // Distinct messages, by first arrival.
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for r in &mine {
            if seen.insert(r.id.clone()) {
                order.push(r.id.clone());
            }
        }
        let types: Vec<String> = order
            .iter()
            .map(|id| {
                let first = mine.iter().find(|r| &r.id == id).expect("arrived");
                first.body["type"]
                    .as_str()
                    .expect("type")
                    .trim_start_matches("job.")
                    .to_owned()
            })
            .collect();
        assert_eq!(types, expected, "job {id}: events in trail order");
        // No overtaking: once message k+1 arrived, message k never again.
        let position: HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let mut highest = 0;
        for r in &mine {
            let p = position[r.id.as_str()];
            assert!(
                p >= highest,
                "job {id}: message {p} arrived after message {highest}"
            );
            highest = highest.max(p);
        }
        // Each message was answered 200 at least once.
        for m in &order {
            assert!(
                mine.iter().any(|r| &r.id == m && r.answered == 200),
                "job {id}: message {m} was never accepted"
            );
        }
    }
    got
}

async fn enqueue_mix(api: &TestApi, q: &str, callback: &str) -> Vec<JobId> {
    let mut requests: Vec<JobRequest> = Vec::new();
    for _ in 0..3 {
        requests.push(request("noop", q, json!({})));
    }
    for _ in 0..3 {
        let mut r = request("flaky", q, json!({ "fail_times": 1 }));
        r.max_attempts = Some(3);
        requests.push(r);
    }
    for _ in 0..2 {
        let mut r = request("flaky", q, json!({ "fail_times": 5 }));
        r.max_attempts = Some(2);
        requests.push(r);
    }
    for r in &mut requests {
        r.callback_url = Some(callback.to_owned());
    }
    let mut ids = Vec::new();
    for r in requests {
        let (status, job) = body_of(
            api.post_json("/v1/jobs", ENQUEUE, serde_json::to_value(&r).expect("json"))
                .await,
        )
        .await;
        assert_eq!(status, 201, "{job}");
        assert_eq!(job["callback_url"], json!(callback));
        ids.push(job["id"].as_str().expect("id").parse().expect("uuid"));
    }
    ids
}

#[tokio::test]
async fn every_event_arrives_signed_and_in_order_through_failures_and_an_outage() {
    assert_eq!(REPORTED, orchestrator::job::JOB_WEBHOOK_EVENTS);
    let secret = secret();
    let api = TestApi::spawn_with(|s| webhooks_on(s, &secret)).await;
    let q = unique_queue();
    // The job's own callback: fails twice, then goes down for ten seconds.
    let callback = Receiver::start(&secret).await;
    callback.fail_first(2);
    callback.down_after(8, Duration::from_secs(10));
    // A subscription for the queue's every job event.
    let subscriber = Receiver::start(&secret).await;
    let (status, hook) = body_of(
        api.post_json(
            "/v1/webhooks",
            ADMIN,
            json!({ "url": subscriber.url, "events": REPORTED, "queues": [q] }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    // Another queue's subscription gets none of these.
    let elsewhere = Receiver::start(&secret).await;
    let (status, _) = body_of(
        api.post_json(
            "/v1/webhooks",
            ADMIN,
            json!({ "url": elsewhere.url, "events": REPORTED, "queues": [unique_queue()] }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201);

    let mut ids = enqueue_mix(&api, &q, &callback.url).await;
    // Two cancelled while waiting.
    for _ in 0..2 {
        let mut r = request("noop", &q, json!({}));
        r.delay_secs = Some(3_600);
        r.callback_url = Some(callback.url.clone());
        let (_, job) = body_of(
            api.post_json("/v1/jobs", ENQUEUE, serde_json::to_value(&r).expect("json"))
                .await,
        )
        .await;
        let id: JobId = job["id"].as_str().expect("id").parse().expect("uuid");
        let r = api
            .post_json(
                &format!("/v1/jobs/{id}/cancel"),
                ADMIN,
                json!({ "reason": "not needed" }),
            )
            .await;
        assert!(r.status().is_success(), "{}", r.status());
        ids.push(id);
    }
    let pool = api.env.start_pool(api.env.pool_config(&q, 4));
    let done = api.env.wait_terminal(&ids, Duration::from_secs(60)).await;
    assert!(done.iter().any(|j| j.status == Status::Dead));
    assert!(done.iter().any(|j| j.status == Status::Cancelled));
    wait_outbox_empty(&api.env, Duration::from_secs(120)).await;
    pool.shutdown().await;

    let got = check_receiver(&api.env, &callback, &ids).await;
    check_receiver(&api.env, &subscriber, &ids).await;
    assert!(
        elsewhere.received().is_empty(),
        "another queue's subscription got events"
    );
    // Distinct messages are exactly the outbox rows, and those exactly the
    // reported events.
    let mut reported = 0;
    for id in &ids {
        reported += reported_events(&api.env, *id).await.len();
    }
    let distinct: HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(distinct.len(), reported);
    assert!(
        got.len() > distinct.len(),
        "the failures and the outage caused retries"
    );
    assert!(got.iter().filter(|r| r.answered == 500).count() >= 2);

    // The retries are recorded, with status codes and errors.
    let mut statuses = HashSet::new();
    let mut no_answer = 0;
    for id in &ids {
        let (status, list) =
            body_of(api.get(&format!("/v1/jobs/{id}/deliveries"), READ).await).await;
        assert_eq!(status, 200, "{list}");
        for d in list["deliveries"].as_array().expect("deliveries") {
            assert_eq!(d["state"], "delivered", "{d}");
            assert_eq!(
                d["attempts"].as_u64(),
                Some(d["attempt_log"].as_array().expect("log").len() as u64)
            );
            assert!(d["message_id"].as_str().expect("id").starts_with("msg_"));
            for a in d["attempt_log"].as_array().expect("log") {
                match a["status"].as_u64() {
                    Some(s) => {
                        statuses.insert(s);
                    }
                    None => {
                        no_answer += 1;
                        assert!(
                            a["error"].as_str().expect("error").contains("no answer"),
                            "{a}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        statuses.contains(&500) && statuses.contains(&204),
        "{statuses:?}"
    );
    assert!(no_answer > 0, "the outage left no failed attempt");
    // The body has what a control plane needs.
    let succeeded = got
        .iter()
        .find(|r| r.body["type"] == "job.succeeded")
        .expect("a success");
    for field in [
        "id", "queue", "kind", "status", "stage", "attempt", "version", "result",
    ] {
        assert!(
            succeeded.body["data"].get(field).is_some(),
            "{field} missing: {}",
            succeeded.body
        );
    }
    assert_eq!(succeeded.body["data"]["status"], "succeeded");
    // The trigger sees each job row as its transition's statement left it.
    for started in got.iter().filter(|r| r.body["type"] == "job.started") {
        assert_eq!(
            started.body["data"]["status"], "running",
            "{}",
            started.body
        );
        assert!(started.body["data"]["attempt"].as_u64() >= Some(1));
    }
    let failed = got
        .iter()
        .find(|r| r.body["type"] == "job.failed")
        .expect("a retry");
    assert_eq!(failed.body["data"]["status"], "scheduled");
    assert!(failed.body["data"]["error"]
        .as_str()
        .is_some_and(|e| e.contains("flaky")));

    // Redelivery: the same message id, once more.
    let id = ids[0];
    let (_, list) = body_of(api.get(&format!("/v1/jobs/{id}/deliveries"), READ).await).await;
    let first = &list["deliveries"][0];
    let before = callback.received().len();
    let r = api
        .post_json(
            &format!("/v1/jobs/{id}/deliveries/{}/redeliver", first["id"]),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let pool = api.env.start_pool(api.env.pool_config(&q, 1));
    wait_outbox_empty(&api.env, Duration::from_secs(30)).await;
    pool.shutdown().await;
    let again = &callback.received()[before..];
    assert_eq!(again.len(), 1, "one redelivery");
    assert_eq!(again[0].id, first["message_id"].as_str().expect("id"));
    // Redelivering a pending one, or another job's, is refused.
    problem(
        api.post_json(
            &format!("/v1/jobs/{}/deliveries/{}/redeliver", ids[1], first["id"]),
            ADMIN,
            json!({}),
        )
        .await,
        404,
    )
    .await;
    problem(
        api.post_json(
            &format!("/v1/jobs/{id}/deliveries/{}/redeliver", first["id"]),
            READ,
            json!({}),
        )
        .await,
        403,
    )
    .await;
}

#[tokio::test]
async fn the_kill_switch_is_reported_to_subscribers_and_a_deleted_subscription_gets_nothing_more() {
    let secret = secret();
    let api = TestApi::spawn_with(|s| webhooks_on(s, &secret)).await;
    let rx = Receiver::start(&secret).await;
    let (status, hook) = body_of(
        api.post_json(
            "/v1/webhooks",
            ADMIN,
            json!({ "url": rx.url, "events": ["engaged", "lifted"] }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let (_, listed) = body_of(api.get("/v1/webhooks", ADMIN).await).await;
    assert_eq!(listed["webhooks"][0]["id"], hook["id"]);
    problem(api.get("/v1/webhooks", READ).await, 403).await;

    let q = unique_queue();
    let pool = api.env.start_pool(api.env.pool_config(&q, 1));
    let r = api
        .post_json("/v1/killswitch", ADMIN, json!({ "reason": "drill" }))
        .await;
    assert_eq!(r.status(), 200);
    let r = api
        .request(
            reqwest::Method::DELETE,
            "/v1/killswitch?reason=over",
            Some(ADMIN),
        )
        .send()
        .await
        .expect("lift");
    assert_eq!(r.status(), 200);
    // The audit records may reach Postgres through the Valkey outbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    while scalar(&api.env, "SELECT count(*) FROM webhook_deliveries").await < 2 {
        assert!(
            Instant::now() < deadline,
            "the kill switch's events were not queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_outbox_empty(&api.env, Duration::from_secs(30)).await;
    let types: Vec<Value> = rx
        .received()
        .iter()
        .map(|r| r.body["type"].clone())
        .collect();
    assert_eq!(
        types,
        [json!("killswitch.engaged"), json!("killswitch.lifted")]
    );
    assert_eq!(rx.received()[0].body["data"]["reason"], "drill");

    // Deleted: the next engagement is not sent to it.
    let r = api
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/webhooks/{}", hook["id"].as_str().expect("id")),
            Some(ADMIN),
        )
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let r = api
        .post_json("/v1/killswitch", ADMIN, json!({ "reason": "again" }))
        .await;
    assert_eq!(r.status(), 200);
    let rows = scalar(&api.env, "SELECT count(*) FROM webhook_deliveries").await;
    assert_eq!(rows, 2, "no row for a deleted subscription");
    problem(
        api.request(
            reqwest::Method::DELETE,
            &format!("/v1/webhooks/{}", hook["id"].as_str().expect("id")),
            Some(ADMIN),
        )
        .send()
        .await
        .expect("delete"),
        404,
    )
    .await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_delivery_loses_nothing_and_duplicates_share_their_id() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| webhooks_on(s, &secret)).await;
    let q = unique_queue();
    let rx = Receiver::start(&secret).await;
    // Requests are held unanswered: whatever is being sent when the
    // processes die is in flight.
    rx.hold(true);
    env.app
        .create_webhook(
            serde_json::from_value(
                json!({ "url": rx.url, "events": ["started", "succeeded"], "queues": [q] }),
            )
            .expect("request"),
            "test",
        )
        .await
        .expect("subscription");
    let owned = webhook_vars(&secret);
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = WorkerProcess::serve(&env, &addr, &vars);
    let mut worker = WorkerProcess::spawn_with(&env, &q, 4, &vars);
    let jobs = env
        .enqueue((0..20).map(|_| request("noop", &q, json!({}))).collect())
        .await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    env.wait_terminal(&ids, Duration::from_secs(60)).await;
    // Both deliverers hold requests in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.received().len() < 2 {
        assert!(Instant::now() < deadline, "no delivery was attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill9();
    serve.kill9();
    let in_flight = scalar(
        &env,
        "SELECT count(*) FROM webhook_deliveries WHERE state = 'sending'",
    )
    .await;
    assert!(
        in_flight > 0,
        "nothing was in flight when the processes died"
    );
    // Every event is in the outbox, fanned out into its delivery row or
    // still in its transition's fan-out row (one URL each here).
    let rows = scalar(&env, "SELECT count(*) FROM webhook_deliveries").await;
    let unfanned = scalar(
        &env,
        "SELECT COALESCE(sum(cardinality(event_ids)), 0) FROM webhook_fanout",
    )
    .await;
    assert_eq!(
        rows + unfanned,
        40,
        "one row per started and succeeded event, committed with it"
    );

    // The API comes back (a new process), and so does a worker.
    rx.hold(false);
    let addr = format!("127.0.0.1:{}", free_port());
    let _serve = WorkerProcess::serve(&env, &addr, &vars);
    let _worker = WorkerProcess::spawn_with(&env, &q, 4, &vars);
    wait_outbox_empty(&env, Duration::from_secs(90)).await;

    let got = check_receiver(&env, &rx, &ids).await;
    let mut bodies: HashMap<&str, &Value> = HashMap::new();
    for r in &got {
        if let Some(body) = bodies.insert(r.id.as_str(), &r.body) {
            assert_eq!(body, &r.body, "a redelivery carries the same message");
        }
    }
    assert_eq!(bodies.len(), 40, "distinct webhook-ids equal the events");
    assert!(
        got.len() > bodies.len(),
        "the messages in flight were sent again"
    );
    let delivered = scalar(
        &env,
        "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'",
    )
    .await;
    assert_eq!(delivered, 40);
}

#[tokio::test]
async fn local_and_hostile_callback_urls_are_refused_at_enqueue_and_nothing_is_sent() {
    let secret = secret();
    let api = TestApi::spawn_with(|s| {
        s.webhooks.secrets = vec![Secret::new(secret.clone())];
    })
    .await;
    let rx = Receiver::start(&secret).await;
    let before = api.footprint().await;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned());
    for url in [
        rx.url.clone(),
        "http://localhost:9/".to_owned(),
        "http://0x7f.1/hook".to_owned(),
        "http://2130706433/".to_owned(),
        "http://[::1]/".to_owned(),
        "http://[::ffff:127.0.0.1]/".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        format!("http://{host}:{}/hook", free_port()),
        "file:///etc/passwd".to_owned(),
        "http://user:pw@example.com/".to_owned(),
        "https://example.com/#frag".to_owned(),
        "https://exa\u{0}mple.com/".to_owned(),
        "https://example.com/a b".to_owned(),
        format!("https://example.com/{}", "a".repeat(3000)),
    ] {
        let body = json!({ "kind": "noop", "callback_url": url });
        let p = problem(api.post_json("/v1/jobs", ENQUEUE, body).await, 422).await;
        assert_eq!(p["field"], "callback_url", "{url}: {p}");
        let p = problem(
            api.post_json(
                "/v1/webhooks",
                ADMIN,
                json!({ "url": url, "events": ["started"] }),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(p["field"], "url", "{url}: {p}");
    }
    // In a batch: all or nothing.
    let batch = json!({ "jobs": [
        { "kind": "noop" },
        { "kind": "noop", "callback_url": rx.url },
    ]});
    let p = problem(api.post_json("/v1/jobs/batch", ENQUEUE, batch).await, 422).await;
    assert_eq!(p["index"], 1, "{p}");
    assert_eq!(
        api.footprint().await,
        before,
        "a refused enqueue changed something"
    );
    assert_eq!(scalar(&api.env, "SELECT count(*) FROM webhooks").await, 0);
    assert!(rx.received().is_empty(), "something was sent");
}

#[tokio::test]
async fn without_a_secret_nothing_is_taken_that_would_need_signing() {
    let api = TestApi::spawn_with(|s| s.webhooks.allow_local = true).await;
    let p = problem(
        api.post_json(
            "/v1/jobs",
            ENQUEUE,
            json!({ "kind": "noop", "callback_url": "http://127.0.0.1:9/" }),
        )
        .await,
        422,
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .expect("detail")
            .contains("no webhook secret"),
        "{p}"
    );
    problem(
        api.post_json(
            "/v1/webhooks",
            ADMIN,
            json!({ "url": "http://127.0.0.1:9/", "events": ["started"] }),
        )
        .await,
        422,
    )
    .await;
}

#[tokio::test]
async fn the_policy_is_checked_again_at_send() {
    // Taken while local addresses were allowed; sent by a deliverer whose
    // policy no longer allows them.
    let secret = secret();
    let env = TestEnv::with_settings(|s| {
        webhooks_on(s, &secret);
        s.webhooks.max_attempts = 2;
    })
    .await;
    let rx = Receiver::start(&secret).await;
    let q = unique_queue();
    let job = cancelled_with_callback(&env, &q, &rx.url).await;
    let mut strict = env.app.settings().webhooks.clone();
    strict.allow_local = false;
    let delivery = strict.delivery().expect("config").expect("a secret");
    let stop = CancellationToken::new();
    let deliverer = tokio::spawn(
        env.maintenance(&q)
            .with_webhooks(Some(delivery))
            .run_webhooks(stop.clone()),
    );
    wait_outbox_empty(&env, Duration::from_secs(30)).await;
    stop.cancel();
    deliverer.await.expect("deliverer");
    let deliveries = env.app.deliveries(job).await.expect("deliveries");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].state, "dead");
    for a in &deliveries[0].attempt_log {
        assert!(
            a.error
                .as_deref()
                .unwrap_or_default()
                .contains("address policy"),
            "{a:?}"
        );
        assert_eq!(a.status, None);
    }
    assert!(rx.received().is_empty(), "a refused URL was sent to");
}

#[tokio::test]
async fn a_job_whose_worker_died_is_reported_as_what_its_expired_lease_led_to() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| webhooks_on(s, &secret)).await;
    let q = unique_queue();
    let rx = Receiver::start(&secret).await;
    let mut r = request("sleep", &q, json!({ "ms": 60_000 }));
    r.max_attempts = Some(1);
    r.callback_url = Some(rx.url.clone());
    let job = env.enqueue(vec![r]).await.remove(0);
    let owned = webhook_vars(&secret);
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker = WorkerProcess::spawn_with(&env, &q, 1, &vars);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.job(job.id).await.status != Status::Running {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill9();
    // Another replica's reaper finds the expired lease: the last attempt
    // is used up, so the job is dead.
    let pool = env.start_pool(env.pool_config(&q, 1));
    let done = env.wait_terminal(&[job.id], Duration::from_secs(60)).await;
    assert_eq!(done[0].status, Status::Dead);
    wait_outbox_empty(&env, Duration::from_secs(30)).await;
    pool.shutdown().await;
    // Distinct messages (the killed worker's deliverer may have sent the
    // first one without recording it: it comes again, with its id).
    let mut seen = HashSet::new();
    let types: Vec<Value> = rx
        .received()
        .iter()
        .filter(|r| r.answered == 200 && seen.insert(r.id.clone()))
        .map(|r| r.body["type"].clone())
        .collect();
    assert_eq!(types, [json!("job.started"), json!("job.dead")]);
    let dead = rx
        .received()
        .into_iter()
        .find(|r| r.body["type"] == "job.dead")
        .expect("dead");
    assert!(
        dead.body["data"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("lease expired")),
        "{}",
        dead.body
    );
}

#[tokio::test]
async fn the_cli_makes_a_secret_manages_subscriptions_and_lists_deliveries() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| webhooks_on(s, &secret)).await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args(args)
            .env("ORCH_DATABASE_URL", &env.database_url)
            .env("ORCH_VALKEY_URL", &env.valkey_url)
            .env("ORCH_KEY_PREFIX", &env.app.settings().key_prefix)
            .env("ORCH_WEBHOOK_SECRET", &secret)
            .env("ORCH_WEBHOOKS__ALLOW_LOCAL", "true")
            .env("ORCH_LOG", "warn")
            .output()
            .expect("run the cli")
    };
    let made = run(&["webhooks", "secret"]);
    assert!(made.status.success());
    let made = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert!(made.starts_with("whsec_"), "{made}");
    assert!(orchestrator::webhook::Signer::new(&[Secret::new(made)]).is_ok());

    let rx = Receiver::start(&secret).await;
    let added = run(&["webhooks", "add", &rx.url, "--events", "started,succeeded"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let hook: Value = serde_json::from_slice(&added.stdout).expect("json");
    assert_eq!(hook["events"], json!(["started", "succeeded"]));
    let refused = run(&["webhooks", "add", &rx.url, "--events", "finished"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("events"));
    let listed: Value = serde_json::from_slice(&run(&["webhooks", "list"]).stdout).expect("json");
    assert_eq!(listed[0]["id"], hook["id"]);

    let enqueued = run(&[
        "enqueue",
        "noop",
        "--queue",
        "cli-hooks",
        "--callback-url",
        &rx.url,
    ]);
    assert!(
        enqueued.status.success(),
        "{}",
        String::from_utf8_lossy(&enqueued.stderr)
    );
    let job: Value = serde_json::from_slice(&enqueued.stdout).expect("json");
    let id: JobId = job["id"].as_str().expect("id").parse().expect("uuid");
    let pool = env.start_pool(env.pool_config("cli-hooks", 1));
    env.wait_terminal(&[id], Duration::from_secs(30)).await;
    wait_outbox_empty(&env, Duration::from_secs(30)).await;
    pool.shutdown().await;
    let shown: Value =
        serde_json::from_slice(&run(&["jobs", "deliveries", &id.to_string()]).stdout)
            .expect("json");
    // The callback and the subscription, each for started and succeeded.
    assert_eq!(shown.as_array().map(Vec::len), Some(4), "{shown}");
    assert!(shown
        .as_array()
        .expect("list")
        .iter()
        .all(|d| d["state"] == "delivered"));
    let removed = run(&["webhooks", "remove", hook["id"].as_str().expect("id")]);
    assert!(removed.status.success());
    let listed: Value = serde_json::from_slice(&run(&["webhooks", "list"]).stdout).expect("json");
    assert_eq!(listed, json!([]));
}

/// A job calling back to `url` that is cancelled before it runs: one
/// reported event.
async fn cancelled_with_callback(env: &TestEnv, q: &str, url: &str) -> JobId {
    let mut r = request("noop", q, json!({}));
    r.callback_url = Some(url.to_owned());
    r.delay_secs = Some(3_600);
    let job = env.enqueue(vec![r]).await.remove(0);
    env.app
        .cancel(job.id, "test", "so that one event is reported")
        .await
        .expect("cancel");
    job.id
}

/// The delivery rows of `id`: (state, attempts).
async fn delivery_state(env: &TestEnv, id: JobId) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT state, attempts FROM webhook_deliveries WHERE job_id = $1")
        .bind(id.0)
        .fetch_all(env.app.store().pool())
        .await
        .expect("delivery rows")
}

#[tokio::test]
async fn while_a_pool_is_saturated_fresh_deliveries_wait_and_older_ones_go() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| {
        webhooks_on(s, &secret);
        // Longer than the test: a fresh row goes only once nothing is
        // saturated.
        s.webhooks.defer_while_saturated_ms = 600_000;
    })
    .await;
    let rx = Receiver::start(&secret).await;
    let q = unique_queue();
    let old = cancelled_with_callback(&env, &q, &rx.url).await;
    let fresh = cancelled_with_callback(&env, &q, &rx.url).await;
    // The first has waited longer than the deferral (its transition's
    // outbox row, not yet fanned out).
    sqlx::query(
        "UPDATE webhook_fanout SET created_at = now() - interval '601 seconds'
         WHERE $1 = ANY (job_ids)",
    )
    .bind(old.0)
    .execute(env.app.store().pool())
    .await
    .expect("age the row");
    env.app
        .queue()
        .mark_saturated(Duration::from_secs(600))
        .await
        .expect("mark");
    assert!(env.app.queue().saturated().await.expect("read the mark"));

    let delivery = env
        .app
        .settings()
        .webhooks
        .delivery()
        .expect("config")
        .expect("a secret");
    let stop = CancellationToken::new();
    let deliverer = tokio::spawn(
        env.maintenance(&q)
            .with_webhooks(Some(delivery))
            .run_webhooks(stop.clone()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivery_state(&env, old).await != [("delivered".to_owned(), 1)] {
        assert!(Instant::now() < deadline, "the old row was not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pass that fanned out the old one would have taken the fresh one
    // too, had it not been deferred: it is still in the outbox, unsent.
    assert_eq!(
        delivery_state(&env, fresh).await,
        [],
        "a fresh row was fanned out while a pool was saturated"
    );
    assert_eq!(
        scalar(&env, "SELECT count(*) FROM webhook_fanout").await,
        1,
        "the fresh event left the outbox without being delivered"
    );

    // Nothing saturated any more (the mark runs out at once): it goes.
    env.app
        .queue()
        .mark_saturated(Duration::from_millis(1))
        .await
        .expect("mark");
    wait_outbox_empty(&env, Duration::from_secs(30)).await;
    assert_eq!(
        delivery_state(&env, fresh).await,
        [("delivered".to_owned(), 1)]
    );
    stop.cancel();
    deliverer.await.expect("deliverer");
    let got: HashSet<String> = rx
        .received()
        .iter()
        .filter(|r| r.valid)
        .map(|r| r.body["data"]["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(got, HashSet::from([old.to_string(), fresh.to_string()]));
}

#[tokio::test]
async fn a_pool_claiming_full_batches_of_short_jobs_says_it_is_saturated() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    assert!(!env.app.queue().saturated().await.expect("read the mark"));
    let burst: Vec<JobRequest> = (0..400).map(|_| request("noop", &q, json!({}))).collect();
    let ids: Vec<JobId> = env.enqueue(burst).await.iter().map(|j| j.id).collect();
    let watch = {
        let queue = env.app.queue().clone();
        tokio::spawn(async move {
            loop {
                if queue.saturated().await.expect("read the mark") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let _pool = env.start_pool(env.pool_config(&q, 2));
    env.wait_terminal(&ids, Duration::from_secs(120)).await;
    // Each mark lasts a second after the last full claim.
    tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("the pool never said it was saturated")
        .expect("watcher");
}

/// A subscription to every event of `q` for `url`; its id.
async fn subscribe(env: &TestEnv, q: &str, url: &str) -> uuid::Uuid {
    env.app
        .create_webhook(
            serde_json::from_value(json!({ "url": url, "events": REPORTED, "queues": [q] }))
                .expect("request"),
            "test",
        )
        .await
        .expect("subscription")
        .id
}

/// The URLs `id`'s deliveries go to, in order.
async fn delivery_urls(env: &TestEnv, id: JobId) -> Vec<String> {
    sqlx::query_scalar("SELECT url FROM webhook_deliveries WHERE job_id = $1 ORDER BY id")
        .bind(id.0)
        .fetch_all(env.app.store().pool())
        .await
        .expect("delivery rows")
}

#[tokio::test]
async fn fan_out_goes_in_order_one_replica_at_a_time_and_only_to_older_subscriptions() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| webhooks_on(s, &secret)).await;
    let q = unique_queue();
    let store = env.app.store();
    let first_url = "http://127.0.0.1:9/first";
    subscribe(&env, &q, first_url).await;
    let older = cancelled_with_callback(&env, &q, "http://127.0.0.1:9/callback").await;
    let younger = cancelled_with_callback(&env, &q, "http://127.0.0.1:9/callback").await;
    // Each cancel was its own statement: two outbox rows, no deliveries yet.
    assert_eq!(scalar(&env, "SELECT count(*) FROM webhook_fanout").await, 2);
    assert_eq!(
        scalar(&env, "SELECT count(*) FROM webhook_deliveries").await,
        0
    );
    // A subscription made after both events gets neither.
    subscribe(&env, &q, "http://127.0.0.1:9/later").await;

    // The younger row is old enough, the older one is not: nothing goes,
    // since the younger would otherwise be fanned out first. The first
    // subscription is aged further, so it still predates the younger row.
    sqlx::query("UPDATE webhooks SET created_at = now() - interval '2 hours' WHERE url = $1")
        .bind(first_url)
        .execute(store.pool())
        .await
        .expect("age the subscription");
    sqlx::query(
        "UPDATE webhook_fanout SET created_at = now() - interval '1 hour' WHERE $1 = ANY (job_ids)",
    )
    .bind(younger.0)
    .execute(store.pool())
    .await
    .expect("age the row");
    assert_eq!(
        store
            .fan_out_deliveries(Duration::from_secs(60), 20)
            .await
            .expect("fan out"),
        Some(FanOutPass { taken: 0, made: 0 })
    );
    // Not yet fanned out is undelivered, as old as its row.
    assert!(
        store.oldest_undelivered().await.expect("oldest") >= Duration::from_secs(3600),
        "the aged fan-out row is not counted"
    );

    // Another replica fanning out right now: this one leaves it alone.
    let mut other = store.pool().begin().await.expect("begin");
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(webhook_fanout_lock())")
        .fetch_one(&mut *other)
        .await
        .expect("lock");
    assert!(held);
    assert_eq!(
        store
            .fan_out_deliveries(Duration::ZERO, 20)
            .await
            .expect("fan out"),
        None
    );
    other.rollback().await.expect("rollback");
    assert_eq!(scalar(&env, "SELECT count(*) FROM webhook_fanout").await, 2);

    // Now both go, in their order: the callback and the first
    // subscription for each, nothing for the later subscription.
    assert_eq!(
        store
            .fan_out_deliveries(Duration::ZERO, 20)
            .await
            .expect("fan out"),
        Some(FanOutPass { taken: 2, made: 4 })
    );
    assert_eq!(scalar(&env, "SELECT count(*) FROM webhook_fanout").await, 0);
    for id in [older, younger] {
        let mut urls = delivery_urls(&env, id).await;
        urls.sort();
        assert_eq!(urls, ["http://127.0.0.1:9/callback", first_url]);
    }
    let order: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT job_id FROM webhook_deliveries ORDER BY id")
            .fetch_all(store.pool())
            .await
            .expect("rows");
    assert_eq!(order, [older.0, older.0, younger.0, younger.0]);
    assert_eq!(store.undelivered_webhooks().await.expect("undelivered"), 4);
}

/// Retention and the fan-out take turns: a retention batch holds fan-out
/// passes off until it commits, and the events of a job it pruned are
/// fanned out to nothing, not into delivery rows of a job that is gone.
#[tokio::test]
async fn retention_and_fan_out_take_turns_and_a_pruned_job_gets_no_deliveries() {
    let secret = secret();
    let env = TestEnv::with_settings(|s| webhooks_on(s, &secret)).await;
    let q = unique_queue();
    let store = env.app.store();
    let pruned = cancelled_with_callback(&env, &q, "http://127.0.0.1:9/callback").await;
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id = $1")
        .bind(pruned.0)
        .execute(store.pool())
        .await
        .expect("age the job");
    let mut retention = store.pool().begin().await.expect("begin");
    let (jobs, _events): (i64, i64) = sqlx::query_as(
        "SELECT * FROM prune_finished_jobs('cancelled', now() - interval '1 day', 10, $1)",
    )
    .bind(&q)
    .fetch_one(&mut *retention)
    .await
    .expect("prune");
    assert_eq!(jobs, 1);
    assert_eq!(
        store
            .fan_out_deliveries(Duration::ZERO, 20)
            .await
            .expect("fan out"),
        None,
        "a fan-out pass ran beside a retention batch"
    );
    retention.commit().await.expect("commit");
    assert_eq!(
        store
            .fan_out_deliveries(Duration::ZERO, 20)
            .await
            .expect("fan out"),
        Some(FanOutPass { taken: 1, made: 0 })
    );
    assert!(delivery_urls(&env, pruned).await.is_empty());
    assert_eq!(store.undelivered_webhooks().await.expect("undelivered"), 0);
}
