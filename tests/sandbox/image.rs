//! The container image (`Dockerfile`, target `prebuilt`): built from the
//! binary under test on the locally made `debian:bookworm-slim`
//! (`scripts/lib/images.sh`), then run on the host network against this
//! test's Postgres database and Valkey: `run` (with the Docker socket, as
//! root, as workers run) finishes a job, and `serve` works as the
//! unprivileged user; both on a read-only root filesystem.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use orchestrator::job::Status;

use crate::docker_cli;
use crate::support::{free_port, TestEnv};

const TOKEN: &str = "image-test-admin-token-0123";

/// Removes the test's containers and image, whatever happened.
struct Cleanup {
    image: String,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// A build context with the Dockerfile, the kinds and the binary under test
/// (its debug sections stripped, as the Dockerfile advises).
fn context() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ctx = tempfile::tempdir().expect("tempdir");
    std::fs::copy(root.join("Dockerfile"), ctx.path().join("Dockerfile")).expect("Dockerfile");
    let status = Command::new("cp")
        .args(["-r", root.join("workers").to_str().expect("utf-8")])
        .arg(ctx.path())
        .status()
        .expect("cp");
    assert!(status.success());
    let bin = ctx.path().join("target/release");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let bin = bin.join("orchestrator");
    std::fs::copy(env!("CARGO_BIN_EXE_orchestrator"), &bin).expect("binary");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg(&bin)
        .status()
        .expect("strip");
    assert!(status.success());
    ctx
}

/// Starts the image read-only on the host network with `command`, and
/// `extra` options.
fn start(env: &TestEnv, image: &str, name: &str, port: u16, command: &str, extra: &[&str]) {
    let addr = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let vars = [
        format!("ORCH_DATABASE_URL={}", env.database_url),
        format!("ORCH_VALKEY_URL={}", env.valkey_url),
        format!("ORCH_KEY_PREFIX={}", env.app.settings().key_prefix),
        format!("ORCH_HTTP_ADDR={addr}"),
        format!("ORCH_METRICS_ADDR={metrics}"),
        format!("ORCH_ADMIN_TOKEN={TOKEN}"),
    ];
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/lib/orchestrator:uid=10001,mode=0700",
    ];
    for var in &vars {
        args.extend_from_slice(&["-e", var]);
    }
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, command]);
    docker_cli(&args);
}

/// Waits for `/readyz` to answer 200, or panics with the container's log.
async fn wait_ready(http: &reqwest::Client, name: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return;
        }
        if Instant::now() > deadline {
            let logs = Command::new("docker")
                .args(["logs", name])
                .output()
                .expect("logs");
            panic!(
                "{name} never became ready: {}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The uid of the container's first process, and whether its root
/// filesystem refuses a write.
fn uid_and_read_only(name: &str) -> (String, bool) {
    let status = docker_cli(&["exec", name, "cat", "/proc/1/status"]);
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    let write = Command::new("docker")
        .args(["exec", name, "sh", "-c", "echo x > /usr/local/bin/x"])
        .output()
        .expect("exec");
    (uid, !write.status.success())
}

#[tokio::test]
async fn the_image_runs_a_job_and_serves_as_a_non_root_user_on_a_read_only_root() {
    let env = TestEnv::new().await;
    let tag = format!("orchestrator-image-test:{}", uuid::Uuid::new_v4().simple());
    let mut cleanup = Cleanup {
        image: tag.clone(),
        containers: Vec::new(),
    };
    let ctx = context();
    docker_cli(&[
        "build",
        "-q",
        "--network",
        "host",
        "--target",
        "prebuilt",
        "-t",
        &tag,
        ctx.path().to_str().expect("utf-8"),
    ]);
    let size: u64 = docker_cli(&["image", "inspect", "-f", "{{.Size}}", &tag])
        .parse()
        .expect("size");
    eprintln!("image {tag}: {} MB (binary under test)", size / 1_000_000);
    assert_eq!(
        docker_cli(&["image", "inspect", "-f", "{{.Config.User}}", &tag]),
        "orchestrator"
    );

    // `run`: migrates its database, serves the API and works.
    let http = reqwest::Client::new();
    let run = format!(
        "orch-image-run-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    cleanup.containers.push(run.clone());
    let port = free_port();
    // Its workers need the Docker daemon (isolation fails closed: without
    // it the process is not ready), hence the socket and root, as the
    // Dockerfile says of workers.
    start(
        &env,
        &tag,
        &run,
        port,
        "run",
        &[
            "--user",
            "0",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
        ],
    );
    wait_ready(&http, &run, port).await;
    let created: serde_json::Value = http
        .post(format!("http://127.0.0.1:{port}/v1/jobs"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "kind": "noop", "queue": "default" }))
        .send()
        .await
        .expect("enqueue")
        .json()
        .await
        .expect("json");
    let id = created["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id");
    let done = env.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!(
        done[0].status,
        Status::Succeeded,
        "{:?}",
        done[0].last_error
    );
    assert_eq!(uid_and_read_only(&run), ("0".to_owned(), true));

    // `serve`: the same, without workers.
    let serve = format!(
        "orch-image-serve-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    cleanup.containers.push(serve.clone());
    let port = free_port();
    start(&env, &tag, &serve, port, "serve", &[]);
    wait_ready(&http, &serve, port).await;
    let job: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/v1/jobs/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(job["status"], "succeeded");
    assert_eq!(uid_and_read_only(&serve), ("10001".to_owned(), true));
    drop(cleanup);
}
