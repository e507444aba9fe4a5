//! The auth matrix: every scope against every endpoint.

use reqwest::Method;
use serde_json::json;

use crate::support::api::{json, TestApi, ADMIN, CANCEL, ENQUEUE, READ};

#[tokio::test]
async fn each_scope_against_each_endpoint() {
    let api = TestApi::spawn().await;
    let (_, job) = json(
        api.post_json(
            "/v1/jobs",
            ADMIN,
            json!({ "kind": "noop", "delay_secs": 600 }),
        )
        .await,
    )
    .await;
    let id = job["id"].as_str().expect("id").to_owned();
    // (method, path, body, scope that may call it)
    let endpoints: Vec<(Method, String, Option<serde_json::Value>, &str)> = vec![
        (
            Method::POST,
            "/v1/jobs".into(),
            Some(json!({ "kind": "noop" })),
            "enqueue",
        ),
        (
            Method::POST,
            "/v1/jobs/batch".into(),
            Some(json!({ "jobs": [{ "kind": "noop" }] })),
            "enqueue",
        ),
        (Method::GET, "/v1/jobs".into(), None, "read"),
        (Method::GET, format!("/v1/jobs/{id}"), None, "read"),
        (Method::GET, format!("/v1/jobs/{id}/events"), None, "read"),
        (Method::GET, "/v1/queues".into(), None, "read"),
        (
            Method::POST,
            format!("/v1/jobs/{id}/cancel"),
            Some(json!({ "reason": "matrix" })),
            "cancel",
        ),
        (
            Method::POST,
            format!("/v1/jobs/{id}/retry"),
            Some(json!({})),
            "admin",
        ),
        (
            Method::POST,
            "/v1/queues/matrix/pause".into(),
            Some(json!({})),
            "admin",
        ),
        (
            Method::POST,
            "/v1/queues/matrix/resume".into(),
            Some(json!({})),
            "admin",
        ),
        (Method::GET, "/v1/killswitch".into(), None, "admin"),
        (
            Method::POST,
            "/v1/killswitch".into(),
            Some(json!({ "reason": "matrix" })),
            "admin",
        ),
        (Method::DELETE, "/v1/killswitch".into(), None, "admin"),
        (Method::GET, "/v1/killswitch/events".into(), None, "admin"),
    ];
    let tokens = [
        ("enqueue", ENQUEUE),
        ("read", READ),
        ("cancel", CANCEL),
        ("admin", ADMIN),
    ];
    for (method, path, body, allowed) in &endpoints {
        let send = |token: Option<&str>| {
            let mut r = api.request(method.clone(), path, token);
            if let Some(b) = body {
                r = r.json(b);
            }
            r.send()
        };
        let none = send(None).await.expect("request");
        assert_eq!(
            none.status().as_u16(),
            401,
            "{method} {path} without a token"
        );
        assert_eq!(
            none.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        let wrong = send(Some("wrong-token-0123456789abcdef"))
            .await
            .expect("request");
        assert_eq!(
            wrong.status().as_u16(),
            401,
            "{method} {path} with an unknown token"
        );
        for (scope, token) in tokens {
            let status = send(Some(token)).await.expect("request").status().as_u16();
            let permitted = scope == *allowed || scope == "admin";
            if permitted {
                assert_ne!(status, 403, "{scope} must be allowed {method} {path}");
                assert!(status < 500, "{method} {path}: {status}");
            } else {
                assert_eq!(status, 403, "{scope} must be refused {method} {path}");
            }
        }
    }
}

#[tokio::test]
async fn malformed_authorization_headers_are_401() {
    let api = TestApi::spawn().await;
    for header in [
        "Basic abc",
        "Bearer",
        "bearer read-token-0123456789abcdef",
        "Bearer  read-token-0123456789abcdef",
        "Token x",
    ] {
        let r = api
            .request(Method::GET, "/v1/jobs", None)
            .header("Authorization", header)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 401, "{header:?}");
    }
}

#[tokio::test]
async fn yolo_needs_the_admin_scope_and_is_marked_in_the_trail() {
    let api = TestApi::spawn().await;
    let before = api.footprint().await;
    let job = json!({ "kind": "script-agent", "payload": { "script": "true", "repo": "https://github.com/acme/app.git", "yolo": true } });
    let r = api.post_json("/v1/jobs", ENQUEUE, job.clone()).await;
    assert_eq!(r.status().as_u16(), 403);
    let body: serde_json::Value = r.json().await.expect("problem");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("admin"),
        "{body}"
    );
    let r = api
        .post_json("/v1/jobs/batch", ENQUEUE, json!({ "jobs": [job.clone()] }))
        .await;
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(api.footprint().await, before, "refused, nothing written");

    let (status, created) = json(api.post_json("/v1/jobs", ADMIN, job).await).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let (_, events) = json(api.get(&format!("/v1/jobs/{id}/events"), READ).await).await;
    assert_eq!(events["events"][0]["data"]["yolo"], true, "{events}");
    assert_eq!(events["events"][0]["actor"], "admin");
}

