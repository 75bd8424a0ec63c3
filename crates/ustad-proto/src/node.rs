//! Node's IPC channel, as ustad speaks it with a pool of `ipc = "node"`: the fd of
//! [`NODE_CHANNEL_FD`](crate::env::NODE_CHANNEL_FD) in `json` serialization, one JSON text per
//! line, as between a parent and a child of Node's `child_process.fork`. The app uses
//! `process.send(value)` and `process.on('message', …)`, with no package installed.
//!
//! Worker → primary: [`READY`] (`process.send('ready')`, PM2's `wait_ready` convention) counts
//! as `READY=1`; an object whose [`KEY`] is one of [`request`]'s values asks for something;
//! an object whose [`INTERNAL_KEY`] starts with [`INTERNAL_PREFIX`] is Node's own and ignored;
//! anything else is a message for the program (under a library primary).
//!
//! Primary → worker: [`SHUTDOWN`] before the stop signal (PM2's `shutdown_with_message`
//! convention); the program's messages as they are.

/// The message a worker sends when it serves.
pub const READY: &str = "ready";
/// The message the primary sends a worker before its stop signal.
pub const SHUTDOWN: &str = "shutdown";
/// The key of a worker's request to the primary: `{"ustad": "restart"}`.
pub const KEY: &str = "ustad";
/// The key of Node's own messages (`{"cmd": "NODE_…"}`).
pub const INTERNAL_KEY: &str = "cmd";
/// How Node's own messages' [`INTERNAL_KEY`] begins.
pub const INTERNAL_PREFIX: &str = "NODE_";

/// What a worker may ask with `{"ustad": …}`.
pub mod request {
    /// `{"ustad": "ready"}`: the same as [`super::READY`].
    pub const READY: &str = "ready";
    /// `{"ustad": "restart"}`: replace me (as `USTAD_REQUEST=restart`).
    pub const RESTART: &str = "restart";
    /// `{"ustad": "stopping"}`: I am shutting down on my own (as `STOPPING=1`).
    pub const STOPPING: &str = "stopping";
    /// `{"ustad": "heartbeat"}`: I am alive (as `WATCHDOG=1`).
    pub const HEARTBEAT: &str = "heartbeat";
}
