//! What the program learns of its cluster: the [`Event`] stream's items and how they name
//! workers ([`WorkerRef`], [`PoolName`]).

use std::sync::Arc;

use ustad_core::plan::{ExitCause, ExitStatus, StopReason, WorkerId};
pub use ustad_core::status::WorkerState;

use crate::channel::{IncomingRequest, Message};

/// A pool's name, shared by the events that name its workers (cloning it copies no text).
/// Compares with `&str`: `worker.pool == "web"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolName(Arc<str>);

impl PoolName {
    pub(super) fn new(name: Arc<str>) -> PoolName {
        PoolName(name)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for PoolName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PoolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for PoolName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for PoolName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for PoolName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl From<PoolName> for String {
    fn from(name: PoolName) -> String {
        name.0.to_string()
    }
}

/// A worker, as events and methods name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRef {
    /// Unique for the life of the primary.
    pub id: WorkerId,
    /// Its pool.
    pub pool: PoolName,
    /// Its slot (`0..size`), kept by its replacements.
    pub slot: usize,
    /// Its generation (rolling restarts increase it).
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
}

/// A live worker and where it is in its life ([`crate::Cluster::worker`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Which.
    pub worker: WorkerRef,
    /// Starting, ready or stopping.
    pub state: WorkerState,
    /// Its message channel is open (Node's `worker.isConnected()`).
    pub connected: bool,
}

/// What happens in the cluster.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Spawned(WorkerRef),
    /// Its first frame arrived on its channel (whatever it said): its code runs and talks, as
    /// Node's `online`. Comes after `Spawned`, before `Ready` and before its first message.
    Online(WorkerRef),
    /// It was seen waiting for connections on one of its pool's sockets (a pool with
    /// `Pool::ready(Readiness::Listening)`), as Node's `listening`: once, before `Ready`. The
    /// address is the one actually bound, so a pool listening on port 0 learns its port.
    Listening {
        /// Which.
        worker: WorkerRef,
        /// The socket's name.
        socket: String,
        /// Its address (`127.0.0.1:41234`, `unix:/run/app.sock`).
        address: String,
    },
    /// It is ready: it called `ready()` (or said so another way, or was seen listening).
    Ready(WorkerRef),
    /// It sent a message.
    Message {
        /// From whom.
        worker: WorkerRef,
        /// What.
        message: Message,
    },
    /// It sent a request; answer it.
    Request {
        /// From whom.
        worker: WorkerRef,
        /// What.
        request: IncomingRequest,
    },
    /// Its message channel closed: it was cut off for breaking the protocol, or it exited
    /// (then this comes just before `Exited`), as Node's `disconnect`. Once per worker.
    Disconnected(WorkerRef),
    /// A worker could not be started in a slot (its program is missing, not executable…);
    /// the slot backs off and tries again.
    SpawnFailed {
        /// The pool.
        pool: PoolName,
        /// The slot.
        slot: usize,
        /// Why.
        error: String,
    },
    /// It was asked to stop.
    Stopping {
        /// Which.
        worker: WorkerRef,
        /// Why.
        reason: StopReason,
    },
    /// It exited.
    Exited {
        /// Which.
        worker: WorkerRef,
        /// How.
        status: ExitStatus,
        /// Why.
        cause: ExitCause,
    },
}
