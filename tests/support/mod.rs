//! The test kit, one for every test binary (`#[path = "../support/mod.rs"]
//! mod support;` in each `main.rs`): test environments (`env`), private
//! servers (`servers`), the binary as a process (`processes`), git fixtures
//! (`git`), a real API server (`api`) and a webhook receiver (`receiver`),
//! all against real services.

// Each test binary uses a part of the kit; the rest is dead code there.
#![allow(dead_code)]

pub mod api;
pub mod browser;
pub mod env;
pub mod git;
pub mod processes;
pub mod receiver;
pub mod servers;

// The kit's common names, as `crate::support::TestEnv` and so on; each
// binary uses some of them.
#[allow(unused_imports)]
pub use env::*;
#[allow(unused_imports)]
pub use processes::*;
#[allow(unused_imports)]
pub use servers::*;
