//! Flow control and time: schedules across replicas, unique jobs under a
//! race, and retention's pruning.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use orchestrator::job::{
    CatchUp, JobId, JobRequest, Overlap, ScheduleRequest, Status, UniqueRequest,
};
use serde_json::json;

use crate::support::processes::WorkerProcess;
use crate::support::servers::ValkeyServer;
use crate::support::{metric_sample, request, unique_queue, TestEnv};

/// The ticks (`scheduled_for`) of every job the schedule enqueued, and
/// how many jobs there are (more than ticks would be a duplicate).
async fn ticks_of(env: &TestEnv, schedule: uuid::Uuid) -> (Vec<DateTime<Utc>>, i64) {
    let ticks: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT scheduled_for FROM jobs WHERE schedule_id = $1 ORDER BY scheduled_for",
    )
    .bind(schedule)
    .fetch_all(env.app.store().pool())
    .await
    .expect("ticks");
    let n = ticks.len() as i64;
    (ticks, n)
}

async fn wait_ticks(env: &TestEnv, schedule: uuid::Uuid, at_least: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (ticks, _) = ticks_of(env, schedule).await;
        if ticks.len() >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} ticks enqueued after {limit:?}, waiting for {at_least}",
            ticks.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pauses the schedule, waits for a pass that read it before the pause
/// (its row lock), and returns its ticks, each with exactly one job.
async fn paused_ticks(
    env: &TestEnv,
    schedule: orchestrator::job::ScheduleId,
) -> (Vec<DateTime<Utc>>, i64) {
    let paused = env
        .app
        .update_schedule(
            schedule,
            ScheduleRequest {
                paused: Some(true),
                ..ScheduleRequest::default()
            },
            "test",
        )
        .await
        .expect("pause");
    assert!(paused.paused);
    sqlx::query("SELECT 1 FROM schedules WHERE id = $1 FOR UPDATE")
        .bind(schedule.0)
        .execute(env.app.store().pool())
        .await
        .expect("lock");
    let (ticks, jobs) = ticks_of(env, schedule.0).await;
    let distinct: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(
        distinct.len() as i64,
        jobs,
        "a tick has two jobs: {ticks:?}"
    );
    (ticks, jobs)
}

/// A schedule of no-op jobs into `q` every second that lets ticks overlap
/// and catches every missed one up: any tick without its job is a loss.
async fn every_second(env: &TestEnv, q: &str, name: &str) -> orchestrator::job::Schedule {
    env.app
        .create_schedule(
            ScheduleRequest {
                name: Some(name.into()),
                cron: Some("* * * * * *".into()),
                job: Some(request("noop", q, json!({}))),
                overlap: Some(Overlap::Allow),
                catch_up: Some(CatchUp::All),
                ..ScheduleRequest::default()
            },
            "test",
        )
        .await
        .expect("schedule")
}

#[tokio::test]
async fn every_tick_yields_exactly_one_job_across_replicas_crashes_and_a_flush() {
    let valkey = ValkeyServer::start();
    let env = TestEnv::with_valkey(&valkey.url()).await;
    let q = unique_queue();
    let schedule = every_second(&env, &q, "every-second").await;
    let id = schedule.id.0;
    let vars = [("ORCH_MAINTENANCE__SCHEDULE_INTERVAL_MS", "100")];
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn_with(&env, &q, 4, &vars))
        .collect();
    wait_ticks(&env, id, 3, Duration::from_secs(30)).await;

    // A replica dies (perhaps inside its scheduler's transaction), another
    // takes its place.
    workers[0].kill9();
    workers[0] = WorkerProcess::spawn_with(&env, &q, 4, &vars);
    let (before, _) = ticks_of(&env, id).await;
    wait_ticks(&env, id, before.len() + 3, Duration::from_secs(30)).await;

    // Valkey loses everything; the schedule lives in Postgres.
    valkey.flushall().await;
    let (before, _) = ticks_of(&env, id).await;
    wait_ticks(&env, id, before.len() + 3, Duration::from_secs(30)).await;

    // Two replicas die at once; the third carries on.
    workers[1].kill9();
    workers[2].kill9();
    let (before, _) = ticks_of(&env, id).await;
    wait_ticks(&env, id, before.len() + 2, Duration::from_secs(30)).await;

    let (ticks, jobs) = paused_ticks(&env, schedule.id).await;
    // catch_up all: no second between the first and the last tick lacks
    // its job, whoever was down.
    let first = *ticks.first().expect("ticks");
    let last = *ticks.last().expect("ticks");
    let span = (last - first).num_seconds() + 1;
    assert_eq!(span, jobs, "gaps between {first} and {last}: {ticks:?}");
    for t in &ticks {
        assert_eq!(t.timestamp_subsec_nanos(), 0, "ticks are whole seconds");
    }
    // Every job names its schedule and tick, and runs.
    let ids: Vec<JobId> = sqlx::query_scalar("SELECT id FROM jobs WHERE schedule_id = $1")
        .bind(id)
        .fetch_all(env.app.store().pool())
        .await
        .expect("ids")
        .into_iter()
        .map(JobId)
        .collect();
    let job = env.job(ids[0]).await;
    assert_eq!(job.schedule_id, Some(schedule.id));
    assert!(job.scheduled_for.is_some());
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    crate::support::assert_status(&done, Status::Succeeded);
    let events: Vec<String> =
        sqlx::query_scalar("SELECT actor FROM job_events WHERE job_id = $1 AND type = 'enqueued'")
            .bind(ids[0].0)
            .fetch_all(env.app.store().pool())
            .await
            .expect("events");
    assert_eq!(events, vec!["schedule:every-second".to_owned()]);
}

