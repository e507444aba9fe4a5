//! The git stage against real repositories: bare remotes in temp dirs and a
//! `git daemon` on loopback (which runs the remote's hooks).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use orchestrator::git::names::{BranchName, RepoUrl};
use orchestrator::git::repo::{CommitOutcome, GitError, GitStage, Network, Worktree};
use orchestrator::git::secrets::Scanner;

#[path = "../support/mod.rs"]
mod support;
use support::git::git;

/// A bare `origin.git` with one commit on main: README.md, app.txt, .gitignore.
fn origin(dir: &Path) -> PathBuf {
    let files = [
        ("README.md", "# app\nline two\n"),
        ("app.txt", "v1\n"),
        (".gitignore", "*.log\n"),
    ];
    support::git::bare_origin(dir, &files)
}

fn stage(root: &Path) -> GitStage {
    GitStage::new(
        root.join("data"),
        "orchestrator".into(),
        "bot@orchestrator.test".into(),
        Arc::new(Scanner::default_rules().expect("rules")),
    )
}

fn local(path: &Path) -> RepoUrl {
    RepoUrl::Local {
        path: path.to_owned(),
    }
}

fn branch(name: &str) -> BranchName {
    BranchName::parse(name).expect("valid branch")
}

fn remote_branches(bare: &Path) -> Vec<String> {
    git(
        bare,
        &["for-each-ref", "--format=%(refname:short)", "refs/heads"],
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn eight_concurrent_jobs_get_isolated_worktrees_and_push_their_branches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let stage = stage.clone();
            let url = local(&bare);
            std::thread::spawn(move || {
                let job = format!("job-{i}");
                let wt = stage
                    .prepare(&job, &url, None, &branch(&format!("orchestrator/{job}")))
                    .expect("prepare");
                // Each worktree sees only its own change.
                std::fs::write(wt.path.join(format!("out-{i}.txt")), format!("from {i}\n"))
                    .expect("write");
                let entries: Vec<_> = std::fs::read_dir(&wt.path)
                    .expect("ls")
                    .filter_map(|e| e.ok())
                    .collect();
                assert_eq!(
                    entries
                        .iter()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("out-"))
                        .count(),
                    1
                );
                let outcome = stage
                    .commit(&wt, &format!("job {i}"))
                    .expect("commit")
                    .outcome;
                assert!(
                    matches!(outcome, CommitOutcome::Committed { files: 1, .. }),
                    "{outcome:?}"
                );
                stage.push(&wt).expect("push");
                stage.cleanup(&wt).expect("cleanup");
                assert!(!wt.path.exists());
            })
        })
        .collect();
    for h in handles {
        h.join().expect("job thread");
    }
    let branches = remote_branches(&bare);
    for i in 0..8 {
        assert!(
            branches.contains(&format!("orchestrator/job-{i}")),
            "{branches:?}"
        );
        let file = git(
            &bare,
            &["show", &format!("orchestrator/job-{i}:out-{i}.txt")],
        );
        assert_eq!(file, format!("from {i}"));
    }
}

#[test]
fn nothing_changed_and_ignored_files_are_not_commits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let wt = stage
        .prepare("j1", &local(&bare), None, &branch("orchestrator/j1"))
        .expect("prepare");
    assert_eq!(
        stage.commit(&wt, "none").expect("commit").outcome,
        CommitOutcome::NoChanges
    );
    std::fs::write(wt.path.join("debug.log"), "ignored\n").expect("write");
    assert_eq!(
        stage.commit(&wt, "ignored").expect("commit").outcome,
        CommitOutcome::NoChanges
    );
    std::fs::remove_file(wt.path.join("app.txt")).expect("rm");
    assert!(matches!(
        stage.commit(&wt, "deletion").expect("commit").outcome,
        CommitOutcome::Committed { files: 1, .. }
    ));
    stage.cleanup(&wt).expect("cleanup");
    let mirror = git2::Repository::open_bare(&wt.mirror).expect("mirror");
    assert!(
        mirror
            .find_branch("orchestrator/j1", git2::BranchType::Local)
            .is_err(),
        "unpushed branch removed"
    );
    assert!(
        mirror.find_reference(&wt.job_ref()).is_err(),
        "the job's ref removed"
    );
}

