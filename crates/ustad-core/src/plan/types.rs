//! The vocabulary of the plan: what goes in (events), what comes out (actions to perform and
//! notices to log), and the reasons attached to them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::value::format_duration;
use crate::config::{ByteSize, PoolSpec, Signal};

/// A worker's identity for the life of the primary: unique and increasing, never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(signal),
            // Stopped/continued statuses are not exits; `wait` does not report them.
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(number) => match Signal::from_number(*number) {
                Some(signal) => write!(f, "{signal}"),
                None => write!(f, "signal {number}"),
            },
        }
    }
}

/// What the sd_notify channel (or the library's IPC) said about a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMessage {
    /// `READY=1`: the worker serves.
    Ready,
    /// `STOPPING=1`: the worker is shutting down on its own.
    Stopping,
    /// `STATUS=…`: a free-form status line.
    Status(String),
    /// `USTAD_REQUEST=restart`: the worker asks to be replaced (rolling).
    RequestRestart,
    /// `WATCHDOG=1`: the worker is alive (pools with a `watchdog`).
    Watchdog,
    /// `WATCHDOG=trigger`: the worker says it is hung.
    WatchdogTrigger,
}

/// Why a whole pool is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutTrigger {
    /// The configuration was re-read (SIGHUP).
    Reload,
    /// Restart with the same configuration (SIGUSR2).
    Restart,
}

impl fmt::Display for RolloutTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RolloutTrigger::Reload => "reload",
            RolloutTrigger::Restart => "restart",
        })
    }
}

/// Inputs to the plan besides the passing of time.
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker process was started.
    Spawned {
        /// Which worker.
        id: WorkerId,
        /// Its pid, which is also its process group id.
        pid: u32,
    },
    /// A worker process could not be started (command missing, not executable…).
    SpawnFailed {
        /// Which worker.
        id: WorkerId,
        /// Why, for the log.
        error: String,
    },
    /// A worker process ended and was reaped.
    Exited {
        /// Which worker.
        id: WorkerId,
        /// How.
        status: ExitStatus,
    },
    /// A worker said something over its notify channel.
    Message {
        /// Which worker.
        id: WorkerId,
        /// What.
        message: WorkerMessage,
    },
    /// A process of the worker was seen waiting for connections on one of its sockets
    /// (`ready = "listening"`).
    Listening {
        /// Which worker.
        id: WorkerId,
        /// The socket's name.
        socket: Arc<str>,
        /// How it waits.
        how: crate::listening::Wait,
        /// The process seen waiting: the worker's, or one it started.
        process: u32,
    },
    /// Replace every worker of a pool (or of every pool), one slot at a time.
    Rollout {
        /// The pool, or `None` for every pool.
        pool: Option<String>,
        /// Why.
        trigger: RolloutTrigger,
        /// New settings for the replacements (a reloaded config); `None` keeps the current ones.
        spec: Option<Arc<PoolSpec>>,
    },
    /// Grow or shrink a pool.
    Scale {
        /// The pool.
        pool: String,
        /// The new number of workers (at least 1).
        size: usize,
    },
    /// Stop everything and exit.
    Shutdown {
        /// Kill every worker's process group now instead of asking them to stop.
        immediate: bool,
        /// How long workers get before SIGKILL, instead of each pool's `kill_timeout`.
        timeout: Option<Duration>,
    },
    /// Start a new pool (a reloaded configuration added it).
    AddPool {
        /// Its name, not used by another pool.
        name: String,
        /// Its settings.
        spec: Arc<PoolSpec>,
    },
    /// Stop every worker of a pool gracefully and forget the pool.
    RemovePool {
        /// The pool.
        name: String,
    },
    /// Replace one worker, rolling (an operator's `ustad restart ID`).
    Replace {
        /// Which.
        id: WorkerId,
    },
    /// Stop one worker gracefully and leave its slot empty until the pool is restarted or
    /// scaled (an operator's `ustad stop ID`, Node's `worker.disconnect()`).
    StopWorker {
        /// Which.
        id: WorkerId,
    },
    /// A worker broke the message protocol and was cut off: a serving worker is replaced
    /// (rolling), a starting one fails its start.
    Cut {
        /// Which.
        id: WorkerId,
        /// What it did.
        why: String,
    },
    /// A measurement of a worker's memory: its process group's resident set size.
    Memory {
        /// Which worker.
        id: WorkerId,
        /// Bytes.
        rss: u64,
    },
    /// A pool's `before_start` command ended (or could not be started).
    HookExited {
        /// The pool.
        pool: String,
        /// The generation it ran for.
        generation: u64,
        /// `Ok` when it exited 0, else what went wrong, for the log.
        result: Result<(), String>,
    },
}

