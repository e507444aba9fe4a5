//! The dashboard's markup. maud escapes every interpolated value, so a job's
//! payload, an error or a log line is shown as text, never read as HTML.
//! Nothing here writes a `style` attribute or an inline script: the CSP
//! forbids both.

use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::actions::KILL_CONFIRMATION;
use super::pages::JobsQuery;
use super::session::Session;
use crate::app::{Overview, THROUGHPUT_WINDOW};
use crate::auth::Scope;
use crate::job::{Job, JobEvent, JobId, Status};

const STATUSES: [&str; 6] = [
    "queued",
    "scheduled",
    "running",
    "succeeded",
    "dead",
    "cancelled",
];

fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn duration_ms(ms: i64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1_000.0)
    } else {
        format!("{:.1} min", ms as f64 / 60_000.0)
    }
}

fn ago(at: &DateTime<Utc>) -> String {
    let ms = Utc::now()
        .signed_duration_since(*at)
        .num_milliseconds()
        .max(0);
    format!("{} ago", duration_ms(ms))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn status_badge(status: Status) -> Markup {
    html! { span class={ "status status-" (status.as_str()) } { (status.as_str()) } }
}

fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · orchestrator" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/ui/" { "orchestrator" }
                    @if let Some(session) = session {
                        nav {
                            a href="/ui/" { "Overview" }
                            a href="/ui/jobs" { "Jobs" }
                            form.search method="get" action="/ui/jobs" {
                                input type="search" name="id" placeholder="job id" aria-label="job id";
                            }
                        }
                        div.who {
                            span #whoami { (session.caller.name) }
                            " "
                            span.scopes {
                                @for s in &session.caller.scopes { (s.as_str()) " " }
                            }
                            form.logout method="post" action="/ui/logout" {
                                (csrf_field(session))
                                button #logout type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login_page(error: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            section.login {
                h1 { "Log in" }
                p { "Paste an API token. It is checked once and never kept: the session remembers only the token's name." }
                @if let Some(error) = error { p.error #login-error { (error) } }
                form method="post" action="/ui/login" {
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="off" required;
                    button #login type="submit" { "Log in" }
                }
            }
        },
    )
}

pub fn error_page(status: axum::http::StatusCode, detail: &str) -> Markup {
    page(
        "Error",
        None,
        html! {
            section.problem {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                p #problem { (detail) }
                p { a href="/ui/" { "Back to the overview" } }
            }
        },
    )
}

pub fn overview_page(overview: &Overview, session: &Session) -> Markup {
    let admin = session.caller.can(Scope::Admin);
    page(
        "Overview",
        Some(session),
        html! {
            section #live data-live="/ui/?fragment=1" data-every="2000" {
                (overview_live(overview, session))
            }
            @if admin {
                section.controls {
                    @if overview.kill_switch.engaged {
                        form #lift-form method="post" action="/ui/killswitch/lift" {
                            h2 { "Lift the kill switch" }
                            (csrf_field(session))
                            input #lift-reason type="text" name="reason" placeholder="reason" required maxlength="500";
                            button #lift-submit.action type="submit" { "Resume everything" }
                        }
                    } @else {
                        form #kill-form method="post" action="/ui/killswitch" {
                            h2 { "Kill all" }
                            p { "Pauses every queue and stops every running job on every worker. Type "
                                code { (KILL_CONFIRMATION) } " to confirm." }
                            (csrf_field(session))
                            input #kill-confirm type="text" name="confirm" placeholder=(KILL_CONFIRMATION) required autocomplete="off";
                            input #kill-reason type="text" name="reason" placeholder="reason" required maxlength="500";
                            button #kill-submit.action.danger type="submit" { "Kill all" }
                        }
                    }
                }
            }
        },
    )
}

