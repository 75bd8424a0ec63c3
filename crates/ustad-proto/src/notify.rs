//! The `sd_notify` datagrams ustad speaks: newline-separated `KEY=VALUE` lines, as in
//! systemd's `sd_notify(3)`. Workers send them to the primary's [`NOTIFY_SOCKET`]; the primary
//! sends its own to its service manager.
//!
//! [`NOTIFY_SOCKET`]: crate::env::NOTIFY_SOCKET

/// The worker serves (sent with [`FLAG`]); from the primary, the whole cluster serves.
pub const READY: &str = "READY";
/// The worker is shutting down on its own (sent with [`FLAG`]); from the primary, it is
/// stopping its workers and will exit.
pub const STOPPING: &str = "STOPPING";
/// A free-form, one-line status for humans, from a worker or from the primary.
pub const STATUS: &str = "STATUS";
/// The primary began a reload (sent with [`FLAG`] and [`MONOTONIC_USEC`]); [`READY`] follows
/// when it is over. Sent by the primary to its service manager only.
pub const RELOADING: &str = "RELOADING";
/// The `CLOCK_MONOTONIC` time in microseconds, which systemd's `Type=notify-reload` requires
/// with [`RELOADING`]. Sent by the primary.
pub const MONOTONIC_USEC: &str = "MONOTONIC_USEC";
/// Proof of life for a pool with a `watchdog` ([`FLAG`]), or "I hung, act now"
/// ([`WATCHDOG_TRIGGER`]). Sent by a worker.
pub const WATCHDOG: &str = "WATCHDOG";
/// Keep the fds sent with this message (`SCM_RIGHTS`) in the service manager's fd store
/// ([`FLAG`], with [`FDNAME`]). Sent by the primary.
pub const FDSTORE: &str = "FDSTORE";
/// Close every fd of the store named [`FDNAME`] ([`FLAG`]). Sent by the primary.
pub const FDSTOREREMOVE: &str = "FDSTOREREMOVE";
/// The name of the fds of [`FDSTORE`] or [`FDSTOREREMOVE`]; the fds come back under it in
/// `LISTEN_FDNAMES`.
pub const FDNAME: &str = "FDNAME";
/// ustad's own key: a worker asks something of the primary ([`REQUEST_RESTART`]).
pub const USTAD_REQUEST: &str = "USTAD_REQUEST";

/// The value of a flag: `READY=1`, `STOPPING=1`, `RELOADING=1`, `WATCHDOG=1`. No other value of
/// these keys is understood.
pub const FLAG: &str = "1";
/// [`WATCHDOG`]`=trigger`: the worker found itself hung (systemd's meaning); the primary
/// replaces it at once.
pub const WATCHDOG_TRIGGER: &str = "trigger";
/// [`USTAD_REQUEST`]`=restart`: replace this worker with a fresh one (rolling: the old one
/// stops once its successor is ready).
pub const REQUEST_RESTART: &str = "restart";
