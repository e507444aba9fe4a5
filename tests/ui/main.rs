//! The dashboard at `/ui/`, driven like a person would drive it: a real
//! headless chromium (through chromium-driver) against a real API server
//! and worker pool, Postgres, Valkey, Docker and git. Nothing here reloads
//! a page to see a change: what is waited for, the page shows by itself.
//! Run with `scripts/test.sh`, which installs chromium and chromium-driver.

mod browser;
mod http;
#[path = "../support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use orchestrator::job::{JobId, JobRequest};
use orchestrator::sandbox::{DockerRuntime, Runtime};
use serde_json::json;

use support::api::TestApi;
use support::{request, unique_queue, RunningPool};

const AGENT: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
timeout_secs = 120
stop_grace_secs = 2
"#;

/// An API server and an in-process worker pool on one queue, with an
/// `agent` kind that runs the job's script in Docker on a local origin.
struct Fixture {
    api: TestApi,
    pool: Option<RunningPool>,
    queue: String,
    bare: PathBuf,
    _tmp: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = support::git::bare_origin(tmp.path(), &[("README.md", "# app\n")]);
    let workers = tmp.path().join("workers");
    std::fs::create_dir_all(workers.join("agent")).expect("mkdir");
    std::fs::write(workers.join("agent").join("worker.toml"), AGENT).expect("kind");
    let data = tmp.path().join("git-data");
    let api = TestApi::spawn_with(move |s| {
        s.git.allow_local = true;
        s.git.data_dir = data;
        s.sandbox.workers_dir = workers;
    })
    .await;
    let queue = unique_queue();
    let pool = api.env.start_pool(api.env.pool_config(&queue, 2));
    Fixture {
        api,
        pool: Some(pool),
        queue,
        bare,
        _tmp: tmp,
    }
}

impl Fixture {
    fn job(&self, script: &str) -> JobRequest {
        request(
            "agent",
            &self.queue,
            json!({ "script": script, "repo": self.bare.to_str().expect("utf-8"), "push": true }),
        )
    }

    async fn enqueue(&self, script: &str) -> JobId {
        self.api
            .env
            .enqueue(vec![self.job(script)])
            .await
            .remove(0)
            .id
    }

    /// This test's containers (its key prefix), running or not.
    async fn containers(&self) -> usize {
        let rt = Runtime::Docker(DockerRuntime::connect().await.expect("docker"));
        rt.list_ours(&self.api.env.app.settings().key_prefix)
            .await
            .expect("list")
            .len()
    }

    async fn shutdown(mut self) {
        if let Some(pool) = self.pool.take() {
            pool.shutdown().await;
        }
    }
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