/// The part of the overview the script refreshes.
pub fn overview_live(overview: &Overview, session: &Session) -> Markup {
    let admin = session.caller.can(Scope::Admin);
    let ks = &overview.kill_switch;
    let minutes = THROUGHPUT_WINDOW.as_secs() / 60;
    html! {
        div #killswitch class=(if ks.engaged { "banner engaged" } else { "banner" }) {
            "Kill switch: "
            strong #killswitch-state { (if ks.engaged { "engaged" } else { "off" }) }
            @if ks.engaged {
                " by " (ks.actor.as_deref().unwrap_or("?"))
                " since " (ks.since.as_deref().unwrap_or("?"))
                ": " (ks.reason.as_deref().unwrap_or(""))
            }
        }
        h2 { "Queues" }
        table #queues {
            thead { tr {
                th { "queue" } th { "pending" } th { "delayed" } th { "active" }
                th { "unfinished (Postgres)" }
                th { "finished / " (minutes) " min" } th { "per minute" } th { "state" }
                @if admin { th {} }
            } }
            tbody {
                @for q in &overview.queues {
                    @let done = overview.finished.get(&q.name).cloned().unwrap_or_default();
                    tr data-queue=(q.name) {
                        td { a href={ "/ui/jobs?queue=" (q.name) } { (q.name) } }
                        td.num { (q.pending) }
                        td.num { (q.delayed) }
                        td.num { (q.active) }
                        td { @for (status, n) in &q.jobs { span.count { (status) " " (n) } " " } }
                        td { span.count { "succeeded " (done.succeeded) } " "
                             span.count { "dead " (done.dead) } " "
                             span.count { "cancelled " (done.cancelled) } }
                        td.num { (format!("{:.1}", done.per_minute())) }
                        td.state {
                            @if q.paused { span.flag.paused { "paused" } " " }
                            @if q.halted { span.flag.halted { "halted" } }
                            @if !q.paused && !q.halted { "running" }
                        }
                        @if admin {
                            td {
                                @let verb = if q.paused { "resume" } else { "pause" };
                                form method="post" action={ "/ui/queues/" (q.name) "/" (verb) } {
                                    (csrf_field(session))
                                    button class={ "action " (verb) } type="submit" { (verb) }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Workers" }
        table #workers {
            thead { tr { th { "id" } th { "host" } th { "queues" } th { "slots busy / total" } th { "last heartbeat" } th {} } }
            tbody {
                @for w in &overview.workers {
                    tr.missing[w.missing] data-worker=(w.id) {
                        td { code { (w.id) } }
                        td { (w.host) }
                        td { (w.queues.join(", ")) }
                        td.num {
                            (w.busy.map(|b| b.to_string()).unwrap_or_else(|| "?".into()))
                            " / "
                            (w.slots.map(|b| b.to_string()).unwrap_or_else(|| "?".into()))
                        }
                        td { (ago(&w.last_beat)) }
                        td { @if w.missing { span.flag.halted { "missing" } } }
                    }
                }
            }
        }
        h2 { "Last failures" }
        table #failures {
            thead { tr { th { "at" } th { "job" } th { "queue" } th { "kind" } th { "attempt" } th { "outcome" } th { "error" } } }
            tbody {
                @for f in &overview.failures {
                    tr {
                        td { (when(&f.at)) }
                        td { a href={ "/ui/jobs/" (f.job_id) } { code { (short_id(f.job_id)) } } }
                        td { (f.queue) }
                        td { (f.kind) }
                        td.num { (f.attempt.map(|a| a.to_string()).unwrap_or_default()) }
                        td { (if f.dead { "dead" } else { "retried" }) }
                        td.error { (f.error) }
                    }
                }
            }
        }
    }
}

fn short_id(id: JobId) -> String {
    id.to_string().chars().take(8).collect()
}

pub fn jobs_page(
    session: &Session,
    query: &JobsQuery,
    queues: &[String],
    jobs: &[Job],
    next: Option<JobId>,
) -> Markup {
    let filters = |cursor: Option<JobId>| {
        let mut url = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("queue", &query.queue),
            ("status", &query.status),
            ("kind", &query.kind),
        ] {
            if !v.is_empty() {
                url.append_pair(k, v);
            }
        }
        if let Some(c) = cursor {
            url.append_pair("cursor", &c.to_string());
        }
        url.finish()
    };
    let mut live = filters(None);
    if !query.cursor.is_empty() {
        live = format!(
            "{live}&cursor={}",
            url::form_urlencoded::byte_serialize(query.cursor.as_bytes()).collect::<String>()
        );
    }
    page(
        "Jobs",
        Some(session),
        html! {
            h1 { "Jobs" }
            form.filters #filters method="get" action="/ui/jobs" {
                label { "queue "
                    select name="queue" #filter-queue {
                        option value="" { "any" }
                        @for q in queues { option value=(q) selected[*q == query.queue] { (q) } }
                    }
                }
                label { "status "
                    select name="status" #filter-status {
                        option value="" { "any" }
                        @for s in STATUSES { option value=(s) selected[s == query.status] { (s) } }
                    }
                }
                label { "kind " input name="kind" #filter-kind value=(query.kind) maxlength="64"; }
                button type="submit" { "Filter" }
            }
            table #jobs {
                thead { tr { th { "id" } th { "queue" } th { "kind" } th { "status" } th { "stage" } th { "progress" } th { "attempt" } th { "created" } th { "updated" } } }
                tbody data-live={ "/ui/jobs?fragment=1&" (live) } data-every="2000" {
                    (job_rows(jobs))
                }
            }
            nav.pages {
                @if !query.cursor.is_empty() { a href={ "/ui/jobs?" (filters(None)) } { "← newest" } " " }
                @if let Some(next) = next { a #older href={ "/ui/jobs?" (filters(Some(next))) } { "older →" } }
            }
        },
    )
}

