//! The trust boundary, tried as an attacker would: agents (real Docker
//! sandboxes) that forge git metadata, plant symlinks, FIFOs, huge or
//! countless files, and jobs that ask for more than their token allows.
//! Each test checks that a listener on 127.0.0.1 heard nothing, the worker
//! stayed up, and nothing of the host leaked.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orchestrator::job::{Job, Status};
use serde_json::json;

use crate::agent::{fixture, fixture_with, Fixture};
use crate::support::git::git;

/// A TCP listener on 127.0.0.1 that counts whoever connects (and what they
/// send), standing in for an attacker's server.
struct Listener {
    port: u16,
    heard: Arc<AtomicUsize>,
    bytes: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Listener {
    fn start() -> Listener {
        let socket = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        let heard = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, b) = (heard.clone(), bytes.clone());
        std::thread::spawn(move || {
            for stream in socket.incoming() {
                let Ok(mut stream) = stream else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf) {
                    b.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            }
        });
        Listener { port, heard, bytes }
    }

    fn assert_silent(&self) {
        assert_eq!(
            self.heard.load(Ordering::SeqCst),
            0,
            "the attacker's listener was contacted: {:?}",
            String::from_utf8_lossy(&self.bytes.lock().expect("lock"))
        );
    }
}

const TOKEN: &str = "orch-test-token-never-leaves-0123456789";

/// What the job's run recorded (its events and result), as one string, to
/// search for leaks.
async fn recorded(f: &Fixture, job: &Job) -> String {
    let events = f
        .env
        .app
        .store()
        .job_events(job.id, None)
        .await
        .expect("events");
    format!(
        "{}{}",
        serde_json::to_string(&events).expect("json"),
        serde_json::to_string(&job.result).expect("json")
    )
}

/// Everything stored about a job (its record whole, payload included),
/// to search for leaks.
async fn trail(f: &Fixture, job: &Job) -> String {
    format!(
        "{}{}",
        recorded(f, job).await,
        serde_json::to_string(job).expect("json")
    )
}

async fn tampered_reasons(f: &Fixture, job: &Job) -> String {
    let events = f
        .env
        .app
        .store()
        .job_events(job.id, None)
        .await
        .expect("events");
    let tampered: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "git_metadata_tampered")
        .collect();
    assert_eq!(tampered.len(), 1, "one git_metadata_tampered event");
    tampered[0].data["reasons"].to_string()
}

/// The pushed branch's tree, recursively: `mode type sha\tpath` lines.
fn pushed_tree(f: &Fixture, job: &Job) -> String {
    git(
        &f.bare,
        &["ls-tree", "-r", &format!("orchestrator/{}", job.id)],
    )
}

fn assert_no_git_entries(tree: &str) {
    assert!(
        !tree.lines().any(|l| l
            .split('\t')
            .nth(1)
            .is_some_and(|p| p.split('/').any(|c| c.eq_ignore_ascii_case(".git")))),
        "a .git entry was committed:\n{tree}"
    );
}

fn payload(f: &Fixture, script: String) -> serde_json::Value {
    json!({ "script": script, "repo": f.bare.to_str().expect("utf-8"), "push": true })
}

#[tokio::test]
async fn a_forged_git_directory_is_ignored_and_nothing_reaches_its_remote() {
    std::env::set_var("ORCH_GIT_HTTPS_TOKEN", TOKEN);
    let listener = Listener::start();
    let f = fixture().await;
    let marker = f.tmp.path().join("fsmonitor-ran");
    // The agent replaces its .git with a repository of its own whose
    // origin is the attacker, with an fsmonitor, hooks and a filter that
    // would run on the host if the host ever used it.
    let script = format!(
        "rm -rf .git && mkdir -p .git/refs/heads .git/objects .git/hooks && \
         printf 'ref: refs/heads/main\\n' > .git/HEAD && \
         printf '[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = touch {m}\\n\\thooksPath = /tmp\\n[remote \"origin\"]\\n\\turl = http://127.0.0.1:{p}/x.git\\n[filter \"evil\"]\\n\\tclean = touch {m}\\n\\tsmudge = touch {m}\\n' > .git/config && \
         printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit && \
         printf '* filter=evil\\n' > .gitattributes && echo changed > change.txt",
        m = marker.display(),
        p = listener.port
    );
    let done = f.run(payload(&f, script)).await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    listener.assert_silent();
    assert!(
        !marker.exists(),
        "a hook, filter or fsmonitor ran on the host"
    );
    let reasons = tampered_reasons(&f, &done).await;
    assert!(reasons.contains("config was changed"), "{reasons}");
    assert!(reasons.contains("hooks"), "{reasons}");
    // The commit went to the job's own remote, built from the files.
    let tree = pushed_tree(&f, &done);
    assert!(tree.contains("change.txt"), "{tree}");
    assert_no_git_entries(&tree);
    assert!(!trail(&f, &done).await.contains(TOKEN), "the token leaked");
}

