//! Git fixtures shared by the test binaries: the `git` CLI with a fixed
//! identity, and a bare "remote" seeded with files on `main`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs git in `dir`; panics with its stderr on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `<dir>/origin.git`, bare, with one commit on main holding `files`.
pub fn bare_origin(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let bare = dir.join("origin.git");
    git(
        dir,
        &["init", "-q", "--bare", bare.to_str().expect("utf-8")],
    );
    let seed = dir.join("seed");
    git(
        dir,
        &[
            "clone",
            "-q",
            bare.to_str().expect("utf-8"),
            seed.to_str().expect("utf-8"),
        ],
    );
    for (name, content) in files {
        std::fs::write(seed.join(name), content).expect("write a seed file");
    }
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-q", "-m", "init"]);
    git(&seed, &["push", "-q", "origin", "HEAD:main"]);
    bare
}
