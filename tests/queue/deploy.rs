//! The queries KEDA scales the workers by (deploy/k8s), run against the real
//! schema: they count exactly the jobs that need a worker now, running ones
//! included, so scaling never removes a worker from under a running agent.

use std::time::Duration;

use orchestrator::job::{JobRequest, Status};
use serde_json::json;

use crate::support::{request, unique_queue, TestEnv};

/// The postgresql trigger's query of a KEDA manifest: the folded (`>-`)
/// block after `query:`, joined as YAML joins it.
fn keda_query(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).expect("read the manifest");
    let mut lines = text.lines().skip_while(|l| l.trim() != "query: >-");
    let head = lines.next().expect("a `query: >-` block");
    let indent = head.len() - head.trim_start().len();
    let query: Vec<&str> = lines
        .take_while(|l| l.len() - l.trim_start().len() > indent)
        .map(str::trim)
        .collect();
    assert!(!query.is_empty(), "{file}: empty query");
    query.join(" ")
}

async fn count(env: &TestEnv, query: &str) -> i64 {
    sqlx::query_scalar(query)
        .fetch_one(env.app.store().pool())
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

#[tokio::test]
async fn keda_counts_running_and_due_jobs_of_the_workers_queues_only() {
    let env = TestEnv::new().await;
    // The manifests scale for the queue the ConfigMap's workers claim.
    let queue = "default";
    let queries = [
        keda_query("deploy/k8s/worker-scaledobject.yaml"),
        keda_query("deploy/k8s/scaledjob/worker-scaledjob.yaml"),
    ];
    assert_eq!(queries[0], queries[1], "the two variants count alike");
    let query = &queries[0];
    assert_eq!(count(&env, query).await, 0);

    // Finished: not counted.
    let mut pool = env.start_pool(env.pool_config(queue, 1));
    let done = env.enqueue(vec![request("noop", queue, json!({}))]).await;
    env.wait_terminal(&[done[0].id], Duration::from_secs(30))
        .await;
    // Running, in the pool's only slot: counted.
    let running = env
        .enqueue(vec![request("sleep", queue, json!({ "ms": 60_000 }))])
        .await;
    // The noop's start is the first the pool reports, the sleep's the second.
    let started = pool.wait_started(2, Duration::from_secs(30)).await;
    assert!(started.contains(&running[0].id), "{started:?}");
    assert_eq!(env.job(running[0].id).await.status, Status::Running);
    // Due, waiting for a slot: counted. Delayed an hour, or in another
    // queue: not.
    let due = env.enqueue(vec![request("noop", queue, json!({}))]).await;
    env.enqueue(vec![
        JobRequest {
            delay_secs: Some(3_600),
            ..request("noop", queue, json!({}))
        },
        request("noop", &unique_queue(), json!({})),
    ])
    .await;
    assert_eq!(env.job(due[0].id).await.status, Status::Queued);
    assert_eq!(count(&env, query).await, 2, "running + due");

    // The partial index of unfinished jobs serves it, so the count costs
    // the backlog, not the history (with sequential scans off, as a large
    // table would make them).
    let mut tx = env.app.store().pool().begin().await.expect("begin");
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {query}"))
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    assert!(
        plan.iter().any(|l| l.contains("jobs_unfinished_idx")),
        "{plan:#?}"
    );
    drop(tx);
    pool.shutdown().await;
}
