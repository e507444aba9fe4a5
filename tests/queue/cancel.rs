//! Cancelling a running job from another process: the worker holding it
//! hears of it through Valkey and records the cancellation.

use std::time::Duration;

use orchestrator::job::Status;

use crate::support::{request, unique_queue, TestEnv, WorkerProcess};

#[tokio::test]
async fn the_cli_cancels_a_job_running_in_another_worker_process() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = env
        .enqueue(vec![request(
            "sleep",
            &q,
            serde_json::json!({ "ms": 600_000 }),
        )])
        .await
        .remove(0);
    let _worker = WorkerProcess::spawn(&env, &q, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.job(job.id).await.status != Status::Running {
        assert!(std::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let id = job.id.to_string();
    let cli = |reason: &str| crate::support::cli(&env, &["cancel", &id, "--reason", reason]);
    let empty = cli("  ");
    assert!(!empty.status.success(), "an empty reason is refused");
    assert_eq!(env.job(job.id).await.status, Status::Running);

    let ok = cli("stop it");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let done = env.wait_terminal(&[job.id], Duration::from_secs(30)).await;
    assert_eq!(done[0].status, Status::Cancelled);
    assert_eq!(env.terminal_events(job.id).await, 1);
    let last = env.cancelled_event(job.id).await;
    assert_eq!(last["requested_by"], "cli");
    assert_eq!(last["reason"], "stop it");
}

/// A request that lands while the job is between attempts (it left
/// `running` for a retry before its worker saw the message) still stops it:
/// the flag is read when the job is claimed again (and on every heartbeat).
#[tokio::test]
async fn a_cancel_request_waiting_in_valkey_stops_the_job_when_it_is_claimed() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let mut r = request("sleep", &q, serde_json::json!({ "ms": 600_000 }));
    r.delay_secs = Some(1);
    let job = env.enqueue(vec![r]).await.remove(0);
    assert_eq!(job.status, Status::Scheduled);
    // What `App::cancel` does for a running job; here the job is not running,
    // which is exactly the race being simulated.
    env.app
        .queue()
        .request_cancel(job.id, "operator", "late")
        .await
        .expect("request cancel");

    let pool = env.start_pool(env.pool_config(&q, 1));
    let done = env.wait_terminal(&[job.id], Duration::from_secs(30)).await;
    pool.shutdown().await;
    assert_eq!(done[0].status, Status::Cancelled);
    assert_eq!(done[0].attempt, 1);
    let last = env.cancelled_event(job.id).await;
    assert_eq!(last["requested_by"], "operator");
    assert_eq!(last["reason"], "late");
}

/// A worker died while it stopped a cancelled job: its lease expires with
/// the cancel request still standing, and the reaper ends the job
/// `cancelled` (not retried), saying who asked and that it finished it.
#[tokio::test]
async fn the_reaper_cancels_an_expired_job_whose_cancel_was_requested() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let queue: orchestrator::job::QueueName = q.parse().expect("queue");
    let job = env
        .enqueue(vec![request("noop", &q, serde_json::json!({}))])
        .await
        .remove(0);
    let lease = Duration::from_millis(200);
    let claimed = env
        .app
        .queue()
        .claim(&queue, 1, lease, Default::default())
        .await
        .expect("claim");
    assert!(matches!(claimed, orchestrator::queue::Claimed::Ids(ref ids) if ids.len() == 1));
    let (started, _) = env
        .app
        .store()
        .claim(&[job.id], "doomed-worker", lease)
        .await
        .expect("claim");
    assert_eq!(started.len(), 1);
    env.app
        .queue()
        .request_cancel(job.id, "operator", "runaway")
        .await
        .expect("request cancel");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let counts = env.maintenance(&q).reap_once().await.expect("reap");
    assert_eq!(counts.reaped, 1);
    let done = env.job(job.id).await;
    assert_eq!(done.status, Status::Cancelled, "{:?}", done.last_error);
    assert_eq!(env.terminal_events(job.id).await, 1);
    let last = env.cancelled_event(job.id).await;
    assert_eq!(last["requested_by"], "operator");
    assert_eq!(last["completed_by"], "test-maintenance");
    assert_eq!(last["lease_expired_from"], "doomed-worker");
    assert!(
        env.app
            .queue()
            .cancel_requests(&[job.id])
            .await
            .expect("flags")
            .is_empty(),
        "the request is done with"
    );
    let stopped = env
        .app
        .queue()
        .stopped_at(&[job.id])
        .await
        .expect("stopped");
    assert!(stopped[0].is_some(), "the stop is confirmed");
}
