//! The Lua scripts and the reconciler on a real Valkey.

use std::time::Duration;

use orchestrator::job::{JobId, QueueName};
use orchestrator::queue::{Claimed, IndexEntry, ValkeyQueue};
use serde_json::json;

use crate::support::{env_var, request, unique_queue, TestEnv, ValkeyServer};

async fn queue() -> (ValkeyQueue, QueueName) {
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let q = ValkeyQueue::connect(&env_var("ORCH_VALKEY_URL"), &prefix, false)
        .await
        .expect("connect");
    (q, unique_queue().parse().expect("name"))
}

fn entry(id: JobId, priority: u8) -> IndexEntry {
    IndexEntry {
        id,
        priority,
        due_ms: None,
    }
}

fn ids(c: Claimed) -> Vec<JobId> {
    match c {
        Claimed::Ids(ids) => ids.into_iter().map(|(id, _)| id).collect(),
        Claimed::Paused => panic!("queue unexpectedly paused"),
        Claimed::RateLimited => panic!("queue unexpectedly rate limited"),
    }
}

#[tokio::test]
async fn claim_pops_highest_priority_first_and_fifo_within_a_priority() {
    let (vq, q) = queue().await;
    let jobs: Vec<(JobId, u8)> = [5, 1, 10, 5, 10, 1, 7, 5]
        .into_iter()
        .map(|p| (JobId::new(), p))
        .collect();
    let entries: Vec<IndexEntry> = jobs.iter().map(|(id, p)| entry(*id, *p)).collect();
    assert_eq!(vq.enqueue(&q, &entries).await.expect("enqueue"), 8);
    // Enqueuing the same ids again indexes nothing twice.
    assert_eq!(vq.enqueue(&q, &entries).await.expect("enqueue"), 0);

    let mut expected = jobs.clone();
    // Stable sort: FIFO within equal priorities.
    expected.sort_by_key(|(_, p)| std::cmp::Reverse(*p));
    let mut got = ids(vq
        .claim(&q, 3, Duration::from_secs(30), Default::default())
        .await
        .expect("claim"));
    got.extend(ids(vq
        .claim(&q, 10, Duration::from_secs(30), Default::default())
        .await
        .expect("claim")));
    assert_eq!(got, expected.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    assert!(ids(vq
        .claim(&q, 10, Duration::from_secs(30), Default::default())
        .await
        .expect("claim"))
    .is_empty());
    let depth = vq.depth(&q).await.expect("depth");
    assert_eq!((depth.pending(), depth.active), (0, 8));
}

#[tokio::test]
async fn delayed_ids_are_not_claimed_before_they_are_due() {
    let (vq, q) = queue().await;
    let soon = JobId::new();
    let due_ms = chrono::Utc::now().timestamp_millis() + 1_500;
    vq.enqueue(
        &q,
        &[IndexEntry {
            id: soon,
            priority: 5,
            due_ms: Some(due_ms),
        }],
    )
    .await
    .expect("enqueue");
    assert!(ids(vq
        .claim(&q, 10, Duration::from_secs(30), Default::default())
        .await
        .expect("claim"))
    .is_empty());
    assert_eq!(vq.depth(&q).await.expect("depth").delayed, 1);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert_eq!(
        ids(vq
            .claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim")),
        vec![soon]
    );
}

#[tokio::test]
async fn paused_queue_hands_out_nothing_and_loses_nothing() {
    let (vq, q) = queue().await;
    let id = JobId::new();
    vq.enqueue(&q, &[entry(id, 5)]).await.expect("enqueue");
    assert!(vq.set_paused(&q, true).await.expect("pause"));
    assert!(!vq.set_paused(&q, true).await.expect("pause again"));
    assert_eq!(
        vq.claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim"),
        Claimed::Paused
    );
    let depth = vq.depth(&q).await.expect("depth");
    assert!(depth.paused);
    assert_eq!(depth.pending(), 1);
    assert!(vq.set_paused(&q, false).await.expect("resume"));
    assert_eq!(
        ids(vq
            .claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim")),
        vec![id]
    );
}

#[tokio::test]
async fn expired_leases_are_reaped_once_and_heartbeats_keep_them() {
    let (vq, q) = queue().await;
    let (a, b) = (JobId::new(), JobId::new());
    vq.enqueue(&q, &[entry(a, 5), entry(b, 5)])
        .await
        .expect("enqueue");
    ids(vq
        .claim(&q, 2, Duration::from_millis(300), Default::default())
        .await
        .expect("claim"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    vq.heartbeat(&q, &[b], Duration::from_secs(30))
        .await
        .expect("heartbeat");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let reaped = vq
        .reap(&q, 10, Duration::from_secs(30))
        .await
        .expect("reap");
    assert_eq!(reaped, vec![a]);
    // Held: a second reaper does not get it again.
    assert!(vq
        .reap(&q, 10, Duration::from_secs(30))
        .await
        .expect("reap")
        .is_empty());
    vq.ack(&q, &[a, b]).await.expect("ack");
    assert_eq!(vq.depth(&q).await.expect("depth").active, 0);
}

#[tokio::test]
async fn claims_report_priorities_and_schedule_requeues_by_them() {
    let (vq, q) = queue().await;
    let (low, high) = (JobId::new(), JobId::new());
    vq.enqueue(&q, &[entry(low, 2), entry(high, 9)])
        .await
        .expect("enqueue");
    let claimed = match vq
        .claim(&q, 2, Duration::from_secs(30), Default::default())
        .await
        .expect("claim")
    {
        Claimed::Ids(ids) => ids,
        Claimed::Paused | Claimed::RateLimited => panic!("paused"),
    };
    assert_eq!(claimed, vec![(high, 9), (low, 2)]);
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    let back: Vec<IndexEntry> = claimed
        .iter()
        .map(|(id, p)| IndexEntry {
            id: *id,
            priority: *p,
            due_ms: None,
        })
        .collect();
    vq.schedule(&q, &back).await.expect("schedule");
    let depth = vq.depth(&q).await.expect("depth");
    assert_eq!(
        (
            depth.pending_by_priority[1],
            depth.pending_by_priority[8],
            depth.active
        ),
        (1, 1, 0),
        "{depth:?}"
    );
    assert_eq!(
        ids(vq
            .claim(&q, 2, Duration::from_secs(30), Default::default())
            .await
            .expect("claim")),
        vec![high, low]
    );
    // Delayed retries keep their priority until promoted.
    vq.schedule(
        &q,
        &[IndexEntry {
            id: low,
            priority: 2,
            due_ms: Some(later),
        }],
    )
    .await
    .expect("schedule");
    let depth = vq.depth(&q).await.expect("depth");
    assert_eq!((depth.delayed, depth.active), (1, 1));
    vq.forget(&q, &[low, high]).await.expect("forget");
    let depth = vq.depth(&q).await.expect("depth");
    assert_eq!((depth.pending(), depth.delayed, depth.active), (0, 0, 0));
}

#[tokio::test]
async fn reconciler_rebuilds_a_flushed_index_from_postgres() {
    let valkey = ValkeyServer::start();
    let env = TestEnv::with_valkey(&valkey.url()).await;
    let q = unique_queue();
    let now_jobs = env
        .enqueue((0..30).map(|_| request("noop", &q, json!({}))).collect())
        .await;
    let mut later = request("noop", &q, json!({}));
    later.delay_secs = Some(600);
    env.enqueue(vec![later]).await;
    let queue: QueueName = q.parse().expect("name");
    assert_eq!(
        env.app
            .queue()
            .depth(&queue)
            .await
            .expect("depth")
            .pending(),
        30
    );

    valkey.flushall().await;
    assert_eq!(
        env.app
            .queue()
            .depth(&queue)
            .await
            .expect("depth")
            .pending(),
        0
    );
    let m = env.maintenance(&q);
    let counts = m.reconcile_once(false).await.expect("reconcile");
    assert!(counts.rebuilt, "a lost sentinel triggers a rebuild");
    assert_eq!(counts.reindexed, 31);
    let depth = env.app.queue().depth(&queue).await.expect("depth");
    assert_eq!((depth.pending(), depth.delayed), (30, 1));
    // Nothing is indexed twice by another pass.
    assert_eq!(
        m.reconcile_once(true).await.expect("reconcile").reindexed,
        0
    );
    assert_eq!(now_jobs.len(), 30);
}

#[tokio::test]
async fn a_queue_limit_caps_leases_across_workers() {
    let (vq, q) = queue().await;
    let entries: Vec<IndexEntry> = (0..10).map(|_| entry(JobId::new(), 5)).collect();
    vq.enqueue(&q, &entries).await.expect("enqueue");
    vq.set_limit(&q, Some(3)).await.expect("limit");
    let first = ids(vq
        .claim(&q, 10, Duration::from_secs(30), Default::default())
        .await
        .expect("claim"));
    assert_eq!(first.len(), 3, "at most 3 under a lease");
    assert!(
        ids(vq
            .claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim"))
        .is_empty(),
        "full"
    );
    vq.ack(&q, &first[..2]).await.expect("ack");
    assert_eq!(
        ids(vq
            .claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim"))
        .len(),
        2
    );
    vq.set_limit(&q, None).await.expect("lift");
    assert_eq!(
        ids(vq
            .claim(&q, 10, Duration::from_secs(30), Default::default())
            .await
            .expect("claim"))
        .len(),
        5
    );
}

#[tokio::test]
async fn rate_limits_hold_starts_per_queue_and_per_key_and_fail_nothing() {
    use orchestrator::queue::{RateLimit, Rates};
    let env = TestEnv::new().await;
    let vq = env.app.queue();
    let q: QueueName = unique_queue().parse().expect("queue");
    let minute = Duration::from_secs(60);
    let entries: Vec<IndexEntry> = (0..10).map(|_| entry(JobId::new(), 5)).collect();
    vq.enqueue(&q, &entries).await.expect("enqueue");
    let three = Rates {
        queue: Some(RateLimit {
            starts: 3,
            per: minute,
        }),
        per_key: None,
    };
    let first = ids(vq.claim(&q, 10, minute, three).await.expect("claim"));
    assert_eq!(first.len(), 3, "three starts a minute");
    let again = vq.claim(&q, 10, minute, three).await.expect("claim");
    assert_eq!(again, Claimed::RateLimited, "the rest wait");
    let depth = vq.depth(&q).await.expect("depth");
    assert_eq!(depth.pending(), 7, "nothing was dropped or failed");
    assert_eq!(depth.rate_limited, 7, "and all seven wait for the limit");
    // The gauge says so, by queue: held back by a limit, not claimable.
    let handle = orchestrator::metrics::install().expect("metrics");
    env.maintenance(q.as_str())
        .sample_once()
        .await
        .expect("sample");
    let text = handle.render();
    let gauge = |state: &str| {
        crate::support::metric_sample(
            &text,
            "orchestrator_queue_depth",
            &[("queue", q.as_str()), ("state", state)],
        )
    };
    assert_eq!(gauge("rate_limited"), Some(7.0), "{text}");
    assert_eq!(gauge("pending"), Some(0.0), "{text}");
    // Without the limit they flow.
    let rest = ids(vq
        .claim(&q, 10, minute, Rates::default())
        .await
        .expect("claim"));
    assert_eq!(rest.len(), 7);
    assert_eq!(
        vq.depth(&q).await.expect("depth").rate_limited,
        0,
        "nothing waits once they started"
    );

    // Per key: one start a minute for each key; a key's second job is held
    // while another key's job starts.
    let q2: QueueName = unique_queue().parse().expect("queue");
    let (k1, k2, l1) = (JobId::new(), JobId::new(), JobId::new());
    vq.set_concurrency(
        &q2,
        &[(k1, 10, "repo-k"), (k2, 10, "repo-k"), (l1, 10, "repo-l")],
    )
    .await
    .expect("keys");
    vq.enqueue(&q2, &[entry(k1, 5), entry(k2, 5), entry(l1, 5)])
        .await
        .expect("enqueue");
    let per_key = Rates {
        queue: None,
        per_key: Some(RateLimit {
            starts: 1,
            per: minute,
        }),
    };
    let got = ids(vq.claim(&q2, 10, minute, per_key).await.expect("claim"));
    assert_eq!(
        got,
        vec![k1, l1],
        "k2 waits for its key's bucket, l1 does not"
    );
    assert_eq!(vq.depth(&q2).await.expect("depth").held, 1);
    let none = ids(vq.claim(&q2, 10, minute, per_key).await.expect("claim"));
    assert!(none.is_empty(), "still no token for repo-k");
    // A fast bucket refills: the held job comes back and starts.
    let fast = Rates {
        queue: None,
        per_key: Some(RateLimit {
            starts: 1,
            per: Duration::from_millis(50),
        }),
    };
    // The bucket's clock is Valkey's: claim until it has refilled.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let later = loop {
        let got = ids(vq.claim(&q2, 10, minute, fast).await.expect("claim"));
        if !got.is_empty() {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bucket never refilled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(later, vec![k2]);
    assert_eq!(vq.depth(&q2).await.expect("depth").held, 0);
}