/// Things the process layer must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a worker process.
    Spawn {
        /// The new worker's id.
        id: WorkerId,
        /// Its pool.
        pool: Arc<str>,
        /// Its slot (`USTAD_WORKER_INDEX`).
        slot: usize,
        /// The pool generation it belongs to.
        generation: u64,
        /// What to run.
        spec: Arc<PoolSpec>,
    },
    /// Send a signal to a worker's process group.
    Signal {
        /// Which worker.
        id: WorkerId,
        /// Its process group.
        pid: u32,
        /// Which signal.
        signal: Signal,
    },
    /// Send SIGKILL to a worker's process group.
    Kill {
        /// Which worker.
        id: WorkerId,
        /// Its process group.
        pid: u32,
    },
    /// Tell a worker over its channel to stop (Node's `'shutdown'` message); its stop signal
    /// follows after its pool's `stop_grace`, as an [`Action::Signal`].
    AskToStop {
        /// Which worker.
        id: WorkerId,
    },
    /// Run a pool's `before_start` command for a generation (the answer is
    /// [`Event::HookExited`]).
    RunHook {
        /// The pool.
        pool: Arc<str>,
        /// The generation it prepares.
        generation: u64,
        /// That generation's settings: the command, and how to run it.
        spec: Arc<PoolSpec>,
    },
    /// Kill the process group of a pool's `before_start` command (its generation was
    /// superseded, it ran too long, or everything stops). It is reported ended as usual.
    StopHook {
        /// The pool.
        pool: Arc<str>,
        /// The generation it ran for.
        generation: u64,
    },
    /// Every worker has stopped after a shutdown: the primary may exit.
    Exit,
}

/// A worker as named in notices: pool, slot, id and pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRef {
    /// The pool's name.
    pub pool: Arc<str>,
    /// The slot.
    pub slot: usize,
    /// The worker's id.
    pub id: WorkerId,
    /// Its pid, once spawned.
    pub pid: Option<u32>,
    /// Its generation.
    pub generation: u64,
}

impl fmt::Display for WorkerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} (id {}", self.pool, self.slot, self.id)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        f.write_str(")")
    }
}

/// Why the supervisor asked a worker to stop (or replaced it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// Replaced in a rolling restart of its pool.
    Rollout,
    /// Its `ttl` ran out.
    Ttl,
    /// It asked to be replaced (`USTAD_REQUEST=restart`).
    Requested,
    /// It announced `STOPPING=1`; a successor was started.
    Announced,
    /// An operator restarted this worker.
    Restart,
    /// Its pool shrank.
    Scale,
    /// The primary is shutting down.
    Shutdown,
    /// It did not become ready within `ready_timeout`.
    ReadyTimeout,
    /// Its memory stayed above `max_memory`.
    Memory,
    /// It did not send `WATCHDOG=1` in time (or sent `WATCHDOG=trigger`): hung.
    Watchdog,
    /// Its pool was removed from the configuration.
    PoolRemoved,
    /// It broke the message protocol: its channel was closed.
    Protocol,
    /// An operator stopped it, not to be replaced (`ustad stop ID`, `Cluster::disconnect`).
    Operator,
}

impl StopReason {
    /// A short machine-readable name, used in JSON logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Rollout => "rollout",
            StopReason::Ttl => "ttl",
            StopReason::Requested => "request",
            StopReason::Announced => "announced",
            StopReason::Restart => "restart",
            StopReason::Scale => "scale",
            StopReason::Shutdown => "shutdown",
            StopReason::ReadyTimeout => "ready_timeout",
            StopReason::Memory => "memory",
            StopReason::Watchdog => "watchdog",
            StopReason::PoolRemoved => "pool_removed",
            StopReason::Protocol => "protocol",
            StopReason::Operator => "operator",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Rollout => "rolling restart",
            StopReason::Ttl => "ttl reached",
            StopReason::Requested => "the worker asked to be replaced",
            StopReason::Announced => "the worker announced STOPPING=1",
            StopReason::Restart => "restart requested",
            StopReason::Scale => "pool scaled down",
            StopReason::Shutdown => "shutdown",
            StopReason::ReadyTimeout => "not ready within ready_timeout",
            StopReason::Memory => "memory above max_memory",
            StopReason::Watchdog => "hung: no WATCHDOG=1 in time",
            StopReason::PoolRemoved => "its pool was removed",
            StopReason::Protocol => "it broke the message protocol",
            StopReason::Operator => "stopped by an operator, not replaced",
        })
    }
}

