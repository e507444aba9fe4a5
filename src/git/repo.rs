//! Mirrors, a worktree per job, commit with a secret scan, conflict check and
//! push, through git2. Every function here blocks: call them inside
//! `spawn_blocking` (a git2 `Repository` is Send, not Sync: each call opens
//! its own).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use git2::{
    BranchType, Cred, CredentialType, FetchOptions, IndexAddOption, Oid, PushOptions,
    RemoteCallbacks, Repository, Signature, WorktreeAddOptions, WorktreePruneOptions,
};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use super::names::{BranchName, RepoUrl};
use super::secrets::{Finding, ScanError, Scanner};

/// Credential callbacks give up after this many tries (no endless loop).
const MAX_CREDENTIAL_ATTEMPTS: usize = 3;
/// Where fetched branches land in a mirror.
const REMOTE_PREFIX: &str = "refs/remotes/origin/";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("secret scan: {0}")]
    Scan(#[from] ScanError),
    #[error("base ref {0:?} does not exist in the repository")]
    NoSuchBase(String),
    #[error("push of {refname} was rejected: {reason}")]
    PushRejected { refname: String, reason: String },
    #[error("cannot lock the mirror: {0}")]
    Lock(String),
    #[error("{0}")]
    Command(String),
}

/// How the git stage is set up.
#[derive(Clone)]
pub struct GitStage {
    root: PathBuf,
    author_name: String,
    author_email: String,
    scanner: Arc<Scanner>,
}

