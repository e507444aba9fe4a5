//! The dashboard's login, session and CSRF rules, checked over plain HTTP
//! (what a forger would send has no browser to help it).

use reqwest::header::{HeaderMap, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use reqwest::{Client, StatusCode};

use crate::support::api::{TestApi, ADMIN, READ};

fn client() -> Client {
    Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

/// Logs in with `token`; returns the `Cookie` header value and the CSRF
/// token from the overview's forms.
async fn login(api: &TestApi, token: &str, headers: HeaderMap) -> (String, String, String) {
    let r = client()
        .post(format!("{}/ui/login", api.base))
        .headers(headers)
        .form(&[("token", token)])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set_cookie = r
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let page = client()
        .get(format!("{}/ui/", api.base))
        .header(COOKIE, &cookie)
        .header("accept", "text/html")
        .send()
        .await
        .expect("overview")
        .text()
        .await
        .expect("html");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF field")
        .to_owned();
    (cookie, csrf, set_cookie)
}

async fn engaged(api: &TestApi) -> bool {
    api.env.app.kill_switch().await.expect("valkey").is_some()
}

#[tokio::test]
async fn a_login_sets_a_strict_cookie_and_a_bad_token_is_refused() {
    let api = TestApi::spawn().await;
    let r = client()
        .get(format!("{}/ui/", api.base))
        .header("accept", "text/html")
        .send()
        .await
        .expect("overview");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/ui/login");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    let bad = client()
        .post(format!("{}/ui/login", api.base))
        .form(&[("token", "not-a-token-at-all-0000")])
        .send()
        .await
        .expect("login");
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert!(bad.headers().get(SET_COOKIE).is_none());

    let (_, _, plain) = login(&api, ADMIN, HeaderMap::new()).await;
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(plain.contains(attr), "{plain}");
    }
    assert!(!plain.contains("Secure"), "no TLS, no Secure: {plain}");
    assert!(!plain.contains(ADMIN), "the cookie is not the token");
    let mut tls = HeaderMap::new();
    tls.insert("x-forwarded-proto", "https".parse().expect("header"));
    let (_, _, secure) = login(&api, ADMIN, tls).await;
    assert!(secure.contains("; Secure"), "{secure}");

    // Valkey holds no token and no usable session id.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}:ui:session:*",
            api.env.app.settings().key_prefix
        ))
        .query_async(
            &mut redis::Client::open(api.env.valkey_url.as_str())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("valkey"),
        )
        .await
        .expect("keys");
    assert_eq!(keys.len(), 2, "{keys:?}");
    let session_id = plain
        .split(';')
        .next()
        .and_then(|c| c.split('=').nth(1))
        .expect("id");
    assert!(keys.iter().all(|k| !k.contains(session_id)), "{keys:?}");
}

