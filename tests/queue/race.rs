//! Fencing: a stale lease can never complete a job.

use std::time::Duration;

use orchestrator::job::{JobId, Status};
use orchestrator::store::{Finish, StoreError};
use serde_json::json;

use crate::support::{request, unique_queue, TestEnv};

async fn claim_one(env: &TestEnv, id: JobId, worker: &str, lease: Duration) -> i64 {
    let (claimed, refused) = env
        .app
        .store()
        .claim(&[id], worker, lease)
        .await
        .expect("claim");
    assert!(refused.is_empty(), "claim refused");
    claimed[0].lease_id
}

#[tokio::test]
async fn two_workers_racing_to_complete_one_job_exactly_one_wins() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    for _ in 0..10 {
        let job = &env.enqueue(vec![request("noop", &q, json!({}))]).await[0];
        let lease = claim_one(&env, job.id, "w1", Duration::from_secs(30)).await;
        let id = job.id;
        let store_a = env.app.store().clone();
        let store_b = env.app.store().clone();
        let a = tokio::spawn(async move {
            store_a
                .finish_one(Finish::succeeded(id, lease, json!("a")), "a")
                .await
        });
        let b = tokio::spawn(async move {
            store_b
                .finish_one(Finish::succeeded(id, lease, json!("b")), "b")
                .await
        });
        let (a, b) = (a.await.expect("task"), b.await.expect("task"));
        let wins = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Ok(Status::Succeeded)))
            .count();
        let stale = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Err(StoreError::StaleLease { .. })))
            .count();
        assert_eq!((wins, stale), (1, 1), "a={a:?} b={b:?}");
        assert_eq!(env.terminal_events(job.id).await, 1);
    }
}

#[tokio::test]
async fn an_expired_lease_is_stale_after_the_job_was_reclaimed() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = &env.enqueue(vec![request("noop", &q, json!({}))]).await[0];
    let old = claim_one(&env, job.id, "slow-worker", Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Expired but not yet reaped: already stale, nothing changes.
    let err = env
        .app
        .store()
        .finish_one(Finish::succeeded(job.id, old, json!(null)), "slow-worker")
        .await
        .expect_err("expired lease");
    assert!(matches!(err, StoreError::StaleLease { .. }), "{err}");
    assert_eq!(env.job(job.id).await.status, Status::Running);

    let reaped = env
        .app
        .store()
        .reap_expired(Some(&[job.id]), 10, "reaper", |_| async {
            Some(Default::default())
        })
        .await
        .expect("reap");
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].to, Status::Scheduled);
    // Wait out the backoff, then another worker takes it.
    let due = env.job(job.id).await.run_at;
    let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let new = claim_one(&env, job.id, "fast-worker", Duration::from_secs(30)).await;
    assert!(new > old, "fencing token must grow: {old} -> {new}");

    let err = env
        .app
        .store()
        .finish_one(Finish::succeeded(job.id, old, json!("old")), "slow-worker")
        .await
        .expect_err("stale");
    assert!(matches!(err, StoreError::StaleLease { lease_id, .. } if lease_id == old));
    let status = env
        .app
        .store()
        .finish_one(Finish::succeeded(job.id, new, json!("new")), "fast-worker")
        .await
        .expect("current lease wins");
    assert_eq!(status, Status::Succeeded);
    let done = env.job(job.id).await;
    assert_eq!(done.result, Some(json!("new")));
    assert_eq!(env.terminal_events(job.id).await, 1);
    assert_eq!(env.event_counts(job.id, "lease_expired").await, 1);
}