/// A job's worktree.
#[derive(Debug, Clone)]
pub struct Worktree {
    pub name: String,
    pub path: PathBuf,
    pub mirror: PathBuf,
    pub branch: BranchName,
    pub base_commit: Oid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommitOutcome {
    /// Nothing changed in the worktree.
    NoChanges,
    /// Secrets found in the change; nothing was committed.
    SecretDetected {
        findings: Vec<Finding>,
    },
    Committed {
        sha: String,
        files: usize,
    },
}

/// Holds an exclusive lock on one mirror while it lives.
struct MirrorLock(#[allow(dead_code)] Flock<File>);

impl GitStage {
    pub fn new(
        root: PathBuf,
        author_name: String,
        author_email: String,
        scanner: Arc<Scanner>,
    ) -> Self {
        GitStage {
            root,
            author_name,
            author_email,
            scanner,
        }
    }

    /// The mirror of `url`: `<root>/mirrors/<sha1 of the url>.git`.
    pub fn mirror_path(&self, url: &RepoUrl) -> PathBuf {
        let digest = Oid::hash_object(git2::ObjectType::Blob, url.as_git_url().as_bytes())
            .map(|o| o.to_string())
            .unwrap_or_else(|_| "mirror".to_owned());
        self.root.join("mirrors").join(format!("{digest}.git"))
    }

    pub fn worktrees_dir(&self) -> PathBuf {
        self.root.join("worktrees")
    }

    /// Mirrors of one repository are changed by one job at a time (across
    /// processes: a file lock); different repositories do not wait.
    fn lock(&self, mirror: &Path) -> Result<MirrorLock, GitError> {
        std::fs::create_dir_all(self.root.join("mirrors"))?;
        let file = File::create(mirror.with_extension("lock"))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(MirrorLock)
            .map_err(|(_, e)| GitError::Lock(e.to_string()))
    }

    /// Creates (first use) and fetches the mirror, then adds a worktree for
    /// `job` on a new `branch` from `base` (default: the remote's HEAD).
    pub fn prepare(
        &self,
        job: &str,
        url: &RepoUrl,
        base: Option<&str>,
        branch: &BranchName,
    ) -> Result<Worktree, GitError> {
        let mirror = self.mirror_path(url);
        let _lock = self.lock(&mirror)?;
        let repo = open_or_init_mirror(&mirror, url)?;
        fetch(
            &repo,
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+HEAD:refs/remotes/origin/HEAD",
            ],
        )?;
        let base_ref = format!("{REMOTE_PREFIX}{}", base.unwrap_or("HEAD"));
        let base_commit = repo
            .find_reference(&base_ref)
            .and_then(|r| r.peel_to_commit())
            .map_err(|_| GitError::NoSuchBase(base.unwrap_or("HEAD").to_owned()))?;
        // What an earlier attempt left (its worktree, its branch) is
        // replaced; the worktree first, since a branch checked out in one
        // cannot be moved.
        let path = self.worktrees_dir().join(job);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(self.worktrees_dir())?;
        if let Ok(old) = repo.find_worktree(job) {
            old.prune(Some(
                WorktreePruneOptions::new().valid(true).working_tree(true),
            ))?;
        }
        let local = repo.branch(branch.as_str(), &base_commit, true)?;
        let mut opts = WorktreeAddOptions::new();
        opts.reference(Some(local.get()));
        repo.worktree(job, &path, Some(&opts))?;
        Ok(Worktree {
            name: job.to_owned(),
            path,
            mirror,
            branch: branch.clone(),
            base_commit: base_commit.id(),
        })
    }

    /// Commits what changed in the worktree (respecting `.gitignore`) after
    /// scanning the added lines for secrets.
    pub fn commit(&self, wt: &Worktree, message: &str) -> Result<CommitOutcome, GitError> {
        let repo = Repository::open(&wt.path)?;
        let mut index = repo.index()?;
        index.add_all(["*"], IndexAddOption::DEFAULT, None)?;
        index.update_all(["*"], None)?;
        index.write()?;
        let tree = repo.find_tree(index.write_tree()?)?;
        let head = repo.head()?.peel_to_commit()?;
        if tree.id() == head.tree_id() {
            return Ok(CommitOutcome::NoChanges);
        }
        let diff = repo.diff_tree_to_tree(Some(&head.tree()?), Some(&tree), None)?;
        let findings = self.scan_diff(&repo, &diff)?;
        if !findings.is_empty() {
            return Ok(CommitOutcome::SecretDetected { findings });
        }
        let files = diff.deltas().len();
        let sig = Signature::now(&self.author_name, &self.author_email)?;
        // The branch ref lives in the mirror, which other jobs write to.
        let _lock = self.lock(&wt.mirror)?;
        let sha = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head])?;
        Ok(CommitOutcome::Committed {
            sha: sha.to_string(),
            files,
        })
    }

    /// The lines the change adds, scanned; binary files whole.
    fn scan_diff(
        &self,
        repo: &Repository,
        diff: &git2::Diff<'_>,
    ) -> Result<Vec<Finding>, GitError> {
        let mut lines: Vec<(String, usize, String)> = Vec::new();
        let mut binaries: Vec<(String, Oid)> = Vec::new();
        diff.foreach(
            &mut |delta, _| {
                if delta.flags().is_binary() || delta.new_file().is_binary() {
                    if let Some(p) = delta.new_file().path() {
                        binaries.push((p.to_string_lossy().into_owned(), delta.new_file().id()));
                    }
                }
                true
            },
            None,
            None,
            Some(&mut |delta, _hunk, line| {
                if line.origin() == '+' {
                    if let Some(p) = delta.new_file().path() {
                        lines.push((
                            p.to_string_lossy().into_owned(),
                            line.new_lineno().unwrap_or(0) as usize,
                            String::from_utf8_lossy(line.content())
                                .trim_end_matches('\n')
                                .to_owned(),
                        ));
                    }
                }
                true
            }),
        )?;
        let mut findings = Vec::new();
        let mut by_file: std::collections::BTreeMap<&str, Vec<(usize, &str)>> = Default::default();
        for (file, n, text) in &lines {
            by_file
                .entry(file.as_str())
                .or_default()
                .push((*n, text.as_str()));
        }
        for (file, lines) in by_file {
            findings.extend(self.scanner.scan_lines(file, lines));
        }
        for (file, oid) in binaries {
            if oid.is_zero() {
                continue;
            }
            let blob = repo.find_blob(oid)?;
            findings.extend(
                self.scanner
                    .scan_text(&file, &String::from_utf8_lossy(blob.content())),
            );
        }
        Ok(findings)
    }

    /// The change the job made (its base to its branch's head) as a patch,
    /// for a reviewer.
    pub fn diff_patch(&self, wt: &Worktree) -> Result<String, GitError> {
        let repo = Repository::open(&wt.path)?;
        let head = repo.head()?.peel_to_commit()?.tree()?;
        let base = repo.find_commit(wt.base_commit)?.tree()?;
        let diff = repo.diff_tree_to_tree(Some(&base), Some(&head), None)?;
        let mut patch = String::new();
        diff.print(git2::DiffFormat::Patch, |_, _, line| {
            if matches!(line.origin(), '+' | '-' | ' ') {
                patch.push(line.origin());
            }
            patch.push_str(&String::from_utf8_lossy(line.content()));
            true
        })?;
        Ok(patch)
    }

    /// Fetches `target` (default: the remote's HEAD) and merges it with the
    /// job's branch in memory; the conflicted paths, empty when the branch
    /// merges cleanly.
    pub fn conflicts(
        &self,
        wt: &Worktree,
        url: &RepoUrl,
        target: Option<&str>,
    ) -> Result<Vec<String>, GitError> {
        let target = target
            .map(BranchName::parse)
            .transpose()
            .map_err(GitError::NoSuchBase)?;
        let (spec, local) = match &target {
            Some(t) => (
                format!("+{}:{REMOTE_PREFIX}{}", t.refname(), t.as_str()),
                format!("{REMOTE_PREFIX}{}", t.as_str()),
            ),
            None => (
                format!("+HEAD:{REMOTE_PREFIX}HEAD"),
                format!("{REMOTE_PREFIX}HEAD"),
            ),
        };
        {
            let _lock = self.lock(&wt.mirror)?;
            let mirror = open_or_init_mirror(&wt.mirror, url)?;
            fetch(&mirror, &[spec.as_str()])?;
        }
        let repo = Repository::open(&wt.path)?;
        let ours = repo.head()?.peel_to_commit()?;
        let theirs = repo
            .find_reference(&local)
            .and_then(|r| r.peel_to_commit())
            .map_err(|_| {
                GitError::NoSuchBase(
                    target
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_else(|| "HEAD".into()),
                )
            })?;
        let index = repo.merge_commits(&ours, &theirs, None)?;
        if !index.has_conflicts() {
            return Ok(Vec::new());
        }
        let mut paths = std::collections::BTreeSet::new();
        for conflict in index.conflicts()? {
            let conflict = conflict?;
            for entry in [conflict.our, conflict.their, conflict.ancestor]
                .into_iter()
                .flatten()
            {
                paths.insert(String::from_utf8_lossy(&entry.path).into_owned());
            }
        }
        Ok(paths.into_iter().collect())
    }

    /// Pushes the job's branch. A ref the server refuses is an error, read
    /// from the per-ref status (git2's push itself returns Ok for those).
    pub fn push(&self, wt: &Worktree) -> Result<(), GitError> {
        // A push updates the mirror's remote-tracking refs: under its lock.
        let _lock = self.lock(&wt.mirror)?;
        let repo = Repository::open(&wt.path)?;
        let mut remote = repo.find_remote("origin")?;
        let mut rejected: Vec<(String, String)> = Vec::new();
        {
            let mut callbacks = credentials();
            callbacks.push_update_reference(|refname, status| {
                if let Some(reason) = status {
                    rejected.push((refname.to_owned(), reason.to_owned()));
                }
                Ok(())
            });
            let mut opts = PushOptions::new();
            opts.remote_callbacks(callbacks);
            let spec = format!("{0}:{0}", wt.branch.refname());
            match remote.push(&[spec.as_str()], Some(&mut opts)) {
                Ok(()) => {}
                // libgit2 refuses a non-fast-forward before sending it.
                Err(e) if e.code() == git2::ErrorCode::NotFastForward => {
                    return Err(GitError::PushRejected {
                        refname: wt.branch.refname(),
                        reason: "non-fast-forward: the branch moved on the remote".to_owned(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        match rejected.into_iter().next() {
            Some((refname, reason)) => Err(GitError::PushRejected { refname, reason }),
            None => Ok(()),
        }
    }

    /// Removes the worktree, prunes it, and deletes the job's branch from the
    /// mirror unless it was pushed. Safe to call more than once.
    pub fn cleanup(&self, wt: &Worktree, keep_branch: bool) -> Result<(), GitError> {
        if wt.path.exists() {
            std::fs::remove_dir_all(&wt.path)?;
        }
        let _lock = self.lock(&wt.mirror)?;
        let repo = Repository::open_bare(&wt.mirror)?;
        if let Ok(w) = repo.find_worktree(&wt.name) {
            w.prune(Some(
                WorktreePruneOptions::new().valid(true).working_tree(true),
            ))?;
        }
        if !keep_branch {
            if let Ok(mut b) = repo.find_branch(wt.branch.as_str(), BranchType::Local) {
                b.delete()?;
            }
        }
        Ok(())
    }

    /// Removes a worktree left behind (its worker died): the directory, the
    /// mirror's record of it, and its branch in the mirror (a pushed branch
    /// lives on in the remote). The mirror is found through the worktree's
    /// `.git` file.
    pub fn remove_orphan(&self, name: &str) -> Result<(), GitError> {
        let path = self.worktrees_dir().join(name);
        let gitdir = std::fs::read_to_string(path.join(".git"))
            .ok()
            .and_then(|s| s.strip_prefix("gitdir:").map(|g| PathBuf::from(g.trim())));
        let head = gitdir
            .as_ref()
            .and_then(|g| std::fs::read_to_string(g.join("HEAD")).ok())
            .and_then(|h| {
                h.strip_prefix("ref: refs/heads/")
                    .map(|b| b.trim().to_owned())
            });
        // <mirror>/worktrees/<name>
        let mirror = gitdir
            .as_ref()
            .and_then(|g| g.parent())
            .and_then(|w| w.parent())
            .map(Path::to_path_buf);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        let Some(mirror) = mirror.filter(|m| m.starts_with(self.root.join("mirrors"))) else {
            return Ok(());
        };
        let _lock = self.lock(&mirror)?;
        let repo = Repository::open_bare(&mirror)?;
        if let Ok(w) = repo.find_worktree(name) {
            w.prune(Some(
                WorktreePruneOptions::new().valid(true).working_tree(true),
            ))?;
        }
        if let Some(branch) = head {
            if let Ok(mut b) = repo.find_branch(&branch, BranchType::Local) {
                b.delete()?;
            }
        }
        Ok(())
    }

    /// Worktree names (job ids) present on disk, for the orphan reaper.
    pub fn worktree_names(&self) -> Result<Vec<String>, GitError> {
        let dir = self.worktrees_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
}

fn open_or_init_mirror(path: &Path, url: &RepoUrl) -> Result<Repository, GitError> {
    match Repository::open_bare(path) {
        Ok(repo) => Ok(repo),
        Err(_) => {
            let repo = Repository::init_bare(path)?;
            repo.remote_with_fetch(
                "origin",
                &url.as_git_url(),
                "+refs/heads/*:refs/remotes/origin/*",
            )?;
            Ok(repo)
        }
    }
}

fn fetch(repo: &Repository, refspecs: &[&str]) -> Result<(), GitError> {
    let mut remote = repo.find_remote("origin")?;
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(credentials());
    remote.fetch(refspecs, Some(&mut opts), None)?;
    Ok(())
}

/// Credentials from the worker's environment: `ORCH_GIT_HTTPS_TOKEN` for
/// HTTPS, the SSH agent or `ORCH_GIT_SSH_KEY` for SSH; at most
/// [`MAX_CREDENTIAL_ATTEMPTS`] tries.
fn credentials<'a>() -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let mut attempts = 0usize;
    callbacks.credentials(move |_url, username, allowed| {
        attempts += 1;
        if attempts > MAX_CREDENTIAL_ATTEMPTS {
            return Err(git2::Error::from_str("credentials refused; giving up"));
        }
        let user = username.unwrap_or("git");
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Ok(key) = std::env::var("ORCH_GIT_SSH_KEY") {
                return Cred::ssh_key(user, None, Path::new(&key), None);
            }
            return Cred::ssh_key_from_agent(user);
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Ok(token) = std::env::var("ORCH_GIT_HTTPS_TOKEN") {
                return Cred::userpass_plaintext("x-access-token", &token);
            }
        }
        Err(git2::Error::from_str(
            "no credentials for this remote in the worker's environment",
        ))
    });
    callbacks
}
