//! `orchestrator bench sandbox`: spawn-to-exit of a trivial container
//! through the sandbox runtime, against `docker run --rm` of the same image,
//! command and hardening, alternating, in one sitting.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{pct, ratio};
use crate::job::JobId;
use crate::sandbox::{
    DockerRuntime, Limits, Network, Owner, RunOptions, Runtime, SandboxError, SandboxSpec,
};

#[derive(Debug, Serialize)]
pub struct SandboxBench {
    pub runs: usize,
    pub image: String,
    pub sandbox_p50_ms: f64,
    pub sandbox_p99_ms: f64,
    pub docker_cli_p50_ms: f64,
    pub docker_cli_p99_ms: f64,
    /// docker CLI p50 / sandbox p50: above 1 means the sandbox is faster.
    pub speedup_p50: f64,
}

pub async fn run(image: &str, runs: usize) -> Result<SandboxBench, SandboxError> {
    let rt = Runtime::Docker(DockerRuntime::connect().await?);
    let limits = Limits::default();
    let mut ours = Vec::with_capacity(runs);
    let mut cli = Vec::with_capacity(runs);
    for i in 0..runs {
        let now = chrono::Utc::now();
        let spec = SandboxSpec {
            name: format!("orch-bench-{}-{i}", std::process::id()),
            image: image.to_owned(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            workspace: None,
            mounts: Vec::new(),
            limits,
            network: Network::None,
            owner: Owner {
                deployment: "bench".into(),
                host: crate::sandbox::machine_host_name(),
                job_id: JobId::new(),
                attempt: 1,
                worker_id: "bench".into(),
                created_at: now,
                expires_at: now + chrono::Duration::minutes(5),
            },
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        let opts = RunOptions {
            timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(1),
        };
        rt.run(&spec, opts, tx, CancellationToken::new()).await?;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);

        let t = Instant::now();
        let status = tokio::process::Command::new("docker")
            .args(["run", "--rm", "--user", "1000:1000", "--cap-drop", "ALL"])
            .args(["--security-opt", "no-new-privileges", "--read-only"])
            .args([
                "--tmpfs",
                &format!(
                    "/tmp:rw,noexec,nosuid,nodev,size={},uid=1000,gid=1000",
                    limits.tmp_bytes
                ),
            ])
            .args([
                "--memory",
                &limits.memory_bytes.to_string(),
                "--memory-swap",
                &limits.memory_bytes.to_string(),
            ])
            .args([
                "--pids-limit",
                &limits.pids.to_string(),
                "--init",
                "--network",
                "none",
            ])
            .args([image, "true"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await?;
        if !status.success() {
            return Err(SandboxError::Spec(format!("docker run failed: {status}")));
        }
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ours.sort_by(f64::total_cmp);
    cli.sort_by(f64::total_cmp);
    let (o50, c50) = (pct(&ours, 50.0), pct(&cli, 50.0));
    Ok(SandboxBench {
        runs,
        image: image.to_owned(),
        sandbox_p50_ms: o50,
        sandbox_p99_ms: pct(&ours, 99.0),
        docker_cli_p50_ms: c50,
        docker_cli_p99_ms: pct(&cli, 99.0),
        speedup_p50: ratio(c50, o50),
    })
}
