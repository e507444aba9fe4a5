//! Graceful shutdown: stop claiming, let in-flight jobs finish within the
//! grace period, release the rest without using up an attempt.

use std::time::Duration;

use orchestrator::job::{JobId, Status};
use serde_json::json;

use crate::support::{request, unique_queue, TestEnv, WorkerProcess};

#[tokio::test]
async fn in_flight_jobs_finish_within_grace_and_unstarted_ones_stay_queued() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..10)
                .map(|_| request("sleep", &q, json!({ "ms": 400 })))
                .collect(),
        )
        .await;
    let mut pool = env.start_pool(env.pool_config(&q, 3));
    let started = pool.wait_started(3, Duration::from_secs(20)).await;
    pool.shutdown().await;

    let mut succeeded = 0;
    for job in &jobs {
        let j = env.job(job.id).await;
        match j.status {
            Status::Succeeded => succeeded += 1,
            Status::Queued => assert_eq!(j.attempt, 0, "an unstarted job used an attempt"),
            other => panic!("job {} is {other} after a graceful shutdown", j.id),
        }
    }
    for id in &started {
        assert_eq!(
            env.job(*id).await.status,
            Status::Succeeded,
            "started job {id} did not finish"
        );
    }
    assert!((3..10).contains(&succeeded), "{succeeded} succeeded");

    // Nothing was lost: a new pool finishes the rest.
    let pool = env.start_pool(env.pool_config(&q, 10));
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(20)).await;
    pool.shutdown().await;
    assert!(done.iter().all(|j| j.status == Status::Succeeded));
}

#[tokio::test]
async fn sigterm_releases_unfinished_jobs_after_the_grace_period_without_burning_attempts() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..4)
                .map(|_| request("sleep", &q, json!({ "ms": 60_000 })))
                .collect(),
        )
        .await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let mut worker = WorkerProcess::spawn(&env, &q, 4);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut running = 0;
        for id in &ids {
            running += usize::from(env.job(*id).await.status == Status::Running);
        }
        if running == ids.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "jobs never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.terminate();
    // Grace is 5s in tests; the 60s jobs cannot finish in it.
    let status = worker.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "worker exited with {status}");
    for id in &ids {
        let j = env.job(*id).await;
        assert_eq!(j.status, Status::Queued, "job {id}");
        assert_eq!(j.attempt, 0, "job {id} used an attempt");
        assert_eq!(env.event_counts(*id, "released").await, 1);
    }
}

/// `worker --one-job` (a Kubernetes ScaledJob's pod): claims one job, runs
/// it to its end even past the shutdown grace, and exits; the other jobs
/// stay queued, untouched. With nothing to claim, `--idle-exit-secs` ends it.
#[tokio::test]
async fn one_job_runs_exactly_one_job_to_its_end_and_idle_exit_ends_an_idle_worker() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..3)
                .map(|_| request("sleep", &q, json!({ "ms": 2_500 })))
                .collect(),
        )
        .await;
    // A grace shorter than the job: were the job held to it, it would be
    // released, not succeed.
    let mut worker = WorkerProcess::spawn_args(
        &env,
        &["worker", "--queues", &q, "--one-job"],
        &[("ORCH_WORKER__SHUTDOWN_GRACE_SECS", "1")],
    );
    let status = worker.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "worker exited with {status}");
    let mut succeeded = 0;
    for job in &jobs {
        let j = env.job(job.id).await;
        match j.status {
            Status::Succeeded => {
                succeeded += 1;
                assert_eq!(env.event_counts(j.id, "started").await, 1);
                assert_eq!(env.event_counts(j.id, "released").await, 0);
            }
            Status::Queued => {
                assert_eq!(j.attempt, 0, "job {} was touched", j.id);
                assert_eq!(env.event_counts(j.id, "started").await, 0);
            }
            other => panic!("job {} is {other}", j.id),
        }
    }
    assert_eq!(succeeded, 1, "--one-job ran {succeeded} jobs");

    // An empty queue: both exit by themselves once idle.
    let empty = unique_queue();
    for args in [
        vec!["worker", "--queues", &empty, "--idle-exit-secs", "1"],
        vec![
            "worker",
            "--queues",
            &empty,
            "--one-job",
            "--idle-exit-secs",
            "1",
        ],
    ] {
        let mut idle = WorkerProcess::spawn_args(&env, &args, &[]);
        let status = idle.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{args:?} exited with {status}");
    }
    // Bad values are refused before anything starts.
    let out = crate::support::cli(&env, &["worker", "--queues", &q, "--idle-exit-secs", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-exit-secs"));
    let out = crate::support::cli(
        &env,
        &["worker", "--queues", &q, "--one-job", "--concurrency", "4"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--one-job"));
}