#[tokio::test]
async fn a_git_file_commondir_alternates_and_nested_git_are_never_followed() {
    std::env::set_var("ORCH_GIT_HTTPS_TOKEN", TOKEN);
    let listener = Listener::start();
    let f = fixture().await;
    // A repository on the host the agent would like the worker to use.
    let evil = f.tmp.path().join("evil.git");
    git(
        f.tmp.path(),
        &["init", "-q", "--bare", evil.to_str().expect("utf-8")],
    );
    git(
        &evil,
        &[
            "config",
            "remote.origin.url",
            &format!("http://127.0.0.1:{}/x.git", listener.port),
        ],
    );

    // 1: /workspace/.git as a gitdir pointer to that repository.
    let done = f
        .run(payload(
            &f,
            format!(
                "rm -rf .git && echo 'gitdir: {}' > .git && echo one > one.txt",
                evil.display()
            ),
        ))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let reasons = tampered_reasons(&f, &done).await;
    assert!(reasons.contains("replaced by a file"), "{reasons}");
    assert!(pushed_tree(&f, &done).contains("one.txt"));

    // 2: commondir and alternates pointing at it, and a nested .git.
    let done = f
        .run(payload(
            &f,
            format!(
                "echo {e} > .git/commondir && mkdir -p .git/objects/info && \
                 echo {e}/objects > .git/objects/info/alternates && \
                 mkdir -p sub/.git && echo 'gitdir: {e}' > sub/.git/HEAD && echo two > sub/two.txt",
                e = evil.display()
            ),
        ))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let reasons = tampered_reasons(&f, &done).await;
    for want in ["commondir", "alternates", "nested .git at sub/.git"] {
        assert!(reasons.contains(want), "{want} not in {reasons}");
    }
    let tree = pushed_tree(&f, &done);
    assert!(tree.contains("sub/two.txt"), "{tree}");
    assert_no_git_entries(&tree);
    // The evil repository got nothing, and nobody called the listener.
    assert_eq!(git(&evil, &["for-each-ref"]), "");
    listener.assert_silent();
    assert!(!trail(&f, &done).await.contains(TOKEN));
}

#[tokio::test]
async fn the_agent_may_use_its_own_git_and_the_host_ignores_it() {
    let f = fixture().await;
    // busybox has no git: the agent checks that the metadata it was given
    // is a repository on its branch, then "uses" it by writing to it.
    let done = f
        .run(payload(
            &f,
            "test -d .git/objects/pack && grep -q 'refs/heads/orchestrator/' .git/HEAD && \
             test -s .git/shallow && test -s .git/index && \
             echo junk > .git/objects/junk && echo ok > used-git.txt"
                .into(),
        ))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let types = f.event_types(done.id).await;
    assert!(
        !types.iter().any(|t| t == "git_metadata_tampered"),
        "ordinary use of the sandbox's own .git is not tampering: {types:?}"
    );
    let tree = pushed_tree(&f, &done);
    assert!(tree.contains("used-git.txt"), "{tree}");
    assert_no_git_entries(&tree);
}

#[tokio::test]
async fn a_symlink_to_a_host_file_is_committed_as_a_link_never_read() {
    let f = fixture().await;
    let done = f
        .run(payload(
            &f,
            "ln -s /etc/shadow leak && ln -s ../../../../etc/passwd up".into(),
        ))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    let branch = format!("orchestrator/{}", done.id);
    let tree = pushed_tree(&f, &done);
    assert!(
        tree.lines()
            .any(|l| l.starts_with("120000") && l.ends_with("\tleak")),
        "{tree}"
    );
    assert_eq!(
        git(&f.bare, &["cat-file", "-p", &format!("{branch}:leak")]),
        "/etc/shadow"
    );
    assert_eq!(
        git(&f.bare, &["cat-file", "-p", &format!("{branch}:up")]),
        "../../../../etc/passwd"
    );
    let passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
    let first = passwd.lines().next().expect("a line");
    assert!(
        !trail(&f, &done).await.contains(first),
        "a host file leaked"
    );
}

