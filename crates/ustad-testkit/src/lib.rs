//! Test helpers for ustad's integration tests (unpublished).
//!
//! Integration tests run the real `ustad` binary against real worker processes. This crate gives
//! them:
//!
//! - the `test-worker` helper binary (`src/bin/test-worker.rs`): a worker with modes (ready after
//!   N ms, crash, ignore SIGTERM, spawn a grandchild, serve HTTP, flood stdout, slow drain) that
//!   writes a JSON [`report::WorkerReport`] of what it really received (fds, environment, what the
//!   strict `sd-notify` and the relaxed `listenfd` crates see);
//! - [`process::ProcessGuard`]: a child in its own process group, killed with its whole group on
//!   drop and on the test's death;
//! - [`cluster::Cluster`]: a running `ustad` primary whose JSON log events can be awaited with
//!   deadlines instead of sleeps;
//! - [`load`]: an HTTP load checker that counts every failed request, for zero-downtime tests.
//!
//! Tests find the helper binaries next to the `ustad` binary with [`helper_bin`].
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//! use ustad_testkit::{cluster::Cluster, helper_bin};
//!
//! # fn example(ustad: &Path) {
//! // In a test of the `ustad-cli` package: `Path::new(env!("CARGO_BIN_EXE_ustad"))`.
//! let worker = helper_bin(ustad, "test-worker");
//! let dir = tempfile::tempdir().unwrap();
//! let cluster = Cluster::start(
//!     ustad,
//!     &["run", "-w", "2", "-l", "127.0.0.1:0", "--", worker.to_str().unwrap(), "--serve-http"],
//!     dir.path(),
//! );
//! let addr = cluster.listen_addr("web");
//! cluster.wait_events(|e| e.is("ready"), 2, Duration::from_secs(10));
//! let (status, headers, _body) = ustad_testkit::load::get(addr).unwrap();
//! assert_eq!(status, 200);
//! assert!(headers.contains_key("x-worker-pid"));
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod cluster;
pub mod load;
pub mod process;
pub mod report;
mod sys;

/// Signals, for [`process::ProcessGuard::signal`] and [`cluster::Cluster::signal`]
/// (`Signal::TERM`, `Signal::HUP`, …).
pub use rustix::process::Signal;

/// The deadline used by helpers that take none (such as [`cluster::Cluster::listen_addr`]).
///
/// Generous, because two cores are shared by the whole test suite; a passing test never waits
/// for it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of the test worker binary, for [`helper_bin`].
pub const TEST_WORKER: &str = "test-worker";

/// The path of one of this crate's helper binaries (such as [`TEST_WORKER`]), found next to the
/// `ustad` binary under test (`env!("CARGO_BIN_EXE_ustad")`), in the same target directory.
///
/// # Panics
///
/// If the helper has not been built: cargo builds another package's binaries only when asked.
#[track_caller]
pub fn helper_bin(ustad_bin: &Path, name: &str) -> PathBuf {
    let dir = ustad_bin
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", ustad_bin.display()));
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "helper binary {name:?} not found at {}: build the helpers with \
             `cargo build -p ustad-testkit --bins`, or run the tests with \
             `cargo nextest run --workspace`",
            path.display()
        );
    }
    path
}
