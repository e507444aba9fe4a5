//! Integration tests of the HTTP API against a real server on a real
//! PostgreSQL and Valkey. Run them with `scripts/test.sh`.

mod auth;
mod bad_input;
mod edit;
mod endpoints;
mod fuzz;
mod killswitch;
mod logs;
mod prometheus;
mod schedules;
#[path = "../support/mod.rs"]
mod support;
mod webhooks;
