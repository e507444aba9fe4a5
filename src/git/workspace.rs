//! Reading what a sandbox wrote, as data only.
//!
//! Everything under a job's workspace may have been written by an adversary:
//! a symlink to `/etc/shadow`, a FIFO where a report should be, a sparse
//! 100 GB file, a million empty files, a directory swapped for a link. So
//! the host walks it by file descriptor: every name is opened relative to
//! its parent's descriptor with `O_NOFOLLOW`, so no symlink is ever followed
//! (a symlink is read as its target's bytes, never opened); regular files
//! are opened `O_NONBLOCK` and checked with `fstat` on the open descriptor
//! before one byte is read, so FIFOs, sockets and devices are refused
//! without blocking; sizes and counts are checked against [`Limits`] before
//! reading, so nothing large is ever loaded.
//!
//! Written by hand on `nix` because std has no `openat`; `cap-std` would
//! confine paths too, but it follows symlinks inside the root and opens
//! files without `O_NONBLOCK`, which is not what we need.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

/// Bounds on what the host reads from a workspace (`[git]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest single file read (`git.max_file_bytes`).
    pub max_file_bytes: u64,
    /// All files read, together (`git.max_worktree_bytes`).
    pub max_total_bytes: u64,
    /// Entries walked: files, links and directories (`git.max_worktree_files`).
    pub max_files: u64,
}

impl Limits {
    /// Bounds for reading one small file on its own (at most `max_bytes`).
    pub fn one_file(max_bytes: u64) -> Limits {
        Limits {
            max_file_bytes: max_bytes,
            max_total_bytes: max_bytes,
            max_files: 1,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 10 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            max_files: 100_000,
        }
    }
}

