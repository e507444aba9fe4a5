//! The real binary, run as a process: its CLI, and worker replicas.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::env::TestEnv;

/// Runs the real binary's command line against `env`'s services.
pub fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .env("ORCH_DATABASE_URL", &env.database_url)
        .env("ORCH_VALKEY_URL", &env.valkey_url)
        .env("ORCH_KEY_PREFIX", &env.app.settings().key_prefix)
        .env("ORCH_LOG", "warn")
        .output()
        .expect("run the cli")
}

/// A worker process of the real binary, killed on drop.
pub struct WorkerProcess {
    pub child: Child,
}

impl WorkerProcess {
    pub fn spawn(env: &TestEnv, queue: &str, concurrency: usize) -> WorkerProcess {
        Self::spawn_with(env, queue, concurrency, &[])
    }

    /// With extra environment variables.
    pub fn spawn_with(
        env: &TestEnv,
        queue: &str,
        concurrency: usize,
        vars: &[(&str, &str)],
    ) -> WorkerProcess {
        Self::spawn_args(
            env,
            &[
                "worker",
                "--queues",
                queue,
                "--concurrency",
                &concurrency.to_string(),
            ],
            vars,
        )
    }

    /// `orchestrator serve` on `addr`, with extra environment variables.
    pub fn serve(env: &TestEnv, addr: &str, vars: &[(&str, &str)]) -> WorkerProcess {
        let mut all = vec![("ORCH_HTTP_ADDR", addr)];
        all.extend_from_slice(vars);
        Self::spawn_args(env, &["serve"], &all)
    }

    /// Any command of the binary, with `env`'s services and test timings.
    pub fn spawn_args(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> WorkerProcess {
        let s = &env.app.settings();
        let child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args(args)
            .env("ORCH_DATABASE_URL", &env.database_url)
            .env("ORCH_VALKEY_URL", &env.valkey_url)
            .env("ORCH_KEY_PREFIX", &s.key_prefix)
            .env("ORCH_WORKER__LEASE_MS", s.worker.lease_ms.to_string())
            .env("ORCH_WORKER__POLL_INTERVAL_MS", "100")
            .env(
                "ORCH_WORKER__SHUTDOWN_GRACE_SECS",
                s.worker.shutdown_grace_secs.to_string(),
            )
            .env("ORCH_MAINTENANCE__REAP_INTERVAL_MS", "200")
            .env("ORCH_RETRY__BACKOFF_BASE_MS", "100")
            .env("ORCH_RETRY__BACKOFF_CAP_MS", "1000")
            .env("ORCH_LOG", "warn")
            // Several workers run at once here: each its own metrics port.
            .env("ORCH_METRICS_ADDR", "127.0.0.1:0")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn worker");
        WorkerProcess { child }
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
