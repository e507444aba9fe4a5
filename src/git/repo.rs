//! Mirrors, a workspace per job, commit with a secret scan, conflict check
//! and push, through git2. Every function here blocks: call them inside
//! `spawn_blocking` (a git2 `Repository` is Send, not Sync: each call opens
//! its own).
//!
//! **The trust boundary.** The sandbox writes the workspace; the host never
//! opens a repository there. All git metadata the host uses lives in the
//! mirror, outside every mount: the job's base commit and branch are kept in
//! [`Worktree`] (and in `meta.json` beside the workspace, for the reaper).
//! The workspace is a plain checkout of the base tree, written by hand (no
//! attributes, filters or hooks), plus a sandbox-local `.git` for the
//! agent's own use that the host never reads as a repository. The commit is
//! built from the workspace's *files* by [`super::workspace`], which never
//! follows a symlink and skips every `.git` entry; fetch and push use the
//! URL validated from the job (never one from a repository's config), no
//! redirects, and credentials only for the validated host.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use git2::{
    Cred, CredentialType, FetchOptions, ObjectType, Oid, PushOptions, RemoteCallbacks,
    RemoteRedirect, Repository, RepositoryInitOptions, Signature, Tree,
};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::names::{BranchName, RepoUrl};
use super::secrets::{Finding, ScanError, Scanner};
use super::workspace::{display_path, Budget, EntryKind, Limits, SafeDir, WorkspaceError};

/// Credential callbacks give up after this many tries (no endless loop).
const MAX_CREDENTIAL_ATTEMPTS: usize = 3;
/// Where fetched branches land in a mirror.
const REMOTE_PREFIX: &str = "refs/remotes/origin/";
/// Where the mirror keeps each job's commit: a ref per job, so that jobs
/// naming the same branch never move, push or delete each other's.
const JOB_REF_PREFIX: &str = "refs/orchestrator/jobs/";
/// The host-side record beside a job's workspace.
const META_FILE: &str = "meta.json";
/// The job's committed tree, for its gates (beside the workspace).
const COMMITTED_DIR: &str = "committed";
/// The directory mounted at `/workspace`.
const WORKSPACE_DIR: &str = "workspace";
/// Deepest directory nesting walked or checked out.
const MAX_DEPTH: usize = 256;
/// Most hooks named in a tampering report.
const MAX_HOOKS_LISTED: u64 = 20;
/// Most bytes of a `.gitignore` read.
const MAX_GITIGNORE_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("secret scan: {0}")]
    Scan(#[from] ScanError),
    #[error("{0}")]
    Workspace(#[from] WorkspaceError),
    #[error("base ref {0:?} does not exist in the repository")]
    NoSuchBase(String),
    #[error("push of {refname} was rejected: {reason}")]
    PushRejected { refname: String, reason: String },
    #[error("cannot lock the mirror: {0}")]
    Lock(#[source] nix::errno::Errno),
    #[error("repository refused: {0}")]
    Refused(String),
    /// A URL or branch name the policy refuses.
    #[error("refused: {0}")]
    Policy(#[from] super::names::Refused),
    #[error("{0}")]
    Command(String),
}

/// Who may receive which token, and whether this machine's addresses may be
/// reached (`[git]`).
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// Loopback, private and link-local addresses allowed (`git.allow_local`).
    pub allow_local: bool,
    /// Per host, the name of the worker's environment variable holding its
    /// HTTPS token (`[git.host_tokens]`).
    pub host_tokens: BTreeMap<String, String>,
    /// The hosts `ORCH_GIT_HTTPS_TOKEN` serves: those `git.allowed_hosts`
    /// names. A host allowed only through `"*"` gets no token.
    pub token_hosts: Vec<String>,
}

impl Network {
    /// The environment variable holding `host`'s HTTPS token, if it has one.
    pub fn token_var(&self, host: &str) -> Option<&str> {
        if let Some((_, var)) = self
            .host_tokens
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(host))
        {
            return Some(var);
        }
        self.token_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
            .then_some("ORCH_GIT_HTTPS_TOKEN")
    }
}

/// How the git stage is set up.
#[derive(Clone)]
pub struct GitStage {
    root: PathBuf,
    author_name: String,
    author_email: String,
    scanner: Arc<Scanner>,
    limits: Limits,
    network: Network,
}

/// A job's workspace and what the host knows about it.
#[derive(Debug, Clone)]
pub struct Worktree {
    /// The job id.
    pub name: String,
    /// `<root>/worktrees/<job>`: the host's, never mounted.
    pub dir: PathBuf,
    /// `<dir>/workspace`: mounted at `/workspace`, the agent's to write.
    pub path: PathBuf,
    pub mirror: PathBuf,
    /// The repository, as validated from the job: every fetch and push of
    /// this workspace goes to it and nowhere else.
    pub url: RepoUrl,
    pub branch: BranchName,
    pub base_commit: Oid,
    /// The job's branch as it was on the remote before the job, if it
    /// existed (pushing to it needs the admin scope or a kind allowing it).
    pub branch_on_remote: Option<Oid>,
    /// A digest of the sandbox-local `.git/config` as the host wrote it.
    sandbox_config: Oid,
}

impl Worktree {
    /// The mirror's ref for this job's commit (the branch name is the
    /// remote's; in the mirror the job has a ref of its own).
    pub fn job_ref(&self) -> String {
        job_ref(&self.name)
    }
}

fn job_ref(job: &str) -> String {
    format!("{JOB_REF_PREFIX}{job}")
}

/// What the reaper needs of a workspace, kept outside it.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    mirror: PathBuf,
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

/// Diff stats and changed paths of a job's change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffSummary {
    pub files_changed: usize,
    pub insertions: usize,
    pub deletions: usize,
    pub paths: Vec<String>,
    /// More paths changed than are listed.
    pub paths_truncated: bool,
}

