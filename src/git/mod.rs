//! The git stage: mirrors, a workspace per job, commits built from the
//! workspace's files, secret scanning, conflict checks and push, and the
//! validation of repository URLs and branch names.

pub mod names;
pub mod repo;
pub mod secrets;
pub mod workspace;
