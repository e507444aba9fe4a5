//! A real API server per test, on port 0, with one token per scope.

use orchestrator::api::{self, ApiState};
use orchestrator::config::TokenSettings;
use orchestrator::job::QueueName;
use orchestrator::secret::Secret;
use reqwest::{Method, RequestBuilder, Response};
use tokio_util::sync::CancellationToken;

use super::env::TestEnv;

pub const ADMIN: &str = "admin-token-0123456789abcdef";
pub const ENQUEUE: &str = "enqueue-token-0123456789abcdef";
pub const READ: &str = "read-token-0123456789abcdef";
pub const CANCEL: &str = "cancel-token-0123456789abcdef";

pub struct TestApi {
    pub env: TestEnv,
    pub base: String,
    pub client: reqwest::Client,
    stop: CancellationToken,
}

impl TestApi {
    pub async fn spawn() -> TestApi {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut orchestrator::config::Settings)) -> TestApi {
        let env = TestEnv::with_settings(|s| {
            s.admin_token = Some(Secret::new(ADMIN));
            s.api.body_limit_bytes = 64 * 1024;
            for (name, token, scope) in [
                ("enqueuer", ENQUEUE, orchestrator::auth::Scope::Enqueue),
                ("reader", READ, orchestrator::auth::Scope::Read),
                ("canceller", CANCEL, orchestrator::auth::Scope::Cancel),
            ] {
                s.api.tokens.push(TokenSettings {
                    name: name.to_owned(),
                    token: Secret::new(token),
                    scopes: vec![scope],
                });
            }
            adjust(s);
        })
        .await;
        let handle = orchestrator::metrics::install().expect("metrics recorder");
        let state = ApiState::new(env.app.clone(), handle);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        tokio::spawn(api::serve(listener, api::router(state), stop.clone()));
        TestApi {
            env,
            base,
            client: reqwest::Client::new(),
            stop,
        }
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn post_json(&self, path: &str, token: &str, body: serde_json::Value) -> Response {
        self.request(Method::POST, path, Some(token))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path, Some(token))
            .send()
            .await
            .expect("request")
    }

    /// Rows in `jobs` and ids in the default queue's index: what a rejected
    /// request must leave unchanged.
    pub async fn footprint(&self) -> (i64, i64, u64) {
        let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(self.env.app.store().pool())
            .await
            .expect("count");
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events")
            .fetch_one(self.env.app.store().pool())
            .await
            .expect("count");
        let d = self
            .env
            .app
            .queue()
            .depth(&QueueName::default_queue())
            .await
            .expect("depth");
        (jobs, events, d.pending() + d.delayed + d.active)
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The status and the JSON body of a response.
pub async fn json(r: Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Asserts a problem+json error with `status`, returning its detail.
pub async fn problem(r: Response, status: u16) -> serde_json::Value {
    assert_eq!(r.status().as_u16(), status, "unexpected status");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: serde_json::Value = r.json().await.expect("problem body");
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| d.len() > 10),
        "a problem says what is wrong: {body}"
    );
    body
}