#[tokio::test]
async fn a_forged_post_without_the_csrf_token_is_refused_and_changes_nothing() {
    let api = TestApi::spawn().await;
    let (cookie, csrf, _) = login(&api, ADMIN, HeaderMap::new()).await;
    let post = |form: Vec<(&'static str, String)>| {
        client()
            .post(format!("{}/ui/killswitch", api.base))
            .header(COOKIE, &cookie)
            .form(&form)
    };
    let kill = |csrf: &str| {
        vec![
            ("confirm", "kill all".to_owned()),
            ("reason", "forged".to_owned()),
            ("csrf", csrf.to_owned()),
        ]
    };
    // No token, a wrong one, and the right one sent from another site.
    let without: Vec<_> = kill("").into_iter().filter(|(k, _)| *k != "csrf").collect();
    let r = post(without).send().await.expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.expect("problem");
    assert_eq!(body["field"], "csrf", "{body}");
    let r = post(kill("A".repeat(43).as_str()))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(kill(&csrf))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(kill(&csrf))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(!engaged(&api).await, "nothing was engaged");

    // Without a session at all: 401, whatever the form holds.
    let r = client()
        .post(format!("{}/ui/killswitch", api.base))
        .form(&kill(&csrf))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A read token's session, with its own valid CSRF token: the scope
    // refuses it.
    let (read_cookie, read_csrf, _) = login(&api, READ, HeaderMap::new()).await;
    let r = client()
        .post(format!("{}/ui/killswitch", api.base))
        .header(COOKIE, &read_cookie)
        .form(&kill(&read_csrf))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(!engaged(&api).await);

    // A cookie of the same name planted next to the real one hides nothing.
    let planted = format!("orch_session={}; {cookie}", "B".repeat(43));
    let r = client()
        .get(format!("{}/ui/?fragment=1", api.base))
        .header(COOKIE, planted)
        .send()
        .await
        .expect("overview");
    assert_eq!(r.status(), StatusCode::OK);

    // The real form, from this site behind a proxy that rewrote Host,
    // works; logging out ends the session.
    let r = post(kill(&csrf))
        .header("origin", "https://dash.example.com")
        .header("x-forwarded-host", "dash.example.com")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(engaged(&api).await);
    api.env.app.resume("test", "over").await.expect("resume");
    let r = client()
        .post(format!("{}/ui/logout", api.base))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = client()
        .get(format!("{}/ui/?fragment=1", api.base))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("after logout");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn hostile_form_input_gets_a_clear_error() {
    let api = TestApi::spawn().await;
    let (cookie, csrf, _) = login(&api, ADMIN, HeaderMap::new()).await;
    let job = api
        .env
        .enqueue(vec![crate::support::request(
            "noop",
            "ui-hostile",
            serde_json::json!({}),
        )])
        .await
        .remove(0);
    let cancel = |reason: String| {
        client()
            .post(format!("{}/ui/jobs/{}/cancel", api.base, job.id))
            .header(COOKIE, &cookie)
            .form(&[("csrf", csrf.clone()), ("reason", reason)])
            .send()
    };
    let r = cancel("bad\u{0}reason".to_owned()).await.expect("post");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = cancel("x".repeat(64 * 1024)).await.expect("post");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = client()
        .get(format!("{}/ui/jobs?status=nonsense", api.base))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = client()
        .get(format!("{}/ui/jobs/..%2F..%2Fetc", api.base))
        .header(COOKIE, &cookie)
        .header("accept", "text/html")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let page = r.text().await.expect("html");
    assert!(page.contains("is not a job id"), "{page}");
    assert_eq!(
        api.env.job(job.id).await.status,
        orchestrator::job::Status::Queued,
        "nothing changed"
    );
    // Whatever a producer or an operator wrote is shown as text, never as
    // markup.
    let r = cancel("<script>alert(1)</script><img src=x onerror=alert(2)>".to_owned())
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let page = client()
        .get(format!("{}/ui/jobs/{}", api.base, job.id))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        !page.contains("<script>alert") && !page.contains("<img src=x"),
        "{page}"
    );
}

#[tokio::test]
async fn the_overview_flags_a_missing_worker_and_lists_the_last_failures() {
    let api = TestApi::spawn().await;
    let (cookie, _, _) = login(&api, ADMIN, HeaderMap::new()).await;
    let queue = crate::support::unique_queue();
    // A live pool, and a worker that stopped beating two leases ago (as a
    // SIGKILLed one leaves its entry).
    let pool = api.env.start_pool(api.env.pool_config(&queue, 2));
    let prefix = api.env.app.settings().key_prefix.clone();
    let lease_ms = api.env.app.settings().worker.lease_ms as i64;
    let mut conn = redis::Client::open(api.env.valkey_url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("valkey");
    let _: () = redis::pipe()
        .zadd(
            format!("{prefix}:workers"),
            "ghost-worker",
            chrono::Utc::now().timestamp_millis() - 2 * lease_ms,
        )
        .hset_multiple(
            format!("{prefix}:worker:ghost-worker"),
            &[("host", "gone-host"), ("concurrency", "4"), ("busy", "3")],
        )
        .query_async(&mut conn)
        .await
        .expect("registry");
    let mut flaky =
        crate::support::request("flaky", &queue, serde_json::json!({ "fail_times": 5 }));
    flaky.max_attempts = Some(1);
    let job = api.env.enqueue(vec![flaky]).await.remove(0);
    api.env
        .wait_terminal(&[job.id], std::time::Duration::from_secs(30))
        .await;

    let page = client()
        .get(format!("{}/ui/?fragment=1", api.base))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("overview")
        .text()
        .await
        .expect("html");
    let ghost = page
        .split("<tr")
        .find(|row| row.contains("data-worker=\"ghost-worker\""))
        .expect("the missing worker is listed");
    assert!(
        ghost.contains("class=\"missing\"") && ghost.contains(">missing<"),
        "{ghost}"
    );
    assert!(
        ghost.contains("gone-host") && ghost.contains("3 / 4"),
        "{ghost}"
    );
    let live = page
        .split("<tr")
        .find(|row| row.contains("data-worker=") && !row.contains("ghost-worker"))
        .expect("the live pool is listed");
    assert!(!live.contains("class=\"missing\""), "{live}");
    let failures = page
        .split("id=\"failures\"")
        .nth(1)
        .expect("failures table");
    assert!(
        failures.contains(&format!("/ui/jobs/{}", job.id)),
        "{failures}"
    );
    assert!(failures.contains("dead"), "{failures}");
    let queue_row = page
        .split("<tr")
        .find(|row| row.contains(&format!("data-queue=\"{queue}\"")))
        .expect("the queue is listed");
    assert!(queue_row.contains("dead 1"), "{queue_row}");
    pool.shutdown().await;
}