/// A commit and what the host saw of git metadata in the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    pub outcome: CommitOutcome,
    /// How the agent created or changed git metadata (ignored, never
    /// followed): for the `git_metadata_tampered` event. Empty when the
    /// sandbox-local `.git` only changed the way git itself changes it.
    pub tampered: Vec<String>,
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
            limits: Limits::default(),
            network: Network::default(),
        }
    }

    /// Bounds on what is read from a workspace.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Address and credential policy for fetch and push.
    pub fn with_network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
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
            .map_err(|(_, e)| GitError::Lock(e))
    }

    /// Fetches `refspecs` of `url` into `repo`: the URL as validated (its
    /// host resolved again now, since DNS may have changed), no redirects,
    /// credentials for that host only.
    fn fetch(&self, repo: &Repository, url: &RepoUrl, refspecs: &[&str]) -> Result<(), GitError> {
        let mut remote = self.remote(repo, url)?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(credentials(url, &self.network));
        opts.follow_redirects(RemoteRedirect::None);
        remote.fetch(refspecs, Some(&mut opts), None)?;
        Ok(())
    }

    /// An unnamed remote for `url` in `repo`, its host resolved again now
    /// (DNS may have changed since enqueue): never a remote from config.
    fn remote<'r>(
        &self,
        repo: &'r Repository,
        url: &RepoUrl,
    ) -> Result<git2::Remote<'r>, GitError> {
        url.check_resolves(self.network.allow_local)?;
        Ok(repo.remote_anonymous(&url.as_git_url())?)
    }

    /// Creates (first use) and fetches the mirror, then writes the job's
    /// workspace: the base tree (default: the remote's HEAD) as plain files,
    /// and a sandbox-local `.git` on `branch` for the agent's own use.
    pub fn prepare(
        &self,
        job: &str,
        url: &RepoUrl,
        base: Option<&str>,
        branch: &BranchName,
    ) -> Result<Worktree, GitError> {
        let mirror = self.mirror_path(url);
        let _lock = self.lock(&mirror)?;
        let repo = open_or_init_mirror(&mirror)?;
        self.fetch(
            &repo,
            url,
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
        let branch_on_remote = repo
            .find_reference(&format!("{REMOTE_PREFIX}{}", branch.as_str()))
            .ok()
            .and_then(|r| r.target());
        // What an earlier attempt left is replaced.
        let dir = self.worktrees_dir().join(job);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(self.worktrees_dir())?;
        std::fs::create_dir(&dir)?;
        let meta = Meta {
            mirror: mirror.clone(),
        };
        std::fs::write(
            dir.join(META_FILE),
            serde_json::to_vec(&meta).map_err(std::io::Error::from)?,
        )?;
        let path = dir.join(WORKSPACE_DIR);
        std::fs::create_dir(&path)?;
        let mut budget = Budget::new(self.limits);
        checkout(&repo, &base_commit.tree()?, &path, &mut budget, 0)?;
        let sandbox_config = self.sandbox_git(&repo, &base_commit, branch, &path)?;
        // The host's own record of the job's commit, so far the base.
        repo.reference(
            &job_ref(job),
            base_commit.id(),
            true,
            "orchestrator: the job's base",
        )?;
        Ok(Worktree {
            name: job.to_owned(),
            dir,
            path,
            mirror,
            url: url.clone(),
            branch: branch.clone(),
            base_commit: base_commit.id(),
            branch_on_remote,
            sandbox_config,
        })
    }

    /// A repository at `<workspace>/.git` for the agent: the base commit
    /// with its tree (a shallow history of one), the job's branch checked
    /// out, an index matching the files. The host writes it and never reads
    /// it as a repository again.
    fn sandbox_git(
        &self,
        mirror: &Repository,
        base: &git2::Commit<'_>,
        branch: &BranchName,
        workspace: &Path,
    ) -> Result<Oid, GitError> {
        let mut opts = RepositoryInitOptions::new();
        opts.no_reinit(true)
            .initial_head(&branch.refname())
            .external_template(false);
        let local = Repository::init_opts(workspace, &opts)?;
        // libgit2 writes a sample; an empty hooks directory makes any hook
        // the agent adds stand out.
        let hooks = workspace.join(".git/hooks");
        if hooks.exists() {
            std::fs::remove_dir_all(&hooks)?;
        }
        std::fs::create_dir(&hooks)?;
        let mut pack = mirror.packbuilder()?;
        pack.insert_commit(base.id())?;
        let mut buf = git2::Buf::new();
        pack.write_buf(&mut buf)?;
        let odb = local.odb()?;
        let mut writer = odb.packwriter()?;
        writer.write_all(&buf)?;
        writer.commit()?;
        local.reference(
            &branch.refname(),
            base.id(),
            true,
            "orchestrator: the job's base",
        )?;
        local.set_head(&branch.refname())?;
        std::fs::write(workspace.join(".git/shallow"), format!("{}\n", base.id()))?;
        let tree = local.find_commit(base.id())?.tree()?;
        let mut index = local.index()?;
        index.read_tree(&tree)?;
        index.write()?;
        let mut config = local.config()?;
        config.set_str("user.name", &self.author_name)?;
        config.set_str("user.email", &self.author_email)?;
        drop(config);
        let written = std::fs::read(workspace.join(".git/config"))?;
        Ok(Oid::hash_object(ObjectType::Blob, &written)?)
    }

    /// Builds the commit from the workspace's files (respecting
    /// `.gitignore`, deletions included, every `.git` skipped) after
    /// scanning the added lines for secrets, and points the job's branch in
    /// the mirror at it.
    pub fn commit(&self, wt: &Worktree, message: &str) -> Result<CommitReport, GitError> {
        let repo = Repository::open_bare(&wt.mirror)?;
        let head = repo.find_commit(wt.base_commit)?;
        let base_tree = head.tree()?;
        let mut root = SafeDir::open_root(&wt.path)?;
        let mut tampered = inspect_sandbox_git(&root, wt.sandbox_config)?;
        let mut budget = Budget::new(self.limits);
        let mut walk = Walk {
            repo: &repo,
            budget: &mut budget,
            tampered: &mut tampered,
        };
        let tree_id = match walk.tree(&mut root, Some(&base_tree), None, 0)? {
            Some(id) => id,
            None => repo.treebuilder(None)?.write()?,
        };
        let outcome = self.finish_commit(&repo, wt, &head, &base_tree, tree_id, message)?;
        Ok(CommitReport { outcome, tampered })
    }

    fn finish_commit(
        &self,
        repo: &Repository,
        wt: &Worktree,
        head: &git2::Commit<'_>,
        base_tree: &Tree<'_>,
        tree_id: Oid,
        message: &str,
    ) -> Result<CommitOutcome, GitError> {
        if tree_id == base_tree.id() {
            return Ok(CommitOutcome::NoChanges);
        }
        let tree = repo.find_tree(tree_id)?;
        let diff = repo.diff_tree_to_tree(Some(base_tree), Some(&tree), None)?;
        let findings = self.scan_diff(repo, &diff)?;
        if !findings.is_empty() {
            return Ok(CommitOutcome::SecretDetected { findings });
        }
        let files = diff.deltas().len();
        let sig = Signature::now(&self.author_name, &self.author_email)?;
        let sha = repo.commit(None, &sig, &sig, message, &tree, &[head])?;
        // The branch ref lives in the mirror, which other jobs write to.
        let _lock = self.lock(&wt.mirror)?;
        repo.reference(&wt.job_ref(), sha, true, "orchestrator: the agent's change")?;
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
        // One file at a time: what is held is one file's added lines, never
        // the whole change's.
        let mut findings = Vec::new();
        for index in 0..diff.deltas().len() {
            let Some(patch) = git2::Patch::from_diff(diff, index)? else {
                continue;
            };
            let delta = patch.delta();
            let Some(path) = delta.new_file().path() else {
                continue;
            };
            let file = path.to_string_lossy().into_owned();
            if delta.flags().is_binary() || delta.new_file().is_binary() {
                let oid = delta.new_file().id();
                if !oid.is_zero() {
                    let blob = repo.find_blob(oid)?;
                    findings.extend(
                        self.scanner
                            .scan_text(&file, &String::from_utf8_lossy(blob.content())),
                    );
                }
                continue;
            }
            let mut added: Vec<(usize, String)> = Vec::new();
            for hunk in 0..patch.num_hunks() {
                for n in 0..patch.num_lines_in_hunk(hunk)? {
                    let line = patch.line_in_hunk(hunk, n)?;
                    if line.origin() == '+' {
                        added.push((
                            line.new_lineno().unwrap_or(0) as usize,
                            String::from_utf8_lossy(line.content())
                                .trim_end_matches('\n')
                                .to_owned(),
                        ));
                    }
                }
            }
            findings.extend(
                self.scanner
                    .scan_lines(&file, added.iter().map(|(n, t)| (*n, t.as_str()))),
            );
        }
        Ok(findings)
    }

    /// The job's commit in the mirror.
    fn branch_head<'r>(
        &self,
        repo: &'r Repository,
        wt: &Worktree,
    ) -> Result<git2::Commit<'r>, GitError> {
        Ok(repo.find_reference(&wt.job_ref())?.peel_to_commit()?)
    }

    /// The job's committed tree as plain files in `<dir>/committed` (no
    /// `.git`, nothing the commit left out): what gates run on, so that
    /// what passes them is exactly what would be pushed.
    pub fn committed_tree(&self, wt: &Worktree) -> Result<PathBuf, GitError> {
        let repo = Repository::open_bare(&wt.mirror)?;
        let tree = self.branch_head(&repo, wt)?.tree()?;
        let dir = wt.dir.join(COMMITTED_DIR);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir(&dir)?;
        checkout(&repo, &tree, &dir, &mut Budget::new(self.limits), 0)?;
        Ok(dir)
    }

    /// The change the job made (its base to its branch's head) as a patch,
    /// for a reviewer.
    pub fn diff_patch(&self, wt: &Worktree) -> Result<String, GitError> {
        let repo = Repository::open_bare(&wt.mirror)?;
        let head = self.branch_head(&repo, wt)?.tree()?;
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

    /// What the change touches (its base to its branch's head): counts and
    /// the changed paths (at most `max_paths`, lossily decoded), for a
    /// coordinator. Paths are data from the agent, never opened here.
    pub fn diff_summary(&self, wt: &Worktree, max_paths: usize) -> Result<DiffSummary, GitError> {
        let repo = Repository::open_bare(&wt.mirror)?;
        let head = self.branch_head(&repo, wt)?.tree()?;
        let base = repo.find_commit(wt.base_commit)?.tree()?;
        let diff = repo.diff_tree_to_tree(Some(&base), Some(&head), None)?;
        let stats = diff.stats()?;
        let paths: Vec<String> = diff
            .deltas()
            .filter_map(|d| {
                d.new_file()
                    .path_bytes()
                    .or(d.old_file().path_bytes())
                    .map(<[u8]>::to_vec)
            })
            .take(max_paths)
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .collect();
        Ok(DiffSummary {
            files_changed: stats.files_changed(),
            insertions: stats.insertions(),
            deletions: stats.deletions(),
            paths_truncated: stats.files_changed() > paths.len(),
            paths,
        })
    }

    /// Fetches `target` (default: the remote's HEAD) and merges it with the
    /// job's branch in memory; the conflicted paths, empty when the branch
    /// merges cleanly.
    pub fn conflicts(&self, wt: &Worktree, target: Option<&str>) -> Result<Vec<String>, GitError> {
        let target = target.map(BranchName::parse).transpose()?;
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
        let _lock = self.lock(&wt.mirror)?;
        let repo = open_or_init_mirror(&wt.mirror)?;
        self.fetch(&repo, &wt.url, &[spec.as_str()])?;
        let ours = self.branch_head(&repo, wt)?;
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
                paths.insert(display_path(&entry.path));
            }
        }
        Ok(paths.into_iter().collect())
    }

    /// Pushes the job's branch from the mirror to the job's repository (as
    /// validated from the job, never a URL from any repository's config). A
    /// ref the server refuses is an error, read from the per-ref status
    /// (git2's push itself returns Ok for those).
    pub fn push(&self, wt: &Worktree) -> Result<(), GitError> {
        let url = &wt.url;
        // A push updates the mirror's remote-tracking refs: under its lock.
        let _lock = self.lock(&wt.mirror)?;
        let repo = Repository::open_bare(&wt.mirror)?;
        let mut remote = self.remote(&repo, url)?;
        let mut rejected: Vec<(String, String)> = Vec::new();
        {
            let mut callbacks = credentials(url, &self.network);
            callbacks.push_update_reference(|refname, status| {
                if let Some(reason) = status {
                    rejected.push((refname.to_owned(), reason.to_owned()));
                }
                Ok(())
            });
            let mut opts = PushOptions::new();
            opts.remote_callbacks(callbacks);
            opts.follow_redirects(RemoteRedirect::None);
            // The job's own commit, to the branch it names on the remote.
            let spec = format!("{}:{}", wt.job_ref(), wt.branch.refname());
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

    /// Removes the workspace, its record and the job's ref in the mirror
    /// (a pushed branch lives on in the remote). Safe to call more than
    /// once.
    pub fn cleanup(&self, wt: &Worktree) -> Result<(), GitError> {
        // std's remove_dir_all never follows symlinks.
        if wt.dir.exists() {
            std::fs::remove_dir_all(&wt.dir)?;
        }
        self.delete_job_ref(&wt.mirror, &wt.name)
    }

    fn delete_job_ref(&self, mirror: &Path, job: &str) -> Result<(), GitError> {
        let _lock = self.lock(mirror)?;
        let repo = Repository::open_bare(mirror)?;
        if let Ok(mut r) = repo.find_reference(&job_ref(job)) {
            r.delete()?;
        }
        Ok(())
    }

    /// Removes a workspace left behind (its worker died), and the job's ref
    /// in the mirror. The mirror comes from the host's record beside the
    /// workspace, never from anything inside it.
    pub fn remove_orphan(&self, name: &str) -> Result<(), GitError> {
        let dir = self.worktrees_dir().join(name);
        let meta: Option<Meta> = std::fs::read(dir.join(META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let Some(meta) = meta else {
            return Ok(());
        };
        if !meta.mirror.starts_with(self.root.join("mirrors")) || !meta.mirror.exists() {
            return Ok(());
        }
        self.delete_job_ref(&meta.mirror, name)
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

/// The mirror: a bare repository of the host's. It has no remote in its
/// config: every fetch and push names the validated URL itself.
fn open_or_init_mirror(path: &Path) -> Result<Repository, GitError> {
    match Repository::open_bare(path) {
        Ok(repo) => Ok(repo),
        Err(_) => Ok(Repository::init_bare(path)?),
    }
}

/// Credentials from the worker's environment, given only when libgit2 asks
/// about the validated host: over HTTPS its token ([`Network::token_var`]),
/// the SSH agent or `ORCH_GIT_SSH_KEY` for SSH; at most
/// [`MAX_CREDENTIAL_ATTEMPTS`] tries.
fn credentials<'a>(url: &'a RepoUrl, network: &'a Network) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let mut attempts = 0usize;
    callbacks.credentials(move |asked, username, allowed| {
        attempts += 1;
        if attempts > MAX_CREDENTIAL_ATTEMPTS {
            return Err(git2::Error::from_str("credentials refused; giving up"));
        }
        let Some(host) = url
            .host()
            .filter(|h| RepoUrl::host_of(asked).as_deref() == Some(*h))
        else {
            return Err(git2::Error::from_str(
                "credentials are given only to the repository's validated host",
            ));
        };
        let user = username.unwrap_or("git");
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Ok(key) = std::env::var("ORCH_GIT_SSH_KEY") {
                return Cred::ssh_key(user, None, Path::new(&key), None);
            }
            return Cred::ssh_key_from_agent(user);
        }
        // A token travels only over TLS.
        let https = matches!(url, RepoUrl::Remote { scheme, .. } if scheme == "https");
        if https && allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(token) = network.token_var(host).and_then(|v| std::env::var(v).ok()) {
                return Cred::userpass_plaintext("x-access-token", &token);
            }
        }
        Err(git2::Error::from_str(
            "no credentials for this remote in the worker's environment",
        ))
    });
    callbacks
}

/// A tree entry name from the remote, as a file name: never empty, `.`,
/// `..`, a path, or `.git` (which only the host writes).
fn checked_name(name: &[u8]) -> Result<&OsStr, GitError> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
        || name.eq_ignore_ascii_case(b".git")
    {
        return Err(GitError::Refused(format!(
            "the repository has an entry named {:?}, which is not checked out",
            display_path(name)
        )));
    }
    Ok(OsStr::from_bytes(name))
}

/// Writes `tree` into the new, empty directory `dir` as plain files:
/// written by hand rather than by libgit2's checkout so that no attribute,
/// filter or config changes a byte (the commit is built from these bytes),
/// and every path is created fresh (`create_new`, `create_dir`), so a
/// crafted tree with a name twice cannot write through a symlink.
fn checkout(
    repo: &Repository,
    tree: &Tree<'_>,
    dir: &Path,
    budget: &mut Budget,
    depth: usize,
) -> Result<(), GitError> {
    if depth >= MAX_DEPTH {
        return Err(GitError::Refused(format!(
            "the repository nests directories more than {MAX_DEPTH} deep"
        )));
    }
    for entry in tree.iter() {
        let name = checked_name(entry.name_bytes())?;
        let path = dir.join(name);
        budget.entry()?;
        match entry.kind() {
            Some(ObjectType::Tree) => {
                std::fs::create_dir(&path)?;
                checkout(repo, &repo.find_tree(entry.id())?, &path, budget, depth + 1)?;
            }
            Some(ObjectType::Blob) => {
                let blob = repo.find_blob(entry.id())?;
                if entry.filemode() == 0o120000 {
                    std::os::unix::fs::symlink(OsStr::from_bytes(blob.content()), &path)?;
                } else {
                    let mode = if entry.filemode() == 0o100755 {
                        0o755
                    } else {
                        0o644
                    };
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&path)?;
                    file.write_all(blob.content())?;
                }
            }
            // A submodule: an empty directory, as git leaves it.
            Some(ObjectType::Commit) => std::fs::create_dir(&path)?,
            _ => {}
        }
    }
    Ok(())
}