/// A kind with a required gate (`tests`) and an advisory one (`style`).
const GATED: &str = r#"
image = "orchestrator/script-agent:latest"
command = ["sh", "-c", "{script}"]
[[gates.gate]]
name = "tests"
type = "command"
command = ["true"]
profiles = ["standard", "strict"]
[[gates.gate]]
name = "style"
type = "command"
command = ["true"]
required = false
profiles = ["standard", "strict", "minimal"]
"#;

#[tokio::test]
async fn leaving_out_a_required_gate_is_yolo_and_needs_admin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let workers = tmp.path().join("workers");
    std::fs::create_dir_all(workers.join("gated")).expect("mkdir");
    std::fs::write(workers.join("gated/worker.toml"), GATED).expect("kind");
    let api = TestApi::spawn_with(move |s| s.sandbox.workers_dir = workers).await;
    let job = |gates: serde_json::Value| {
        json!({ "kind": "gated", "payload": {
            "script": "true", "repo": "https://github.com/acme/app.git", "gates": gates } })
    };
    let before = api.footprint().await;
    // A custom list without it, none at all, a profile without it.
    for gates in [json!(["style"]), json!([]), json!("minimal")] {
        let r = api.post_json("/v1/jobs", ENQUEUE, job(gates.clone())).await;
        assert_eq!(r.status().as_u16(), 403, "{gates}");
        let body: serde_json::Value = r.json().await.expect("problem");
        assert_eq!(body["field"], "payload.gates", "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("tests"),
            "{body}"
        );
        let r = api
            .post_json(
                "/v1/jobs/batch",
                ENQUEUE,
                json!({ "jobs": [job(gates.clone())] }),
            )
            .await;
        assert_eq!(r.status().as_u16(), 403, "{gates}");
    }
    assert_eq!(api.footprint().await, before, "refused, nothing written");
    // Choices that keep it need no admin and are not YOLO.
    for gates in [json!(["tests"]), json!("strict")] {
        let (status, created) = json(api.post_json("/v1/jobs", ENQUEUE, job(gates)).await).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().expect("id");
        let (_, events) = json(api.get(&format!("/v1/jobs/{id}/events"), READ).await).await;
        assert!(
            events["events"][0]["data"].get("yolo").is_none(),
            "{events}"
        );
    }
    // From an admin it is accepted, and audited exactly like yolo: true.
    let (status, created) = json(api.post_json("/v1/jobs", ADMIN, job(json!([]))).await).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let (_, events) = json(api.get(&format!("/v1/jobs/{id}/events"), READ).await).await;
    assert_eq!(events["events"][0]["data"]["yolo"], true, "{events}");
}

#[tokio::test]
async fn allow_existing_branch_needs_admin() {
    let api = TestApi::spawn().await;
    let job = json!({ "kind": "script-agent", "payload": {
        "script": "true", "repo": "https://github.com/acme/app.git", "branch": "main",
        "push": true, "allow_existing_branch": true } });
    let r = api.post_json("/v1/jobs", ENQUEUE, job.clone()).await;
    assert_eq!(r.status().as_u16(), 403);
    let (status, _) = json(api.post_json("/v1/jobs", ADMIN, job).await).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn a_url_two_parsers_read_differently_is_refused_and_nothing_is_contacted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let api = TestApi::spawn().await;
    let before = api.footprint().await;
    for repo in [
        format!("https://github.com\\@127.0.0.1:{port}/x.git"),
        format!("https://github.com@127.0.0.1:{port}/x.git"),
        format!("https://%31%32%37.0.0.1:{port}/x.git"),
        format!("https://[::1]:{port}/x.git"),
        format!("https://localhost:{port}/x.git"),
    ] {
        let job = json!({ "kind": "script-agent", "payload": { "script": "true", "repo": repo } });
        let r = api.post_json("/v1/jobs", ADMIN, job).await;
        assert_eq!(r.status().as_u16(), 422, "{repo}");
        let body: serde_json::Value = r.json().await.expect("problem");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("payload.repo"),
            "{body}"
        );
    }
    assert_eq!(api.footprint().await, before, "refused, nothing written");
    assert!(
        listener.accept().is_err(),
        "nobody connected to the listener"
    );
}

#[tokio::test]
async fn invented_methods_and_paths_do_not_grow_the_metric_labels() {
    let api = TestApi::spawn().await;
    for i in 0..5 {
        let method = Method::from_bytes(format!("XYZZY{i}").as_bytes()).expect("method");
        let r = api
            .request(method, &format!("/v1/jobs/{i}"), Some(ADMIN))
            .send()
            .await
            .expect("request");
        assert!(r.status().is_client_error(), "{}", r.status());
        let r = api
            .request(Method::GET, &format!("/no-such-route-{i}"), None)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 404);
    }
    let text = api
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(!text.contains("XYZZY"), "a method became a label value");
    assert!(
        !text.contains("no-such-route"),
        "a path became a label value"
    );
    assert!(
        text.contains("method=\"other\""),
        "invented methods share one value"
    );
}