/// Why a worker's process group got SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillCause {
    /// It did not exit within `kill_timeout` after the stop signal.
    KillTimeout(Duration),
    /// It did not become ready within `ready_timeout`.
    ReadyTimeout(Duration),
    /// An immediate shutdown (second SIGINT/SIGTERM).
    ShutdownNow,
}

impl fmt::Display for KillCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillCause::KillTimeout(t) => {
                write!(
                    f,
                    "still running {} after the stop signal (kill_timeout)",
                    format_duration(*t)
                )
            }
            KillCause::ReadyTimeout(t) => {
                write!(f, "not ready after {} (ready_timeout)", format_duration(*t))
            }
            KillCause::ShutdownNow => f.write_str("immediate shutdown"),
        }
    }
}

/// How an exit came about, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitCause {
    /// The supervisor had asked it to stop.
    Stopped(StopReason),
    /// It exited on its own after announcing `STOPPING=1`.
    Announced,
    /// It exited without being asked: a crash.
    Crashed,
    /// A worker of a `oneshot` pool exited 0: its job is done.
    Completed,
}

impl ExitCause {
    /// A short machine-readable name, used in JSON logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitCause::Stopped(reason) => reason.as_str(),
            ExitCause::Announced => "announced",
            ExitCause::Crashed => "crash",
            ExitCause::Completed => "done",
        }
    }
}

impl fmt::Display for ExitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitCause::Stopped(reason) => write!(f, "stopped: {reason}"),
            ExitCause::Announced => f.write_str("after announcing STOPPING=1"),
            ExitCause::Crashed => f.write_str("crashed: it was not asked to stop"),
            ExitCause::Completed => f.write_str("done: a oneshot worker that succeeded"),
        }
    }
}