pub fn job_rows(jobs: &[Job]) -> Markup {
    html! {
        @for j in jobs {
            tr data-job=(j.id) {
                td { a href={ "/ui/jobs/" (j.id) } { code { (short_id(j.id)) } } }
                td { (j.queue) }
                td { (j.kind) }
                td { (status_badge(j.status)) }
                td { (j.stage.as_deref().unwrap_or("")) }
                td { @if let Some(p) = &j.progress { progress max="100" value=(p.percent) {} " " (p.percent) "%" } }
                td.num { (j.attempt) " / " (j.max_attempts) }
                td { (when(&j.created_at)) }
                td { (ago(&j.updated_at)) }
            }
        }
        @if jobs.is_empty() { tr { td colspan="9" { "No jobs match." } } }
    }
}

pub fn job_page(session: &Session, job: &Job, events: &[JobEvent]) -> Markup {
    let last = events.last().map(|e| e.id).unwrap_or(0);
    let (logs, trail): (Vec<&JobEvent>, Vec<&JobEvent>) =
        events.iter().partition(|e| e.kind == "log");
    page(
        &format!("Job {}", short_id(job.id)),
        Some(session),
        html! {
            h1 { "Job " code { (job.id) } }
            section #live data-live={ "/ui/jobs/" (job.id) "/summary" } {
                (job_live(session, job, events))
            }
            h2 { "Spec" }
            dl.spec {
                dt { "queue" } dd { (job.queue) }
                dt { "kind" } dd { (job.kind) }
                dt { "priority" } dd { (job.priority) }
                dt { "max attempts" } dd { (job.max_attempts) }
                dt { "backoff" } dd { (duration_ms(job.backoff_base_ms as i64)) " to " (duration_ms(job.backoff_cap_ms as i64)) }
                dt { "timeout" } dd { (job.timeout_secs) " s" }
                dt { "run at" } dd { (when(&job.run_at)) }
                @if let Some(key) = &job.idempotency_key { dt { "idempotency key" } dd { code { (key) } } }
                dt { "created" } dd { (when(&job.created_at)) }
            }
            pre.json #payload { (pretty(&job.payload)) }
            h2 { "Log" }
            div #log.log data-events={ "/ui/jobs/" (job.id) "/events?after=" (last) } {
                @for e in &logs { (log_line(e)) }
            }
            h2 { "Audit trail" }
            table #events {
                thead { tr { th { "#" } th { "at" } th { "event" } th { "actor" } th { "data" } } }
                tbody {
                    @for e in &trail {
                        tr { td.num { (e.id) } td { (when(&e.at)) } td { (e.kind) } td { (e.actor) } td { code.data { (compact(&e.data)) } } }
                    }
                }
            }
        },
    )
}

