//! A Valkey Cluster (three primaries, a replica each) of its own: the queue
//! works across slots, and a failover of the primary that owns a busy queue
//! loses nothing, completes nothing twice, and the workers carry on by
//! themselves. (scripts/test.sh also runs the whole queue suite against a
//! shared cluster.)

use std::time::{Duration, Instant};

use orchestrator::job::{JobId, Status};
use serde_json::json;

use crate::recovery::assert_each_finished_once;
use crate::support::{assert_status, request, unique_queue, TestEnv, ValkeyServer, WorkerProcess};

async fn succeeded(env: &TestEnv, queue: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'succeeded'")
        .bind(queue)
        .fetch_one(env.app.store().pool())
        .await
        .expect("count")
}

/// Enqueues `n` short sleep jobs; their ids.
async fn sleeps(env: &TestEnv, queue: &str, n: usize) -> Vec<JobId> {
    let jobs = env
        .enqueue(
            (0..n)
                .map(|_| request("sleep", queue, json!({ "ms": 25 })))
                .collect(),
        )
        .await;
    jobs.iter().map(|j| j.id).collect()
}

#[tokio::test]
async fn failing_over_the_primary_of_a_busy_queue_loses_nothing_and_completes_nothing_twice() {
    let cluster = ValkeyServer::start_cluster(3, 1);
    let env = TestEnv::with_valkey(&cluster.url()).await;
    assert!(env.app.queue().is_cluster());
    let q = unique_queue();
    // Every key of the queue carries this hash tag, so one primary owns it.
    let (primary, replica) = cluster.owners(&format!("{{q:{q}}}"));
    let replica = replica.expect("the queue's primary has a replica");

    let mut ids = sleeps(&env, &q, 400).await;
    let mut workers = [
        WorkerProcess::spawn(&env, &q, 8),
        WorkerProcess::spawn(&env, &q, 8),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while succeeded(&env, &q).await < 60 {
        assert!(Instant::now() < deadline, "the workers made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Mid-run, the replica takes over the queue's slots.
    cluster.failover(replica);
    let (now_primary, _) = cluster.owners(&format!("{{q:{q}}}"));
    assert_eq!(now_primary, replica, "the replica owns the queue now");
    assert_ne!(now_primary, primary);
    let before = succeeded(&env, &q).await;
    assert!(
        before < 400,
        "the run was over before the failover ({before} done)"
    );

    // Jobs enqueued after the failover run too: the producers' and the
    // workers' connections found the new primary by themselves.
    ids.extend(sleeps(&env, &q, 40).await);
    let done = env.wait_terminal(&ids, Duration::from_secs(120)).await;
    assert_status(&done, Status::Succeeded);
    assert_each_finished_once(&env, &ids).await;
    for worker in &mut workers {
        assert!(
            worker.child.try_wait().expect("try_wait").is_none(),
            "a worker exited during the failover"
        );
    }
}
