//! `orchestrator bench lifecycle`: a `script-agent` job whose script does
//! nothing, through the whole lifecycle (queue, worktree, sandbox, commit,
//! conflict check, complete), broken down by stage, against the same steps
//! done by hand with the git and docker CLIs, alternating, in one sitting.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{percentile, round};
use crate::app::App;
use crate::config::Settings;
use crate::job::{JobRequest, Status};
use crate::pipeline::NoChanges;
use crate::worker::PoolEvent;

#[derive(Debug, Serialize)]
pub struct LifecycleBench {
    pub runs: usize,
    /// Medians, milliseconds.
    pub job_total_ms: f64,
    pub job_spawn_ms: f64,
    pub job_git_ms: f64,
    pub job_complete_ms: f64,
    pub cli_total_ms: f64,
    pub cli_worktree_ms: f64,
    pub cli_docker_ms: f64,
    pub cli_git_ms: f64,
    /// Job total / CLI total: the price of the queue, the audit trail and
    /// the checks.
    pub overhead_ratio: f64,
}

fn sh(dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    round(percentile(&v, 50.0))
}

pub async fn run(mut settings: Settings, runs: usize) -> Result<LifecycleBench, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = tmp.path();
    let git = |args: &[&str]| {
        let mut a = super::GIT_IDENTITY.to_vec();
        a.extend_from_slice(args);
        sh(root, "git", &a)
    };
    git(&["init", "-q", "--bare", "origin.git"])?;
    git(&["clone", "-q", "origin.git", "seed"])?;
    std::fs::write(root.join("seed/README.md"), "# bench\n").map_err(|e| e.to_string())?;
    sh(
        &root.join("seed"),
        "git",
        &["-c", "user.name=b", "-c", "user.email=b@b", "add", "."],
    )?;
    sh(
        &root.join("seed"),
        "git",
        &[
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "commit",
            "-q",
            "-m",
            "seed",
        ],
    )?;
    sh(
        &root.join("seed"),
        "git",
        &["push", "-q", "origin", "HEAD:main"],
    )?;
    git(&["clone", "-q", "--bare", "origin.git", "cli-mirror.git"])?;
    let bare = root.join("origin.git");

    settings.git.allow_local = true;
    settings.git.data_dir = root.join("stage");
    settings.git.no_changes = NoChanges::Succeed;
    let app = App::connect(settings).await.map_err(|e| e.to_string())?;
    let queue = format!(
        "bench-life-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = app.settings().pool_config();
    cfg.queues = vec![queue.parse().map_err(|e| format!("{e}"))?];
    cfg.concurrency = 1;
    let (tx, mut events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let pool = tokio::spawn(app.pool(cfg).with_observer(tx).run(stop.clone()));

    let (mut total, mut spawn, mut gitst, mut complete) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c_total, mut c_wt, mut c_docker, mut c_git) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let image = "orchestrator/script-agent:latest";
    for i in 0..runs {
        // Through the orchestrator.
        let request = JobRequest {
            kind: "script-agent".into(),
            queue: Some(queue.clone()),
            payload: Some(json!({ "script": "true", "repo": bare.to_string_lossy() })),
            max_attempts: Some(1),
            ..JobRequest::default()
        };
        let t = Instant::now();
        let jobs = app
            .validate(vec![request], "bench")
            .map_err(|e| e.to_string())?;
        app.enqueue(&jobs).await.map_err(|e| e.to_string())?;
        loop {
            match tokio::time::timeout(Duration::from_secs(120), events.recv()).await {
                Ok(Some(PoolEvent::Finished(done)))
                    if done.iter().any(|(_, s)| s.is_terminal()) =>
                {
                    break
                }
                Ok(Some(_)) => {}
                _ => return Err("the lifecycle bench stalled".into()),
            }
        }
        total.push(t.elapsed().as_secs_f64() * 1000.0);
        let job = app
            .store()
            .get_job(jobs[0].id)
            .await
            .map_err(|e| e.to_string())?;
        if job.status != Status::Succeeded {
            return Err(format!(
                "bench job ended {}: {:?}",
                job.status, job.last_error
            ));
        }
        let stages = job.result.unwrap_or_default()["stages"].clone();
        spawn.push(stages["spawn_ms"].as_f64().unwrap_or(0.0));
        gitst.push(stages["git_ms"].as_f64().unwrap_or(0.0));
        complete.push(stages["complete_ms"].as_f64().unwrap_or(0.0));

        // The same steps by hand.
        let wt = root.join(format!("cli-wt-{i}"));
        let wt_s = wt.to_string_lossy().into_owned();
        let t = Instant::now();
        sh(
            &root.join("cli-mirror.git"),
            "git",
            &["fetch", "-q", "origin"],
        )
        .ok();
        sh(
            &root.join("cli-mirror.git"),
            "git",
            &[
                "worktree",
                "add",
                "-q",
                "-b",
                &format!("cli/{i}"),
                &wt_s,
                "main",
            ],
        )?;
        sh(root, "chown", &["-R", "1000:1000", &wt_s])?;
        let t_wt = t.elapsed();
        sh(
            root,
            "docker",
            &[
                "run",
                "--rm",
                "--user",
                "1000:1000",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--read-only",
                "--tmpfs",
                "/tmp:rw,size=64m,uid=1000,gid=1000",
                "--memory",
                "268435456",
                "--memory-swap",
                "268435456",
                "--pids-limit",
                "128",
                "--init",
                "--network",
                "none",
                "-v",
                &format!("{wt_s}:/workspace"),
                "-w",
                "/workspace",
                image,
                "sh",
                "-c",
                "true",
            ],
        )?;
        let t_docker = t.elapsed();
        sh(root, "chown", &["-R", "0:0", &wt_s])?;
        sh(&wt, "git", &["add", "-A"])?;
        sh(&wt, "git", &["diff", "--cached", "--quiet"])?;
        sh(
            &root.join("cli-mirror.git"),
            "git",
            &["worktree", "remove", "--force", &wt_s],
        )?;
        sh(
            &root.join("cli-mirror.git"),
            "git",
            &["branch", "-D", &format!("cli/{i}")],
        )?;
        let t_all = t.elapsed();
        c_wt.push(t_wt.as_secs_f64() * 1000.0);
        c_docker.push((t_docker - t_wt).as_secs_f64() * 1000.0);
        c_git.push((t_all - t_docker).as_secs_f64() * 1000.0);
        c_total.push(t_all.as_secs_f64() * 1000.0);
    }
    stop.cancel();
    let _ = pool.await;
    let (job_total, cli_total) = (median(total), median(c_total));
    Ok(LifecycleBench {
        runs,
        job_total_ms: job_total,
        job_spawn_ms: median(spawn),
        job_git_ms: median(gitst),
        job_complete_ms: median(complete),
        cli_total_ms: cli_total,
        cli_worktree_ms: median(c_wt),
        cli_docker_ms: median(c_docker),
        cli_git_ms: median(c_git),
        overhead_ratio: if cli_total > 0.0 {
            round(job_total / cli_total)
        } else {
            0.0
        },
    })
}
