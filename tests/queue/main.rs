//! Integration tests of the durable queue core against a real Valkey, a real
//! PostgreSQL and the real binary. Run them with `scripts/test.sh`.

mod cancel;
mod cluster;
mod deploy;
mod flow;
mod frontends;
mod index;
mod killswitch;
mod ordering;
mod progress;
mod race;
mod recovery;
mod retry;
mod shutdown;
#[path = "../support/mod.rs"]
mod support;