/// The worker whose Postgres session waits on a lock inside an `INSERT
/// INTO jobs` (sessions name their process: `orchestrator pid <pid>`).
async fn blocked_inserter(env: &TestEnv, pids: &[u32], limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query ILIKE '%INSERT INTO jobs%'",
        )
        .fetch_all(env.app.store().pool())
        .await
        .expect("pg_stat_activity");
        if let Some(pid) = names
            .iter()
            .filter_map(|n| n.strip_prefix("orchestrator pid ")?.parse::<u32>().ok())
            .find(|pid| pids.contains(pid))
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no replica blocked inside its scheduler transaction after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replica_killed_inside_its_scheduler_transaction_leaves_its_tick_to_another() {
    let valkey = ValkeyServer::start();
    let env = TestEnv::with_valkey(&valkey.url()).await;
    let q = unique_queue();
    let schedule = every_second(&env, &q, "killed-mid-tick").await;
    let id = schedule.id.0;
    let first = schedule.next_tick.expect("next tick");
    let held = first + chrono::Duration::seconds(3);

    // Hold the unique key of a future tick with an uncommitted job of our
    // own: whichever replica enqueues that tick waits on it inside its
    // scheduler transaction, after taking the schedule's row lock, until
    // this transaction ends. That is the moment to kill it.
    let template = env
        .enqueue(vec![request("noop", &unique_queue(), json!({}))])
        .await;
    let mut blocker = env.app.store().pool().begin().await.expect("begin");
    sqlx::query("CREATE TEMP TABLE blocker ON COMMIT DROP AS SELECT * FROM jobs WHERE id = $1")
        .bind(template[0].id.0)
        .execute(&mut *blocker)
        .await
        .expect("copy");
    sqlx::query("UPDATE blocker SET id = gen_random_uuid(), schedule_id = $1, scheduled_for = $2")
        .bind(id)
        .bind(held)
        .execute(&mut *blocker)
        .await
        .expect("retarget");
    sqlx::query("INSERT INTO jobs SELECT * FROM blocker")
        .execute(&mut *blocker)
        .await
        .expect("hold the tick");

    let vars = [("ORCH_MAINTENANCE__SCHEDULE_INTERVAL_MS", "100")];
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn_with(&env, &q, 4, &vars))
        .collect();
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    let inside = blocked_inserter(&env, &pids, Duration::from_secs(30)).await;
    let victim = pids.iter().position(|p| *p == inside).expect("one of ours");
    workers[victim].kill9();
    // And Valkey loses everything while the tick hangs: the ticks live in
    // Postgres.
    valkey.flushall().await;
    // Our transaction ends; the dead replica's, woken, finds no client and
    // rolls back with its row lock. Another replica takes the tick.
    blocker.rollback().await.expect("rollback");
    workers[victim] = WorkerProcess::spawn_with(&env, &q, 4, &vars);
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        let (ticks, _) = ticks_of(&env, id).await;
        if ticks.iter().filter(|t| **t > held).count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ticks after the held one: {ticks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ticks, jobs) = paused_ticks(&env, schedule.id).await;
    assert_eq!(
        ticks.iter().filter(|t| **t == held).count(),
        1,
        "the tick whose replica died has exactly one job: {ticks:?}"
    );
    let last = *ticks.last().expect("ticks");
    assert_eq!(ticks.first(), Some(&first), "{ticks:?}");
    assert_eq!(
        (last - first).num_seconds() + 1,
        jobs,
        "gaps between {first} and {last}: {ticks:?}"
    );
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(format!("orchestrator pid {inside}"))
            .fetch_one(env.app.store().pool())
            .await
            .expect("sessions");
    assert_eq!(dead, 0, "the killed replica's session is gone");
}

