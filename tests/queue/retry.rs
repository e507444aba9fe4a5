//! Retries with backoff, dead-lettering and the admin retry.

use std::time::Duration;

use orchestrator::job::{JobRequest, Status};
use orchestrator::store::StoreError;
use serde_json::json;

use crate::support::{request, unique_queue, TestEnv};

#[tokio::test]
async fn failed_attempts_back_off_exponentially_up_to_the_cap() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = &env
        .enqueue(vec![JobRequest {
            max_attempts: Some(6),
            backoff_base_ms: Some(200),
            backoff_cap_ms: Some(800),
            ..request("flaky", &q, json!({ "fail_times": 5 }))
        }])
        .await[0];
    let pool = env.start_pool(env.pool_config(&q, 2));
    let done = env.wait_terminal(&[job.id], Duration::from_secs(30)).await;
    pool.shutdown().await;
    assert_eq!(done[0].status, Status::Succeeded);
    assert_eq!(done[0].attempt, 6);

    let events = env
        .app
        .store()
        .job_events(job.id, None)
        .await
        .expect("events");
    let failed: Vec<_> = events.iter().filter(|e| e.kind == "failed").collect();
    assert_eq!(failed.len(), 5);
    // The delay the policy chose at each failure, as recorded.
    let delays: Vec<f64> = failed
        .iter()
        .map(|e| e.data["delay_ms"].as_f64().expect("delay_ms"))
        .collect();
    let nominal = [200.0, 400.0, 800.0, 800.0, 800.0];
    for (d, n) in delays.iter().zip(nominal) {
        assert!(
            *d >= n * 0.75 - 20.0 && *d <= n * 1.25 + 20.0,
            "delays {delays:?} vs nominal {nominal:?}"
        );
    }
    assert!(
        delays.iter().all(|d| *d <= 800.0 + 20.0),
        "cap exceeded: {delays:?}"
    );
    // And it never ran again before its retry time.
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "started")
        .map(|e| e.at)
        .collect();
    for (f, next_start) in failed.iter().zip(starts.iter().skip(1)) {
        let retry_at: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(f.data["retry_at"].clone()).expect("retry_at");
        assert!(
            *next_start >= retry_at,
            "restarted at {next_start} before {retry_at}"
        );
    }
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_and_admin_retry_brings_the_job_back() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = &env
        .enqueue(vec![JobRequest {
            max_attempts: Some(2),
            backoff_base_ms: Some(50),
            ..request("flaky", &q, json!({ "fail_times": 3 }))
        }])
        .await[0];
    let pool = env.start_pool(env.pool_config(&q, 2));
    let done = env.wait_terminal(&[job.id], Duration::from_secs(20)).await;
    assert_eq!(done[0].status, Status::Dead);
    assert_eq!(done[0].attempt, 2);
    assert!(done[0]
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("flaky"));
    assert_eq!(env.event_counts(job.id, "started").await, 2);
    assert_eq!(env.event_counts(job.id, "dead").await, 1);

    // Only a dead job can be retried.
    let other = &env.enqueue(vec![request("noop", &q, json!({}))]).await[0];
    env.wait_terminal(&[other.id], Duration::from_secs(20))
        .await;
    match env.app.retry_dead(other.id, "admin").await {
        Err(orchestrator::app::AppError::Store(StoreError::InvalidTransition { .. })) => {}
        other => panic!("retrying a succeeded job must fail, got {other:?}"),
    }

    let retried = env.app.retry_dead(job.id, "admin").await.expect("retry");
    // The running pool may already have claimed it again.
    assert!(
        retried.attempt <= 1 && !retried.status.is_terminal(),
        "{retried:?}"
    );
    assert_eq!(env.event_counts(job.id, "retried").await, 1);
    // Back in the queue: it runs again (and, still flaky, dies again).
    let again = env.wait_terminal(&[job.id], Duration::from_secs(20)).await;
    pool.shutdown().await;
    assert_eq!(again[0].status, Status::Dead);
    assert_eq!(env.event_counts(job.id, "started").await, 4);
    assert_eq!(env.event_counts(job.id, "dead").await, 2);
    // A fresh set of attempts: 1, 2, then 1, 2 again.
    let attempts: Vec<i64> = env
        .app
        .store()
        .job_events(job.id, None)
        .await
        .expect("events")
        .iter()
        .filter(|e| e.kind == "started")
        .filter_map(|e| e.data["attempt"].as_i64())
        .collect();
    assert_eq!(attempts, vec![1, 2, 1, 2]);
}