#[test]
fn secrets_in_new_files_and_modified_lines_block_the_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let secret = "ghp_aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zAB";
    let wt = stage
        .prepare("s1", &local(&bare), None, &branch("orchestrator/s1"))
        .expect("prepare");
    std::fs::write(
        wt.path.join("deploy.env"),
        format!("A=1\nGITHUB_TOKEN={secret}\n"),
    )
    .expect("write");
    std::fs::write(
        wt.path.join("README.md"),
        "# app\n-----BEGIN OPENSSH PRIVATE KEY-----\n",
    )
    .expect("write");
    // A binary file is scanned whole.
    std::fs::write(
        wt.path.join("blob.bin"),
        format!("\0\0\x01binary\0token={secret}\0"),
    )
    .expect("write");
    let outcome = stage.commit(&wt, "leaky").expect("commit").outcome;
    let CommitOutcome::SecretDetected { findings } = &outcome else {
        panic!("not detected: {outcome:?}")
    };
    assert!(
        findings
            .iter()
            .any(|f| f.rule_id == "github-pat" && f.file == "deploy.env" && f.line == 2),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.rule_id == "private-key" && f.file == "README.md" && f.line == 2),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.rule_id == "github-pat" && f.file == "blob.bin"),
        "{findings:?}"
    );
    assert!(
        !serde_json::to_string(&outcome)
            .expect("json")
            .contains(secret),
        "the finding carries no secret"
    );
    let head = git2::Repository::open_bare(&wt.mirror)
        .expect("mirror")
        .find_reference(&wt.job_ref())
        .expect("the job's ref")
        .target();
    assert_eq!(head, Some(wt.base_commit), "nothing was committed");
    stage.cleanup(&wt).expect("cleanup");
}

#[test]
fn conflicts_are_found_with_their_paths_and_clean_merges_pass() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let url = local(&bare);
    let wt = stage
        .prepare("c1", &url, Some("main"), &branch("orchestrator/c1"))
        .expect("prepare");
    std::fs::write(wt.path.join("README.md"), "# app\nline two, by the agent\n").expect("write");
    std::fs::write(wt.path.join("new.txt"), "agent\n").expect("write");
    assert!(matches!(
        stage.commit(&wt, "agent").expect("commit").outcome,
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(
        stage.conflicts(&wt, Some("main")).expect("check"),
        Vec::<String>::new(),
        "clean so far"
    );

    // Someone changes the same line on main.
    let other = tmp.path().join("other");
    git(
        tmp.path(),
        &[
            "clone",
            bare.to_str().expect("utf-8"),
            other.to_str().expect("utf-8"),
        ],
    );
    std::fs::write(other.join("README.md"), "# app\nline two, by a human\n").expect("write");
    std::fs::write(other.join("unrelated.txt"), "fine\n").expect("write");
    git(&other, &["commit", "-am", "human", "--allow-empty"]);
    git(&other, &["add", "."]);
    git(&other, &["commit", "-m", "more", "--allow-empty"]);
    git(&other, &["push", "origin", "HEAD:main"]);
    assert_eq!(
        stage.conflicts(&wt, Some("main")).expect("check"),
        vec!["README.md".to_owned()]
    );
    assert!(matches!(
        stage.conflicts(&wt, Some("no-such-branch")),
        Err(GitError::Git(_) | GitError::NoSuchBase(_))
    ));
    stage.cleanup(&wt).expect("cleanup");
}

#[test]
fn an_unknown_base_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let err = stage(tmp.path())
        .prepare(
            "b1",
            &local(&bare),
            Some("release-9"),
            &branch("orchestrator/b1"),
        )
        .expect_err("no such base");
    assert!(err.to_string().contains("release-9"), "{err}");
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `git daemon` serving `base` on a free loopback port, with pushes allowed.
fn daemon(base: &Path) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--enable=receive-pack",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "git daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Daemon(child), port)
}