/// Lifecycle events worth logging and publishing to control clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A worker process was started.
    Spawned {
        /// Which (with its generation).
        worker: WorkerRef,
    },
    /// A worker process could not be started.
    SpawnFailed {
        /// Which.
        worker: WorkerRef,
        /// Why.
        error: String,
    },
    /// A worker became ready.
    Ready {
        /// Which.
        worker: WorkerRef,
        /// Time from spawn to ready.
        after: Duration,
    },
    /// A worker was seen waiting for connections on one of its sockets.
    Listening {
        /// Which.
        worker: WorkerRef,
        /// The socket's name.
        socket: Arc<str>,
        /// How it waits.
        how: crate::listening::Wait,
        /// The process seen waiting: the worker's, or one it started.
        process: u32,
        /// Time from spawn until it was seen.
        after: Duration,
    },
    /// A worker was asked to stop.
    Stopping {
        /// Which.
        worker: WorkerRef,
        /// Why.
        reason: StopReason,
        /// With which signal.
        signal: Signal,
        /// Told to stop over its channel first (`ipc = "node"`): the time until its signal.
        told: Option<Duration>,
    },
    /// A worker's process group got SIGKILL.
    Killed {
        /// Which.
        worker: WorkerRef,
        /// Why.
        cause: KillCause,
    },
    /// A worker process ended.
    Exited {
        /// Which.
        worker: WorkerRef,
        /// How.
        status: ExitStatus,
        /// Why.
        cause: ExitCause,
        /// How long it ran.
        uptime: Duration,
    },
    /// An empty slot will be filled after a delay.
    RestartScheduled {
        /// The pool.
        pool: Arc<str>,
        /// The slot.
        slot: usize,
        /// When.
        delay: Duration,
        /// Consecutive failed starts in this slot (0 after a worker that had been ready).
        failures: u32,
    },
    /// A worker will be replaced as soon as its pool is not busy replacing another.
    ReplaceQueued {
        /// Which.
        worker: WorkerRef,
        /// Why.
        reason: StopReason,
    },
    /// A replacement for a single worker failed; the worker keeps serving.
    ReplaceAbandoned {
        /// The worker that keeps serving.
        worker: WorkerRef,
        /// Why it was to be replaced.
        reason: StopReason,
        /// What went wrong.
        why: String,
    },
    /// A rolling restart of a pool began.
    RolloutStarted {
        /// The pool.
        pool: Arc<str>,
        /// The generation being rolled out.
        generation: u64,
        /// Why.
        trigger: RolloutTrigger,
        /// It superseded an unfinished rollout.
        superseded: Option<u64>,
    },
    /// Every worker of a pool now belongs to the new generation.
    RolloutFinished {
        /// The pool.
        pool: Arc<str>,
        /// The generation now live.
        generation: u64,
        /// Workers replaced.
        replaced: usize,
        /// How long it took.
        elapsed: Duration,
    },
    /// A rollout stopped because a new worker failed; the old workers keep serving.
    RolloutAborted {
        /// The pool.
        pool: Arc<str>,
        /// The generation that failed.
        generation: u64,
        /// Workers already replaced.
        replaced: usize,
        /// The pool's size.
        size: usize,
        /// What went wrong.
        why: String,
    },
    /// A pool does not start before the pools it waits for (`after`) are ready or done.
    Waiting {
        /// The pool.
        pool: Arc<str>,
        /// The pools it waits for.
        on: Vec<Arc<str>>,
    },
    /// Every worker of a `oneshot` pool exited 0: the pools after it may start.
    PoolDone {
        /// The pool.
        pool: Arc<str>,
        /// The generation that ran.
        generation: u64,
    },
    /// A pool's `before_start` command started, for a generation.
    HookStarted {
        /// The pool.
        pool: Arc<str>,
        /// The generation it prepares.
        generation: u64,
    },
    /// A pool's `before_start` command exited 0: that generation's workers may start.
    HookFinished {
        /// The pool.
        pool: Arc<str>,
        /// The generation it prepared.
        generation: u64,
        /// How long it ran.
        elapsed: Duration,
    },
    /// A pool's `before_start` command failed. For a rollout, a
    /// [`Notice::RolloutAborted`] follows; for a pool's first start, it is run again.
    HookFailed {
        /// The pool.
        pool: Arc<str>,
        /// The generation it was to prepare.
        generation: u64,
        /// What went wrong.
        why: String,
        /// Failures in a row, for a pool's first start (0 for a rollout's).
        failures: u32,
        /// When it runs again: for a pool's first start, not for a rollout.
        retry_in: Option<Duration>,
    },
    /// A pool's size changed.
    Scaled {
        /// The pool.
        pool: Arc<str>,
        /// Old size.
        from: usize,
        /// New size.
        to: usize,
    },
    /// A worker's `STATUS=` changed.
    Status {
        /// Which.
        worker: WorkerRef,
        /// The text.
        text: String,
        /// Changes of it not logged since the last one that was (at most one is logged
        /// every [`crate::plan::STATUS_LOG_INTERVAL`]).
        suppressed: u64,
    },
    /// A request was refused (unknown pool, bad size, shutting down…).
    Refused {
        /// What and why.
        why: String,
    },
    /// Shutdown began.
    ShutdownStarted {
        /// Kill now rather than ask.
        immediate: bool,
        /// Workers still running.
        workers: usize,
    },
    /// Every worker has stopped.
    AllStopped,
    /// A pool was added.
    PoolAdded {
        /// The pool.
        pool: Arc<str>,
        /// Its size.
        size: usize,
    },
    /// A pool was removed; its workers are stopping.
    PoolRemoved {
        /// The pool.
        pool: Arc<str>,
        /// Workers being stopped.
        workers: usize,
    },
    /// A worker stopped sending `WATCHDOG=1`, or said it hung.
    Hung {
        /// Which.
        worker: WorkerRef,
        /// Time since its last sign of life.
        silent_for: Duration,
    },
    /// A worker's memory stayed above its pool's `max_memory`.
    OverMemory {
        /// Which.
        worker: WorkerRef,
        /// Its process group's RSS, bytes.
        rss: u64,
        /// The limit, bytes.
        limit: u64,
    },
}

impl Notice {
    /// The worker it concerns, if one.
    pub fn worker(&self) -> Option<&WorkerRef> {
        match self {
            Notice::Spawned { worker }
            | Notice::SpawnFailed { worker, .. }
            | Notice::Ready { worker, .. }
            | Notice::Listening { worker, .. }
            | Notice::Stopping { worker, .. }
            | Notice::Killed { worker, .. }
            | Notice::Exited { worker, .. }
            | Notice::ReplaceQueued { worker, .. }
            | Notice::ReplaceAbandoned { worker, .. }
            | Notice::Status { worker, .. }
            | Notice::Hung { worker, .. }
            | Notice::OverMemory { worker, .. } => Some(worker),
            _ => None,
        }
    }

