//! `orchestrator bench git`: worktree creation for a repository of many
//! files through the git stage (mirror lock, fetch, branch, worktree) against
//! `git worktree add` from the CLI on a mirror of the same repository,
//! alternating, in one sitting.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{pct, ratio};
use crate::git::names::{BranchName, RepoUrl};
use crate::git::repo::{GitError, GitStage};
use crate::git::secrets::Scanner;

#[derive(Debug, Serialize)]
pub struct GitBench {
    pub files: usize,
    pub runs: usize,
    pub stage_p50_ms: f64,
    pub stage_p99_ms: f64,
    pub cli_p50_ms: f64,
    pub cli_p99_ms: f64,
    /// CLI p50 / stage p50: above 1 means the stage is faster.
    pub speedup_p50: f64,
}

fn git(dir: &Path, args: &[&str]) -> Result<(), GitError> {
    let out = Command::new("git")
        .args(super::GIT_IDENTITY)
        .args(args)
        .current_dir(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GitError::Command(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

pub fn run(files: usize, runs: usize) -> Result<GitBench, GitError> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let seed = root.join("seed");
    std::fs::create_dir_all(&seed)?;
    git(&seed, &["init", "-q"])?;
    for i in 0..files {
        let dir = seed.join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}\n"))?;
    }
    git(&seed, &["add", "."])?;
    git(&seed, &["commit", "-q", "-m", "seed"])?;
    let bare = root.join("origin.git");
    git(root, &["clone", "-q", "--bare", "seed", "origin.git"])?;
    // The CLI's mirror, cloned once, like the stage's.
    git(
        root,
        &["clone", "-q", "--bare", "origin.git", "cli-mirror.git"],
    )?;
    let cli_mirror = root.join("cli-mirror.git");

    let stage = GitStage::new(
        root.join("stage"),
        "bench".into(),
        "bench@localhost".into(),
        Arc::new(Scanner::default_rules()?),
    );
    let url = RepoUrl::Local { path: bare };
    // Warm both: the stage's first call creates its mirror.
    let wt = stage.prepare(
        "warm",
        &url,
        None,
        &BranchName::parse("bench/warm").map_err(GitError::Policy)?,
    )?;
    stage.cleanup(&wt)?;

    let mut ours = Vec::with_capacity(runs);
    let mut cli = Vec::with_capacity(runs);
    for i in 0..runs {
        let branch = BranchName::parse(&format!("bench/s{i}")).map_err(GitError::Policy)?;
        let t = Instant::now();
        let wt = stage.prepare(&format!("s{i}"), &url, None, &branch)?;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        stage.cleanup(&wt)?;

        let path = root.join(format!("cli-wt-{i}"));
        let t = Instant::now();
        git(
            &cli_mirror,
            &[
                "worktree",
                "add",
                "-q",
                "-b",
                &format!("bench/c{i}"),
                path.to_str().unwrap_or("wt"),
                "main",
            ],
        )?;
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_dir_all(&path)?;
        git(&cli_mirror, &["worktree", "prune"])?;
    }
    ours.sort_by(f64::total_cmp);
    cli.sort_by(f64::total_cmp);
    let (o50, c50) = (pct(&ours, 50.0), pct(&cli, 50.0));
    Ok(GitBench {
        files,
        runs,
        stage_p50_ms: o50,
        stage_p99_ms: pct(&ours, 99.0),
        cli_p50_ms: c50,
        cli_p99_ms: pct(&cli, 99.0),
        speedup_p50: ratio(c50, o50),
    })
}