#[tokio::test]
async fn overlap_skip_waits_for_the_last_job_and_catch_up_none_drops_missed_ticks() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    // Nobody serves this queue: the first job stays queued, so with
    // overlap skip no other tick enqueues.
    let schedule = env
        .app
        .create_schedule(
            ScheduleRequest {
                name: Some("skip".into()),
                cron: Some("* * * * * *".into()),
                job: Some(request("noop", &q, json!({}))),
                ..ScheduleRequest::default()
            },
            "test",
        )
        .await
        .expect("schedule");
    assert_eq!(schedule.overlap, Overlap::Skip);
    assert_eq!(schedule.catch_up, CatchUp::None);
    let maintenance = env.maintenance(&q);
    let cfg = scheduler_config(&env);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks_of(&env, schedule.id.0).await.1 == 0 {
        maintenance.schedule_once(&cfg).await.expect("pass");
        assert!(Instant::now() < deadline, "no tick enqueued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several seconds' ticks pass while the job is unfinished.
    let first_next = env.app.schedule(schedule.id).await.expect("s").next_tick;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        maintenance.schedule_once(&cfg).await.expect("pass");
        let s = env.app.schedule(schedule.id).await.expect("s");
        if s.next_tick
            .zip(first_next)
            .is_some_and(|(a, b)| (a - b).num_seconds() >= 2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the schedule did not move on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ticks_of(&env, schedule.id.0).await.1,
        1,
        "skipped while unfinished"
    );

    // Downtime: the next tick lies an hour back. catch_up none runs none of
    // the missed ticks, only what is within the grace.
    sqlx::query("UPDATE schedules SET next_tick = now() - interval '1 hour' WHERE id = $1")
        .bind(schedule.id.0)
        .execute(env.app.store().pool())
        .await
        .expect("rewind");
    sqlx::query("UPDATE schedules SET overlap = 'allow' WHERE id = $1")
        .bind(schedule.id.0)
        .execute(env.app.store().pool())
        .await
        .expect("allow");
    maintenance.schedule_once(&cfg).await.expect("pass");
    let (ticks, n) = ticks_of(&env, schedule.id.0).await;
    let grace = env.app.settings().maintenance.schedule_grace_secs as i64;
    assert!(
        n >= 2 && n <= 2 + grace + 1,
        "{n} jobs: the missed hour was caught up ({ticks:?})"
    );
    assert_eq!(
        last_pass_missed(&env, schedule.id.0).await,
        (n - 1, 0),
        "a tick older than the grace ran ({ticks:?})"
    );
}

/// Of the jobs the schedule's latest pass enqueued, how many there are and
/// how many were missed ticks: older than the grace when enqueued. A
/// pass's jobs share their `created_at` (its transaction's `now()`, the
/// time the tick was judged by), so this reads no clock of the test's.
async fn last_pass_missed(env: &TestEnv, schedule: uuid::Uuid) -> (i64, i64) {
    let grace = env.app.settings().maintenance.schedule_grace_secs as f64;
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at - scheduled_for > make_interval(secs => $2))
         FROM jobs
         WHERE schedule_id = $1
           AND created_at = (SELECT max(created_at) FROM jobs WHERE schedule_id = $1)",
    )
    .bind(schedule)
    .bind(grace)
    .fetch_one(env.app.store().pool())
    .await
    .expect("last pass")
}

/// After an hour's downtime (`next_tick` an hour back), `catch_up: latest`
/// runs the newest missed tick and `all` the newest `catch_up_limit`,
/// beside the ticks within the grace.
#[tokio::test]
async fn catch_up_latest_runs_the_newest_missed_tick_and_all_up_to_its_bound() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let maintenance = env.maintenance(&q);
    let cfg = scheduler_config(&env);
    let metrics = orchestrator::metrics::install().expect("metrics");
    let ticks_before = counter(&metrics.render(), TICKS, &[("outcome", "enqueued")]);
    for (name, catch_up, limit, missed) in [
        ("latest", CatchUp::Latest, None, 1),
        ("all", CatchUp::All, Some(7), 7),
    ] {
        let schedule = env
            .app
            .create_schedule(
                ScheduleRequest {
                    name: Some(name.into()),
                    cron: Some("* * * * * *".into()),
                    job: Some(request("noop", &q, json!({}))),
                    overlap: Some(Overlap::Allow),
                    catch_up: Some(catch_up),
                    catch_up_limit: limit,
                    ..ScheduleRequest::default()
                },
                "test",
            )
            .await
            .expect("schedule");
        sqlx::query("UPDATE schedules SET next_tick = now() - interval '1 hour' WHERE id = $1")
            .bind(schedule.id.0)
            .execute(env.app.store().pool())
            .await
            .expect("rewind");
        maintenance.schedule_once(&cfg).await.expect("pass");
        let (jobs, late) = last_pass_missed(&env, schedule.id.0).await;
        assert_eq!(late, missed, "{name}: missed ticks run");
        assert_eq!(
            ticks_of(&env, schedule.id.0).await.1,
            jobs,
            "{name}: one pass"
        );
        let grace = env.app.settings().maintenance.schedule_grace_secs as i64;
        assert!(
            jobs - late >= grace && jobs - late <= grace + 1,
            "{name}: {} ticks within a grace of {grace} s",
            jobs - late
        );
        // The missed ones are the newest: one second apart, ending just
        // before the grace.
        let ticks: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT scheduled_for FROM jobs WHERE schedule_id = $1 ORDER BY scheduled_for",
        )
        .bind(schedule.id.0)
        .fetch_all(env.app.store().pool())
        .await
        .expect("ticks");
        for pair in ticks.windows(2) {
            assert_eq!(
                (pair[1] - pair[0]).num_seconds(),
                1,
                "{name}: a gap in {ticks:?}"
            );
        }
    }
    let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1")
        .bind(&q)
        .fetch_one(env.app.store().pool())
        .await
        .expect("jobs");
    let text = metrics.render();
    let grew = counter(&text, TICKS, &[("outcome", "enqueued")]) - ticks_before;
    assert!(grew >= enqueued as f64, "{enqueued} jobs: {text}");
}

const TICKS: &str = "orchestrator_schedule_ticks_total";

/// A counter's value (0 before its first increment). The recorder is the
/// process's: nextest runs each test in a process of its own, but under
/// `cargo test` other tests of this binary add to it at the same time, so
/// tests check that it grew by at least what they did.
fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sample(text, name, labels).unwrap_or(0.0)
}

