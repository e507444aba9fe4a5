//! The CLI does what the API does for the same verb: both call the same
//! `App` operation (here, an idempotency key reused for another job, and
//! pausing a queue nobody has used yet).

use crate::support::{cli, unique_queue, TestEnv};

#[tokio::test]
async fn the_cli_refuses_an_idempotency_key_reused_for_another_job() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let key = format!("key-{q}");
    let enqueue = |payload: &str| {
        cli(
            &env,
            &[
                "enqueue",
                "sleep",
                "--queue",
                &q,
                "--payload",
                payload,
                "--idempotency-key",
                &key,
            ],
        )
    };
    let first = enqueue(r#"{"ms": 1}"#);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let replay = enqueue(r#"{"ms": 1}"#);
    assert!(replay.status.success(), "the same job again is a replay");
    let other = enqueue(r#"{"ms": 2}"#);
    assert!(!other.status.success(), "another payload under the key");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("with a different kind, queue or payload"),
        "{stderr}"
    );
    let stored = env
        .app
        .jobs_by_idempotency_keys(std::slice::from_ref(&key))
        .await
        .expect("lookup");
    assert_eq!(stored.len(), 1, "one job under the key");
    assert_eq!(stored[0].payload, serde_json::json!({ "ms": 1 }));
}

#[tokio::test]
async fn pausing_a_new_queue_from_the_cli_registers_it_as_the_api_does() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let out = cli(&env, &["queues", "pause", &q]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queues = env.app.queues().await.expect("queues");
    let listed = queues.iter().find(|i| i.name == q);
    assert!(
        listed.is_some_and(|i| i.paused),
        "{q} is listed and paused: {queues:?}"
    );
}

#[tokio::test]
async fn the_database_refuses_a_name_the_application_would_refuse() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = env
        .enqueue(vec![crate::support::request(
            "noop",
            &q,
            serde_json::json!({}),
        )])
        .await
        .remove(0);
    for (column, bad) in [
        ("queue", "bad name"),
        ("queue", ""),
        ("kind", "-x"),
        ("kind", "k\u{e9}"),
    ] {
        let refused = sqlx::query(&format!("UPDATE jobs SET {column} = $1 WHERE id = $2"))
            .bind(bad)
            .bind(job.id.0)
            .execute(env.app.store().pool())
            .await;
        assert!(refused.is_err(), "{column} = {bad:?} was stored");
    }
    assert_eq!(env.job(job.id).await.queue, q, "nothing changed");
}