/// What the agent did to git metadata. The sandbox-local `.git` may change
/// the way git changes it (index, objects, refs, logs); replacing it,
/// pointing it elsewhere, borrowing objects, adding hooks or changing its
/// config is recorded. Only `lstat` and a bounded read of the config's
/// bytes: nothing is interpreted.
fn inspect_sandbox_git(root: &SafeDir, written_config: Oid) -> Result<Vec<String>, GitError> {
    let mut found = Vec::new();
    match root.kind(b".git") {
        Err(WorkspaceError::Io { .. }) => found.push("/workspace/.git was removed".to_owned()),
        Err(e) => return Err(e.into()),
        Ok(EntryKind::Dir) => {}
        Ok(EntryKind::Symlink) => {
            found.push("/workspace/.git was replaced by a symlink".to_owned())
        }
        Ok(EntryKind::File { .. }) => {
            found.push("/workspace/.git was replaced by a file (a gitdir pointer)".to_owned())
        }
        Ok(EntryKind::Special(what)) => {
            found.push(format!("/workspace/.git was replaced by a {what}"))
        }
    }
    if !found.is_empty() {
        return Ok(found);
    }
    let git = match root.open_dir(b".git") {
        Ok(dir) => dir,
        Err(e) => {
            found.push(format!(
                "/workspace/.git cannot be opened as a directory: {e}"
            ));
            return Ok(found);
        }
    };
    for (name, why) in [
        (&b"commondir"[..], "a commondir pointer"),
        (b"gitdir", "a gitdir pointer"),
    ] {
        if git.kind(name).is_ok() {
            found.push(format!("/workspace/.git has {why}"));
        }
    }
    if let Ok(objects) = git.open_dir(b"objects") {
        if let Ok(info) = objects.open_dir(b"info") {
            for name in [&b"alternates"[..], b"http-alternates"] {
                if info.kind(name).is_ok() {
                    found.push(format!(
                        "/workspace/.git/objects/info/{} borrows objects from elsewhere",
                        display_path(name)
                    ));
                }
            }
        }
    }
    if let Ok(mut hooks) = git.open_dir(b"hooks") {
        let mut few = Budget::new(Limits {
            max_files: MAX_HOOKS_LISTED,
            ..Limits::default()
        });
        match hooks.entries(&mut few) {
            Ok(list) if list.is_empty() => {}
            Ok(list) => {
                let names: Vec<String> = list.iter().map(|(n, _)| display_path(n)).collect();
                found.push(format!("/workspace/.git/hooks has {}", names.join(", ")));
            }
            Err(WorkspaceError::TooManyFiles { .. }) => found.push(format!(
                "/workspace/.git/hooks has more than {MAX_HOOKS_LISTED} entries"
            )),
            Err(e) => return Err(e.into()),
        }
    }
    match git.read_file(b"config", &mut Budget::new(Limits::one_file(1024 * 1024))) {
        Ok(bytes) if Oid::hash_object(ObjectType::Blob, bytes.as_slice())? == written_config => {}
        Ok(_) => found.push("/workspace/.git/config was changed".to_owned()),
        Err(e) => found.push(format!(
            "/workspace/.git/config is not the one written: {e}"
        )),
    }
    Ok(found)
}