/// A schedule whose tick fails for good stops (`next_tick` null,
/// `last_error` says why) and holds back no other; an edit that leaves it
/// unpaused starts it again, even one that changes neither `cron` nor
/// `timezone`.
#[tokio::test]
async fn a_stopped_schedule_holds_back_no_other_and_an_edit_starts_it_again() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let maintenance = env.maintenance(&q);
    let cfg = scheduler_config(&env);
    let metrics = orchestrator::metrics::install().expect("metrics");
    let invalid_before = counter(&metrics.render(), TICKS, &[("outcome", "invalid")]);
    let broken = every_second(&env, &q, "broken").await;
    let healthy = every_second(&env, &q, "healthy").await;
    // What only a change of the cron crate could do to a stored row.
    sqlx::query(
        "UPDATE schedules SET cron = 'no longer a cron', next_tick = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(broken.id.0)
    .execute(env.app.store().pool())
    .await
    .expect("break");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        maintenance.schedule_once(&cfg).await.expect("pass");
        let stopped = env.app.schedule(broken.id).await.expect("s");
        if stopped.next_tick.is_none() && ticks_of(&env, healthy.id.0).await.1 > 0 {
            let error = stopped.last_error.expect("why it stopped");
            assert!(error.starts_with("stopped: "), "{error}");
            assert!(error.contains("schedule"), "{error}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken schedule did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ticks_of(&env, broken.id.0).await.1, 0);
    let text = metrics.render();
    let grew = counter(&text, TICKS, &[("outcome", "invalid")]) - invalid_before;
    assert!(grew >= 1.0, "{text}");

    // Repaired underneath (as an upgrade would), then resumed by a PATCH
    // that repeats what it already is.
    sqlx::query("UPDATE schedules SET cron = '* * * * * *' WHERE id = $1")
        .bind(broken.id.0)
        .execute(env.app.store().pool())
        .await
        .expect("repair");
    let resumed = env
        .app
        .update_schedule(
            broken.id,
            ScheduleRequest {
                paused: Some(false),
                cron: Some("* * * * * *".into()),
                ..ScheduleRequest::default()
            },
            "test",
        )
        .await
        .expect("resume");
    assert!(resumed.next_tick.is_some(), "still stopped: {resumed:?}");
    assert_eq!(resumed.last_error, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks_of(&env, broken.id.0).await.1 == 0 {
        maintenance.schedule_once(&cfg).await.expect("pass");
        assert!(
            Instant::now() < deadline,
            "the resumed schedule enqueued nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `worker --maintenance-only` (beside `--one-job` pods): its scheduler
/// fires ticks, and it claims none of the jobs they make, nor any other.
#[tokio::test]
async fn a_maintenance_only_worker_fires_schedules_and_claims_nothing() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let waiting = env.enqueue(vec![request("noop", &q, json!({}))]).await;
    let schedule = env
        .app
        .create_schedule(
            ScheduleRequest {
                name: Some("maintenance-only".into()),
                cron: Some("* * * * * *".into()),
                job: Some(request("noop", &q, json!({}))),
                overlap: Some(Overlap::Allow),
                ..ScheduleRequest::default()
            },
            "test",
        )
        .await
        .expect("schedule");
    let mut worker = WorkerProcess::spawn_args(
        &env,
        &["worker", "--queues", &q, "--maintenance-only"],
        &[("ORCH_MAINTENANCE__SCHEDULE_INTERVAL_MS", "100")],
    );
    wait_ticks(&env, schedule.id.0, 3, Duration::from_secs(30)).await;
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "worker exited with {status}");

    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id \
         WHERE j.queue = $1 AND e.type = 'started'",
    )
    .bind(&q)
    .fetch_one(env.app.store().pool())
    .await
    .expect("started events");
    assert_eq!(started, 0, "a maintenance-only worker started jobs");
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT status FROM jobs WHERE queue = $1")
            .bind(&q)
            .fetch_all(env.app.store().pool())
            .await
            .expect("statuses");
    assert_eq!(statuses, vec!["queued".to_owned()]);
    assert_eq!(env.job(waiting[0].id).await.attempt, 0);

    // It takes no job-running options.
    for extra in ["--one-job", "--concurrency=2", "--idle-exit-secs=5"] {
        let out = crate::support::cli(
            &env,
            &["worker", "--queues", &q, "--maintenance-only", extra],
        );
        assert!(!out.status.success(), "{extra} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
            "{extra}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn scheduler_config(env: &TestEnv) -> orchestrator::maintenance::SchedulerConfig {
    env.app.scheduler_config()
}

#[tokio::test]
async fn twenty_racing_enqueues_with_one_unique_key_make_one_job() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let unique = |for_secs: Option<i64>| {
        Some(UniqueRequest {
            key: "review:repo-a:pr-7".into(),
            for_secs,
            states: None,
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let app = env.app.clone();
        let q = q.clone();
        let unique = unique(Some(3600));
        tasks.spawn(async move {
            let r = JobRequest {
                unique,
                metadata: Some(json!({ "n": i })),
                ..request("noop", &q, json!({}))
            };
            let jobs = app.validate(vec![r], "racer").expect("valid");
            app.enqueue(&jobs).await.expect("enqueue").remove(0)
        });
    }
    let mut created = 0;
    let mut ids = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let (job, new) = r.expect("task");
        created += usize::from(new);
        ids.insert(job.id);
    }
    assert_eq!(created, 1, "exactly one enqueue created a job");
    assert_eq!(ids.len(), 1, "every duplicate got the one job back");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1")
        .bind(&q)
        .fetch_one(env.app.store().pool())
        .await
        .expect("count");
    assert_eq!(stored, 1);

    // The key ends with the job's state: once it is cancelled (not one of
    // the default states), the key is free again.
    let id = *ids.first().expect("id");
    env.app
        .cancel(id, "test", "done with it")
        .await
        .expect("cancel");
    let r = JobRequest {
        unique: unique(Some(3600)),
        ..request("noop", &q, json!({}))
    };
    let jobs = env.app.validate(vec![r], "test").expect("valid");
    let (again, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(new, "the key is free once its job finished");
    assert_ne!(again.id, id);

    // The window ends: a key held by a job created longer ago is free.
    sqlx::query("UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = $1")
        .bind(again.id.0)
        .execute(env.app.store().pool())
        .await
        .expect("age");
    let r = JobRequest {
        unique: unique(Some(3600)),
        ..request("noop", &q, json!({}))
    };
    let jobs = env.app.validate(vec![r], "test").expect("valid");
    let (third, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(new, "outside the window the key is free");
    // Without a window it holds for ever (while the job is unfinished).
    let r = JobRequest {
        unique: unique(None),
        ..request("noop", &q, json!({}))
    };
    let jobs = env.app.validate(vec![r], "test").expect("valid");
    let (dup, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(!new);
    assert!(
        dup.id == third.id || dup.id == again.id,
        "an existing holder"
    );

    // For ever means for ever: a holder created ten years ago, alone.
    let aged = |key: &str, states: Option<Vec<String>>| JobRequest {
        unique: Some(UniqueRequest {
            key: key.into(),
            for_secs: None,
            states,
        }),
        ..request("noop", &q, json!({}))
    };
    let jobs = env
        .app
        .validate(vec![aged("forever", None)], "test")
        .expect("valid");
    let (old, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(new);
    sqlx::query("UPDATE jobs SET created_at = now() - interval '10 years' WHERE id = $1")
        .bind(old.id.0)
        .execute(env.app.store().pool())
        .await
        .expect("age");
    let jobs = env
        .app
        .validate(vec![aged("forever", None)], "test")
        .expect("valid");
    let (dup, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(!new, "no window: the ten-year-old holder still holds");
    assert_eq!(dup.id, old.id);

    // `states` names what holds the key: here only a succeeded job. A
    // queued one does not, so a second is enqueued; once one has
    // succeeded, it holds.
    let done_only = || aged("once-done", Some(vec!["succeeded".to_owned()]));
    let jobs = env.app.validate(vec![done_only()], "test").expect("valid");
    let (first, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(new);
    let jobs = env.app.validate(vec![done_only()], "test").expect("valid");
    let (second, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(
        new,
        "a queued job does not hold a key kept for succeeded ones"
    );
    assert_ne!(second.id, first.id);
    let pool = env.start_pool(env.pool_config(&q, 4));
    let done = env
        .wait_terminal(&[first.id, second.id], Duration::from_secs(60))
        .await;
    crate::support::assert_status(&done, Status::Succeeded);
    pool.shutdown().await;
    let jobs = env.app.validate(vec![done_only()], "test").expect("valid");
    let (held, new) = env.app.enqueue(&jobs).await.expect("enqueue").remove(0);
    assert!(!new, "a succeeded job holds it now");
    assert!(held.id == first.id || held.id == second.id);
    assert_eq!(held.status, Status::Succeeded);
}

#[tokio::test]
async fn retention_prunes_old_finished_jobs_and_only_it_may_delete_events() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let pool = env.app.store().pool();
    // The first holds an idempotency key, the second a unique key kept for
    // succeeded jobs: both end with their job.
    let mut requests: Vec<JobRequest> = (0..30).map(|_| request("noop", &q, json!({}))).collect();
    requests[0].idempotency_key = Some("retained-idem".into());
    requests[1].unique = Some(UniqueRequest {
        key: "retained-unique".into(),
        for_secs: None,
        states: Some(vec!["succeeded".into()]),
    });
    let jobs = env.enqueue(requests).await;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let running = env.start_pool(env.pool_config(&q, 4));
    let done = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    crate::support::assert_status(&done, Status::Succeeded);
    // And jobs that ended otherwise: a dead one and a cancelled one.
    let other = unique_queue();
    let mut failing = request("flaky", &other, json!({ "fail_times": 5 }));
    failing.max_attempts = Some(1);
    let ended = env
        .enqueue(vec![
            failing.clone(),
            failing,
            request("noop", &other, json!({})),
            request("noop", &other, json!({})),
        ])
        .await;
    for j in &ended[2..] {
        env.app
            .cancel(j.id, "test", "not needed")
            .await
            .expect("cancel");
    }
    let flaky_pool = env.start_pool(env.pool_config(&other, 2));
    let ended_ids: Vec<JobId> = ended.iter().map(|j| j.id).collect();
    let finished = env.wait_terminal(&ended_ids, Duration::from_secs(30)).await;
    flaky_pool.shutdown().await;
    running.shutdown().await;
    let statuses: Vec<Status> = finished.iter().map(|j| j.status).collect();
    assert_eq!(
        statuses,
        vec![
            Status::Dead,
            Status::Dead,
            Status::Cancelled,
            Status::Cancelled
        ]
    );
    // Each status keeps its own time (1 day, 7 days, 1 day by default): a
    // dead job two days old stays, one eight days old goes; a cancelled
    // one two days old goes, one just now stays.
    for (id, age) in [
        (ended[0].id, "2 days"),
        (ended[1].id, "8 days"),
        (ended[2].id, "2 days"),
    ] {
        sqlx::query(&format!(
            "UPDATE jobs SET finished_at = now() - interval '{age}' WHERE id = $1"
        ))
        .bind(id.0)
        .execute(pool)
        .await
        .expect("age");
    }
    // Two thirds finished two days ago; the rest just now.
    let old: Vec<uuid::Uuid> = ids[..20].iter().map(|i| i.0).collect();
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id = ANY($1)")
        .bind(&old)
        .execute(pool)
        .await
        .expect("age");

    // The trail refuses any other DELETE or TRUNCATE, and what the pruning
    // function sets for itself is no way around it.
    for sql in [
        "DELETE FROM job_events WHERE job_id = ANY($1)",
        "TRUNCATE job_events",
    ] {
        let err = sqlx::query(sql)
            .bind(&old)
            .execute(pool)
            .await
            .expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("SELECT set_config('orchestrator.pruning', 'on', true)")
        .execute(&mut *tx)
        .await
        .expect("set");
    let err = sqlx::query("DELETE FROM job_events WHERE job_id = ANY($1)")
        .bind(&old)
        .execute(&mut *tx)
        .await
        .expect_err("a DELETE outside prune_finished_jobs()");
    assert!(err.to_string().contains("append-only"), "{err}");
    drop(tx);
    // Not from a function of one's own either.
    let err = sqlx::query(
        "DO $$ BEGIN DELETE FROM job_events WHERE job_id = '00000000-0000-0000-0000-000000000000'; END $$",
    )
    .execute(pool)
    .await
    .expect_err("a DELETE in a DO block");
    assert!(err.to_string().contains("append-only"), "{err}");
    // Before pruning, both keys still answer with their job.
    let replay = |requests: Vec<JobRequest>| {
        let app = env.app.clone();
        async move {
            let jobs = app.validate(requests, "test").expect("valid");
            app.enqueue(&jobs).await.expect("enqueue").remove(0)
        }
    };
    let idem = || JobRequest {
        idempotency_key: Some("retained-idem".into()),
        ..request("noop", &q, json!({}))
    };
    let uniq = || JobRequest {
        unique: Some(UniqueRequest {
            key: "retained-unique".into(),
            for_secs: None,
            states: Some(vec!["succeeded".into()]),
        }),
        ..request("noop", &q, json!({}))
    };
    let (replayed, new) = replay(vec![idem()]).await;
    assert!(!new && replayed.id == ids[0], "{replayed:?}");
    let (held, new) = replay(vec![uniq()]).await;
    assert!(!new && held.id == ids[1], "{held:?}");

    let cfg = orchestrator::maintenance::RetentionConfig {
        batch: 7,
        ..env
            .app
            .settings()
            .retention
            .config()
            .expect("retention on by default")
    };
    let metrics = orchestrator::metrics::install().expect("metrics");
    const PRUNED: &str = "orchestrator_retention_pruned_rows_total";
    let pruned = |text: &str, table: &str, status: &str| {
        counter(text, PRUNED, &[("table", table), ("status", status)])
    };
    let statuses = ["succeeded", "dead", "cancelled"];
    let text = metrics.render();
    let before: Vec<(f64, f64)> = statuses
        .iter()
        .map(|s| (pruned(&text, "jobs", s), pruned(&text, "job_events", s)))
        .collect();
    let counts = env.maintenance(&q).prune_once(&cfg).await.expect("prune");
    assert_eq!(
        counts.jobs, 22,
        "20 succeeded, one dead, one cancelled: {counts:?}"
    );
    assert!(counts.events >= 20 * 3, "{counts:?}");
    // The metric says the same, by table and status.
    let text = metrics.render();
    let mut events = 0.0;
    for ((status, (jobs, evs)), want) in statuses.iter().zip(&before).zip([20.0, 1.0, 1.0]) {
        let grew = pruned(&text, "jobs", status) - jobs;
        assert!(
            grew >= want,
            "{status}: {grew} jobs pruned, {want} here: {text}"
        );
        events += pruned(&text, "job_events", status) - evs;
    }
    assert!(events >= counts.events as f64, "{text}");
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE queue = $1")
        .bind(&q)
        .fetch_all(pool)
        .await
        .expect("left");
    let kept: BTreeSet<uuid::Uuid> = ids[20..].iter().map(|i| i.0).collect();
    assert_eq!(left.into_iter().collect::<BTreeSet<_>>(), kept);
    let left: BTreeSet<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE queue = $1")
        .bind(&other)
        .fetch_all(pool)
        .await
        .expect("left")
        .into_iter()
        .collect();
    assert_eq!(
        left,
        [ended[0].id.0, ended[3].id.0].into_iter().collect(),
        "the dead job within its 7 days and the fresh cancelled one stay"
    );
    // The keys went with their jobs: each makes a new job now.
    let (fresh, new) = replay(vec![idem()]).await;
    assert!(new && fresh.id != ids[0], "the idempotency key is free");
    let (fresh, new) = replay(vec![uniq()]).await;
    assert!(new && fresh.id != ids[1], "the unique key is free");
    let orphans: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events WHERE job_id = ANY($1)")
        .bind(&old)
        .fetch_one(pool)
        .await
        .expect("events");
    assert_eq!(orphans, 0, "their trails went with them");
    let again = env.maintenance(&q).prune_once(&cfg).await.expect("prune");
    assert_eq!(again.jobs, 0, "idempotent");

    // One replica at a time: while another holds the lock, a pass does
    // nothing.
    let mut holder = pool.begin().await.expect("tx");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(0x6f72_6368_7072_756e_i64)
        .execute(&mut *holder)
        .await
        .expect("lock");
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE queue = $1")
        .bind(&q)
        .execute(pool)
        .await
        .expect("age");
    let blocked = env.maintenance(&q).prune_once(&cfg).await.expect("prune");
    assert!(blocked.busy && blocked.jobs == 0, "{blocked:?}");
    holder.rollback().await.expect("release");
    let rest = env.maintenance(&q).prune_once(&cfg).await.expect("prune");
    assert_eq!(rest.jobs, 10);
}

/// (start, end) of each job from its audit trail: the `started` event and
/// the terminal one, in Postgres' time.
async fn intervals(env: &TestEnv, ids: &[JobId]) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    let rows: Vec<(uuid::Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT job_id,
                min(at) FILTER (WHERE type = 'started'),
                max(at) FILTER (WHERE type = 'succeeded')
         FROM job_events WHERE job_id = ANY($1) GROUP BY job_id",
    )
    .bind(&uuids)
    .fetch_all(env.app.store().pool())
    .await
    .expect("events");
    assert_eq!(rows.len(), ids.len());
    // In the order the ids were given (their enqueue order).
    ids.iter()
        .map(|id| {
            let (_, s, e) = rows.iter().find(|r| r.0 == id.0).expect("row");
            (*s, *e)
        })
        .collect()
}

#[tokio::test]
async fn a_concurrency_key_never_runs_twice_at_once_across_prefetching_workers() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let keyed = |key: &str| JobRequest {
        concurrency_key: Some(key.to_owned()),
        ..request("sleep", &q, json!({ "ms": 150 }))
    };
    // Eight jobs of key a first, then eight of key b, then sixteen without
    // a key, all at one priority: a's held jobs must not block what is
    // behind them.
    let mut requests = Vec::new();
    requests.extend((0..8).map(|_| keyed("https://example.test/a.git#main")));
    requests.extend((0..8).map(|_| keyed("https://example.test/b.git#main")));
    requests.extend((0..16).map(|_| request("sleep", &q, json!({ "ms": 150 }))));
    let jobs = env.enqueue(requests).await;
    assert_eq!(
        jobs[0].concurrency_key.as_deref(),
        Some("https://example.test/a.git#main")
    );
    assert_eq!(jobs[0].concurrency_limit, Some(1), "the default limit");
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let vars = [("ORCH_WORKER__PREFETCH", "16")];
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::spawn_with(&env, &q, 4, &vars))
        .collect();
    // While keys are held, the depth gauge says so, as the sampler every
    // replica runs exports it.
    let metrics = orchestrator::metrics::install().expect("metrics");
    let maintenance = env.maintenance(&q);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_held = false;
    while !saw_held && Instant::now() < deadline {
        maintenance.sample_once().await.expect("sample");
        let held = metric_sample(
            &metrics.render(),
            "orchestrator_queue_depth",
            &[("queue", q.as_str()), ("state", "held")],
        );
        saw_held = held.is_some_and(|n| n > 0.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_held, "no job was ever held by its key");
    let done = env.wait_terminal(&ids, Duration::from_secs(90)).await;
    crate::support::assert_status(&done, Status::Succeeded);

    let spans = intervals(&env, &ids).await;
    for key in ["a.git", "b.git"] {
        let of_key: Vec<_> = jobs
            .iter()
            .zip(&spans)
            .filter(|(j, _)| {
                j.concurrency_key
                    .as_deref()
                    .is_some_and(|k| k.contains(key))
            })
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(of_key.len(), 8);
        // Skipped, never starved: a key's jobs run in their enqueue order,
        // each after the one before it ended.
        for pair in of_key.windows(2) {
            assert!(
                pair[1].0 > pair[0].1,
                "{key}: a job started at {} before the previous one ended at {}",
                pair[1].0,
                pair[0].1
            );
        }
    }
    // Other keys kept flowing: at some instant jobs of both keys and jobs
    // without a key ran side by side.
    let overlapping = |a: &(DateTime<Utc>, DateTime<Utc>), b: &(DateTime<Utc>, DateTime<Utc>)| {
        a.0 < b.1 && b.0 < a.1
    };
    let (a, b, free): (Vec<_>, Vec<_>, Vec<_>) = {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut free = Vec::new();
        for (j, s) in jobs.iter().zip(&spans) {
            match j.concurrency_key.as_deref() {
                Some(k) if k.contains("a.git") => a.push(*s),
                Some(_) => b.push(*s),
                None => free.push(*s),
            }
        }
        (a, b, free)
    };
    assert!(
        a.iter().any(|x| b.iter().any(|y| overlapping(x, y))),
        "the two keys never ran at once"
    );
    // FIFO without holds would start nothing of b or of the free jobs
    // before a's seven other jobs: they started while a's second waited.
    let a_second = a[1].0;
    let first_b = b.iter().map(|s| s.0).min().expect("b");
    let first_free = free.iter().map(|s| s.0).min().expect("free");
    assert!(first_b < a_second, "key b waited behind key a's held jobs");
    assert!(
        first_free < a_second,
        "jobs without a key waited behind key a"
    );
}

#[tokio::test]
async fn postgres_refuses_a_claim_past_a_keys_limit_even_without_valkey() {
    let env = TestEnv::new().await;
    let q = unique_queue();
    let keyed = || JobRequest {
        concurrency_key: Some("repo#main".into()),
        ..request("noop", &q, json!({}))
    };
    let jobs = env.enqueue((0..5).map(|_| keyed()).collect()).await;
    let store = env.app.store().clone();
    let lease = Duration::from_secs(30);
    // Racing claims of one key each, as workers would make them after
    // Valkey lost its running sets: exactly one wins.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, job) in jobs.iter().take(4).enumerate() {
        let store = store.clone();
        let id = job.id;
        tasks.spawn(async move {
            store
                .claim(&[id], &format!("w{i}"), lease)
                .await
                .expect("claim")
        });
    }
    let mut won = 0;
    while let Some(r) = tasks.join_next().await {
        let (claimed, refused) = r.expect("task");
        won += claimed.len();
        assert_eq!(claimed.len() + refused.len(), 1);
    }
    assert_eq!(won, 1, "one job of the key runs");
    // While one runs, another claim of the key takes nothing.
    let (claimed, refused) = store
        .claim(&[jobs[4].id], "w9", lease)
        .await
        .expect("claim");
    assert!(claimed.is_empty() && refused == vec![jobs[4].id]);
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'running'")
            .bind(&q)
            .fetch_one(store.pool())
            .await
            .expect("count");
    assert_eq!(running, 1);
}

/// When each of `ids` started, earliest first (from `intervals`).
async fn starts(env: &TestEnv, ids: &[JobId]) -> Vec<DateTime<Utc>> {
    let mut starts: Vec<DateTime<Utc>> =
        intervals(env, ids).await.into_iter().map(|s| s.0).collect();
    starts.sort();
    starts
}

/// `[admission.rate_limits]` and `[admission.key_rate_limits]` from a
/// worker process's config file: starts are paced by the token bucket
/// (N at once, then N per window), the jobs over it wait and none fails,
/// and one key's bucket does not pace another key.
#[tokio::test]
async fn configured_rate_limits_pace_a_workers_starts_and_fail_nothing() {
    let env = TestEnv::new().await;
    let per_queue = unique_queue();
    let per_key = unique_queue();
    let mut config = tempfile::NamedTempFile::new().expect("config file");
    std::io::Write::write_all(
        &mut config,
        format!(
            "[admission.rate_limits]\n\"{per_queue}\" = {{ starts = 4, per_secs = 1 }}\n\
             [admission.key_rate_limits]\n\"{per_key}\" = {{ starts = 2, per_secs = 1 }}\n"
        )
        .as_bytes(),
    )
    .expect("write config");
    let queued = env
        .enqueue(
            (0..16)
                .map(|_| request("noop", &per_queue, json!({})))
                .collect(),
        )
        .await;
    let keyed = |key: &str| JobRequest {
        concurrency_key: Some(key.to_owned()),
        ..request("noop", &per_key, json!({}))
    };
    let mut requests: Vec<JobRequest> = (0..8).map(|_| keyed("key-a")).collect();
    requests.extend((0..8).map(|_| keyed("key-b")));
    let keyed_jobs = env.enqueue(requests).await;
    let queues = format!("{per_queue},{per_key}");
    let path = config.path().to_str().expect("utf-8 path").to_owned();
    let _worker = WorkerProcess::spawn_with(&env, &queues, 8, &[("ORCH_CONFIG", &path)]);

    let all: Vec<JobId> = queued.iter().chain(&keyed_jobs).map(|j| j.id).collect();
    let done = env.wait_terminal(&all, Duration::from_secs(120)).await;
    crate::support::assert_status(&done, Status::Succeeded);
    assert!(
        done.iter().all(|j| j.attempt == 1),
        "a job held back by a limit used an attempt"
    );

    // A bucket of N refilled at N per second: 16 starts take at least
    // (16 - 4) / 4 = 3 s, 8 starts of one key (8 - 2) / 2 = 3 s. Delays
    // between a claim and its `started` event only stretch this; the half
    // second allows for the first start being the later one.
    let span = |t: &[DateTime<Utc>]| (t[t.len() - 1] - t[0]).num_milliseconds();
    let ids = |jobs: &[orchestrator::job::Job]| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    let q_starts = starts(&env, &ids(&queued)).await;
    assert_eq!(q_starts.len(), 16);
    assert!(
        span(&q_starts) >= 2_500,
        "16 starts within {} ms",
        span(&q_starts)
    );
    let (a, b) = keyed_jobs.split_at(8);
    let (a, b) = (starts(&env, &ids(a)).await, starts(&env, &ids(b)).await);
    for (key, t) in [("key-a", &a), ("key-b", &b)] {
        assert_eq!(t.len(), 8);
        assert!(span(t) >= 2_500, "{key}: 8 starts within {} ms", span(t));
    }
    // Each key has its own bucket: both keys' jobs ran through the same
    // seconds, not one key after the other.
    assert!(
        b[0] < a[a.len() - 1] && a[0] < b[b.len() - 1],
        "one key waited for the other: {a:?} {b:?}"
    );
}
