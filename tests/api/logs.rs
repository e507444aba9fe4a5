//! Tokens and payload secrets never reach the logs, even at debug level.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::{free_port, wait_port, TestEnv};

#[tokio::test]
async fn tokens_and_payloads_are_not_logged() {
    let env = TestEnv::new().await;
    let port = free_port();
    let token = "admin-secret-token-Zq81x0PpQ";
    let secret = "sk-live-SECRETPAYLOAD-4242";
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["run", "--concurrency", "2"])
        .env("ORCH_DATABASE_URL", &env.database_url)
        .env("ORCH_VALKEY_URL", &env.valkey_url)
        .env("ORCH_KEY_PREFIX", &env.app.settings().key_prefix)
        .env("ORCH_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ORCH_ADMIN_TOKEN", token)
        .env("ORCH_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log handle"))
        .spawn()
        .expect("spawn orchestrator run");
    wait_port(port, Duration::from_secs(20));
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let r = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(token)
        .json(&json!({ "kind": "sleep", "payload": { "ms": 10, "api_key": secret } }))
        .send()
        .await
        .expect("request");
    // An unknown field: the payload is refused, and still not logged.
    assert_eq!(r.status().as_u16(), 422);
    let r = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(token)
        .json(
            &json!({ "kind": "flaky", "payload": { "fail_times": 1 }, "idempotency_key": secret }),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<serde_json::Value>().await.expect("job")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let wrong = client
        .get(format!("{base}/v1/jobs"))
        .bearer_auth("wrong-secret-token-AAAA1111")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    env.wait_terminal(&[id.parse().expect("id")], Duration::from_secs(20))
        .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(log.path()).expect("read log");
    assert!(
        text.contains("worker starting"),
        "the log was captured: {text}"
    );
    for needle in [token, secret, "wrong-secret-token"] {
        assert!(
            !text.contains(needle),
            "{needle} leaked into the log:\n{text}"
        );
    }
}
