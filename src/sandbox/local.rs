//! The local-process runtime, for development machines without Docker.
//!
//! WEAKER ISOLATION: the command runs on the host, as the worker's user, in
//! the worktree, in a process group of its own, with rlimits (address space,
//! processes, CPU time) set right after it starts. No filesystem, network or
//! user isolation. Stopping signals the whole group: SIGTERM, the grace
//! period, then SIGKILL. An out-of-memory kill cannot be told apart from
//! other kills here.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rlimit::Resource;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::logs::{LineSplitter, LogLine, LogStream};
use super::{Finished, Outcome, RunOptions, SandboxError, SandboxSpec};

#[derive(Clone, Copy, Debug, Default)]
pub struct LocalRuntime;

impl LocalRuntime {
    pub async fn run(
        &self,
        spec: &SandboxSpec,
        opts: RunOptions,
        logs: mpsc::UnboundedSender<LogLine>,
        cancel: CancellationToken,
    ) -> Result<Finished, SandboxError> {
        let started = Instant::now();
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(&spec.env)
            .envs(spec.secrets.iter().map(|(k, v)| (k, v.expose())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(ws) = &spec.workspace {
            cmd.current_dir(&ws.host).env("WORKSPACE", &ws.host);
        }
        let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            command: spec.command[0].clone(),
            source,
        })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        limit(pid, spec);
        let out = child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, LogStream::Stdout, logs.clone())));
        let err = child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, LogStream::Stderr, logs)));

        let reason = tokio::select! {
            status = child.wait() => {
                let code = code_of(status?);
                drain(out, err).await;
                return Ok(Finished { outcome: Outcome::Exited { code }, duration: started.elapsed() });
            }
            () = tokio::time::sleep(opts.timeout) => Reason::Timeout,
            () = cancel.cancelled() => Reason::Requested,
        };
        let code = stop_group(&mut child, pid, opts.stop_grace).await?;
        drain(out, err).await;
        let outcome = match reason {
            Reason::Timeout => Outcome::TimedOut,
            Reason::Requested => Outcome::Stopped { code },
        };
        Ok(Finished {
            outcome,
            duration: started.elapsed(),
        })
    }
}

enum Reason {
    Timeout,
    Requested,
}

/// rlimits for the new process (inherited by everything it starts).
fn limit(pid: i32, spec: &SandboxSpec) {
    let memory = u64::try_from(spec.limits.memory_bytes).unwrap_or(u64::MAX);
    let pids = u64::try_from(spec.limits.pids).unwrap_or(u64::MAX);
    for (resource, value) in [(Resource::AS, memory), (Resource::NPROC, pids)] {
        if let Err(err) = rlimit::prlimit(pid, resource, Some((value, value)), None) {
            tracing::warn!(error = %err, ?resource, "could not limit a local sandbox");
        }
    }
}

/// SIGTERM to the group, the grace period, SIGKILL; returns the exit code.
async fn stop_group(child: &mut Child, pid: i32, grace: Duration) -> Result<i64, SandboxError> {
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            // The leader is gone; make sure nothing of the group survives it.
            let _ = killpg(group, Signal::SIGKILL);
            Ok(code_of(status?))
        }
        Err(_) => {
            let _ = killpg(group, Signal::SIGKILL);
            Ok(code_of(child.wait().await?))
        }
    }
}

/// The exit code as a shell reports it: 128 + the signal when killed.
fn code_of(status: std::process::ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(signal)) => 128 + i64::from(signal),
        (None, None) => -1,
    }
}

async fn pump(
    mut source: impl AsyncRead + Unpin,
    stream: LogStream,
    out: mpsc::UnboundedSender<LogLine>,
) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 8192];
    let mut lines = Vec::new();
    loop {
        match source.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => splitter.feed(stream, &buf[..n], &mut lines),
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

async fn drain(out: Option<tokio::task::JoinHandle<()>>, err: Option<tokio::task::JoinHandle<()>>) {
    // Output of grandchildren that outlive the group leader can hold the
    // pipes open; do not wait for it forever.
    for mut task in [out, err].into_iter().flatten() {
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