fn compact(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        v => serde_json::to_string(v).unwrap_or_default(),
    }
}

fn log_line(e: &JobEvent) -> Markup {
    let stream = e
        .data
        .get("stream")
        .and_then(Value::as_str)
        .unwrap_or("stdout");
    let line = e.data.get("line").and_then(Value::as_str).unwrap_or("");
    html! { div class={ "line " (if stream == "stderr" { "stderr" } else { "stdout" }) } { (line) } }
}

/// A stage as the audit trail tells it.
struct Stage<'a> {
    name: &'a str,
    started: DateTime<Utc>,
    duration_ms: Option<i64>,
    ok: Option<bool>,
}

fn stages(events: &[JobEvent]) -> Vec<Stage<'_>> {
    let mut out: Vec<Stage<'_>> = Vec::new();
    for e in events {
        let name = e.data.get("stage").and_then(Value::as_str).unwrap_or("");
        match e.kind.as_str() {
            "stage_started" => out.push(Stage {
                name,
                started: e.at,
                duration_ms: None,
                ok: None,
            }),
            "stage_finished" => {
                if let Some(s) = out
                    .iter_mut()
                    .rev()
                    .find(|s| s.name == name && s.ok.is_none())
                {
                    s.duration_ms = e.data.get("duration_ms").and_then(Value::as_i64);
                    s.ok = e.data.get("ok").and_then(Value::as_bool);
                }
            }
            _ => {}
        }
    }
    out
}

/// An attempt: from its `started` event to the event that ended it.
struct Attempt {
    number: i64,
    started: DateTime<Utc>,
    ended: Option<(DateTime<Utc>, String)>,
    error: Option<String>,
}

