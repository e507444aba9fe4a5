//! Crashes and outages: a worker killed mid-job, Valkey flushed mid-run,
//! Postgres restarted mid-run. Nothing is lost, nothing finishes twice.

use std::time::Duration;

use orchestrator::job::{JobId, Status};
use serde_json::json;

use crate::support::{
    assert_status, request, unique_queue, PgServer, TestEnv, ValkeyServer, WorkerProcess,
};

async fn running_count(env: &TestEnv, ids: &[JobId]) -> i64 {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'running'")
        .bind(&uuids)
        .fetch_one(env.app.store().pool())
        .await
        .expect("count")
}

pub(crate) async fn assert_each_finished_once(env: &TestEnv, ids: &[JobId]) {
    for id in ids {
        assert_eq!(
            env.terminal_events(*id).await,
            1,
            "job {id} has not exactly one terminal event"
        );
        assert_eq!(env.event_counts(*id, "succeeded").await, 1, "job {id}");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_nothing_and_each_job_finishes_once() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..12)
                .map(|_| request("sleep", &q, json!({ "ms": 1500 })))
                .collect(),
        )
        .await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();

    let mut victim = WorkerProcess::spawn(&env, &q, 6);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running_count(&env, &ids).await < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never started 6 jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    victim.kill9();
    let orphaned = running_count(&env, &ids).await;
    assert!(orphaned > 0, "jobs were running when the worker died");

    let rescuer = WorkerProcess::spawn(&env, &q, 12);
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    drop(rescuer);
    assert_status(&done, Status::Succeeded);
    assert_each_finished_once(&env, &ids).await;
    let expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_events WHERE type = 'lease_expired'")
            .fetch_one(env.app.store().pool())
            .await
            .expect("count");
    assert!(
        expired >= orphaned,
        "{expired} leases reaped, {orphaned} were orphaned"
    );
}

#[tokio::test]
async fn flushing_valkey_mid_run_loses_no_job() {
    let valkey = ValkeyServer::start();
    let env = TestEnv::with_valkey(&valkey.url()).await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..300)
                .map(|_| request("sleep", &q, json!({ "ms": 20 })))
                .collect(),
        )
        .await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let mut pool = env.start_pool(env.pool_config(&q, 10));
    pool.wait_started(50, Duration::from_secs(20)).await;

    valkey.flushall().await;
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    pool.shutdown().await;
    assert_status(&done, Status::Succeeded);
    assert_each_finished_once(&env, &ids).await;
}

#[tokio::test]
async fn restarting_postgres_mid_run_loses_nothing_and_crashes_nothing() {
    let pg = PgServer::start();
    let database_url = crate::support::fresh_database(&pg.url()).await;
    let env =
        TestEnv::with_services(&database_url, &crate::support::env_var("ORCH_VALKEY_URL")).await;
    let q = unique_queue();
    let jobs = env
        .enqueue(
            (0..200)
                .map(|_| request("sleep", &q, json!({ "ms": 30 })))
                .collect(),
        )
        .await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();

    let mut worker = WorkerProcess::spawn(&env, &q, 8);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let succeeded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
                .fetch_one(env.app.store().pool())
                .await
                .expect("count");
        if succeeded >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.halt();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "the worker crashed while Postgres was down"
    );
    pg.resume();

    let done = env.wait_terminal(&ids, Duration::from_secs(90)).await;
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "the worker crashed"
    );
    worker.terminate();
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    assert_status(&done, Status::Succeeded);
    assert_each_finished_once(&env, &ids).await;
}
