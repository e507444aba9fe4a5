//! orchestrator: a durable job-queue worker pool for coding agents.
//!
//! Postgres is the truth, Valkey is the index. See `README.md` for the
//! guarantees and `DESIGN` notes in the module docs.

pub mod api;
pub mod app;
pub mod bench;
pub mod config;
pub mod git;
pub mod job;
pub mod killswitch;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod pool;
pub mod queue;
pub mod sandbox;
pub mod store;
pub mod telemetry;
