//! In the browser: log in, watch a job live, cancel, kill all, read only.

use std::time::Duration;

use orchestrator::job::Status;

use super::{fixture, wait_until};
use crate::support::api::{ADMIN, READ};
use crate::support::browser::{docs_dir, Browser};

#[tokio::test]
async fn a_job_appears_progresses_and_finishes_live() {
    let f = fixture().await;
    let b = Browser::start().await;
    b.login(&f.api.base, ADMIN).await;
    assert_eq!(b.text_of("#whoami").await, "admin");

    // The jobs list, open before the job exists.
    b.goto(&format!("{}/ui/jobs?queue={}", f.api.base, f.queue))
        .await;
    b.find("#jobs").await;
    let id = f
        .enqueue(
            "echo '::progress::20 reading the code'; sleep 2; \
             echo 'halfway there'; echo '::progress::70 running the tests'; sleep 2; \
             echo 'all done' | tee notes.txt",
        )
        .await;
    let row = format!("tr[data-job=\"{id}\"]");
    b.find(&row).await;

    // Its page, followed live from the first progress report to the end.
    b.click(&format!("{row} a")).await;
    b.find("#live").await;
    b.wait_text("#progress-percent", "a reported progress", |t| {
        t == "20%" || t == "70%"
    })
    .await;
    b.wait_text("#progress-percent", "70%", |t| t == "70%")
        .await;
    assert_eq!(b.text_of("#progress-message").await, "running the tests");
    b.wait_text("#status", "succeeded", |t| t == "succeeded")
        .await;
    b.wait_text("#log", "the agent's last line", |t| t.contains("all done"))
        .await;
    let log = b.text_of("#log").await;
    assert!(log.contains("halfway there"), "{log}");
    assert!(
        !log.contains("::progress::"),
        "progress lines are not log lines: {log}"
    );
    b.wait_text("#stages", "the stage timeline", |t| {
        ["spawn", "git", "complete"].iter().all(|s| t.contains(s))
    })
    .await;
    b.wait_text("#events", "the audit trail", |t| t.contains("succeeded"))
        .await;
    // The attempts table and the result are refreshed by the page on its
    // own, a moment after the status: waited for, not read once.
    b.wait_text("#attempts", "the attempt succeeded", |t| {
        t.contains("succeeded")
    })
    .await;
    b.wait_text("#result", "the pushed result", |t| {
        t.contains("\"pushed\": true")
    })
    .await;
    let stored = f.api.env.job(id).await;
    assert_eq!(stored.status, Status::Succeeded);
    b.screenshot(&docs_dir().join("dashboard-job.png")).await;

    // The overview: the queue, what finished, the worker.
    b.goto(&format!("{}/ui/", f.api.base)).await;
    let queue_row = format!("#queues tr[data-queue=\"{}\"]", f.queue);
    b.wait_text(&queue_row, "one job succeeded", |t| {
        t.contains("succeeded 1")
    })
    .await;
    // Busy slots are as of the worker's last heartbeat; the total is fixed.
    let workers = b.text_of("#workers").await;
    assert!(
        workers.contains(&f.queue) && workers.contains(" / 2"),
        "{workers}"
    );
    assert!(!workers.contains("missing"), "{workers}");
    assert_eq!(b.text_of("#killswitch-state").await, "off");
    b.screenshot(&docs_dir().join("dashboard-overview.png"))
        .await;
    b.quit().await;
    f.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_agent_from_its_page_removes_its_sandbox() {
    let f = fixture().await;
    let b = Browser::start().await;
    b.login(&f.api.base, ADMIN).await;
    let id = f.enqueue("echo '::progress::5 thinking'; sleep 600").await;
    b.goto(&format!("{}/ui/jobs/{id}", f.api.base)).await;
    b.wait_text("#progress-percent", "the agent running", |t| t == "5%")
        .await;
    assert_eq!(f.containers().await, 1, "the agent's sandbox runs");

    b.type_into("#cancel-reason", "wrong branch").await;
    b.click("#cancel-submit").await;
    b.wait_text("#status", "cancelled", |t| t == "cancelled")
        .await;
    wait_until("the sandbox gone", Duration::from_secs(30), || async {
        f.containers().await == 0
    })
    .await;
    let cancelled = f.api.env.cancelled_event(id).await;
    assert_eq!(cancelled["reason"], "wrong branch", "{cancelled}");
    b.wait_text("#events", "the cancel in the trail", |t| {
        t.contains("wrong branch")
    })
    .await;
    assert!(
        b.find_all("#cancel-form").await.is_empty(),
        "a finished job offers no cancel"
    );
    b.quit().await;
    f.shutdown().await;
}

#[tokio::test]
async fn the_kill_switch_is_engaged_and_lifted_from_the_overview() {
    let f = fixture().await;
    let b = Browser::start().await;
    b.login(&f.api.base, ADMIN).await;

    // A wrong confirmation engages nothing.
    b.type_into("#kill-confirm", "kill everything").await;
    b.type_into("#kill-reason", "drill").await;
    b.click("#kill-submit").await;
    b.wait_text("#problem", "why it was refused", |t| {
        t.contains("\"kill all\"")
    })
    .await;
    assert!(f.api.env.app.kill_switch().await.expect("valkey").is_none());

    b.goto(&format!("{}/ui/", f.api.base)).await;
    b.type_into("#kill-confirm", "kill all").await;
    b.type_into("#kill-reason", "incident drill").await;
    b.click("#kill-submit").await;
    b.wait_text("#killswitch-state", "engaged", |t| t == "engaged")
        .await;
    let banner = b.text_of("#killswitch").await;
    assert!(
        banner.contains("admin") && banner.contains("incident drill"),
        "{banner}"
    );
    let state = f
        .api
        .env
        .app
        .kill_switch()
        .await
        .expect("valkey")
        .expect("engaged");
    assert_eq!(state.actor, "admin");

    b.type_into("#lift-reason", "drill over").await;
    b.click("#lift-submit").await;
    b.wait_text("#killswitch-state", "off", |t| t == "off")
        .await;
    assert!(f.api.env.app.kill_switch().await.expect("valkey").is_none());
    let trail = f
        .api
        .env
        .app
        .control_events(10)
        .await
        .expect("control events");
    assert!(trail.iter().any(|e| e.reason == "drill over"), "{trail:?}");
    b.quit().await;
    f.shutdown().await;
}

#[tokio::test]
async fn a_read_token_sees_everything_and_no_action() {
    let f = fixture().await;
    let id = f.enqueue("echo '::progress::5 thinking'; sleep 600").await;
    let b = Browser::start().await;
    b.login(&f.api.base, READ).await;
    assert_eq!(b.text_of("#whoami").await, "reader");
    let queue_row = format!("#queues tr[data-queue=\"{}\"]", f.queue);
    b.find(&queue_row).await;
    assert!(
        b.find_all(".action").await.is_empty(),
        "no action buttons on the overview"
    );
    assert!(b.find_all("#kill-form").await.is_empty());

    b.goto(&format!("{}/ui/jobs/{id}", f.api.base)).await;
    b.wait_text("#status", "running", |t| t == "running").await;
    assert!(
        b.find_all(".action").await.is_empty(),
        "no action buttons on a job"
    );
    assert!(b.find_all("#cancel-form").await.is_empty());

    // Nothing of a token is in the page, and the script cannot read the
    // session cookie.
    let html = b.script("return document.documentElement.outerHTML;").await;
    let html = html.as_str().expect("html");
    assert!(!html.contains(READ), "the token is in the page");
    let cookies = b.script("return document.cookie;").await;
    assert_eq!(cookies.as_str(), Some(""), "the session cookie is HttpOnly");
    let cookie = b.cookie("orch_session").await.expect("a session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    b.quit().await;
    f.api
        .env
        .app
        .cancel(id, "test", "done")
        .await
        .expect("cancel");
    f.shutdown().await;
}
