//! The Docker runtime, through bollard. Hardened by default: a non-root
//! user, every capability dropped, `no-new-privileges`, a read-only root with
//! a size-capped tmpfs at /tmp, memory (= memory + swap), CPU and pids limits,
//! an init process so SIGTERM reaches the agent, no network unless the kind
//! allows it, and never the Docker socket.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;

/// Most output Docker keeps on disk per container (its json-file driver).
const DOCKER_LOG_MAX_SIZE: &str = "10m";
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::logs::{LineSplitter, LogLine, LogStream};
use super::{
    Finished, Labelled, Network, Outcome, RunOptions, SandboxError, SandboxSpec, LABEL_ATTEMPT,
    LABEL_CREATED, LABEL_DEPLOYMENT, LABEL_EXPIRES, LABEL_HOST, LABEL_JOB, LABEL_WORKER,
    SANDBOX_USER, WORKSPACE,
};

/// How long after its start a container counts as young: a stop signal
/// then may arrive before its init listens (see `drive`).
const YOUNG_CONTAINER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerRuntime {
    /// Connects through `DOCKER_HOST` or the local socket and checks the
    /// daemon answers.
    pub async fn connect() -> Result<Self, SandboxError> {
        let docker = Docker::connect_with_defaults()?;
        docker.ping().await?;
        Ok(DockerRuntime { docker })
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn create_body(spec: &SandboxSpec) -> ContainerCreateBody {
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(
            spec.secrets
                .iter()
                .map(|(k, v)| format!("{k}={}", v.expose())),
        );
        let mut binds = Vec::new();
        for m in spec.workspace.iter().chain(spec.mounts.iter()) {
            let mode = if m.read_only { "ro" } else { "rw" };
            binds.push(format!("{}:{}:{mode}", m.host.display(), m.target));
        }
        let owner = &spec.owner;
        let labels = HashMap::from([
            (LABEL_DEPLOYMENT.to_owned(), owner.deployment.clone()),
            (LABEL_JOB.to_owned(), owner.job_id.to_string()),
            (LABEL_ATTEMPT.to_owned(), owner.attempt.to_string()),
            (LABEL_WORKER.to_owned(), owner.worker_id.clone()),
            (LABEL_HOST.to_owned(), owner.host.clone()),
            (LABEL_CREATED.to_owned(), owner.created_at.to_rfc3339()),
            (LABEL_EXPIRES.to_owned(), owner.expires_at.to_rfc3339()),
        ]);
        // uid/gid options rather than mode=1777: not every daemon honours
        // the mode of a tmpfs.
        let (uid, gid) = SANDBOX_USER
            .split_once(':')
            .unwrap_or((SANDBOX_USER, SANDBOX_USER));
        let tmpfs = HashMap::from([(
            "/tmp".to_owned(),
            format!(
                "rw,noexec,nosuid,nodev,size={},uid={uid},gid={gid}",
                spec.limits.tmp_bytes
            ),
        )]);
        let host = HostConfig {
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            memory: Some(spec.limits.memory_bytes),
            memory_swap: Some(spec.limits.memory_bytes),
            nano_cpus: Some(spec.limits.nano_cpus),
            pids_limit: Some(spec.limits.pids),
            init: Some(true),
            privileged: Some(false),
            network_mode: Some(
                match spec.network {
                    Network::None => "none",
                    Network::Bridge => "bridge",
                    Network::Egress => super::egress::EGRESS_NETWORK,
                }
                .to_owned(),
            ),
            // The egress firewall is written for IPv4; the sandbox has no
            // IPv6 to go around it with (Docker's default too, made sure).
            sysctls: (spec.network == Network::Egress).then(|| {
                HashMap::from([("net.ipv6.conf.all.disable_ipv6".to_owned(), "1".to_owned())])
            }),
            binds: (!binds.is_empty()).then_some(binds),
            // Docker keeps a container's output on the host's disk: capped,
            // whatever the daemon's default driver would allow. We stream
            // it as it comes, so nothing we record is lost to the rotation.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), DOCKER_LOG_MAX_SIZE.to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                ])),
            }),
            ..HostConfig::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.command.clone()),
            // The image's entrypoint is not trusted to wrap our argv.
            entrypoint: Some(Vec::new()),
            env: Some(env),
            user: Some(SANDBOX_USER.to_owned()),
            working_dir: Some(if spec.workspace.is_some() {
                WORKSPACE.to_owned()
            } else {
                "/".to_owned()
            }),
            labels: Some(labels),
            network_disabled: Some(spec.network == Network::None),
            tty: Some(false),
            host_config: Some(host),
            ..ContainerCreateBody::default()
        }
    }

    pub async fn run(
        &self,
        spec: &SandboxSpec,
        opts: RunOptions,
        logs: mpsc::UnboundedSender<LogLine>,
        cancel: CancellationToken,
    ) -> Result<Finished, SandboxError> {
        let started = Instant::now();
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(spec.name.clone()),
                    ..CreateContainerOptions::default()
                }),
                Self::create_body(spec),
            )
            .await?;
        let id = created.id;
        // From here on, the container is removed on every path.
        let result = self.drive(&id, opts, logs, cancel, started).await;
        if let Err(err) = self.force_remove(&id).await {
            tracing::warn!(container = %id, error = %err, "could not remove a sandbox; the orphan reaper will");
        }
        result
    }

    async fn drive(
        &self,
        id: &str,
        opts: RunOptions,
        logs: mpsc::UnboundedSender<LogLine>,
        cancel: CancellationToken,
        started: Instant,
    ) -> Result<Finished, SandboxError> {
        self.docker.start_container(id, None).await?;
        let running_since = Instant::now();
        let log_task = tokio::spawn(stream_logs(self.docker.clone(), id.to_owned(), logs));
        let wait = self.wait_exit(id);
        tokio::pin!(wait);
        let stopped_because = tokio::select! {
            code = &mut wait => {
                let code = code?;
                let _ = log_task.await;
                let oom = self.oom_killed(id).await?;
                let outcome = if oom { Outcome::OomKilled } else { Outcome::Exited { code } };
                return Ok(Finished { outcome, duration: started.elapsed() });
            }
            () = tokio::time::sleep(opts.timeout) => StopReason::Timeout,
            () = cancel.cancelled() => StopReason::Requested,
        };
        // A signal that reaches the container's init before it has set up
        // its handlers is lost (PID 1 ignores signals it does not handle),
        // so a young container is asked once more before the grace period.
        let mut code = None;
        if running_since.elapsed() < YOUNG_CONTAINER {
            self.signal(id, "SIGTERM").await?;
            if let Ok(exited) = tokio::time::timeout(YOUNG_CONTAINER, &mut wait).await {
                code = Some(exited?);
            }
        }
        let code = match code {
            Some(code) => code,
            None => {
                self.stop(id, opts.stop_grace).await?;
                wait.await?
            }
        };
        let _ = log_task.await;
        let outcome = match stopped_because {
            StopReason::Timeout => Outcome::TimedOut,
            StopReason::Requested => Outcome::Stopped { code },
        };
        Ok(Finished {
            outcome,
            duration: started.elapsed(),
        })
    }

    /// The exit code, once the container stopped. bollard reports a
    /// non-zero exit as an error value carrying the code.
    async fn wait_exit(&self, id: &str) -> Result<i64, SandboxError> {
        let mut stream = self.docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".to_owned(),
            }),
        );
        match stream.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(e.into()),
            None => Err(SandboxError::Spec(
                "the wait stream ended without an exit code".into(),
            )),
        }
    }

    async fn oom_killed(&self, id: &str) -> Result<bool, SandboxError> {
        let info = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await?;
        Ok(info.state.and_then(|s| s.oom_killed).unwrap_or(false))
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), SandboxError> {
        let opts = KillContainerOptions {
            signal: signal.to_owned(),
        };
        match self.docker.kill_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // Gone, or no longer running.
            Err(DockerError::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// SIGTERM, `grace`, then SIGKILL (Docker's stop does exactly this).
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX).max(1);
        match self
            .docker
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            // Already gone or already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn force_remove(&self, id: &str) -> Result<(), SandboxError> {
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops (with grace) and removes a container.
    pub async fn remove(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        self.stop(id, grace).await?;
        self.force_remove(id).await
    }

    /// Every container of `deployment` carrying our job label, running or not.
    pub async fn list_ours(&self, deployment: &str) -> Result<Vec<Labelled>, SandboxError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                LABEL_JOB.to_owned(),
                format!("{LABEL_DEPLOYMENT}={deployment}"),
            ],
        )]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..ListContainersOptions::default()
            }))
            .await?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // Double check: never touch what is not ours.
                labels.get(LABEL_JOB)?;
                if labels.get(LABEL_DEPLOYMENT).map(String::as_str) != Some(deployment) {
                    return None;
                }
                Some(Labelled {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    job_id: labels.get(LABEL_JOB).and_then(|v| v.parse().ok()),
                    attempt: labels.get(LABEL_ATTEMPT).and_then(|v| v.parse().ok()),
                    worker_id: labels.get(LABEL_WORKER).cloned(),
                    host: labels.get(LABEL_HOST).cloned(),
                    expires_at: labels
                        .get(LABEL_EXPIRES)
                        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
                        .map(|t| t.with_timezone(&chrono::Utc)),
                })
            })
            .collect())
    }
}

enum StopReason {
    Timeout,
    Requested,
}

/// Follows a container's output until it ends, line by line.
async fn stream_logs(docker: Docker, id: String, out: mpsc::UnboundedSender<LogLine>) {
    let mut stream = docker.logs(
        &id,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..LogsOptions::default()
        }),
    );
    let mut splitter = LineSplitter::default();
    let mut lines = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bollard::container::LogOutput::StdOut { message }) => {
                splitter.feed(LogStream::Stdout, &message, &mut lines)
            }
            Ok(bollard::container::LogOutput::StdErr { message }) => {
                splitter.feed(LogStream::Stderr, &message, &mut lines)
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(container = %id, error = %err, "log stream ended");
                break;
            }
        }
        for line in lines.drain(..) {
            let _ = out.send(line);
        }
    }
    splitter.finish(&mut lines);
    for line in lines {
        let _ = out.send(line);
    }
}
