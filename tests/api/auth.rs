//! The auth matrix: every scope against every endpoint.

use reqwest::Method;
use serde_json::json;

use crate::server::{json, TestApi, ADMIN, CANCEL, ENQUEUE, READ};

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
