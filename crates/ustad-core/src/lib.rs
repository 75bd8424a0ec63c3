//! The ustad engine: configuration, the supervisor's state machine, and the process layer
//! around it. The `ustad` command is a thin CLI over this crate; it has no CLI dependencies.
//!
//! # Theory of operation
//!
//! A **primary** process runs named **pools** of interchangeable **workers**. A pool has `size`
//! **slots**; slot `i` is always meant to hold one serving worker, whose `USTAD_WORKER_INDEX`
//! is `i` and who keeps it across restarts.
//!
//! 1. **Sockets first.** The primary binds every listening socket before it starts any worker
//!    ([`sockets`]) and holds them for its whole life. Workers receive them as fds 3, 4, …
//!    with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set to the worker's own pid
//!    ([`spawn`]), so a restarting worker never causes a refused connection: the
//!    kernel queues connections on a socket the primary still holds. Under systemd with an fd
//!    store, the service manager holds a copy of each ([`fdstore`]), so that even a crash of
//!    the primary refuses no connection.
//! 2. **Spawning.** Each worker runs in its own process group, with stdin from `/dev/null` and
//!    stdout/stderr relayed line by line ([`output`]), and dies with the primary
//!    (`PR_SET_PDEATHSIG`).
//! 3. **Readiness.** A worker is *ready* when the primary sees one of its processes wait for
//!    connections on one of its sockets (`ready = "listening"`, the default for pools with
//!    sockets, [`listening`]), when it sends `READY=1` on `NOTIFY_SOCKET` (`ready = "notify"`,
//!    [`notify`]) or `'ready'` over its message channel, after a fixed delay, or at once. A
//!    worker not ready within `ready_timeout` is killed and counts as a failed start.
//! 4. **Restarts.** A worker that exits without being asked leaves its slot empty. One that
//!    had been ready is replaced at once (a pool whose ready workers die faster than one per
//!    slot a second waits a little, at most a second); one that never became ready is a failed
//!    start, and its slot is refilled after `restart_delay`, then an exponential backoff
//!    (capped at a minute) while starts keep failing.
//! 5. **Generations and rollouts.** Every worker belongs to a generation of its pool. A
//!    rollout to generation `g` (SIGHUP, SIGUSR2) replaces, one slot at a time, every worker
//!    older than `g`: start the replacement, wait until it is ready, then stop the old one,
//!    and wait for it to exit before the next slot. A pool therefore never has more than one
//!    extra worker alive (with `strict`, none: the old one is stopped first). If a
//!    replacement fails to become ready, the rollout stops and the old workers keep serving.
//!    Requests for a rollout during a rollout are coalesced into one target generation.
//!    `ttl`, a worker's `USTAD_REQUEST=restart` and `STOPPING=1` replace single workers the
//!    same way.
//! 6. **Stopping.** A worker is stopped with its pool's `stop_signal` sent to its process
//!    group; after `kill_timeout` the group gets SIGKILL. When a worker's main process exits,
//!    what is left of its group gets SIGKILL at that same deadline. The primary stops every
//!    worker this way on SIGINT/SIGTERM, then exits 0; a second signal kills them at once.
//!
//! The decisions of steps 3–6 live in [`plan::Plan`], a pure state machine fed with events
//! and the time; [`supervisor`] is the thin layer that performs its actions on real
//! processes and reports back what happened.
//!
//! # Ordering guarantees
//! - No worker starts before every socket is bound.
//! - In a rollout, a slot's old worker receives its stop signal only after its replacement
//!   reported ready, and the next slot's replacement starts only after that old worker has
//!   exited.
//! - A slot is never refilled while a worker that was stopped in it is still running.

pub mod accounts;
pub mod config;
pub mod control;
pub mod fdstore;
pub mod handover;
pub mod ipc;
pub mod listening;
pub mod logbook;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod plan;
pub mod preload;
pub mod priority;
pub mod procfs;
pub mod service;
pub mod sockets;
pub mod spawn;
pub mod stack;
pub mod status;
pub mod supervisor;
mod sys;
pub mod watch;

/// The version of ustad (the engine's crate version, which every crate of the workspace
/// shares).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
