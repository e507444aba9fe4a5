//! The git stage's building blocks. So far: secret scanning of a change and
//! the validation of repository URLs and branch names; mirrors, worktrees,
//! commits, conflict checks and push come next (issue #5).

pub mod bench;
pub mod names;
pub mod repo;
pub mod secrets;
