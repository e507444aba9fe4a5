//! orchestrator: a durable job-queue worker pool for coding agents.
//!
//! Postgres is the truth, Valkey is the index. See `README.md` for the
//! guarantees and `DESIGN` notes in the module docs.

pub mod api;
pub mod app;
pub mod auth;
pub mod bench;
pub mod config;
pub mod git;
pub mod job;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod pool;
pub mod queue;
pub mod sandbox;
pub mod secret;
pub mod store;
pub mod telemetry;