fn attempts(events: &[JobEvent]) -> Vec<Attempt> {
    let mut out: Vec<Attempt> = Vec::new();
    for e in events {
        match e.kind.as_str() {
            "started" => out.push(Attempt {
                number: e
                    .data
                    .get("attempt")
                    .and_then(Value::as_i64)
                    .unwrap_or(out.len() as i64 + 1),
                started: e.at,
                ended: None,
                error: None,
            }),
            "succeeded" | "failed" | "dead" | "cancelled" | "released" | "reaped" => {
                if let Some(a) = out.last_mut().filter(|a| a.ended.is_none()) {
                    a.ended = Some((e.at, e.kind.clone()));
                    a.error = e
                        .data
                        .get("error")
                        .or_else(|| e.data.get("reason"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
            }
            _ => {}
        }
    }
    out
}

/// The part of a job's page that changes as it runs, re-fetched by the
/// script whenever an event arrives.
pub fn job_live(session: &Session, job: &Job, events: &[JobEvent]) -> Markup {
    let result = job.result.as_ref();
    let gates = result
        .and_then(|r| r.get("gates"))
        .and_then(Value::as_object);
    let findings = result
        .and_then(|r| r.get("findings"))
        .and_then(Value::as_array);
    html! {
        div.summary data-terminal=(job.status.is_terminal()) {
            p.headline {
                span #status { (status_badge(job.status)) }
                @if let Some(stage) = &job.stage { " stage " strong #stage { (stage) } }
                " · attempt " (job.attempt) " of " (job.max_attempts)
                " · version " span #version { (job.version) }
                @if let Some(w) = &job.worker_id { " · worker " code { (w) } }
            }
            div.progress {
                @let percent = job.progress.as_ref().map(|p| p.percent).unwrap_or(if job.status == Status::Succeeded { 100 } else { 0 });
                progress #progress max="100" value=(percent) {}
                " " span #progress-percent { (percent) "%" }
                @if let Some(p) = &job.progress {
                    " " span #progress-message { (p.message) } " " span.muted { (ago(&p.at)) }
                }
            }
            @if let Some(err) = &job.last_error { p.error #last-error { (err) } }
            @if !job.status.is_terminal() && session.caller.can(Scope::Cancel) {
                form #cancel-form.inline method="post" action={ "/ui/jobs/" (job.id) "/cancel" } {
                    (csrf_field(session))
                    input #cancel-reason type="text" name="reason" placeholder="why cancel?" required maxlength="500";
                    button #cancel-submit.action.danger type="submit" { "Cancel job" }
                }
            }
            @if job.status == Status::Dead && session.caller.can(Scope::Admin) {
                form #retry-form.inline method="post" action={ "/ui/jobs/" (job.id) "/retry" } {
                    (csrf_field(session))
                    button #retry-submit.action type="submit" { "Retry with fresh attempts" }
                }
            }
            h2 { "Stages" }
            table #stages {
                thead { tr { th { "stage" } th { "started" } th { "duration" } th { "outcome" } } }
                tbody {
                    @for s in stages(events) {
                        tr {
                            td { (s.name) }
                            td { (when(&s.started)) }
                            td.num { (s.duration_ms.map(duration_ms).unwrap_or_else(|| format!("running {}", ago(&s.started)))) }
                            td { @match s.ok { Some(true) => "ok", Some(false) => span.error { "failed" }, None => "…" } }
                        }
                    }
                }
            }
            h2 { "Attempts" }
            table #attempts {
                thead { tr { th { "#" } th { "started" } th { "ended" } th { "outcome" } th { "error" } } }
                tbody {
                    @for a in attempts(events) {
                        tr {
                            td.num { (a.number) }
                            td { (when(&a.started)) }
                            td { @if let Some((at, _)) = &a.ended { (duration_ms(at.signed_duration_since(a.started).num_milliseconds())) " later" } }
                            td { @if let Some((_, how)) = &a.ended { (how) } @else { "running" } }
                            td.error { (a.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
            @if let Some(gates) = gates.filter(|g| !g.is_empty()) {
                h2 { "Gates" }
                table #gates {
                    thead { tr { th { "gate" } th { "type" } th { "required" } th { "passed" } th { "duration" } th { "detail" } } }
                    tbody {
                        @for (name, g) in gates {
                            tr {
                                td { (name) }
                                td { (g.get("type").and_then(Value::as_str).unwrap_or("")) }
                                td { (if g.get("required").and_then(Value::as_bool).unwrap_or(false) { "required" } else { "advisory" }) }
                                td { (if g.get("passed").and_then(Value::as_bool).unwrap_or(false) { "passed" } else { "failed" }) }
                                td.num { (g.get("duration_ms").and_then(Value::as_i64).map(duration_ms).unwrap_or_default()) }
                                td { (g.get("detail").and_then(Value::as_str).unwrap_or("")) }
                            }
                        }
                    }
                }
            }
            @if let Some(findings) = findings {
                h2 { "Secret findings" }
                p.muted { "Where a secret was found; the secret itself is never stored." }
                table #findings {
                    thead { tr { th { "rule" } th { "file" } th { "line" } th { "description" } } }
                    tbody {
                        @for f in findings {
                            tr {
                                td { (f.get("rule_id").and_then(Value::as_str).unwrap_or("")) }
                                td { code { (f.get("file").and_then(Value::as_str).unwrap_or("")) } }
                                td.num { (f.get("line").and_then(Value::as_u64).unwrap_or(0)) }
                                td { (f.get("description").and_then(Value::as_str).unwrap_or("")) }
                            }
                        }
                    }
                }
            }
            @if let Some(result) = result {
                h2 { "Result" }
                pre.json #result { (pretty(result)) }
            }
            @if let Some(finished) = &job.finished_at {
                p.muted { "Finished " (when(finished)) @if let Some(started) = &job.started_at { ", " (duration_ms(finished.signed_duration_since(*started).num_milliseconds())) " after it started" } "." }
            }
        }
    }
}
