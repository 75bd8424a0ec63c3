//! The channel between a library primary and each of its workers: a Unix stream socket
//! carrying frames, each a [`HEADER`]-byte little-endian length and then one JSON object, the
//! envelope, whose `"t"` is one of the [`kind`]s (`docs/protocol.md`).

pub use crate::env::{USTAD_IPC_FD, USTAD_IPC_MAX_FRAME};

/// Bytes of a frame's length prefix (a little-endian `u32`).
pub const HEADER: usize = 4;
/// The largest frame body, in bytes, when the primary says nothing else in
/// [`USTAD_IPC_MAX_FRAME`] (the default of a pool's `max_message`).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// The kinds of frame: the values of an envelope's `"t"`.
pub mod kind {
    /// Worker → primary: I serve now.
    pub const READY: &str = "ready";
    /// Worker → primary: I am alive (for a pool with a `watchdog`).
    pub const HEARTBEAT: &str = "heartbeat";
    /// Worker → primary: replace me (a rolling replacement).
    pub const RESTART: &str = "restart";
    /// Worker → primary: I am shutting down on my own.
    pub const STOPPING: &str = "stopping";
    /// Primary → worker: stop gracefully within `deadline_ms`.
    pub const STOP: &str = "stop";
    /// Either way: a message, in `body`.
    pub const MSG: &str = "msg";
    /// Either way: a request `id`, in `body`, answered with [`REP`] or [`ERR`] of the same id.
    pub const REQ: &str = "req";
    /// Either way: the answer to request `id`, in `body`.
    pub const REP: &str = "rep";
    /// Either way: request `id` failed, with a `message`.
    pub const ERR: &str = "err";
    /// Primary → worker: a connection accepted on the `round-robin` socket `socket`; its fd is
    /// attached (`SCM_RIGHTS`).
    pub const CONN: &str = "conn";
}
