//! `orchestrator bench cancel`: how long stopping takes, through the real
//! path (Valkey, Postgres, a worker pool, Docker sandboxes of the
//! `script-agent` kind running `sleep`), against removing the same number of
//! running containers straight with `docker rm -f`.
//!
//! - cancel latency: from `App::cancel` to the worker's confirmation that
//!   the sandbox is gone (then checked with Docker), one job at a time;
//!   every agent has run for 2 s when it is stopped, and so has every
//!   container `docker rm -f` removes;
//! - kill-all: wall time of `App::kill_all` with `agents` running agents,
//!   which returns once every one is confirmed gone.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{pct, ratio};
use crate::app::{App, Cancel};
use crate::config::Settings;
use crate::job::{JobId, JobRequest, QueueName};
use crate::sandbox::{DockerRuntime, Runtime};

const KIND: &str = "script-agent";
const IMAGE: &str = "orchestrator/script-agent:latest";
const LIMIT: Duration = Duration::from_secs(60);
/// How long agents run before they are stopped: past their start-up, as
/// the agents of a real incident are (a container stopped in its first
/// second is signalled twice; see the Docker runtime).
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct CancelBench {
    pub runs: usize,
    pub agents: usize,
    pub cancel_p50_ms: f64,
    pub cancel_p99_ms: f64,
    /// `docker rm -f` of one running container of the same image.
    pub docker_rm_p50_ms: f64,
    /// cancel p50 / docker rm p50: what the request path adds to the stop.
    pub cancel_vs_docker_rm: f64,
    pub kill_all_median_ms: f64,
    /// `docker rm -f` of `agents` running containers in one command.
    pub docker_rm_all_median_ms: f64,
    pub kill_all_vs_docker_rm: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the bench under its own key prefix and queue; `settings` name the
/// services.
pub async fn run(
    mut settings: Settings,
    runs: usize,
    agents: usize,
) -> Result<CancelBench, String> {
    settings.key_prefix = format!("bench-cancel-{}", std::process::id());
    settings.worker.lease_ms = 5_000;
    settings.worker.poll_interval_ms = 100;
    let app = App::connect(settings).await.map_err(|e| e.to_string())?;
    app.ensure_migrated().await.map_err(|e| e.to_string())?;
    let docker = Runtime::Docker(DockerRuntime::connect().await.map_err(|e| e.to_string())?);
    let queue = QueueName::parse(format!("bench-cancel-{}", std::process::id()))
        .map_err(|e| e.to_string())?;
    let mut cfg = app.settings().pool_config();
    cfg.queues = vec![queue.clone()];
    cfg.concurrency = agents.max(1);
    cfg.prefetch = 0;
    let stop = CancellationToken::new();
    let pool = tokio::spawn(app.pool(cfg).run(stop.clone()));
    let result = measure(&app, &docker, &queue, runs, agents).await;
    stop.cancel();
    let _ = pool.await;
    let _ = app.resume("bench", "bench over").await;
    result
}

async fn measure(
    app: &App,
    docker: &Runtime,
    queue: &QueueName,
    runs: usize,
    agents: usize,
) -> Result<CancelBench, String> {
    let mut cancels = Vec::with_capacity(runs);
    let mut rm_one = Vec::with_capacity(runs);
    for _ in 0..runs {
        let ids = start_agents(app, docker, queue, 1).await?;
        let t = Instant::now();
        match app.cancel(ids[0], "bench", "bench").await {
            Ok(Cancel::Requested(_)) => {}
            other => return Err(format!("cancel did not reach a running job: {other:?}")),
        }
        wait_stopped(app, &ids).await?;
        cancels.push(ms(t.elapsed()));
        if running_containers(app, docker).await? != 0 {
            return Err("a cancelled job's container is still there".into());
        }
        rm_one.push(docker_rm(1).await?);
    }
    let mut kills = Vec::with_capacity(3);
    let mut rm_all = Vec::with_capacity(3);
    for _ in 0..3 {
        start_agents(app, docker, queue, agents).await?;
        let t = Instant::now();
        let report = app
            .kill_all("bench", "bench")
            .await
            .map_err(|e| e.to_string())?;
        kills.push(ms(t.elapsed()));
        if report.cancelled != agents || running_containers(app, docker).await? != 0 {
            return Err(format!(
                "kill-all left work behind: {} of {agents} cancelled",
                report.cancelled
            ));
        }
        app.resume("bench", "bench")
            .await
            .map_err(|e| e.to_string())?;
        rm_all.push(docker_rm(agents).await?);
    }
    for v in [&mut cancels, &mut rm_one, &mut kills, &mut rm_all] {
        v.sort_by(f64::total_cmp);
    }
    let (c50, r50) = (pct(&cancels, 50.0), pct(&rm_one, 50.0));
    let (k50, a50) = (pct(&kills, 50.0), pct(&rm_all, 50.0));
    Ok(CancelBench {
        runs,
        agents,
        cancel_p50_ms: c50,
        cancel_p99_ms: pct(&cancels, 99.0),
        docker_rm_p50_ms: r50,
        cancel_vs_docker_rm: ratio(c50, r50),
        kill_all_median_ms: k50,
        docker_rm_all_median_ms: a50,
        kill_all_vs_docker_rm: ratio(k50, a50),
    })
}

/// Enqueues `n` sleeping agents and waits until their containers run.
async fn start_agents(
    app: &App,
    docker: &Runtime,
    queue: &QueueName,
    n: usize,
) -> Result<Vec<JobId>, String> {
    let requests = (0..n)
        .map(|_| JobRequest {
            kind: KIND.to_owned(),
            queue: Some(queue.to_string()),
            payload: Some(serde_json::json!({ "script": "sleep 600" })),
            ..JobRequest::default()
        })
        .collect();
    let jobs = app.validate(requests, "bench").map_err(|e| e.to_string())?;
    let stored = app.enqueue(&jobs).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + LIMIT;
    while running_containers(app, docker).await? < n {
        if Instant::now() > deadline {
            return Err(format!("{n} agents did not start within {LIMIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(stored.into_iter().map(|(j, _)| j.id).collect())
}

async fn running_containers(app: &App, docker: &Runtime) -> Result<usize, String> {
    Ok(docker
        .list_ours(&app.settings().key_prefix)
        .await
        .map_err(|e| e.to_string())?
        .len())
}

async fn wait_stopped(app: &App, ids: &[JobId]) -> Result<(), String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let stopped = app
            .queue()
            .stopped_at(ids)
            .await
            .map_err(|e| e.to_string())?;
        if stopped.iter().all(Option::is_some) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("a cancel was not confirmed".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts `n` containers like the agents (`sleep` under an init), then
/// times one `docker rm -f` of them all.
async fn docker_rm(n: usize) -> Result<f64, String> {
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("orch-bench-rm-{}-{i}", std::process::id());
        let status = tokio::process::Command::new("docker")
            .args(["run", "-d", "--init", "--network", "none", "--name", &name])
            .args([IMAGE, "sh", "-c", "sleep 600"])
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("docker run failed: {status}"));
        }
        names.push(name);
    }
    tokio::time::sleep(SETTLE).await;
    let t = Instant::now();
    let status = tokio::process::Command::new("docker")
        .args(["rm", "-f"])
        .args(&names)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("docker rm failed: {status}"));
    }
    Ok(ms(t.elapsed()))
}