/// Runs `script` as an agent job expected to fail with `error`, then a
/// plain job on the same worker pool to show it stayed up.
async fn fails_cleanly(f: &Fixture, script: &str, error: &str) {
    let pool = f.env.start_pool(f.env.pool_config(&f.queue, 1));
    let bad = f
        .finish(payload(f, script.into()), Duration::from_secs(120))
        .await;
    let good = f
        .finish(
            payload(f, "echo fine > fine.txt".into()),
            Duration::from_secs(90),
        )
        .await;
    pool.shutdown().await;
    assert_eq!(bad.status, Status::Dead, "{:?}", bad.last_error);
    let last = bad.last_error.clone().unwrap_or_default();
    assert!(last.contains(error), "{last}");
    assert!(
        !f.remote_branches().contains(&bad.id.to_string()),
        "nothing pushed"
    );
    assert_eq!(
        good.status,
        Status::Succeeded,
        "the worker served the next job: {:?}",
        good.last_error
    );
    assert_eq!(f.worktrees_left(), 0, "workspaces cleaned up");
}

#[tokio::test]
async fn a_fifo_in_the_workspace_fails_the_job_and_the_worker_stays_up() {
    let f = fixture().await;
    fails_cleanly(
        &f,
        "mkfifo pipe && echo x > x.txt",
        "worktree_special_file: pipe is a FIFO",
    )
    .await;
}

#[tokio::test]
async fn a_sparse_100_gb_file_fails_the_job_without_being_read() {
    let f = fixture().await;
    fails_cleanly(
        &f,
        "dd if=/dev/zero of=big bs=1 count=0 seek=100G 2>/dev/null",
        "worktree_file_too_large: big is 107374182400 bytes",
    )
    .await;
}

#[tokio::test]
async fn too_many_files_fail_the_job() {
    let f = fixture_with(|s| s.git.max_worktree_files = 500).await;
    fails_cleanly(
        &f,
        "mkdir many && cd many && i=0; while [ $i -lt 2000 ]; do : > f$i; i=$((i+1)); done",
        "worktree_too_many_files",
    )
    .await;
}

#[tokio::test]
async fn pushing_to_an_existing_branch_needs_admin_or_the_kind() {
    let f = fixture().await;
    let done = f
        .run(json!({
            "script": "echo x > x.txt",
            "repo": f.bare.to_str().expect("utf-8"),
            "branch": "main",
            "push": true,
        }))
        .await;
    assert_eq!(done.status, Status::Dead, "{:?}", done.last_error);
    assert!(
        done.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("branch_exists: main"),
        "{:?}",
        done.last_error
    );
    let main = git(&f.bare, &["log", "--format=%s", "main"]);
    assert!(!main.contains("orchestrator"), "main is untouched: {main}");
}

#[tokio::test]
async fn no_docker_daemon_means_no_agent_job_never_a_host_process() {
    // This test process's Docker client points at nothing.
    std::env::set_var("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    let f = fixture().await;
    let marker = f.tmp.path().join("ran-on-host");
    let done = f
        .run(json!({ "script": format!("touch {}", marker.display()) }))
        .await;
    assert_eq!(done.status, Status::Dead, "one attempt, refused");
    let last = done.last_error.clone().unwrap_or_default();
    assert!(last.contains("no Docker daemon answers"), "{last}");
    assert!(!marker.exists(), "the agent ran as a host process");
    let check = f.env.app.sandboxes().check().await;
    assert!(check.is_err(), "{check:?}");
}

#[tokio::test]
async fn a_secret_the_agent_prints_is_redacted_before_it_is_stored() {
    let f = fixture().await;
    let token = "ghp_aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zAB";
    let done = f
        .run(json!({ "script": format!("echo using {token} to push; echo done") }))
        .await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.last_error);
    // The producer's own payload holds the token; what the agent printed
    // (events, result) must not.
    let everything = recorded(&f, &done).await;
    assert!(
        !everything.contains(token),
        "the token reached Postgres: {everything}"
    );
    assert!(
        everything.contains("using [REDACTED:github-pat] to push"),
        "{everything}"
    );
}