/// Why a workspace could not be read. Each names the path (as data:
/// escaped and shortened) and the limit; none carries file contents.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("worktree_file_too_large: {path} is {size} bytes, over git.max_file_bytes ({limit})")]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error(
        "worktree_too_large: the files add up to more than git.max_worktree_bytes ({limit} bytes)"
    )]
    TooManyBytes { limit: u64 },
    #[error("worktree_too_many_files: more than git.max_worktree_files ({limit}) entries")]
    TooManyFiles { limit: u64 },
    #[error("worktree_special_file: {path} is a {what}; only regular files, directories and symlinks are read")]
    SpecialFile { path: String, what: &'static str },
    #[error("worktree_not_found: {path} does not exist or is not a regular file (a symlink is never followed)")]
    NotFound { path: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What an entry is, from `lstat` (symlinks are never resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64, executable: bool },
    Symlink,
    Special(&'static str),
}

/// A path shown in an error or an event: lossy UTF-8, control characters
/// escaped, at most 200 characters. A file name is data, never markup.
pub fn display_path(path: &[u8]) -> String {
    let text = String::from_utf8_lossy(path);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts what a walk has read against [`Limits`].
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    entries: u64,
    bytes: u64,
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Budget {
            limits,
            entries: 0,
            bytes: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// One more entry walked.
    pub fn entry(&mut self) -> Result<(), WorkspaceError> {
        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(WorkspaceError::TooManyFiles {
                limit: self.limits.max_files,
            });
        }
        Ok(())
    }

    /// `size` more bytes about to be read from `path`.
    fn bytes(&mut self, path: &str, size: u64) -> Result<(), WorkspaceError> {
        if size > self.limits.max_file_bytes {
            return Err(WorkspaceError::FileTooLarge {
                path: path.to_owned(),
                size,
                limit: self.limits.max_file_bytes,
            });
        }
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limits.max_total_bytes {
            return Err(WorkspaceError::TooManyBytes {
                limit: self.limits.max_total_bytes,
            });
        }
        Ok(())
    }
}

/// A directory of the workspace, opened without following links.
pub struct SafeDir {
    dir: Dir,
    /// Where it is, relative to the workspace root (for messages).
    rel: Vec<u8>,
}

fn io_err(path: &[u8], errno: nix::errno::Errno) -> WorkspaceError {
    WorkspaceError::Io {
        path: display_path(path),
        source: std::io::Error::from(errno),
    }
}

fn kind_of(stat: &FileStat) -> EntryKind {
    let fmt = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if fmt == SFlag::S_IFDIR {
        EntryKind::Dir
    } else if fmt == SFlag::S_IFREG {
        EntryKind::File {
            size: u64::try_from(stat.st_size).unwrap_or(u64::MAX),
            executable: stat.st_mode & 0o100 != 0,
        }
    } else if fmt == SFlag::S_IFLNK {
        EntryKind::Symlink
    } else if fmt == SFlag::S_IFIFO {
        EntryKind::Special("FIFO")
    } else if fmt == SFlag::S_IFSOCK {
        EntryKind::Special("socket")
    } else if fmt == SFlag::S_IFCHR {
        EntryKind::Special("character device")
    } else if fmt == SFlag::S_IFBLK {
        EntryKind::Special("block device")
    } else {
        EntryKind::Special("special file")
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);
const FILE_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOCTTY);

impl SafeDir {
    /// Opens the workspace root itself (which must not be a symlink).
    pub fn open_root(path: &Path) -> Result<SafeDir, WorkspaceError> {
        let dir = Dir::open(path, DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err(path.as_os_str().as_bytes(), e))?;
        Ok(SafeDir {
            dir,
            rel: Vec::new(),
        })
    }

    /// The path of `name` in this directory, relative to the root.
    pub fn rel(&self, name: &[u8]) -> Vec<u8> {
        if self.rel.is_empty() {
            name.to_vec()
        } else {
            let mut p = self.rel.clone();
            p.push(b'/');
            p.extend_from_slice(name);
            p
        }
    }

    /// This directory's path relative to the root (empty for the root).
    pub fn path(&self) -> &[u8] {
        &self.rel
    }

    /// The entries (without `.` and `..`), sorted by name, each with its
    /// kind from `lstat`. Each name counts against `budget` as it is read,
    /// so a directory of a million names stops at the limit.
    pub fn entries(
        &mut self,
        budget: &mut Budget,
    ) -> Result<Vec<(Vec<u8>, EntryKind)>, WorkspaceError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        for entry in self.dir.iter() {
            let entry = entry.map_err(|e| io_err(&self.rel, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            budget.entry()?;
            names.push(name.to_vec());
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let kind = self.kind(&name)?;
            out.push((name, kind));
        }
        Ok(out)
    }

    /// The kind of `name` (`lstat`: a symlink is reported as one).
    pub fn kind(&self, name: &[u8]) -> Result<EntryKind, WorkspaceError> {
        let stat = fstatat(
            self.dir.as_fd(),
            OsStr::from_bytes(name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(&self.rel(name), e))?;
        Ok(kind_of(&stat))
    }

    /// Opens the subdirectory `name`; a symlink (or anything else) is refused.
    pub fn open_dir(&self, name: &[u8]) -> Result<SafeDir, WorkspaceError> {
        let rel = self.rel(name);
        let dir = Dir::openat(
            self.dir.as_fd(),
            OsStr::from_bytes(name),
            DIR_FLAGS,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // O_NOFOLLOW on a symlink, or not a directory at all.
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => WorkspaceError::SpecialFile {
                path: display_path(&rel),
                what: "symlink or non-directory where a directory was expected",
            },
            e => io_err(&rel, e),
        })?;
        Ok(SafeDir { dir, rel })
    }

    /// Reads the regular file `name` whole, within `budget`. A symlink, a
    /// FIFO, a socket or a device is refused before anything is read; so is
    /// a file over the size limit (checked on the open descriptor, so it
    /// cannot be swapped in between).
    pub fn read_file(&self, name: &[u8], budget: &mut Budget) -> Result<Vec<u8>, WorkspaceError> {
        let rel = self.rel(name);
        let shown = display_path(&rel);
        let fd: OwnedFd = nix::fcntl::openat(
            self.dir.as_fd(),
            OsStr::from_bytes(name),
            FILE_FLAGS,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // O_NOFOLLOW on a symlink.
            nix::errno::Errno::ELOOP => WorkspaceError::SpecialFile {
                path: shown.clone(),
                what: "symlink",
            },
            nix::errno::Errno::ENOENT => WorkspaceError::NotFound {
                path: shown.clone(),
            },
            e => io_err(&rel, e),
        })?;
        let stat = fstat(&fd).map_err(|e| io_err(&rel, e))?;
        let size = match kind_of(&stat) {
            EntryKind::File { size, .. } => size,
            EntryKind::Dir => {
                return Err(WorkspaceError::NotFound { path: shown });
            }
            EntryKind::Symlink => {
                return Err(WorkspaceError::SpecialFile {
                    path: shown,
                    what: "symlink",
                })
            }
            EntryKind::Special(what) => {
                return Err(WorkspaceError::SpecialFile { path: shown, what })
            }
        };
        budget.bytes(&shown, size)?;
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // At most one byte more than fstat said: a file that grows while
        // it is read is still bounded.
        std::fs::File::from(fd)
            .take(size.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|source| WorkspaceError::Io {
                path: shown.clone(),
                source,
            })?;
        if data.len() as u64 > size {
            return Err(WorkspaceError::FileTooLarge {
                path: shown,
                size: data.len() as u64,
                limit: budget.limits.max_file_bytes.min(size),
            });
        }
        Ok(data)
    }

    /// The target of the symlink `name`, as bytes: read, never followed.
    pub fn read_link(&self, name: &[u8]) -> Result<Vec<u8>, WorkspaceError> {
        nix::fcntl::readlinkat(self.dir.as_fd(), OsStr::from_bytes(name))
            .map(|t| t.as_bytes().to_vec())
            .map_err(|e| io_err(&self.rel(name), e))
    }
}

/// Reads `relative` (a path from trusted configuration, such as a gate's
/// coverage report) under `root`, one component at a time without
/// following any symlink, within `limits.max_file_bytes`.
pub fn read_relative(
    root: &Path,
    relative: &Path,
    limits: Limits,
) -> Result<Vec<u8>, WorkspaceError> {
    let shown = display_path(relative.as_os_str().as_bytes());
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in relative.components() {
        match c {
            std::path::Component::Normal(p) => parts.push(p.as_bytes()),
            std::path::Component::CurDir => {}
            _ => return Err(WorkspaceError::NotFound { path: shown }),
        }
    }
    let Some((file, dirs)) = parts.split_last() else {
        return Err(WorkspaceError::NotFound { path: shown });
    };
    let mut dir = SafeDir::open_root(root)?;
    for d in dirs {
        dir = dir.open_dir(d).map_err(|e| match e {
            WorkspaceError::Io { .. } => WorkspaceError::NotFound {
                path: shown.clone(),
            },
            e => e,
        })?;
    }
    dir.read_file(
        file,
        &mut Budget::new(Limits::one_file(limits.max_file_bytes)),
    )
}
