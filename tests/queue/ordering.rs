//! Order of execution through a real worker pool.

use std::time::Duration;

use orchestrator::job::{JobRequest, QueueName, Status};
use serde_json::json;

use crate::support::{assert_status, request, unique_queue, TestEnv};

#[tokio::test]
async fn one_slot_runs_jobs_by_priority_then_fifo() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let queue: QueueName = q.parse().expect("name");
    // Paused while enqueuing, so the pool sees the whole set at once.
    env.app
        .queue()
        .set_paused(&queue, true)
        .await
        .expect("pause");
    let priorities = [3, 8, 3, 10, 1, 8, 5, 10, 3];
    let requests: Vec<JobRequest> = priorities
        .iter()
        .map(|p| JobRequest {
            priority: Some(*p),
            ..request("noop", &q, json!({}))
        })
        .collect();
    let jobs = env.enqueue(requests).await;
    let mut cfg = env.pool_config(&q, 1);
    cfg.claim_batch = 1;
    let mut pool = env.start_pool(cfg);
    env.app
        .queue()
        .set_paused(&queue, false)
        .await
        .expect("resume");
    let started = pool.wait_started(jobs.len(), Duration::from_secs(20)).await;
    pool.shutdown().await;

    let mut expected: Vec<_> = jobs.iter().map(|j| (j.priority, j.id)).collect();
    expected.sort_by_key(|(p, _)| std::cmp::Reverse(*p)); // stable: FIFO within a priority
    assert_eq!(
        started,
        expected.iter().map(|(_, id)| *id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn delayed_jobs_never_start_before_run_at() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let run_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let delayed: Vec<JobRequest> = (0..5)
        .map(|_| JobRequest {
            run_at: Some(run_at),
            ..request("noop", &q, json!({}))
        })
        .collect();
    let by_delay: Vec<JobRequest> = (0..5)
        .map(|_| JobRequest {
            delay_secs: Some(1),
            ..request("noop", &q, json!({}))
        })
        .collect();
    let mut jobs = env.enqueue(delayed).await;
    jobs.extend(env.enqueue(by_delay).await);
    assert_status(&jobs, Status::Scheduled);
    let pool = env.start_pool(env.pool_config(&q, 4));
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(20)).await;
    pool.shutdown().await;
    assert_status(&done, Status::Succeeded);
    for job in done {
        let started = job.started_at.expect("started");
        assert!(
            started >= job.run_at,
            "job {} started at {started} before run_at {}",
            job.id,
            job.run_at
        );
    }
}
