//! The agent lifecycle for jobs that name a repository: **spawn** (a
//! worktree from the repository's mirror, the agent in its sandbox on it),
//! **git** (commit after a secret scan, conflict check), **complete** (a
//! second conflict check and the push when asked, the result). The stage is
//! recorded on the job, each start and end is an event with its duration,
//! and the worktree is cleaned up on every path. Between git and complete,
//! the **gates** of the job's profile run, each in a fresh sandbox.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::git_host::GitHost;
use super::host::SandboxHost;
use super::payload::AgentPayload;
use super::run::{outcome_result, run_gate, run_sandbox};
use crate::git::names::BranchName;
use crate::git::repo::{CommitOutcome, GitError, Worktree};
use crate::pipeline::gates::{self, GateDef, GateResult, GateType};
use crate::pipeline::kinds::KindDef;
use crate::pipeline::{JobContext, JobError};
use crate::sandbox::{BindMount, Outcome, SANDBOX_USER, WORKSPACE};

/// What a job whose agent changed nothing ends as (`git.no_changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoChanges {
    Fail,
    Succeed,
}

/// Output lines of a gate kept in its result.
const GATE_TAIL_LINES: usize = 40;

pub(super) async fn run(
    def: &KindDef,
    host: &SandboxHost,
    git: &GitHost,
    payload: &AgentPayload,
    ctx: JobContext,
) -> Result<Value, JobError> {
    let job = &ctx.job;
    let repo = payload.repo.as_deref().unwrap_or_default();
    let url = git
        .policy
        .check(repo)
        .map_err(|e| JobError::Fatal(format!("payload.repo: {e}")))?;
    let branch = match &payload.branch {
        Some(b) => BranchName::parse(b),
        None => BranchName::parse(&format!("orchestrator/{}", job.id)),
    }
    .map_err(|e| JobError::Fatal(format!("payload.branch: {e}")))?;
    let mut stages = Map::new();

    let started = stage_start(&ctx, "spawn").await;
    let stage = git.stage.clone();
    let (name, prep_url, base) = (job.id.to_string(), url.clone(), payload.base.clone());
    let prep_branch = branch.clone();
    let wt = blocking(move || stage.prepare(&name, &prep_url, base.as_deref(), &prep_branch))
        .await
        .map_err(|e| match e {
            GitError::NoSuchBase(_) => JobError::Fatal(e.to_string()),
            // A refusal is final; a name that does not resolve now may later.
            GitError::Policy(ref r) if !r.is_retryable() => JobError::Fatal(e.to_string()),
            e => JobError::Failed(format!("preparing the worktree failed: {e}")),
        })?;

    let result =
        stages_after_prepare(def, host, git, payload, &ctx, &wt, &mut stages, started).await;

    let stage = git.stage.clone();
    let cleanup_wt = wt.clone();
    if let Err(err) = blocking(move || stage.cleanup(&cleanup_wt)).await {
        tracing::warn!(job.id = %job.id, error = %err, "worktree cleanup failed; the reaper will retry");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn stages_after_prepare(
    def: &KindDef,
    host: &SandboxHost,
    git: &GitHost,
    payload: &AgentPayload,
    ctx: &JobContext,
    wt: &Worktree,
    stages: &mut Map<String, Value>,
    spawn_started: Instant,
) -> Result<Value, JobError> {
    // A branch that exists on the remote (the base, or someone else's) is
    // not the job's to push to, unless an admin or the kind allows it, or
    // an earlier attempt of this job created it.
    if payload.push && wt.branch_on_remote.is_some() {
        let allowed = payload.allow_existing_branch == Some(true) || def.allow_existing_branch;
        if !allowed && !pushed_before(ctx, &wt.branch).await? {
            return Err(JobError::Fatal(format!(
                "branch_exists: {} already exists on the remote and was not created by this job; pushing to it needs payload.allow_existing_branch (admin scope) or a kind with allow_existing_branch = true",
                wt.branch.as_str()
            )));
        }
    }

    // spawn: the agent on the worktree.
    let runtime = host
        .runtime()
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?;
    if runtime.name() == "docker" {
        let (uid, gid) = sandbox_ids();
        chown_tree(&wt.path, uid, gid)
            .map_err(|e| JobError::Failed(format!("preparing the worktree: {e}")))?;
    }
    let workspace = BindMount {
        host: wt.path.clone(),
        target: WORKSPACE.to_owned(),
        read_only: false,
    };
    // What the agent wrote stays the sandbox user's: the host reads it as
    // data only (never opening it as a repository), so it need not own it.
    let ran = run_sandbox(def, host, ctx, payload.text(), Some(workspace)).await;
    let (finished, log, runtime_name) = ran?;
    let sandbox = outcome_result(def, finished, log, runtime_name);
    stage_end(ctx, "spawn", spawn_started, sandbox.is_ok(), stages).await;
    let sandbox = sandbox?;

    // git: commit after the secret scan, then the conflict check.
    stop_requested(ctx)?;
    let started = stage_start(ctx, "git").await;
    let stage = git.stage.clone();
    let commit_wt = wt.clone();
    let message = payload
        .message
        .clone()
        .unwrap_or_else(|| format!("orchestrator: job {}\n\nAgent: {}", ctx.job.id, def.kind));
    let report = blocking(move || stage.commit(&commit_wt, &message)).await;
    let report = match report {
        Ok(report) => report,
        Err(e @ GitError::Workspace(_)) => {
            stage_end(ctx, "git", started, false, stages).await;
            // What the agent left cannot be read safely: retrying the same
            // agent would only leave it again.
            return Err(JobError::Fatal(e.to_string()));
        }
        Err(e) => return Err(JobError::Failed(format!("commit failed: {e}"))),
    };
    if !report.tampered.is_empty() {
        tracing::warn!(job.id = %ctx.job.id, reasons = ?report.tampered, "the agent created or changed git metadata; ignored");
        record(
            ctx,
            "git_metadata_tampered",
            json!({ "reasons": report.tampered, "action": "ignored; the commit is built from the files" }),
        )
        .await;
    }
    stop_requested(ctx)?;
    let (sha, files) = match report.outcome {
        CommitOutcome::Committed { sha, files } => (sha, files),
        CommitOutcome::NoChanges => {
            stage_end(
                ctx,
                "git",
                started,
                git.no_changes == NoChanges::Succeed,
                stages,
            )
            .await;
            return match git.no_changes {
                NoChanges::Fail => Err(JobError::Fatal(
                    "no_changes: the agent changed nothing".into(),
                )),
                NoChanges::Succeed => Ok(json!({
                    "outcome": "no_changes", "branch": wt.branch.as_str(), "pushed": false,
                    "stages": stages.clone(), "sandbox": sandbox,
                })),
            };
        }
        CommitOutcome::SecretDetected { findings } => {
            record(ctx, "secret_detected", json!({ "findings": findings })).await;
            stage_end(ctx, "git", started, false, stages).await;
            let list: Vec<String> = findings
                .iter()
                .map(|f| format!("{} in {}:{}", f.rule_id, f.file, f.line))
                .collect();
            return Err(JobError::Rejected {
                message: format!("secret_detected: {}", list.join(", ")),
                result: json!({
                    "outcome": "secret_detected", "findings": findings, "branch": wt.branch.as_str(),
                    "pushed": false, "stages": stages.clone(), "sandbox": sandbox,
                }),
            });
        }
    };
    let merges = check_conflicts(git, ctx, wt, payload).await;
    stage_end(ctx, "git", started, merges.is_ok(), stages).await;
    merges?;
    stop_requested(ctx)?;

    // gates: each in a fresh sandbox on the committed tree.
    let skip_all = payload.yolo == Some(true) || git.yolo;
    let gates = def
        .gates
        .select(payload.gates.as_ref())
        .map_err(JobError::Fatal)?;
    // A choice of gates that leaves out required ones is YOLO too (the API
    // let it through only from an admin).
    let dropped = def.gates.dropped(&gates);
    let yolo = skip_all || !dropped.is_empty();
    let skipped: Vec<String> = if skip_all {
        gates.iter().map(|g| g.name.clone()).collect()
    } else {
        dropped
    };
    if yolo && !skipped.is_empty() {
        tracing::warn!(job.id = %ctx.job.id, gates = ?skipped, "YOLO MODE: quality gates skipped");
        let by = if payload.yolo == Some(true) {
            "job"
        } else if git.yolo {
            "deployment (git.yolo)"
        } else {
            "job (payload.gates leaves out required gates)"
        };
        record(
            ctx,
            "gates_skipped",
            json!({ "yolo": true, "set_by": by, "gates": skipped }),
        )
        .await;
    }
    let gates = if skip_all { Vec::new() } else { gates };
    let gate_results = if gates.is_empty() {
        Vec::new()
    } else {
        let started = stage_start(ctx, "gates").await;
        let results = run_gates(def, host, git, ctx, wt, &sha, &gates).await;
        let passed = results
            .as_ref()
            .is_ok_and(|r| r.iter().all(|g| g.passed || !g.required));
        stage_end(ctx, "gates", started, passed, stages).await;
        let results = results?;
        if let Some(failed) = results.iter().find(|g| g.required && !g.passed) {
            return Err(JobError::FailedWith {
                message: format!("gate_failed: {}: {}", failed.name, failed.detail),
                result: json!({
                    "outcome": "gate_failed", "commit": sha, "branch": wt.branch.as_str(), "pushed": false,
                    "stages": stages.clone(), "gates": gates::summary(&results),
                }),
            });
        }
        results
    };

    // complete: push when asked (after another conflict check).
    stop_requested(ctx)?;
    let started = stage_start(ctx, "complete").await;
    let mut pushed = false;
    if payload.push {
        check_conflicts(git, ctx, wt, payload).await?;
        stop_requested(ctx)?;
        let stage = git.stage.clone();
        let push_wt = wt.clone();
        blocking(move || stage.push(&push_wt))
            .await
            .map_err(|e| match e {
                GitError::PushRejected { .. } => JobError::Fatal(format!("push_rejected: {e}")),
                e => JobError::Failed(format!("push failed: {e}")),
            })?;
        pushed = true;
        record(
            ctx,
            "pushed",
            json!({ "branch": wt.branch.as_str(), "commit": sha }),
        )
        .await;
    }
    stage_end(ctx, "complete", started, true, stages).await;
    Ok(json!({
        "outcome": "committed",
        "commit": sha,
        "files": files,
        "branch": wt.branch.as_str(),
        "pushed": pushed,
        "stages": stages.clone(),
        "gates": gates::summary(&gate_results),
        "yolo": yolo,
        "sandbox": sandbox,
    }))
}

/// Most changed paths a coordinator is sent.
const MAX_REVIEW_PATHS: usize = 1000;

/// Runs `gates` in order; stops at the first required one that fails.
async fn run_gates(
    def: &KindDef,
    host: &SandboxHost,
    git: &GitHost,
    ctx: &JobContext,
    wt: &Worktree,
    sha: &str,
    gates: &[GateDef],
) -> Result<Vec<GateResult>, JobError> {
    // A reviewer reads the diff, mounted read-only beside the tree.
    // Beside the workspace, outside every mount but its own.
    let review_dir = wt.dir.join("review");
    if gates.iter().any(|g| g.kind == GateType::AiReview) {
        let stage = git.stage.clone();
        let diff_wt = wt.clone();
        let patch = blocking(move || stage.diff_patch(&diff_wt))
            .await
            .map_err(|e| JobError::Failed(format!("diff for the review: {e}")))?;
        std::fs::create_dir_all(&review_dir).map_err(|e| JobError::Failed(e.to_string()))?;
        std::fs::write(review_dir.join("diff.patch"), patch)
            .map_err(|e| JobError::Failed(e.to_string()))?;
    }
    // Gates see the commit, not the workspace: nothing it left out
    // (ignored files, any .git) can pass or fail them.
    let stage = git.stage.clone();
    let tree_wt = wt.clone();
    let tree = blocking(move || stage.committed_tree(&tree_wt))
        .await
        .map_err(|e| JobError::Failed(format!("the committed tree for the gates: {e}")))?;
    // What a coordinator is shown: counts and paths, not the tree.
    let diff = if gates.iter().any(|g| g.kind == GateType::Http) {
        let stage = git.stage.clone();
        let diff_wt = wt.clone();
        let summary = blocking(move || stage.diff_summary(&diff_wt, MAX_REVIEW_PATHS))
            .await
            .map_err(|e| JobError::Failed(format!("diff for the coordinator: {e}")))?;
        Some(summary)
    } else {
        None
    };
    let mut results: Vec<GateResult> = Vec::with_capacity(gates.len());
    for (index, gate) in gates.iter().enumerate() {
        if ctx.cancel.is_cancelled() {
            let _ = std::fs::remove_dir_all(&review_dir);
            return Err(JobError::Interrupted);
        }
        let started = Instant::now();
        // Each kind comes to (image, passed, detail, output tail); `None`:
        // the job was told to stop.
        let ran = if gate.kind == GateType::Http {
            let review = json!({
                "job": {
                    "id": ctx.job.id, "queue": ctx.job.queue.as_str(), "kind": ctx.job.kind.as_str(),
                    "attempt": ctx.job.attempt, "payload": ctx.job.payload,
                },
                "gate": gate.name,
                "commit": sha,
                "branch": wt.branch.as_str(),
                "diff": diff,
                "gates": results,
            });
            ask_coordinator(git, ctx, gate, &review)
                .await
                .map(|(passed, detail)| (String::new(), passed, detail, Vec::new()))
        } else {
            run_sandboxed_gate(def, host, git, ctx, gate, index, &tree, &review_dir).await
        };
        let Some((image, passed, detail, output_tail)) = ran else {
            let _ = std::fs::remove_dir_all(&review_dir);
            return Err(JobError::Interrupted);
        };
        let result = GateResult {
            name: gate.name.clone(),
            kind: gate.kind,
            image,
            required: gate.required,
            passed,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            detail,
            output_tail,
        };
        record(
            ctx,
            "gate_finished",
            serde_json::to_value(&result).unwrap_or_default(),
        )
        .await;
        let stop = result.required && !result.passed;
        results.push(result);
        if stop {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&review_dir);
    Ok(results)
}

/// An `http` gate's verdict from the coordinator; `None` when the job was
/// told to stop meanwhile.
async fn ask_coordinator(
    git: &GitHost,
    ctx: &JobContext,
    gate: &GateDef,
    review: &serde_json::Value,
) -> Option<(bool, String)> {
    let Some(coordinator) = &git.coordinator else {
        return Some((
            false,
            "no coordinator is configured for http gates".to_owned(),
        ));
    };
    // One message id per claim (its lease) and gate: a run after a release
    // or a retry asks under a new one, so no answer to an earlier run is
    // taken for this one.
    let id = format!(
        "gate_{}_{}_{}",
        ctx.job.id.0.simple(),
        ctx.job.lease_id,
        gate.name
    );
    tokio::select! {
        verdict = coordinator.ask(gate, &id, review) => Some(verdict),
        () = ctx.cancel.cancelled() => None,
    }
}

/// A gate run in a fresh sandbox on the committed tree: (image, passed,
/// detail, output tail); `None` when the job was told to stop meanwhile.
#[allow(clippy::too_many_arguments)]
async fn run_sandboxed_gate(
    def: &KindDef,
    host: &SandboxHost,
    git: &GitHost,
    ctx: &JobContext,
    gate: &GateDef,
    index: usize,
    tree: &std::path::Path,
    review_dir: &std::path::Path,
) -> Option<(String, bool, String, Vec<String>)> {
    let workspace = BindMount {
        host: tree.to_path_buf(),
        target: WORKSPACE.to_owned(),
        read_only: true,
    };
    let mounts = if gate.kind == GateType::AiReview {
        vec![BindMount {
            host: review_dir.to_path_buf(),
            target: "/review".to_owned(),
            read_only: true,
        }]
    } else {
        Vec::new()
    };
    let image = gate.image.clone().unwrap_or_else(|| def.image.clone());
    let (passed, detail, tail) =
        match run_gate(def, host, ctx, gate, index, workspace, mounts).await {
            Ok((finished, output)) => {
                let (passed, detail) = match finished.outcome {
                    Outcome::Exited { code } => gate.judge(code, &output, tree, git.stage.limits()),
                    Outcome::TimedOut => (false, format!("timed out after {}s", gate.timeout_secs)),
                    Outcome::OomKilled => (false, "ran out of memory".to_owned()),
                    Outcome::Stopped { .. } => return None,
                };
                let tail = output[output.len().saturating_sub(GATE_TAIL_LINES)..].to_vec();
                (passed, detail, tail)
            }
            Err(e) => (false, e.to_string(), Vec::new()),
        };
    Some((image, passed, detail, tail))
}

async fn check_conflicts(
    git: &GitHost,
    ctx: &JobContext,
    wt: &Worktree,
    payload: &AgentPayload,
) -> Result<(), JobError> {
    let stage = git.stage.clone();
    let check_wt = wt.clone();
    let target = payload.base.clone();
    let paths = blocking(move || stage.conflicts(&check_wt, target.as_deref()))
        .await
        .map_err(|e| JobError::Failed(format!("conflict check failed: {e}")))?;
    if paths.is_empty() {
        return Ok(());
    }
    let target = payload.base.as_deref().unwrap_or("HEAD");
    record(ctx, "conflict", json!({ "target": target, "paths": paths })).await;
    Err(JobError::Rejected {
        message: format!(
            "conflict: {} no longer merges ({})",
            wt.branch.as_str(),
            paths.join(", ")
        ),
        result: json!({ "outcome": "conflict", "target": target, "paths": paths, "branch": wt.branch.as_str(), "pushed": false }),
    })
}

/// Most a git operation (a fetch, a push: network) may take.
const GIT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A git step on the blocking pool, bounded by [`GIT_STEP_TIMEOUT`].
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, GitError> {
    match tokio::time::timeout(GIT_STEP_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(joined) => {
            joined.unwrap_or_else(|e| Err(GitError::Command(format!("git task failed: {e}"))))
        }
        Err(_) => Err(GitError::Command(format!(
            "a git step took longer than {}s",
            GIT_STEP_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether an earlier attempt of this job pushed `branch` (its trail has
/// the `pushed` event).
async fn pushed_before(ctx: &JobContext, branch: &BranchName) -> Result<bool, JobError> {
    let events = ctx
        .store
        .job_events(ctx.job.id, None)
        .await
        .map_err(|e| JobError::Failed(format!("reading the job's trail: {e}")))?;
    Ok(events
        .iter()
        .any(|e| e.kind == "pushed" && e.data["branch"] == json!(branch.as_str())))
}

/// A stop (cancel, lost lease, shutdown) takes effect between git steps: a
/// step under way is not interrupted, so a worktree or ref is never left
/// half-written, but nothing after it runs (above all, no push).
fn stop_requested(ctx: &JobContext) -> Result<(), JobError> {
    if ctx.cancel.is_cancelled() {
        Err(JobError::Interrupted)
    } else {
        Ok(())
    }
}

async fn record(ctx: &JobContext, kind: &'static str, data: Value) {
    if let Err(err) = ctx.append_events(&[(kind, data)]).await {
        tracing::warn!(job.id = %ctx.job.id, error = %err, event = kind, "could not record an event");
    }
}

async fn stage_start(ctx: &JobContext, stage: &'static str) -> Instant {
    if let Err(err) = ctx.set_stage(stage).await {
        tracing::warn!(job.id = %ctx.job.id, error = %err, stage, "could not record the stage");
    }
    record(ctx, "stage_started", json!({ "stage": stage })).await;
    Instant::now()
}

async fn stage_end(
    ctx: &JobContext,
    stage: &'static str,
    started: Instant,
    ok: bool,
    stages: &mut Map<String, Value>,
) {
    let elapsed = started.elapsed();
    metrics::histogram!(
        crate::metrics::STAGE_SECONDS,
        "queue" => ctx.job.queue.to_string(),
        "kind" => ctx.job.kind.to_string(),
        "stage" => stage,
        "outcome" => if ok { "ok" } else { "failed" }
    )
    .record(elapsed.as_secs_f64());
    let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    stages.insert(format!("{stage}_ms"), json!(ms));
    record(
        ctx,
        "stage_finished",
        json!({ "stage": stage, "duration_ms": ms, "ok": ok }),
    )
    .await;
}

/// The uid and gid sandboxes run as.
fn sandbox_ids() -> (u32, u32) {
    let (uid, gid) = SANDBOX_USER.split_once(':').unwrap_or(("1000", "1000"));
    (uid.parse().unwrap_or(1000), gid.parse().unwrap_or(1000))
}

/// `chown -R` without following symlinks (an agent may plant them).
fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}
