//! orchestrator: a durable job-queue worker pool for coding agents.
//!
//! Postgres is the truth, Valkey is the index. `docs/ARCHITECTURE.md` maps
//! the modules onto layers (domain, adapters, engine, application, front
//! ends); `docs/guarantees.md` says what each guarantee is and where it is
//! tested.

#[cfg(feature = "apalis")]
pub mod apalis;
pub mod api;
pub mod app;
pub mod auth;
pub mod bench;
pub mod config;
pub mod digest;
pub mod git;
pub mod job;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod queue;
pub mod sandbox;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod webhook;
pub mod worker;
