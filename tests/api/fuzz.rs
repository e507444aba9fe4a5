//! The API described by its OpenAPI document, checked against the server:
//! coverage of every route, schemathesis fuzzing (no input may cause a 5xx,
//! answers must match the document), and promtool on /metrics.

use std::process::Command;

use reqwest::Method;
use serde_json::json;

use crate::support::api::{json, TestApi, ADMIN, ENQUEUE};

/// The public contract: every route the server answers.
const ROUTES: [(&str, &str); 28] = [
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs/batch"),
    ("get", "/v1/jobs/{id}"),
    ("patch", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/events"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("post", "/v1/jobs/{id}/retry"),
    ("get", "/v1/jobs/{id}/deliveries"),
    ("post", "/v1/jobs/{id}/deliveries/{delivery}/redeliver"),
    ("post", "/v1/webhooks"),
    ("get", "/v1/webhooks"),
    ("delete", "/v1/webhooks/{id}"),
    ("post", "/v1/schedules"),
    ("get", "/v1/schedules"),
    ("get", "/v1/schedules/{id}"),
    ("patch", "/v1/schedules/{id}"),
    ("delete", "/v1/schedules/{id}"),
    ("get", "/v1/queues"),
    ("post", "/v1/queues/{name}/pause"),
    ("post", "/v1/queues/{name}/resume"),
    ("get", "/v1/killswitch"),
    ("post", "/v1/killswitch"),
    ("delete", "/v1/killswitch"),
    ("get", "/v1/killswitch/events"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let api = TestApi::spawn().await;
    let (status, doc) = json(
        api.request(Method::GET, "/v1/openapi.json", None)
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in ROUTES {
        let op = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the document"))[method];
        assert!(op.is_object(), "{method} {path} missing from the document");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
        if path.starts_with("/v1/") {
            assert!(
                op["security"].is_array(),
                "{method} {path} must document its bearer auth"
            );
        }
    }
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "the document lists routes the server does not have"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let api = TestApi::spawn().await;
    // Some jobs to find, so generated ids sometimes hit.
    api.post_json("/v1/jobs", ENQUEUE, json!({ "kind": "noop" }))
        .await;
    let out = tokio::process::Command::new("schemathesis")
        .arg("run")
        .arg(format!("{}/v1/openapi.json", api.base))
        .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "20261122"])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("schemathesis is installed by scripts/test.sh (pip install schemathesis)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let api = TestApi::spawn().await;
    api.post_json("/v1/jobs", ENQUEUE, json!({ "kind": "noop" }))
        .await;
    api.get("/v1/jobs", ADMIN).await;
    let pool = api.env.start_pool(api.env.pool_config("default", 1));
    let ids: Vec<_> = api
        .env
        .app
        .store()
        .list_jobs(&orchestrator::job::JobFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list")
        .iter()
        .map(|j| j.id)
        .collect();
    api.env
        .wait_terminal(&ids, std::time::Duration::from_secs(20))
        .await;
    pool.shutdown().await;
    let text = api
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    for name in [
        "orchestrator_jobs_finished_total",
        "orchestrator_job_run_seconds",
        "orchestrator_http_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    let promtool = std::env::var("ORCH_PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test.sh (Debian's prometheus package)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write metrics");
    }
    let out = child.wait_with_output().expect("promtool");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool: {findings}"
    );
}