    /// The pool it concerns, if one: a worker's, or the pool's own.
    pub fn pool(&self) -> Option<&Arc<str>> {
        match self {
            Notice::RestartScheduled { pool, .. }
            | Notice::RolloutStarted { pool, .. }
            | Notice::RolloutFinished { pool, .. }
            | Notice::RolloutAborted { pool, .. }
            | Notice::Scaled { pool, .. }
            | Notice::Waiting { pool, .. }
            | Notice::PoolDone { pool, .. }
            | Notice::HookStarted { pool, .. }
            | Notice::HookFinished { pool, .. }
            | Notice::HookFailed { pool, .. }
            | Notice::PoolAdded { pool, .. }
            | Notice::PoolRemoved { pool, .. } => Some(pool),
            _ => self.worker().map(|worker| &worker.pool),
        }
    }

    /// Its event name: the `event` field of the JSON log and of the control stream's event
    /// records (`docs/control.md`), so part of both formats.
    pub fn name(&self) -> &'static str {
        match self {
            Notice::Spawned { .. } => "spawned",
            Notice::SpawnFailed { .. } => "spawn_failed",
            Notice::Ready { .. } => "ready",
            Notice::Listening { .. } => "listening",
            Notice::Stopping { .. } => "stopping",
            Notice::Killed { .. } => "killed",
            Notice::Exited { .. } => "exited",
            Notice::RestartScheduled { .. } => "restart_scheduled",
            Notice::ReplaceQueued { .. } => "replace_queued",
            Notice::ReplaceAbandoned { .. } => "replace_abandoned",
            Notice::RolloutStarted { .. } => "rollout_started",
            Notice::RolloutFinished { .. } => "rollout_finished",
            Notice::RolloutAborted { .. } => "rollout_aborted",
            Notice::Scaled { .. } => "scaled",
            Notice::Waiting { .. } => "waiting",
            Notice::PoolDone { .. } => "pool_done",
            Notice::HookStarted { .. } => "before_start",
            Notice::HookFinished { .. } => "before_start_done",
            Notice::HookFailed { .. } => "before_start_failed",
            Notice::Status { .. } => "status",
            Notice::Refused { .. } => "refused",
            Notice::ShutdownStarted { .. } => "shutdown",
            Notice::AllStopped => "stopped",
            Notice::PoolAdded { .. } => "pool_added",
            Notice::PoolRemoved { .. } => "pool_removed",
            Notice::Hung { .. } => "hung",
            Notice::OverMemory { .. } => "over_memory",
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |duration: &Duration| format_duration(round_ms(*duration));
        match self {
            Notice::Spawned { worker } => {
                write!(f, "{worker} spawned (generation {})", worker.generation)
            }
            Notice::SpawnFailed { worker, error } => {
                write!(f, "{worker} could not be started: {error}")
            }
            Notice::Ready { worker, after } => write!(f, "{worker} ready after {}", d(after)),
            Notice::Listening {
                worker,
                socket,
                how,
                process,
                after,
            } => {
                write!(f, "{worker} seen listening on socket {socket} ({how}")?;
                if worker.pid != Some(*process) {
                    write!(f, " in pid {process}")?;
                }
                write!(f, ") after {}", d(after))
            }
            Notice::Stopping {
                worker,
                reason,
                signal,
                told: None,
            } => {
                write!(
                    f,
                    "{worker} stopping ({reason}): sent {signal} to its process group"
                )
            }
            Notice::Stopping {
                worker,
                reason,
                signal,
                told: Some(grace),
            } => {
                write!(
                    f,
                    "{worker} stopping ({reason}): sent 'shutdown' over its channel, {signal} to its process group in {}",
                    d(grace)
                )
            }
            Notice::Killed { worker, cause } => {
                write!(f, "{worker} killed (SIGKILL to its process group): {cause}")
            }
            Notice::Exited {
                worker,
                status,
                cause,
                uptime,
            } => {
                write!(
                    f,
                    "{worker} exited with {status} after {}, {cause}",
                    d(uptime)
                )
            }
            Notice::RestartScheduled {
                pool,
                slot,
                delay,
                failures: 0,
            } => {
                write!(f, "{pool}.{slot} will be restarted in {}", d(delay))
            }
            Notice::RestartScheduled {
                pool,
                slot,
                delay,
                failures,
            } => write!(
                f,
                "{pool}.{slot} failed to start {failures} time{} in a row; backing off, next attempt in {}",
                if *failures == 1 { "" } else { "s" },
                d(delay)
            ),
            Notice::ReplaceQueued { worker, reason } => {
                write!(f, "{worker} will be replaced ({reason})")
            }
            Notice::ReplaceAbandoned {
                worker,
                reason,
                why,
            } => write!(
                f,
                "{worker} keeps serving: its replacement ({reason}) failed: {why}"
            ),
            Notice::RolloutStarted {
                pool,
                generation,
                trigger,
                superseded,
            } => {
                write!(
                    f,
                    "rolling restart of pool {pool} to generation {generation} ({trigger})"
                )?;
                if let Some(old) = superseded {
                    write!(f, "; supersedes the unfinished rollout of generation {old}")?;
                }
                Ok(())
            }
            Notice::RolloutFinished {
                pool,
                generation,
                replaced,
                elapsed,
            } => write!(
                f,
                "rolling restart of pool {pool} finished: generation {generation} live, {replaced} worker{} replaced in {}",
                if *replaced == 1 { "" } else { "s" },
                d(elapsed)
            ),
            Notice::RolloutAborted {
                pool,
                generation,
                replaced,
                size,
                why,
            } => write!(
                f,
                "rolling restart of pool {pool} to generation {generation} stopped: {why}; {replaced} of {size} replaced, the others keep serving"
            ),
            Notice::Waiting { pool, on } => {
                let on: Vec<&str> = on.iter().map(|p| &**p).collect();
                write!(
                    f,
                    "pool {pool} waits for {} before it starts",
                    on.join(", ")
                )
            }
            Notice::PoolDone { pool, generation } => write!(
                f,
                "pool {pool} is done: every worker of generation {generation} exited 0"
            ),
            Notice::HookStarted { pool, generation } => write!(
                f,
                "pool {pool}: running before_start for generation {generation}; its workers start once it exits 0"
            ),
            Notice::HookFinished {
                pool,
                generation,
                elapsed,
            } => write!(
                f,
                "pool {pool}: before_start for generation {generation} succeeded in {}",
                d(elapsed)
            ),
            Notice::HookFailed {
                pool,
                generation,
                why,
                failures,
                retry_in,
            } => {
                write!(
                    f,
                    "pool {pool}: before_start for generation {generation} failed: {why}"
                )?;
                match retry_in {
                    Some(delay) => write!(
                        f,
                        "; {failures} failure{} in a row, running it again in {}",
                        plural(*failures as usize),
                        d(delay)
                    ),
                    None => f.write_str("; its workers do not start"),
                }
            }
            Notice::Scaled { pool, from, to } => {
                write!(f, "pool {pool} scaled from {from} to {to}")
            }
            Notice::Status {
                worker,
                text,
                suppressed: 0,
            } => write!(f, "{worker} status: {text}"),
            Notice::Status {
                worker,
                text,
                suppressed,
            } => write!(
                f,
                "{worker} status: {text} ({suppressed} changes since the last one logged)"
            ),
            Notice::Refused { why } => write!(f, "refused: {why}"),
            Notice::ShutdownStarted {
                immediate: false,
                workers,
            } => write!(
                f,
                "shutting down: stopping {workers} worker{} gracefully (send the signal again to kill them now)",
                if *workers == 1 { "" } else { "s" }
            ),
            Notice::ShutdownStarted {
                immediate: true,
                workers,
            } => {
                write!(
                    f,
                    "shutting down now: killing {workers} worker{}",
                    if *workers == 1 { "" } else { "s" }
                )
            }
            Notice::AllStopped => f.write_str("all workers stopped"),
            Notice::PoolAdded { pool, size } => {
                write!(f, "pool {pool} added with {size} worker{}", plural(*size))
            }
            Notice::PoolRemoved { pool, workers } => write!(
                f,
                "pool {pool} removed: stopping its {workers} worker{}",
                plural(*workers)
            ),
            Notice::Hung { worker, silent_for } => write!(
                f,
                "{worker} hung: no sign of life (WATCHDOG=1) for {}; killing it with SIGABRT and replacing it",
                d(silent_for)
            ),
            Notice::OverMemory { worker, rss, limit } => write!(
                f,
                "{worker} uses {} of memory, above max_memory {}: replacing it",
                ByteSize(*rss),
                ByteSize(*limit)
            ),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Durations in logs are shown to the millisecond.
fn round_ms(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}