#[test]
fn push_rejections_are_reported_not_swallowed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    // The remote refuses any push to protected/*.
    let hook = bare.join("hooks").join("pre-receive");
    std::fs::write(&hook, "#!/bin/sh\nwhile read old new ref; do case \"$ref\" in refs/heads/protected/*) echo \"protected ref\" >&2; exit 1;; esac; done\n").expect("hook");
    Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .expect("chmod");
    let (_daemon, port) = daemon(tmp.path());
    let url = RepoUrl::Remote {
        url: format!("git://127.0.0.1:{port}/origin.git"),
        scheme: "git".into(),
        host: "127.0.0.1".into(),
        port,
    };
    let stage = stage(tmp.path()).with_network(Network {
        allow_local: true,
        ..Network::default()
    });

    let wt: Worktree = stage
        .prepare("p1", &url, None, &branch("protected/p1"))
        .expect("prepare");
    std::fs::write(wt.path.join("x.txt"), "x\n").expect("write");
    stage.commit(&wt, "x").expect("commit");
    let err = stage.push(&wt).expect_err("the hook refuses it");
    assert!(
        matches!(err, GitError::PushRejected { .. } | GitError::Git(_)),
        "{err}"
    );
    assert!(!remote_branches(&bare).contains(&"protected/p1".to_owned()));
    stage.cleanup(&wt).expect("cleanup");

    // Non-fast-forward: the branch moved on the remote since.
    let wt = stage
        .prepare("n1", &url, None, &branch("feature/n1"))
        .expect("prepare");
    std::fs::write(wt.path.join("a.txt"), "a\n").expect("write");
    stage.commit(&wt, "a").expect("commit");
    stage.push(&wt).expect("first push");
    stage.cleanup(&wt).expect("cleanup");
    let wt = stage
        .prepare("n2", &url, None, &branch("feature/n1"))
        .expect("prepare again from main");
    std::fs::write(wt.path.join("b.txt"), "b\n").expect("write");
    stage.commit(&wt, "b").expect("commit");
    let err = stage.push(&wt).expect_err("non-fast-forward");
    let text = err.to_string();
    assert!(matches!(err, GitError::PushRejected { .. }), "{text}");
    assert!(text.contains("feature/n1"), "{text}");
    stage.cleanup(&wt).expect("cleanup");
}

#[test]
fn a_retry_replaces_what_an_earlier_attempt_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let url = local(&bare);
    let first = stage
        .prepare("r1", &url, None, &branch("orchestrator/r1"))
        .expect("first attempt");
    std::fs::write(first.path.join("half-done.txt"), "x\n").expect("write");
    stage.commit(&first, "half").expect("commit");
    // The worker died here: no cleanup. The retry starts over from the base.
    let second = stage
        .prepare("r1", &url, None, &branch("orchestrator/r1"))
        .expect("second attempt");
    assert!(
        !second.path.join("half-done.txt").exists(),
        "a fresh worktree"
    );
    assert_eq!(
        stage.commit(&second, "none").expect("commit").outcome,
        CommitOutcome::NoChanges
    );
    stage.cleanup(&second).expect("cleanup");
}

#[test]
fn an_untouched_workspace_is_clean_and_has_its_own_git() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let wt = stage
        .prepare("g1", &local(&bare), None, &branch("orchestrator/g1"))
        .expect("prepare");
    // The sandbox-local repository is a working git repository on the
    // job's branch, with the base commit and a clean status.
    assert_eq!(
        git(&wt.path, &["rev-parse", "--abbrev-ref", "HEAD"]),
        "orchestrator/g1"
    );
    assert_eq!(git(&wt.path, &["status", "--porcelain"]), "");
    assert_eq!(
        git(&wt.path, &["rev-parse", "HEAD"]),
        wt.base_commit.to_string()
    );
    let report = stage.commit(&wt, "none").expect("commit");
    assert_eq!(report.tampered, Vec::<String>::new());
    assert_eq!(report.outcome, CommitOutcome::NoChanges);
    // The agent committing with its own git changes nothing for the host.
    std::fs::write(wt.path.join("new.txt"), "agent\n").expect("write");
    git(&wt.path, &["add", "new.txt"]);
    git(&wt.path, &["commit", "-qm", "the agent's own commit"]);
    let report = stage.commit(&wt, "host").expect("commit");
    assert_eq!(report.tampered, Vec::<String>::new());
    assert!(matches!(
        report.outcome,
        CommitOutcome::Committed { files: 1, .. }
    ));
    stage.cleanup(&wt).expect("cleanup");
}

