//! Names of the environment variables a supervisor sets for its workers.
//!
//! Shared with the supervisor side so that both agree on the spelling.

/// Number of inherited listening sockets, starting at fd 3 (systemd socket activation).
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// The pid the inherited sockets are meant for; anyone else ignores them.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// Colon-separated names of the inherited sockets, one per fd.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// Where to send `sd_notify` datagrams: a path, or `@name` for an abstract socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Name of the pool this worker belongs to.
pub const USTAD_POOL: &str = "USTAD_POOL";
/// Unique id of this worker process within the supervisor's lifetime (a `u64`).
pub const USTAD_WORKER_ID: &str = "USTAD_WORKER_ID";
/// Slot of this worker in its pool, `0..size` (a `usize`); a replacement reuses the slot.
pub const USTAD_WORKER_INDEX: &str = "USTAD_WORKER_INDEX";