/// `.gitignore` rules in force in a directory: its own, then its parents'.
struct Ignores<'a> {
    parent: Option<&'a Ignores<'a>>,
    rules: Option<Gitignore>,
}

impl Ignores<'_> {
    /// Whether an untracked `path` (relative to the workspace) is ignored:
    /// the deepest rule file that has an opinion decides, as in git.
    fn ignored(&self, path: &[u8], is_dir: bool) -> bool {
        let path = Path::new(OsStr::from_bytes(path));
        let mut level = Some(self);
        while let Some(l) = level {
            if let Some(rules) = &l.rules {
                match rules.matched(path, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            level = l.parent;
        }
        false
    }
}

/// Builds git trees from a workspace into the mirror's object database.
struct Walk<'r, 'b> {
    repo: &'r Repository,
    budget: &'b mut Budget,
    tampered: &'b mut Vec<String>,
}

impl Walk<'_, '_> {
    /// The tree of `dir`, `None` when nothing in it is committed (git
    /// stores no empty directories). `base` is the same directory in the
    /// job's base commit: what it tracks is never ignored, and its
    /// submodules are kept as they were.
    fn tree(
        &mut self,
        dir: &mut SafeDir,
        base: Option<&Tree<'_>>,
        parent: Option<&Ignores<'_>>,
        depth: usize,
    ) -> Result<Option<Oid>, GitError> {
        // Each level holds a descriptor and a stack frame: bounded, so a
        // deep tree cannot exhaust either.
        if depth >= MAX_DEPTH {
            return Err(GitError::Refused(format!(
                "worktree_too_deep: {} is more than {MAX_DEPTH} directories deep",
                display_path(dir.path())
            )));
        }
        let entries = dir.entries(self.budget)?;
        // Read once: for its rules, and as the blob it is.
        let mut gitignore = match entries.iter().find(|(n, _)| n == b".gitignore") {
            Some((_, EntryKind::File { size, .. })) => Some(self.read_gitignore(dir, *size)?),
            _ => None,
        };
        let rules = gitignore
            .as_deref()
            .map(|text| gitignore_rules(dir, text))
            .transpose()?;
        let ignores = Ignores { parent, rules };
        let mut builder = self.repo.treebuilder(None)?;
        for (name, kind) in entries {
            let rel = dir.rel(&name);
            if name.eq_ignore_ascii_case(b".git") {
                if !dir.path().is_empty() {
                    self.tampered
                        .push(format!("a nested .git at {} (ignored)", display_path(&rel)));
                }
                continue;
            }
            let tracked = base.and_then(|t| t.get_name_bytes(&name));
            let is_dir = kind == EntryKind::Dir;
            if tracked.is_none() && ignores.ignored(&rel, is_dir) {
                continue;
            }
            match kind {
                EntryKind::Dir => {
                    if let Some(sub) = tracked
                        .as_ref()
                        .filter(|e| e.kind() == Some(ObjectType::Commit))
                    {
                        builder.insert(name, sub.id(), 0o160000)?;
                        continue;
                    }
                    let base_sub = match tracked
                        .as_ref()
                        .filter(|e| e.kind() == Some(ObjectType::Tree))
                    {
                        Some(e) => Some(self.repo.find_tree(e.id())?),
                        None => None,
                    };
                    let mut sub = dir.open_dir(&name)?;
                    if let Some(id) =
                        self.tree(&mut sub, base_sub.as_ref(), Some(&ignores), depth + 1)?
                    {
                        builder.insert(name, id, 0o040000)?;
                    }
                }
                EntryKind::File { executable, .. } => {
                    let cached = if name == b".gitignore" {
                        gitignore.take()
                    } else {
                        None
                    };
                    let data = match cached {
                        Some(data) => data,
                        None => dir.read_file(&name, self.budget)?,
                    };
                    let id = self.repo.blob(&data)?;
                    builder.insert(name, id, if executable { 0o100755 } else { 0o100644 })?;
                }
                EntryKind::Symlink => {
                    let target = dir.read_link(&name)?;
                    let id = self.repo.blob(&target)?;
                    builder.insert(name, id, 0o120000)?;
                }
                EntryKind::Special(what) => {
                    return Err(WorkspaceError::SpecialFile {
                        path: display_path(&rel),
                        what,
                    }
                    .into())
                }
            }
        }
        if builder.is_empty() {
            return Ok(None);
        }
        Ok(Some(builder.write()?))
    }

    /// `dir/.gitignore` (of `size` bytes by `lstat`), read within the
    /// walk's budget and at most [`MAX_GITIGNORE_BYTES`].
    fn read_gitignore(&mut self, dir: &SafeDir, size: u64) -> Result<Vec<u8>, GitError> {
        if size > MAX_GITIGNORE_BYTES {
            return Err(GitError::Refused(format!(
                "worktree_gitignore_too_large: {} is {size} bytes, over {MAX_GITIGNORE_BYTES}",
                display_path(&dir.rel(b".gitignore"))
            )));
        }
        Ok(dir.read_file(b".gitignore", self.budget)?)
    }
}

/// The rules of a directory's `.gitignore` text, as data.
fn gitignore_rules(dir: &SafeDir, text: &[u8]) -> Result<Gitignore, GitError> {
    let root = Path::new(OsStr::from_bytes(dir.path()));
    let mut builder = GitignoreBuilder::new(root);
    for line in String::from_utf8_lossy(text).lines() {
        // A line the matcher cannot parse is skipped, as git does.
        let _ = builder.add_line(None, line);
    }
    builder
        .build()
        .map_err(|e| GitError::Command(format!(".gitignore: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_go_only_to_hosts_named_for_them() {
        let network = Network {
            allow_local: false,
            host_tokens: BTreeMap::from([("GitLab.example.org".into(), "GITLAB_TOKEN".into())]),
            token_hosts: vec!["github.com".into()],
        };
        assert_eq!(
            network.token_var("github.com"),
            Some("ORCH_GIT_HTTPS_TOKEN")
        );
        assert_eq!(
            network.token_var("GITHUB.com"),
            Some("ORCH_GIT_HTTPS_TOKEN")
        );
        assert_eq!(
            network.token_var("gitlab.example.org"),
            Some("GITLAB_TOKEN")
        );
        // Allowed through "*", or not at all: no token.
        assert_eq!(network.token_var("attacker.example"), None);
    }
}
