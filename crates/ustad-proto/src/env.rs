//! The environment of a worker: what the primary sets for it (`ustad_core::spawn` writes it,
//! `ustad-worker` reads it), and the names the primary never passes on from its own
//! environment or a pool's `env`.

use std::os::fd::RawFd;

/// How many listening sockets the worker inherits, from fd [`LISTEN_FDS_START`] on. Set by the
/// primary when the pool has sockets (and by systemd for the primary itself).
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// The pid the inherited sockets are meant for; any other process ignores them. Set by the
/// child itself, between fork and exec (only it knows its pid).
pub const LISTEN_PID: &str = "LISTEN_PID";
/// The names of the inherited sockets, one per fd, separated by [`LISTEN_FDNAMES_SEPARATOR`].
/// Set by the primary with [`LISTEN_FDS`].
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// What separates the names in [`LISTEN_FDNAMES`].
pub const LISTEN_FDNAMES_SEPARATOR: &str = ":";
/// The name of an inherited socket when [`LISTEN_FDNAMES`] is unset (systemd's default).
pub const UNNAMED_FD: &str = "unknown";
/// The first inherited socket's fd (systemd's `SD_LISTEN_FDS_START`); the channel of
/// [`USTAD_IPC_FD`] comes after the last socket.
pub const LISTEN_FDS_START: RawFd = 3;

/// Where to send `sd_notify` datagrams (see [`crate::notify`]): a path, or `@name` for an
/// abstract socket. Set by the primary for a pool with `ready = "notify"`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// How many fds the service manager keeps in its fd store for this service (systemd 254 and
/// later set it from `FileDescriptorStoreMax=`). Read by the primary; never passed to a worker.
pub const FDSTORE: &str = "FDSTORE";
/// How often, in microseconds, the worker must send `WATCHDOG=1`. Set by the primary, with
/// [`NOTIFY_SOCKET`], for a pool with a `watchdog`.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid [`WATCHDOG_USEC`] is meant for. Never set by the primary (a worker's pid is not
/// known before the fork, and `sd_watchdog_enabled` checks it only when it is set); reserved.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The name of the worker's pool. Set by the primary.
pub const USTAD_POOL: &str = "USTAD_POOL";
/// The worker's id, unique for the primary's life (a `u64`). Set by the primary.
pub const USTAD_WORKER_ID: &str = "USTAD_WORKER_ID";
/// The worker's slot in its pool, `0..size` (a `usize`), kept by its replacements. Set by the
/// primary.
pub const USTAD_WORKER_INDEX: &str = "USTAD_WORKER_INDEX";
/// The worker's generation (a `u64`): each rolling restart starts workers of a newer one. Set
/// by the primary.
pub const USTAD_GENERATION: &str = "USTAD_GENERATION";
/// The fd of the worker's end of its message channel (see [`crate::ipc`]). Set by a library
/// primary for a pool with a channel.
pub const USTAD_IPC_FD: &str = "USTAD_IPC_FD";
/// The largest frame body, in bytes, either end of the channel may send. Set by a library
/// primary with [`USTAD_IPC_FD`].
pub const USTAD_IPC_MAX_FRAME: &str = "USTAD_IPC_MAX_FRAME";

/// The fd of the worker's end of Node's IPC channel (see [`crate::node`]): with it, Node sets
/// up `process.send` and `process.on('message')`, as for a child of `child_process.fork`. Set
/// by the primary for a pool with `ipc = "node"`, in place of [`USTAD_IPC_FD`].
pub const NODE_CHANNEL_FD: &str = "NODE_CHANNEL_FD";
/// How Node serializes messages on [`NODE_CHANNEL_FD`]; ustad sets
/// [`NODE_CHANNEL_SERIALIZATION_JSON`].
pub const NODE_CHANNEL_SERIALIZATION_MODE: &str = "NODE_CHANNEL_SERIALIZATION_MODE";
/// One JSON text per line: the serialization ustad speaks.
pub const NODE_CHANNEL_SERIALIZATION_JSON: &str = "json";

/// The sockets the preload library (`ustad-preload`) hands to a program that binds their
/// address itself: `FD:INODE` per socket, comma-separated, with `:MAJOR:MINOR:INO` (its socket
/// file's device and inode) after a Unix socket bound to a path, e.g.
/// `3:81234,4:81240:0:25:1234567`. Set by the primary, with [`LD_PRELOAD`], for a pool with
/// sockets and `preload` on.
pub const USTAD_PRELOAD_FDS: &str = "USTAD_PRELOAD_FDS";
/// The dynamic loader's list of libraries to load before a program's own; the primary puts the
/// preload library first, before what the worker would otherwise get.
pub const LD_PRELOAD: &str = "LD_PRELOAD";
/// The port to listen on, by the Heroku and PM2 convention. Set by the primary, with
/// [`LD_PRELOAD`], when exactly one of the pool's sockets is TCP, unless the pool's `env`
/// sets it; the primary's own `PORT` is not passed on then.
pub const PORT: &str = "PORT";

/// Variables the primary never passes on to a worker, from its own environment or a pool's
/// `env`, besides every name starting with [`RESERVED_PREFIX`]: a worker must not see its
/// supervisor's own socket activation or service manager.
pub const RESERVED: &[&str] = &[
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    NOTIFY_SOCKET,
    FDSTORE,
    WATCHDOG_USEC,
    WATCHDOG_PID,
    // A channel fd named by ustad's own parent (ustad started by Node's `fork`) is not the
    // worker's: Node would try to open it.
    NODE_CHANNEL_FD,
    NODE_CHANNEL_SERIALIZATION_MODE,
];
/// The prefix of ustad's own variables, all reserved (the `USTAD_*` constants above, and any
/// later ones).
pub const RESERVED_PREFIX: &str = "USTAD_";

/// Whether the primary keeps the variable `name` from a worker: one of [`RESERVED`], or starting
/// with [`RESERVED_PREFIX`]. Bytes, since a variable's name need not be UTF-8.
///
/// ```
/// use ustad_proto::env;
///
/// assert!(env::is_reserved(env::USTAD_IPC_FD.as_bytes()));
/// assert!(env::is_reserved(b"WATCHDOG_PID"));
/// assert!(!env::is_reserved(b"PATH"));
/// ```
pub fn is_reserved(name: &[u8]) -> bool {
    RESERVED.iter().any(|reserved| reserved.as_bytes() == name)
        || name.starts_with(RESERVED_PREFIX.as_bytes())
}
