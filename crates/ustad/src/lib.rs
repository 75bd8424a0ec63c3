//! Run your Rust program as a cluster of its own processes, the way Node's `cluster` module
//! does, but typed and async.
//!
//! The program starts as the **primary**; the primary starts **workers** by re-executing the
//! same binary with the same arguments, and [`role`] tells each process which it is. Workers
//! come in named **pools** (`web` ×4, `jobs` ×2…), get listening sockets the primary bound,
//! are restarted when they die, replaced one at a time in rolling restarts, and exchange typed
//! messages with the primary over a private channel.
//!
//! ```no_run
//! use ustad::{Pool, Primary, Role};
//!
//! fn main() -> Result<(), ustad::Error> {
//!     match ustad::role() {
//!         Role::Primary(primary) => primary
//!             .pool("web", Pool::new(4).listen("127.0.0.1:8000"))
//!             .pool("crons", Pool::new(1))
//!             .run(),
//!         Role::Worker(worker) => {
//!             let runtime = tokio::runtime::Runtime::new()?;
//!             runtime.block_on(async move {
//!                 match worker.pool() {
//!                     "web" => { /* serve worker.tcp_listener("web")? */ }
//!                     _ => { /* run the crons */ }
//!                 }
//!                 worker.ready().await?;
//!                 worker.stopped().await;
//!                 Ok(())
//!             })
//!         }
//!     }
//! }
//! ```
//!
//! - [`Primary::run`] supervises until SIGINT/SIGTERM; [`Primary::start`] returns a
//!   [`Cluster`] handle to talk to workers: [`Cluster::send`], [`Cluster::broadcast`],
//!   [`Cluster::request`], [`Cluster::round_robin`], [`Cluster::dispatch`], and the
//!   [`Cluster::events`] stream.
//! - A [`Worker`] knows its pool, id and slot, takes its listeners, says [`Worker::ready`],
//!   learns when to stop ([`Worker::stopped`]), and talks to the primary
//!   ([`Worker::send`], [`Worker::recv`], [`Worker::request`]).
//!
//! Messages are any `Serialize`/`Deserialize` type; route by type with a
//! `#[serde(tag = "type")]` enum and a `match`. The wire format is JSON in length-prefixed
//! frames (`docs/protocol.md`), so workers in other languages can join.
//!
//! # Performance
//! Each worker's channel is a Unix socket whose frames senders encode straight into a buffer
//! bounded in bytes; a request or reply on an idle channel is written by the sender itself, and
//! under load many frames go in one write. A worker's messages reach [`Cluster::events`], and
//! replies their [`Cluster::request`], from the channel's reader directly. Programs and
//! workers that exchange many messages do best on current-thread tokio runtimes (see
//! [`Primary::start`]); the numbers, side by side with Node's `cluster`, are in
//! `docs/benchmarks.md`.

mod channel;
mod cluster;
mod error;
mod primary;
mod worker;

pub use cluster::{
    Cluster, Event, IncomingRequest, Message, PoolName, WorkerInfo, WorkerRef, WorkerState,
};
pub use error::{Error, RequestError};
pub use primary::{Pool, Primary};
pub use ustad_core::config::{Budget, Readiness};
pub use ustad_core::plan::{ExitCause, ExitStatus, StopReason, WorkerId};
pub use worker::{FromPrimary, Handed, HandedStream, Worker};

/// Which part this process plays.
#[derive(Debug)]
pub enum Role {
    /// The first process: it supervises.
    Primary(Primary),
    /// A worker started by the primary.
    Worker(Worker),
}

/// Whether this process is the primary or one of its workers: a worker has the environment
/// the primary gives its library workers (`USTAD_POOL`, `USTAD_IPC_FD`…).
///
/// # Panics
/// In a worker whose environment is malformed (set by hand, not by a primary).
pub fn role() -> Role {
    match Worker::from_env() {
        Ok(Some(worker)) => Role::Worker(worker),
        Ok(None) => Role::Primary(Primary::new()),
        Err(error) => panic!("ustad: this process looks like a worker, but {error}"),
    }
}
