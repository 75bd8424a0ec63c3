//! The names of ustad's wire, spelled once: both the primary (`ustad-core`) and the worker side
//! (`ustad-worker`, the `ustad` library's workers) use these, so that the two cannot drift apart.
//!
//! - [`env`](mod@env): the environment variables the primary sets for a worker, and those it never
//!   passes on from its own environment.
//! - [`notify`]: the keys and values of the `sd_notify` datagrams ustad sends and understands.
//! - [`ipc`]: the constants of the framed channel between a library primary and its workers
//!   (`docs/protocol.md` describes the channel itself).
//! - [`node`]: the messages of Node's own IPC channel, for pools of unmodified Node apps.
//!
//! Names only: no parsing, no I/O, no dependencies.
//!
//! ```
//! use ustad_proto::{env, notify};
//!
//! assert_eq!(env::USTAD_WORKER_ID, "USTAD_WORKER_ID");
//! assert_eq!(format!("{}={}", notify::READY, notify::FLAG), "READY=1");
//! ```

#![forbid(unsafe_code)]

pub mod env;
pub mod ipc;
pub mod node;
pub mod notify;

#[cfg(test)]
mod tests;
