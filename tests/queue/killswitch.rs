//! The kill switch's bookkeeping in Valkey and the outbox, on real servers.

use orchestrator::job::QueueName;
use orchestrator::store::{ControlEvent, ControlKind};

use crate::support::{unique_queue, TestEnv};

#[tokio::test]
async fn holds_follow_the_switch_whatever_was_missed() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let queue: QueueName = q.parse().expect("queue");
    let maintenance = env.maintenance(&q);
    let depth = || async { env.app.queue().depth(&queue).await.expect("depth").halted };

    // A hold left behind (a kill-all that raced a resume): cleared.
    env.app
        .queue()
        .set_halted(&queue, true)
        .await
        .expect("hold");
    assert_eq!(maintenance.sync_holds_once().await.expect("sync"), 1);
    assert!(!depth().await);

    // Engaged before this queue existed: it is held once its worker looks.
    let report = env.app.kill_all("operator", "drill").await.expect("kill");
    assert!(!report.queues_paused.contains(&q), "not known yet");
    assert!(!depth().await);
    // Its first worker registers it and its maintenance holds it.
    env.app
        .queue()
        .register_queues(&[&queue])
        .await
        .expect("register");
    assert_eq!(maintenance.sync_holds_once().await.expect("sync"), 1);
    assert!(depth().await);
    assert_eq!(maintenance.sync_holds_once().await.expect("sync"), 0);

    let resumed = env
        .app
        .resume("operator", "drill over")
        .await
        .expect("resume");
    assert!(resumed.queues_resumed.contains(&q));
    assert!(!depth().await);
    assert_eq!(maintenance.sync_holds_once().await.expect("sync"), 0);
}

#[tokio::test]
async fn the_outbox_writes_each_record_once_and_sets_aside_what_postgres_refuses() {
    let env = TestEnv::new().await;
    let event = |reason: &str| ControlEvent {
        id: uuid::Uuid::now_v7(),
        at: chrono::Utc::now(),
        kind: ControlKind::KillAll,
        actor: "operator".into(),
        reason: reason.into(),
        jobs: Vec::new(),
        data: serde_json::json!({}),
    };
    let good = event("kept while Postgres was down");
    let record = serde_json::to_string(&good).expect("json");
    // Postgres refuses NUL in text: this one can never be written.
    let refused = serde_json::to_string(&event("nul \u{0} byte")).expect("json");
    for r in [&refused, &record, &record] {
        env.app.queue().outbox_push(r).await.expect("push");
    }
    let moved = env
        .maintenance("default")
        .drain_outbox_once()
        .await
        .expect("drain");
    assert_eq!(moved, 2, "the good record, twice");
    let trail = env.app.store().control_events(10).await.expect("trail");
    assert_eq!(trail.len(), 1, "written once");
    assert_eq!(trail[0].id, good.id);
    assert_eq!(trail[0].reason, good.reason);
    assert!(env
        .app
        .queue()
        .outbox_peek(10)
        .await
        .expect("peek")
        .is_empty());
    let keys = env.app.queue().keys();
    let mut conn = env.app.queue().connection();
    let dead: Vec<String> = redis::AsyncCommands::lrange(&mut conn, keys.outbox_dead(), 0, -1)
        .await
        .expect("dead list");
    assert_eq!(dead, [refused], "set aside, not lost");
}

/// What a flush does to this test's prefix: the kill switch and the
/// rebuild sentinel are gone.
async fn lose_valkey_state(env: &TestEnv) {
    let keys = env.app.queue().keys();
    let mut conn = env.app.queue().connection();
    let _: () = redis::AsyncCommands::del(&mut conn, &[keys.kill_switch(), keys.epoch()])
        .await
        .expect("del");
}

/// Valkey loses its data (a flush, a restart without persistence): the
/// reconciler engages the switch again from Postgres' trail, as it was;
/// after a resume, it stays lifted.
#[tokio::test]
async fn the_kill_switch_survives_valkey_losing_its_data() {
    let env = TestEnv::new().await;
    let maintenance = env.maintenance(&unique_queue());

    let report = env
        .app
        .kill_all("operator", "incident 7")
        .await
        .expect("kill");
    assert_eq!(report.audit, "recorded");
    // Repeated: the engagement stays the first one, and so it comes back.
    let again = env
        .app
        .kill_all("someone-else", "still on")
        .await
        .expect("kill");
    assert_eq!(again.status.reason.as_deref(), Some("incident 7"));
    lose_valkey_state(&env).await;
    assert!(env.app.kill_switch().await.expect("read").is_none());
    let counts = maintenance.reconcile_once(false).await.expect("reconcile");
    assert!(counts.rebuilt);
    let state = env
        .app
        .kill_switch()
        .await
        .expect("read")
        .expect("engaged again");
    assert_eq!(
        (state.actor.as_str(), state.reason.as_str()),
        ("operator", "incident 7")
    );
    let since = report.status.since.expect("since");
    let since = chrono::DateTime::parse_from_rfc3339(&since).expect("rfc3339");
    assert_eq!(state.since.timestamp_millis(), since.timestamp_millis());

    env.app.resume("operator", "over").await.expect("resume");
    lose_valkey_state(&env).await;
    maintenance.reconcile_once(false).await.expect("reconcile");
    assert!(
        env.app.kill_switch().await.expect("read").is_none(),
        "stays lifted"
    );
}
