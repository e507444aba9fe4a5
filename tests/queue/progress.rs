//! Progress writes race the job's end: optimistic (`version`), fenced by
//! the lease, never after a terminal state, never over newer progress.

use std::time::Duration;

use orchestrator::job::{Progress, Status};
use orchestrator::store::{Finish, ProgressWrite};

use crate::support::{request, unique_queue, TestEnv};

async fn race(end: impl FnOnce(orchestrator::job::JobId, i64) -> Finish) {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let job = env
        .enqueue(vec![request("noop", &q, serde_json::json!({}))])
        .await
        .remove(0);
    let (started, _) = env
        .app
        .store()
        .claim(&[job.id], "racer", Duration::from_secs(30))
        .await
        .expect("claim");
    let lease_id = started[0].lease_id;
    let version_at_start = env.job(job.id).await.version;

    // Four writers, each with its own clock offset, 40 writes each; the
    // job ends while they write.
    let t0 = chrono::Utc::now();
    // The end waits for the first written progress, not for a sleep: on a
    // loaded machine the writers may not have reached Postgres in any
    // fixed time.
    let first_write = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4i64 {
        let store = env.app.store().clone();
        let first_write = first_write.clone();
        writers.spawn(async move {
            let mut written = 0;
            for i in 0..40i64 {
                let progress = Progress {
                    percent: u8::try_from(i).expect("small"),
                    message: format!("writer {w} step {i}"),
                    at: t0 + chrono::Duration::milliseconds(i * 10 + w),
                };
                match store
                    .set_progress(job.id, lease_id, &progress, "racer")
                    .await
                    .expect("progress write")
                {
                    ProgressWrite::Written { .. } => {
                        written += 1;
                        first_write.notify_one();
                    }
                    ProgressWrite::NotRunning => break,
                    ProgressWrite::Older | ProgressWrite::Contended => {}
                }
            }
            written
        });
    }
    first_write.notified().await;
    let to = env
        .app
        .store()
        .finish_one(end(job.id, lease_id), "racer")
        .await
        .expect("finish");
    let mut written = 0;
    while let Some(n) = writers.join_next().await {
        written += n.expect("writer");
    }
    assert!(written > 0, "some progress was written before the end");

    let done = env.job(job.id).await;
    assert_eq!(done.status, to);
    assert!(
        done.version > version_at_start,
        "every write bumps the version"
    );
    let events = env
        .app
        .store()
        .job_events(job.id, None)
        .await
        .expect("events");
    let terminal = events
        .iter()
        .position(|e| e.kind == to.as_str() || e.kind == "succeeded" || e.kind == "cancelled")
        .expect("a terminal event");
    let progress: Vec<(usize, Progress)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "progress")
        .map(|(i, e)| (i, serde_json::from_value(e.data.clone()).expect("progress")))
        .collect();
    assert_eq!(progress.len(), written, "one event per write");
    assert!(
        progress.iter().all(|(i, _)| *i < terminal),
        "no progress after the job ended"
    );
    assert!(
        progress.windows(2).all(|w| w[0].1.at <= w[1].1.at),
        "a write never replaced newer progress"
    );
    assert_eq!(
        done.progress.as_ref(),
        progress.last().map(|(_, p)| p),
        "the job holds the last progress written"
    );
    // After the end, a write changes nothing.
    let late = Progress {
        percent: 100,
        message: "too late".into(),
        at: chrono::Utc::now(),
    };
    let after = env
        .app
        .store()
        .set_progress(job.id, lease_id, &late, "racer")
        .await
        .expect("late write");
    assert_eq!(after, ProgressWrite::NotRunning);
    assert_eq!(env.job(job.id).await.version, done.version);
}

#[tokio::test]
async fn progress_racing_a_completion_stops_at_the_end_and_keeps_the_newest() {
    race(|id, lease| Finish::succeeded(id, lease, serde_json::json!({}))).await;
}

#[tokio::test]
async fn progress_racing_a_cancel_stops_at_the_end_and_keeps_the_newest() {
    race(|id, lease| {
        let mut finish = Finish::dead(id, lease, "stopped".into());
        finish.to = Status::Cancelled;
        finish.event = "cancelled";
        finish
    })
    .await;
}