#[test]
fn jobs_naming_the_same_branch_never_touch_each_others_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let url = local(&bare);
    let shared = branch("feature/shared");
    let a = stage.prepare("a1", &url, None, &shared).expect("prepare a");
    std::fs::write(a.path.join("a.txt"), "from a\n").expect("write");
    assert!(matches!(
        stage.commit(&a, "a").expect("commit").outcome,
        CommitOutcome::Committed { .. }
    ));
    // A second job on the same branch name, prepared and committed after.
    let b = stage.prepare("b1", &url, None, &shared).expect("prepare b");
    std::fs::write(b.path.join("b.txt"), "from b\n").expect("write");
    assert!(matches!(
        stage.commit(&b, "b").expect("commit").outcome,
        CommitOutcome::Committed { .. }
    ));
    // b's cleanup leaves a's commit alone, and a pushes its own change.
    stage.cleanup(&b).expect("cleanup b");
    stage.push(&a).expect("push a");
    assert_eq!(git(&bare, &["show", "feature/shared:a.txt"]), "from a");
    let files = git(&bare, &["ls-tree", "--name-only", "feature/shared"]);
    assert!(
        !files.contains("b.txt"),
        "b's change was not pushed: {files}"
    );
    stage.cleanup(&a).expect("cleanup a");
}

#[test]
fn hostile_workspaces_end_in_named_errors_without_reading_the_host() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = origin(tmp.path());
    let stage = stage(tmp.path());
    let url = local(&bare);
    let attempt = |job: &str, plant: &dyn Fn(&Path)| {
        let wt = stage
            .prepare(job, &url, None, &branch(&format!("orchestrator/{job}")))
            .expect("prepare");
        plant(&wt.path);
        let result = stage.commit(&wt, "x");
        stage.cleanup(&wt).expect("cleanup");
        result
    };
    // A .gitignore that is a FIFO: refused, never opened (it would block).
    let err = attempt("fifo", &|ws| {
        std::fs::remove_file(ws.join(".gitignore")).expect("rm");
        let status = Command::new("mkfifo")
            .arg(ws.join(".gitignore"))
            .status()
            .expect("mkfifo");
        assert!(status.success());
    })
    .expect_err("a FIFO");
    assert!(err.to_string().contains(".gitignore is a FIFO"), "{err}");
    // A .gitignore too large to be rules.
    let err = attempt("big", &|ws| {
        std::fs::write(ws.join(".gitignore"), "x\n".repeat(200_000)).expect("write");
    })
    .expect_err("too large");
    assert!(
        err.to_string().contains("worktree_gitignore_too_large"),
        "{err}"
    );
    // Nesting deeper than the walk goes.
    let err = attempt("deep", &|ws| {
        let mut p = ws.to_path_buf();
        for _ in 0..300 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join("f"), "x").expect("write");
    })
    .expect_err("too deep");
    assert!(err.to_string().contains("worktree_too_deep"), "{err}");
    // A .gitignore that links to a host file is a link in the commit; its
    // target is never read as rules (debug.log stays unignored).
    let report = attempt("link", &|ws| {
        std::fs::remove_file(ws.join(".gitignore")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", ws.join(".gitignore")).expect("ln");
        std::fs::write(ws.join("debug.log"), "kept\n").expect("write");
    })
    .expect("commit");
    let CommitOutcome::Committed { sha, .. } = &report.outcome else {
        panic!("{report:?}")
    };
    let changed = git(
        &stage.mirror_path(&url),
        &["diff-tree", "--no-commit-id", "--name-status", "-r", sha],
    );
    assert_eq!(changed, "T\t.gitignore\nA\tdebug.log", "{changed}");
}
