//! The supervisor's decisions as plain data: which worker to start, stop or replace, and when.
//!
//! [`Plan`] is a pure state machine. It is fed [`Event`]s and the current time, and answers
//! with [`Action`]s for the process layer and [`Notice`]s for the log. It never reads a clock,
//! touches a process or sleeps, so its tests drive it with synthetic time and no processes.
//!
//! # Model
//! - A **pool** has `size` **slots**. A slot holds at most one *current* worker (starting or
//!   serving) and, during a replacement, one *replacement* that is starting.
//! - Every worker belongs to a **generation** of its pool. A **rollout** to generation `g`
//!   replaces every worker older than `g`: start the replacement, wait until it is ready, then
//!   ask the old one to stop. By default one slot at a time, so a pool never has more than one
//!   extra worker alive; a pool's `max_surge` (replacements at once) and `max_unavailable`
//!   (slots that may be empty meanwhile) widen it into batches (`strict` pools: none extra,
//!   the old one is stopped first).
//! - A worker asked to stop is *detached* from its slot: it no longer counts as serving, and the
//!   slot is not refilled until it has exited.
//! - A worker that exits without being asked leaves its slot empty; the slot is refilled after
//!   `restart_delay`, or after an exponential backoff when starts keep failing.

mod snapshot;
mod types;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, IpcProtocol, PoolSpec, Readiness, Signal};
use crate::status;
use snapshot::{mono, mono_opt, mono_with};

pub use snapshot::{Clock, RestoreError, STATE_VERSION};
pub use types::{
    Action, Event, ExitCause, ExitStatus, KillCause, Notice, RolloutTrigger, StopReason, WorkerId,
    WorkerMessage, WorkerRef,
};

/// The longest pause between two attempts to start a worker in a failing slot.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a worker's memory must stay above `max_memory` before it is replaced: one high
/// sample (a burst) is not enough.
pub const MEMORY_GRACE: Duration = Duration::from_secs(3);
/// A worker's `STATUS=` changes are logged at most this often.
pub const STATUS_LOG_INTERVAL: Duration = Duration::from_secs(3);
/// The shortest backoff step, used when `restart_delay` is zero.
const MIN_BACKOFF_STEP: Duration = Duration::from_millis(100);

/// The state of one worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Spawned, not yet ready.
    Starting {
        /// When it is killed unless ready.
        #[serde(with = "mono")]
        deadline: Instant,
        /// With `ready = "delay:…"`: when it becomes ready.
        #[serde(with = "mono_opt")]
        ready_at: Option<Instant>,
    },
    /// Serving.
    Ready {
        /// Since when.
        #[serde(with = "mono")]
        since: Instant,
    },
    /// Asked to stop (or killed); waiting for it to exit.
    Stopping {
        /// Why.
        reason: StopReason,
        /// When its process group gets SIGKILL; `None` once it has.
        #[serde(with = "mono_opt")]
        kill_at: Option<Instant>,
    },
}

/// One worker, as the plan sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    /// Its id.
    pub id: WorkerId,
    /// Index of its pool in [`Plan::pools`].
    pool: usize,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// Its pid (and process group id), once spawned.
    pub pid: Option<u32>,
    /// When it was spawned.
    #[serde(with = "mono")]
    pub spawned_at: Instant,
    /// Where it is in its life.
    pub phase: Phase,
    /// When its `ttl` runs out.
    #[serde(with = "mono_opt")]
    ttl_at: Option<Instant>,
    /// It sent `STOPPING=1`.
    announced_stop: bool,
    /// Its message channel was cut because it broke the protocol: its exit is not a crash.
    cut: bool,
    /// Its last `STATUS=` text.
    pub status: Option<String>,
    /// When a change of its `STATUS=` was last logged, and how many since were not.
    #[serde(with = "mono_with")]
    status_logged: Option<(Instant, u64)>,
    /// When it was first seen waiting for connections, and on which socket
    /// (`ready = "listening"`).
    #[serde(with = "mono_with")]
    pub seen_listening: Option<(Instant, Arc<str>)>,
    /// The settings it was started with.
    spec: Arc<PoolSpec>,
    /// With a `watchdog`: when it is deemed hung unless it sends `WATCHDOG=1` first.
    #[serde(with = "mono_opt")]
    watchdog_at: Option<Instant>,
    /// Its last sign of life: spawn, ready or `WATCHDOG=1`.
    #[serde(with = "mono")]
    last_alive: Instant,
    /// Since when its memory has been above `max_memory`.
    #[serde(with = "mono_opt")]
    over_memory_since: Option<Instant>,
    /// Stopping, told to stop over its channel (Node's `'shutdown'`): when its stop signal
    /// follows, and which.
    #[serde(with = "mono_with")]
    signal_at: Option<(Instant, Signal)>,
}

impl Worker {
    /// The settings it was started with.
    pub fn spec(&self) -> &Arc<PoolSpec> {
        &self.spec
    }

    /// Whether it is serving.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }
}

/// How the last worker of a slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Why.
    pub cause: ExitCause,
    /// When.
    #[serde(with = "mono")]
    pub at: Instant,
}

/// One position in a pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Slot {
    /// The worker holding the slot (starting or ready).
    current: Option<WorkerId>,
    /// A worker starting to take the slot over, and why the current one is being replaced.
    replacement: Option<(WorkerId, StopReason)>,
    /// A replacement wanted as soon as the pool is free to start one.
    pending: Option<StopReason>,
    /// Failed starts in a row.
    failures: u32,
    /// An empty slot is not refilled before this time.
    #[serde(with = "mono_opt")]
    respawn_at: Option<Instant>,
    /// Workers of this slot that ended and were followed by another (crashes, replacements…).
    restarts: u32,
    /// How the last worker of this slot ended.
    last_exit: Option<LastExit>,
    /// An operator stopped its worker: it stays empty until its pool is restarted or scaled.
    parked: bool,
    /// A `oneshot` pool's slot whose worker exited 0: the generation it ran. It is not run
    /// again until a newer generation is wanted.
    done: Option<u64>,
}

/// The part a worker plays in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// It holds the slot.
    Current,
    /// It is starting to take the slot over from the current one, for this reason.
    Replacement(StopReason),
    /// It was asked to stop and no longer holds the slot.
    Detached,
}

/// A rolling restart in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rollout {
    generation: u64,
    spec: Arc<PoolSpec>,
    #[serde(with = "mono")]
    started: Instant,
    replaced: usize,
}

/// One pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pool {
    name: Arc<str>,
    /// The settings workers are (re)started with outside a rollout.
    spec: Arc<PoolSpec>,
    /// The generation of `spec`.
    generation: u64,
    /// The highest generation ever given, aborted rollouts' included.
    last_generation: u64,
    slots: Vec<Slot>,
    rollout: Option<Rollout>,
    /// Removed from the configuration: no slots, its last workers are stopping. Kept so that
    /// pool indices stay valid.
    retired: bool,
    /// Workers that ended and were replaced, by reason (`ExitCause::as_str`).
    restarts: BTreeMap<Cow<'static, str>, u64>,
    /// Ready workers that died lately, which are replaced at once within a budget.
    ready_deaths: ReadyDeaths,
    /// Its `after` pools were ready (or done) once: it started, and stays started.
    started: bool,
    /// It was said in the log that it waits for its `after` pools.
    said_waiting: bool,
    /// A `oneshot` pool whose every slot is done with its generation was said to be done.
    said_done: Option<u64>,
    /// Its `before_start` command: which generation it prepared, which one it runs for.
    hook: Hook,
}

/// Where a pool's `before_start` command stands. A generation whose settings have one starts
/// no worker before it exited 0; a rollout waits for it with the old workers serving.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Hook {
    /// The newest generation it succeeded for (0: none yet).
    passed: u64,
    /// The run in progress, if one.
    running: Option<HookRun>,
    /// Failures in a row for the pool's own generation (a first start; a rollout's failure
    /// stops the rollout instead), and when it runs again.
    failures: u32,
    #[serde(with = "mono_opt")]
    retry_at: Option<Instant>,
    /// The generation it last failed for and why, for `status` (until it succeeds).
    last_error: Option<(u64, String)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct HookRun {
    generation: u64,
    #[serde(with = "mono")]
    started: Instant,
    /// Killed, and failed, past this (`before_start_timeout`).
    #[serde(with = "mono")]
    deadline: Instant,
}

/// Counts the deaths of a pool's ready workers in windows of [`READY_DEATH_WINDOW`]. A ready
/// worker that dies is replaced at once: a killed or crashed server is not a failed start.
/// Up to one death per slot in a window is taken as it comes (an operator's kills, the OOM
/// killer, chaos); beyond that the pool's workers die faster than they could be serving (a
/// crash on the first request), and each further replacement waits a little: 100 ms, doubling,
/// at most [`MAX_READY_DEATH_DELAY`], so the pool neither spins nor stays empty for long.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReadyDeaths {
    #[serde(with = "mono_opt")]
    window_start: Option<Instant>,
    count: u32,
}

/// The window over which deaths of ready workers are counted.
pub const READY_DEATH_WINDOW: Duration = Duration::from_secs(1);
/// The longest a ready worker's replacement waits, however fast its pool's workers die.
pub const MAX_READY_DEATH_DELAY: Duration = Duration::from_secs(1);

impl ReadyDeaths {
    /// Records a death at `now` in a pool of `size` slots; returns how long its replacement
    /// waits.
    fn record(&mut self, now: Instant, size: usize) -> Duration {
        if self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= READY_DEATH_WINDOW)
        {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        let budget = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        match self.count.checked_sub(budget) {
            None | Some(0) => Duration::ZERO,
            Some(excess) => MIN_BACKOFF_STEP
                .saturating_mul(1 << (excess - 1).min(16))
                .min(MAX_READY_DEATH_DELAY),
        }
    }
}

impl Pool {
    fn new(name: &str, spec: Arc<PoolSpec>) -> Pool {
        Pool {
            name: Arc::from(name),
            slots: vec![Slot::default(); spec.size.count()],
            spec,
            generation: 1,
            last_generation: 1,
            rollout: None,
            retired: false,
            restarts: BTreeMap::new(),
            ready_deaths: ReadyDeaths::default(),
            started: false,
            said_waiting: false,
            said_done: None,
            hook: Hook::default(),
        }
    }

    /// The generation and settings for a worker started into an empty slot now: the
    /// rollout's once its `before_start` passed, else the pool's own.
    fn spawn_target(&self) -> (u64, Arc<PoolSpec>) {
        match &self.rollout {
            Some(rollout) if self.prepared(rollout.generation, &rollout.spec) => {
                (rollout.generation, rollout.spec.clone())
            }
            _ => (self.generation, self.spec.clone()),
        }
    }

    /// The generation the pool moves to (its rollout's, else its own) and its settings.
    fn newest(&self) -> (u64, Arc<PoolSpec>) {
        match &self.rollout {
            Some(rollout) => (rollout.generation, rollout.spec.clone()),
            None => (self.generation, self.spec.clone()),
        }
    }

    /// Its `before_start` as `status` shows it: while it runs, or since it failed.
    fn hook_status(&self, now: Instant) -> Option<status::HookStatus> {
        let hook = &self.hook;
        let secs = |d: Duration| d.as_secs_f64();
        match hook.running {
            Some(run) => Some(status::HookStatus {
                generation: run.generation,
                running_secs: Some(secs(now.saturating_duration_since(run.started))),
                failures: hook.failures,
                next_attempt_secs: None,
                last_error: hook.last_error.as_ref().map(|(_, why)| why.clone()),
            }),
            None => hook
                .last_error
                .as_ref()
                .map(|(generation, error)| status::HookStatus {
                    generation: *generation,
                    running_secs: None,
                    failures: hook.failures,
                    next_attempt_secs: hook
                        .retry_at
                        .map(|at| secs(at.saturating_duration_since(now))),
                    last_error: Some(error.clone()),
                }),
        }
    }

    /// Whether workers of `generation` (with settings `spec`) may start: it has no
    /// `before_start`, or that ran to success for it.
    fn prepared(&self, generation: u64, spec: &PoolSpec) -> bool {
        spec.before_start.is_none() || self.hook.passed >= generation
    }
}

/// What the plan decided in answer to one call.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// To perform, in order.
    pub actions: Vec<Action>,
    /// To log, in order.
    pub notices: Vec<Notice>,
}

impl Outcome {
    /// Why the plan refused the event this outcome answers, if it did: the one way to tell. A
    /// refused event changes nothing and is refused once (the refusal is a notice, so it is
    /// logged with the others).
    pub fn refusal(&self) -> Option<&str> {
        self.notices.iter().find_map(|notice| match notice {
            Notice::Refused { why } => Some(why.as_str()),
            _ => None,
        })
    }
}

/// The supervisor's state machine. See the [module docs](self).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pools: Vec<Pool>,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: u64,
    shutdown: Option<bool>,
    /// A graceful shutdown's `timeout`, for the pools stopped after their dependants.
    shutdown_timeout: Option<Duration>,
    exited: bool,
    rng: u64,
    #[serde(skip)]
    out: Outcome,
}

impl Plan {
    /// A plan for `config`, with no workers yet; call [`Plan::start`] to start them.
    /// `seed` drives the `ttl` jitter.
    pub fn new(config: &Config, seed: u64) -> Plan {
        let pools = config
            .pools
            .iter()
            .map(|(name, spec)| Pool::new(name, Arc::new(spec.clone())))
            .collect();
        Plan {
            pools,
            workers: BTreeMap::new(),
            next_id: 1,
            shutdown: None,
            shutdown_timeout: None,
            exited: false,
            rng: seed | 1,
            out: Outcome::default(),
        }
    }

    /// Starts every pool's workers.
    pub fn start(&mut self, now: Instant) -> Outcome {
        self.settle(now)
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event, now: Instant) -> Outcome {
        match event {
            Event::Spawned { id, pid } => self.on_spawned(id, pid, now),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error, now),
            Event::Exited { id, status } => self.on_exited(id, status, now),
            Event::Message { id, message } => self.on_message(id, message, now),
            Event::Listening {
                id,
                socket,
                how,
                process,
            } => self.on_listening(id, socket, (how, process), now),
            Event::Rollout {
                pool,
                trigger,
                spec,
            } => self.on_rollout(pool, trigger, spec, now),
            Event::Scale { pool, size } => self.on_scale(&pool, size, now),
            Event::Shutdown { immediate, timeout } => self.on_shutdown(immediate, timeout, now),
            Event::AddPool { name, spec } => self.on_add_pool(name, spec),
            Event::RemovePool { name } => self.on_remove_pool(&name, now),
            Event::Replace { id } => self.on_replace(id),
            Event::StopWorker { id } => self.on_stop_worker(id, now),
            Event::Cut { id, why } => self.on_cut(id, &why, now),
            Event::Memory { id, rss } => self.on_memory(id, rss, now),
            Event::HookExited {
                pool,
                generation,
                result,
            } => self.on_hook_exited(&pool, generation, result, now),
        }
        self.settle(now)
    }

    /// Acts on every deadline that has passed by `now`.
    pub fn tick(&mut self, now: Instant) -> Outcome {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let Some(worker) = self.workers.get(&id) else {
                continue;
            };
            if worker.watchdog_at.is_some_and(|at| at <= now)
                && !matches!(worker.phase, Phase::Stopping { .. })
            {
                self.hang(id, now);
                continue;
            }
            match worker.phase {
                Phase::Starting { ready_at, deadline } => {
                    if ready_at.is_some_and(|at| at <= now) {
                        self.become_ready(id, now);
                    } else if deadline <= now {
                        self.on_ready_timeout(id, now);
                    }
                }
                Phase::Stopping {
                    kill_at: Some(at), ..
                } if at <= now => {
                    let timeout = worker.spec.kill_timeout;
                    self.kill(id, KillCause::KillTimeout(timeout));
                }
                Phase::Stopping { .. } if worker.signal_at.is_some_and(|(at, _)| at <= now) => {
                    let (pid, signal) = (worker.pid, worker.signal_at.map(|(_, s)| s));
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.signal_at = None;
                    }
                    if let (Some(pid), Some(signal)) = (pid, signal) {
                        self.out.actions.push(Action::Signal { id, pid, signal });
                    }
                }
                Phase::Ready { .. } if worker.ttl_at.is_some_and(|at| at <= now) => {
                    let (pool, slot) = (worker.pool, worker.slot);
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.ttl_at = None;
                    }
                    if self.pools[pool]
                        .slots
                        .get(slot)
                        .is_some_and(|s| s.current == Some(id))
                    {
                        self.queue_replacement(pool, slot, StopReason::Ttl);
                    }
                }
                _ => {}
            }
        }
        for pool in 0..self.pools.len() {
            let Some(run) = self.pools[pool].hook.running else {
                continue;
            };
            if run.deadline <= now {
                let p = &mut self.pools[pool];
                p.hook.running = None;
                let timeout = run.deadline.saturating_duration_since(run.started);
                self.out.actions.push(Action::StopHook {
                    pool: p.name.clone(),
                    generation: run.generation,
                });
                let why = format!(
                    "still running after before_start_timeout ({}): its process group was killed",
                    crate::config::value::format_duration(timeout)
                );
                self.hook_failed(pool, run.generation, why, now);
            }
        }
        self.settle(now)
    }

    /// The next time [`Plan::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().flat_map(|w| {
            let phase = match w.phase {
                Phase::Starting { deadline, ready_at } => {
                    Some(ready_at.map_or(deadline, |at| at.min(deadline)))
                }
                Phase::Stopping { kill_at, .. } => kill_at,
                Phase::Ready { .. } => None,
            };
            let alive = !matches!(w.phase, Phase::Stopping { .. });
            [
                phase,
                w.signal_at.map(|(at, _)| at).filter(|_| !alive),
                w.ttl_at.filter(|_| matches!(w.phase, Phase::Ready { .. })),
                w.watchdog_at.filter(|_| alive),
            ]
        });
        // An empty slot waiting for a detached worker to exit waits for that event, not a time.
        let slots = self.pools.iter().enumerate().flat_map(|(pool, p)| {
            p.slots.iter().enumerate().map(move |(slot, s)| {
                let empty = s.current.is_none() && s.replacement.is_none();
                s.respawn_at
                    .filter(|_| empty && !self.has_detached(pool, slot))
            })
        });
        let hooks = self.pools.iter().map(|p| match p.hook.running {
            Some(run) => Some(run.deadline),
            None => p.hook.retry_at,
        });
        workers.chain(slots).flatten().chain(hooks.flatten()).min()
    }

    /// The worker with this id, if alive.
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// The worker with this pid, if alive.
    pub fn worker_by_pid(&self, pid: u32) -> Option<&Worker> {
        self.workers.values().find(|w| w.pid == Some(pid))
    }

    /// Every live worker, by id.
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    /// How to name a worker in logs.
    pub fn worker_ref(&self, id: WorkerId) -> Option<WorkerRef> {
        self.workers.get(&id).map(|w| self.reference(w))
    }

    /// The pool names, in order, with their current sizes.
    pub fn pools(&self) -> impl Iterator<Item = (&str, usize)> {
        self.pools
            .iter()
            .filter(|p| !p.retired)
            .map(|p| (&*p.name, p.slots.len()))
    }

    /// The name of a worker's pool.
    pub fn pool_of(&self, worker: &Worker) -> &str {
        &self.pools[worker.pool].name
    }

    /// Whether the plan is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    // ----- events -------------------------------------------------------------------------

    fn on_spawned(&mut self, id: WorkerId, pid: u32, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.pid = Some(pid);
        if let Phase::Stopping { .. } = worker.phase {
            // Asked to stop before its pid was known: do it now.
            self.out.actions.push(Action::Kill { id, pid });
            return;
        }
        let readiness = worker.spec.ready;
        let notice = Notice::Spawned {
            worker: self.reference(&self.workers[&id]),
        };
        self.out.notices.push(notice);
        match readiness {
            Readiness::None => self.become_ready(id, now),
            Readiness::Delay(delay) => {
                if let Some(w) = self.workers.get_mut(&id) {
                    if let Phase::Starting { ready_at, .. } = &mut w.phase {
                        *ready_at = Some(now + delay);
                    }
                }
            }
            Readiness::Notify | Readiness::Listening | Readiness::Message => {}
        }
    }

    fn on_listening(
        &mut self,
        id: WorkerId,
        socket: Arc<str>,
        (how, process): (crate::listening::Wait, u32),
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.seen_listening.is_some() || matches!(worker.phase, Phase::Stopping { .. }) {
            return;
        }
        worker.seen_listening = Some((now, socket.clone()));
        let starting = matches!(worker.phase, Phase::Starting { .. });
        let waits_for_it = worker.spec.ready == Readiness::Listening;
        let after = now.saturating_duration_since(worker.spawned_at);
        let notice = Notice::Listening {
            worker: self.reference(&self.workers[&id]),
            socket,
            how,
            process,
            after,
        };
        self.out.notices.push(notice);
        if starting && waits_for_it {
            self.become_ready(id, now);
        }
    }

    fn on_spawn_failed(&mut self, id: WorkerId, error: String, now: Instant) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        self.out.notices.push(Notice::SpawnFailed {
            worker: self.reference(&worker),
            error: error.clone(),
        });
        self.lost_unasked(&worker, &format!("could not be started: {error}"), now);
    }

    fn on_exited(&mut self, id: WorkerId, status: ExitStatus, now: Instant) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        let completed = worker.spec.oneshot && status.success();
        let cause = match worker.phase {
            Phase::Stopping { reason, .. } => ExitCause::Stopped(reason),
            _ if completed => ExitCause::Completed,
            _ if worker.announced_stop => ExitCause::Announced,
            // Cut off, it may leave before its replacement asks it to: for breaking the
            // protocol, not a crash.
            _ if worker.cut => ExitCause::Stopped(StopReason::Protocol),
            _ => ExitCause::Crashed,
        };
        self.out.notices.push(Notice::Exited {
            worker: self.reference(&worker),
            status,
            cause,
            uptime: now.saturating_duration_since(worker.spawned_at),
        });
        self.record_exit(&worker, status, cause, now);
        if cause == ExitCause::Completed {
            // A oneshot worker that did its job: its slot is done with that generation.
            self.detach(&worker);
            if let Some(slot) = self.pools[worker.pool].slots.get_mut(worker.slot) {
                slot.done = Some(worker.generation);
                slot.failures = 0;
            }
        } else if !matches!(worker.phase, Phase::Stopping { .. }) {
            self.lost_unasked(&worker, &format!("exited with {status}"), now);
        }
    }

    fn on_message(&mut self, id: WorkerId, message: WorkerMessage, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let (pool, slot) = (worker.pool, worker.slot);
        let serving = matches!(worker.phase, Phase::Ready { .. });
        match message {
            WorkerMessage::Ready => {
                if matches!(worker.phase, Phase::Starting { .. }) {
                    self.become_ready(id, now);
                }
            }
            WorkerMessage::Status(text) => {
                if worker.status.as_deref() == Some(&text) {
                    return;
                }
                worker.status = Some(text.clone());
                // A status is state (`ustad status` shows the last one); its changes are
                // logged at most once per interval, with a count of those that were not.
                let suppressed = match worker.status_logged {
                    Some((at, suppressed))
                        if now.saturating_duration_since(at) < STATUS_LOG_INTERVAL =>
                    {
                        worker.status_logged = Some((at, suppressed + 1));
                        return;
                    }
                    Some((_, suppressed)) => suppressed,
                    None => 0,
                };
                worker.status_logged = Some((now, 0));
                let worker = self.reference(&self.workers[&id]);
                self.out.notices.push(Notice::Status {
                    worker,
                    text,
                    suppressed,
                });
            }
            WorkerMessage::Stopping => {
                if matches!(worker.phase, Phase::Stopping { .. }) {
                    return;
                }
                worker.announced_stop = true;
                if serving && self.is_current(pool, slot, id) {
                    self.queue_replacement(pool, slot, StopReason::Announced);
                }
            }
            WorkerMessage::RequestRestart => {
                if serving && self.is_current(pool, slot, id) {
                    self.queue_replacement(pool, slot, StopReason::Requested);
                }
            }
            WorkerMessage::Watchdog => {
                worker.last_alive = now;
                if let Some(watchdog) = worker.spec.watchdog {
                    if !matches!(worker.phase, Phase::Stopping { .. }) {
                        worker.watchdog_at = Some(now + watchdog);
                    }
                }
            }
            WorkerMessage::WatchdogTrigger => {
                if !matches!(worker.phase, Phase::Stopping { .. }) {
                    self.hang(id, now);
                }
            }
        }
    }

    fn on_add_pool(&mut self, name: String, spec: Arc<PoolSpec>) {
        if self.shutdown.is_some() {
            self.refuse(format!("adding pool `{name}` during shutdown"));
            return;
        }
        if self.pool_index(&name).is_some() {
            self.refuse(format!("pool `{name}` already exists"));
            return;
        }
        let pool = Pool::new(&name, spec);
        self.out.notices.push(Notice::PoolAdded {
            pool: pool.name.clone(),
            size: pool.slots.len(),
        });
        self.pools.push(pool);
    }

    fn on_remove_pool(&mut self, name: &str, now: Instant) {
        let Some(index) = self.pool_index(name) else {
            self.refuse(format!("removing unknown pool `{name}`"));
            return;
        };
        self.stop_hook(index);
        let pool = &mut self.pools[index];
        pool.retired = true;
        pool.rollout = None;
        pool.slots.clear();
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.pool == index)
            .map(|w| w.id)
            .collect();
        self.out.notices.push(Notice::PoolRemoved {
            pool: self.pools[index].name.clone(),
            workers: ids.len(),
        });
        for id in ids {
            self.stop(id, StopReason::PoolRemoved, now);
        }
    }

    fn on_replace(&mut self, id: WorkerId) {
        if self.shutdown.is_some() {
            self.refuse(format!("restarting worker {id} during shutdown"));
            return;
        }
        let Some(worker) = self.workers.get(&id) else {
            self.refuse(format!("no worker with id {id}"));
            return;
        };
        let (pool, slot) = (worker.pool, worker.slot);
        if !matches!(worker.phase, Phase::Ready { .. }) || !self.is_current(pool, slot, id) {
            let worker = self.reference(worker);
            self.refuse(format!(
                "worker {worker} is not serving (starting, stopping or being replaced already)"
            ));
            return;
        }
        self.queue_replacement(pool, slot, StopReason::Restart);
    }

    fn on_stop_worker(&mut self, id: WorkerId, now: Instant) {
        if self.shutdown.is_some() {
            self.refuse(format!("stopping worker {id} during shutdown"));
            return;
        }
        let Some(worker) = self.workers.get(&id) else {
            self.refuse(format!("no worker with id {id}"));
            return;
        };
        if matches!(worker.phase, Phase::Stopping { .. }) {
            let worker = self.reference(worker);
            self.refuse(format!("worker {worker} is stopping already"));
            return;
        }
        let (pool, slot) = (worker.pool, worker.slot);
        // Its slot is left empty: a replacement under way goes too, and nothing is queued.
        let replacement = match self.pools[pool].slots.get_mut(slot) {
            Some(s) => {
                s.parked = true;
                s.pending = None;
                s.respawn_at = None;
                s.replacement.map(|(id, _)| id)
            }
            None => None,
        };
        for id in [Some(id), replacement].into_iter().flatten() {
            self.stop(id, StopReason::Operator, now);
        }
    }

    fn on_cut(&mut self, id: WorkerId, why: &str, now: Instant) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let (pool, slot) = (worker.pool, worker.slot);
        if let Some(w) = self.workers.get_mut(&id) {
            w.cut = true;
        }
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        match worker.phase {
            Phase::Ready { .. } if self.is_current(pool, slot, id) => {
                self.queue_replacement(pool, slot, StopReason::Protocol);
            }
            Phase::Starting { .. } => {
                // Like a start that failed: stopped now, and its slot backs off.
                let snapshot = worker.clone();
                let role = self.detach(&snapshot);
                let signal = snapshot.spec.stop_signal;
                self.stop_with(id, StopReason::Protocol, signal, now);
                self.after_failed_start(
                    &snapshot,
                    role,
                    &format!("broke the message protocol: {why}"),
                    now,
                );
            }
            // Stopping already, or a replacement in progress: it goes anyway.
            _ => {
                let signal = worker.spec.stop_signal;
                if !matches!(worker.phase, Phase::Stopping { .. }) {
                    self.stop_with(id, StopReason::Protocol, signal, now);
                }
            }
        }
    }

    fn on_memory(&mut self, id: WorkerId, rss: u64, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(limit) = worker.spec.max_memory.map(|m| m.0) else {
            return;
        };
        if rss <= limit || !matches!(worker.phase, Phase::Ready { .. }) {
            worker.over_memory_since = None;
            return;
        }
        let since = *worker.over_memory_since.get_or_insert(now);
        let (pool, slot) = (worker.pool, worker.slot);
        if now.saturating_duration_since(since) < MEMORY_GRACE || !self.is_current(pool, slot, id) {
            return;
        }
        let s = &self.pools[pool].slots[slot];
        if s.pending.is_some() || s.replacement.is_some() {
            return;
        }
        let worker = self.reference(&self.workers[&id]);
        self.out
            .notices
            .push(Notice::OverMemory { worker, rss, limit });
        self.queue_replacement(pool, slot, StopReason::Memory);
    }

    fn on_rollout(
        &mut self,
        pool: Option<String>,
        trigger: RolloutTrigger,
        spec: Option<Arc<PoolSpec>>,
        now: Instant,
    ) {
        if self.shutdown.is_some() {
            self.refuse("a rolling restart was requested during shutdown".to_owned());
            return;
        }
        let targets: Vec<usize> = match &pool {
            None => (0..self.pools.len()).collect(),
            Some(name) => match self.pool_index(name) {
                Some(index) => vec![index],
                None => {
                    self.refuse(format!("rolling restart of unknown pool `{name}`"));
                    return;
                }
            },
        };
        for index in targets {
            let p = &mut self.pools[index];
            // A restart fills the slots an operator emptied.
            for slot in &mut p.slots {
                slot.parked = false;
            }
            let superseded = p.rollout.as_ref().map(|r| r.generation);
            // Never a number given before: an aborted rollout's workers or hook may still be
            // about, and events of two attempts must not read alike.
            let generation = p.last_generation + 1;
            p.last_generation = generation;
            // A restart keeps the pool's current size (it may have been scaled); new settings
            // bring their own.
            let size = spec.as_ref().map_or(p.slots.len(), |s| s.size.count());
            let spec = spec.clone().unwrap_or_else(|| {
                p.rollout
                    .as_ref()
                    .map_or(p.spec.clone(), |r| r.spec.clone())
            });
            if let Some(run) = p.hook.running.take() {
                self.out.actions.push(Action::StopHook {
                    pool: p.name.clone(),
                    generation: run.generation,
                });
            }
            p.rollout = Some(Rollout {
                generation,
                spec,
                started: now,
                replaced: 0,
            });
            self.out.notices.push(Notice::RolloutStarted {
                pool: p.name.clone(),
                generation,
                trigger,
                superseded,
            });
            if size != p.slots.len() {
                self.resize(index, size, now);
            }
        }
    }

    fn on_scale(&mut self, pool: &str, size: usize, now: Instant) {
        if self.shutdown.is_some() {
            self.refuse(format!("scaling pool `{pool}` during shutdown"));
            return;
        }
        let Some(index) = self.pool_index(pool) else {
            self.refuse(format!("scaling unknown pool `{pool}`"));
            return;
        };
        if size > crate::config::value::PID_MAX_LIMIT {
            self.refuse(format!(
                "pool `{pool}` cannot have {size} workers: no system runs more than {} processes",
                crate::config::value::PID_MAX_LIMIT
            ));
            return;
        }
        self.resize(index, size, now);
    }

    fn on_shutdown(&mut self, immediate: bool, timeout: Option<Duration>, now: Instant) {
        if self.shutdown == Some(true) || (self.shutdown == Some(false) && !immediate) {
            return;
        }
        self.shutdown = Some(immediate);
        self.shutdown_timeout = timeout;
        self.out.notices.push(Notice::ShutdownStarted {
            immediate,
            workers: self.workers.len(),
        });
        for pool in 0..self.pools.len() {
            self.stop_hook(pool);
        }
        for pool in &mut self.pools {
            pool.rollout = None;
            for slot in &mut pool.slots {
                *slot = Slot::default();
            }
        }
        if immediate {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                self.kill(id, KillCause::ShutdownNow);
            }
        } else {
            self.stop_in_order(now);
        }
    }

    /// A graceful shutdown stops a pool's workers once no pool that waits for it (`after`)
    /// has workers left: dependants first, in the reverse of the order they started in.
    fn stop_in_order(&mut self, now: Instant) {
        let has_live = |plan: &Plan, pool: usize| plan.workers.values().any(|w| w.pool == pool);
        let stoppable: Vec<usize> = (0..self.pools.len())
            .filter(|&pool| {
                let name = &self.pools[pool].name;
                !(0..self.pools.len()).any(|other| {
                    other != pool
                        && self.pools[other].spec.after.iter().any(|a| **a == **name)
                        && has_live(self, other)
                })
            })
            .collect();
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| stoppable.contains(&w.pool) && !matches!(w.phase, Phase::Stopping { .. }))
            .map(|w| w.id)
            .collect();
        let timeout = self.shutdown_timeout;
        for id in ids {
            self.stop(id, StopReason::Shutdown, now);
            if let (Some(timeout), Some(worker)) = (timeout, self.workers.get_mut(&id)) {
                if let Phase::Stopping { kill_at, .. } = &mut worker.phase {
                    if kill_at.is_some() {
                        *kill_at = Some(now + timeout);
                    }
                }
                if let Some((at, _)) = &mut worker.signal_at {
                    *at = (*at).min(now + timeout);
                }
            }
        }
    }

    // ----- transitions --------------------------------------------------------------------

    fn become_ready(&mut self, id: WorkerId, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let after = now.saturating_duration_since(worker.spawned_at);
        worker.phase = Phase::Ready { since: now };
        worker.last_alive = worker.last_alive.max(now);
        if let Some(watchdog) = worker.spec.watchdog {
            // An early WATCHDOG=1 may have armed it already.
            worker.watchdog_at.get_or_insert(now + watchdog);
        }
        let ttl = worker.spec.ttl;
        let (pool, slot) = (worker.pool, worker.slot);
        if let Some(ttl) = ttl {
            let at = now + self.jitter(ttl);
            if let Some(w) = self.workers.get_mut(&id) {
                w.ttl_at = Some(at);
            }
        }
        let notice = Notice::Ready {
            worker: self.reference(&self.workers[&id]),
            after,
        };
        self.out.notices.push(notice);

        let p = &mut self.pools[pool];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        match s.replacement {
            Some((replacement, reason)) if replacement == id => {
                s.replacement = None;
                s.respawn_at = None;
                let old = s.current.replace(id);
                if let Some(old) = old {
                    self.stop(old, reason, now);
                }
            }
            _ if s.current == Some(id) => {}
            _ => return,
        }
        // Workers of the rollout generation count as replaced, whether they replaced a serving
        // worker or filled an empty slot (strict pools, restarts during a rollout).
        let generation = self.workers[&id].generation;
        if let Some(rollout) = &mut self.pools[pool].rollout {
            if generation == rollout.generation {
                rollout.replaced += 1;
            }
        }
    }

    fn on_ready_timeout(&mut self, id: WorkerId, now: Instant) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let timeout = worker.spec.ready_timeout;
        let snapshot = worker.clone();
        let role = self.detach(&snapshot);
        if let Some(w) = self.workers.get_mut(&id) {
            w.phase = Phase::Stopping {
                reason: StopReason::ReadyTimeout,
                kill_at: Some(now),
            };
        }
        self.kill(id, KillCause::ReadyTimeout(timeout));
        let why = format!(
            "was not ready within ready_timeout ({})",
            crate::config::value::format_duration(timeout)
        );
        self.after_failed_start(&snapshot, role, &why, now);
    }

    /// A worker that was not asked to stop is gone (exited, or could not be spawned).
    ///
    /// One that had been serving is replaced at once (see [`ReadyDeaths`]): being serving
    /// means its readiness was seen (`notify`, `listening`), or, where readiness is only
    /// assumed (`none`, `delay:…`), that it stayed up `min_uptime`. Any other counts as a
    /// failed start, and its slot backs off.
    fn lost_unasked(&mut self, worker: &Worker, why: &str, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        let role = self.detach(worker);
        // A oneshot worker that did not exit 0 failed, however long it ran.
        let served = !worker.spec.oneshot
            && matches!(worker.phase, Phase::Ready { .. })
            && (worker.spec.ready.is_observed()
                || now.saturating_duration_since(worker.spawned_at) >= worker.spec.min_uptime);
        if !served {
            self.after_failed_start(worker, role, why, now);
            return;
        }
        let pool = &mut self.pools[worker.pool];
        let size = pool.slots.len();
        let Some(slot) = pool.slots.get_mut(worker.slot) else {
            return;
        };
        slot.failures = 0;
        if role == Role::Current && slot.replacement.is_none() {
            let delay = pool.ready_deaths.record(now, size);
            let slot = &mut pool.slots[worker.slot];
            slot.respawn_at = Some(now + delay);
            self.out.notices.push(Notice::RestartScheduled {
                pool: pool.name.clone(),
                slot: worker.slot,
                delay,
                failures: 0,
            });
        }
    }

    /// Bookkeeping after a worker failed to start (or died before `min_uptime`): a failed
    /// replacement leaves the old worker serving and stops the rollout; a failed worker in an
    /// empty slot backs the slot off.
    fn after_failed_start(&mut self, worker: &Worker, role: Role, why: &str, now: Instant) {
        let failed = self.reference(worker);
        let pool = &mut self.pools[worker.pool];
        let Some(slot) = pool.slots.get_mut(worker.slot) else {
            return;
        };
        let abandoned = match role {
            Role::Replacement(reason) => {
                slot.pending = None;
                Some(reason)
            }
            Role::Current | Role::Detached => None,
        };
        if role != Role::Detached && slot.current.is_none() && slot.replacement.is_none() {
            slot.failures += 1;
            let delay = backoff(worker.spec.restart_delay, slot.failures);
            slot.respawn_at = Some(now + delay);
            self.out.notices.push(Notice::RestartScheduled {
                pool: pool.name.clone(),
                slot: worker.slot,
                delay,
                failures: slot.failures,
            });
        }
        let current = slot.current;
        let of_rollout =
            worker.generation > pool.generation || abandoned == Some(StopReason::Rollout);
        if of_rollout {
            if let Some(rollout) = pool.rollout.take() {
                self.out.notices.push(Notice::RolloutAborted {
                    pool: pool.name.clone(),
                    generation: rollout.generation,
                    replaced: rollout.replaced,
                    size: pool.slots.len(),
                    why: format!("new worker {failed} {why}"),
                });
                return;
            }
        }
        let (Some(reason), Some(current)) = (abandoned, current) else {
            return;
        };
        if reason == StopReason::Ttl {
            // Try again after another ttl rather than right away.
            let ttl = self.workers.get(&current).and_then(|w| w.spec.ttl);
            if let Some(ttl) = ttl {
                let at = now + self.jitter(ttl);
                if let Some(w) = self.workers.get_mut(&current) {
                    w.ttl_at = Some(at);
                }
            }
        }
        if let Some(worker) = self.worker_ref(current) {
            self.out.notices.push(Notice::ReplaceAbandoned {
                worker,
                reason,
                why: format!("new worker {failed} {why}"),
            });
        }
    }

    /// Asks a worker to stop with its pool's stop signal; it gets SIGKILL after `kill_timeout`.
    fn stop(&mut self, id: WorkerId, reason: StopReason, now: Instant) {
        let Some(signal) = self.workers.get(&id).map(|w| w.spec.stop_signal) else {
            return;
        };
        self.stop_with(id, reason, signal, now);
    }

    /// A worker that stopped answering its watchdog: SIGABRT (a core dump shows where it
    /// hung), then SIGKILL after `kill_timeout`; its slot is refilled once it has exited.
    fn hang(&mut self, id: WorkerId, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.watchdog_at = None;
        let silent_for = now.saturating_duration_since(worker.last_alive);
        let worker = self.reference(&self.workers[&id]);
        self.out.notices.push(Notice::Hung { worker, silent_for });
        self.stop_with(id, StopReason::Watchdog, Signal::ABRT, now);
    }

    fn stop_with(&mut self, id: WorkerId, reason: StopReason, signal: Signal, now: Instant) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        if matches!(worker.phase, Phase::Stopping { .. }) {
            return;
        }
        let snapshot = worker.clone();
        self.detach(&snapshot);
        let kill_at = now + snapshot.spec.kill_timeout;
        // A Node app is told over its channel first, and given `stop_grace` to act on it (a
        // hung worker gets its signal at once).
        let told = snapshot
            .spec
            .ipc
            .is_some_and(|ipc| ipc.protocol == IpcProtocol::Node)
            && reason != StopReason::Watchdog
            && snapshot.pid.is_some();
        let grace = snapshot.spec.stop_grace.min(snapshot.spec.kill_timeout);
        if let Some(w) = self.workers.get_mut(&id) {
            w.phase = Phase::Stopping {
                reason,
                kill_at: Some(kill_at),
            };
            w.signal_at = (told && !grace.is_zero()).then_some((now + grace, signal));
        }
        self.out.notices.push(Notice::Stopping {
            worker: self.reference(&snapshot),
            reason,
            signal,
            told: told.then_some(grace),
        });
        // Without a pid (not spawned yet), `on_spawned` kills it as soon as the pid is known.
        if let Some(pid) = snapshot.pid {
            if told {
                self.out.actions.push(Action::AskToStop { id });
            }
            if !told || grace.is_zero() {
                self.out.actions.push(Action::Signal { id, pid, signal });
            }
        }
    }

    /// Sends SIGKILL to a worker's process group.
    fn kill(&mut self, id: WorkerId, cause: KillCause) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if let Phase::Stopping { kill_at: None, .. } = worker.phase {
            return;
        }
        let reason = match worker.phase {
            Phase::Stopping { reason, .. } => reason,
            _ => StopReason::Shutdown,
        };
        worker.phase = Phase::Stopping {
            reason,
            kill_at: None,
        };
        let snapshot = worker.clone();
        self.detach(&snapshot);
        self.out.notices.push(Notice::Killed {
            worker: self.reference(&snapshot),
            cause,
        });
        if let Some(pid) = snapshot.pid {
            self.out.actions.push(Action::Kill { id, pid });
        }
    }

    /// Removes a worker from its slot, and says which role it had there.
    fn detach(&mut self, worker: &Worker) -> Role {
        let Some(slot) = self.pools[worker.pool].slots.get_mut(worker.slot) else {
            return Role::Detached;
        };
        if slot.current == Some(worker.id) {
            slot.current = None;
            return Role::Current;
        }
        match slot.replacement {
            Some((id, reason)) if id == worker.id => {
                slot.replacement = None;
                Role::Replacement(reason)
            }
            _ => Role::Detached,
        }
    }

    fn queue_replacement(&mut self, pool: usize, slot: usize, reason: StopReason) {
        let s = &mut self.pools[pool].slots[slot];
        if s.pending.is_some() || s.replacement.is_some() {
            return;
        }
        s.pending = Some(reason);
        if let Some(current) = s.current {
            if let Some(worker) = self.worker_ref(current) {
                self.out
                    .notices
                    .push(Notice::ReplaceQueued { worker, reason });
            }
        }
    }

    fn resize(&mut self, index: usize, size: usize, now: Instant) {
        let pool = &mut self.pools[index];
        // Scaling fills the slots an operator emptied (to the new size).
        for slot in &mut pool.slots {
            slot.parked = false;
        }
        let from = pool.slots.len();
        if size == from {
            return;
        }
        self.out.notices.push(Notice::Scaled {
            pool: pool.name.clone(),
            from,
            to: size,
        });
        if size > from {
            pool.slots.resize(size, Slot::default());
            return;
        }
        let removed: Vec<Slot> = pool.slots.drain(size..).collect();
        for slot in removed.into_iter().rev() {
            let ids = slot
                .replacement
                .map(|(id, _)| id)
                .into_iter()
                .chain(slot.current);
            for id in ids.collect::<Vec<_>>() {
                self.stop(id, StopReason::Scale, now);
            }
        }
    }

    /// After any change: fill empty slots, start the next replacement, finish rollouts, and
    /// exit once a shutdown has emptied everything. Returns what was decided.
    fn settle(&mut self, now: Instant) -> Outcome {
        if self.shutdown == Some(false) {
            self.stop_in_order(now);
        }
        if self.shutdown.is_some() {
            if self.workers.is_empty() && !self.exited {
                self.exited = true;
                self.out.notices.push(Notice::AllStopped);
                self.out.actions.push(Action::Exit);
            }
            return std::mem::take(&mut self.out);
        }
        for pool in 0..self.pools.len() {
            self.fill_empty_slots(pool, now);
            self.start_next_replacement(pool, now);
            self.finish_rollout(pool, now);
        }
        std::mem::take(&mut self.out)
    }

    fn fill_empty_slots(&mut self, pool: usize, now: Instant) {
        if !self.pools[pool].started {
            let waiting = self.unmet_dependencies(pool);
            if !waiting.is_empty() {
                let p = &mut self.pools[pool];
                if !p.said_waiting {
                    p.said_waiting = true;
                    self.out.notices.push(Notice::Waiting {
                        pool: p.name.clone(),
                        on: waiting,
                    });
                }
                return;
            }
            self.pools[pool].started = true;
        }
        self.run_hook_if_due(pool, now);
        let (target, spec) = self.pools[pool].spawn_target();
        if !self.pools[pool].prepared(target, &spec) {
            return;
        }
        for slot in 0..self.pools[pool].slots.len() {
            let s = &self.pools[pool].slots[slot];
            let empty = s.current.is_none() && s.replacement.is_none();
            let done = spec.oneshot && s.done.is_some_and(|ran| ran >= target);
            if empty
                && !done
                && !s.parked
                && s.respawn_at.is_none_or(|at| at <= now)
                && !self.has_detached(pool, slot)
            {
                let id = self.spawn(pool, slot, now);
                let s = &mut self.pools[pool].slots[slot];
                s.current = Some(id);
                s.respawn_at = None;
            }
        }
        if spec.oneshot && self.oneshot_done(pool, target) {
            let p = &mut self.pools[pool];
            if p.said_done.is_none_or(|said| said < target) {
                p.said_done = Some(target);
                self.out.notices.push(Notice::PoolDone {
                    pool: p.name.clone(),
                    generation: target,
                });
            }
        }
    }

    /// Whether every slot of a `oneshot` pool ran `generation` (or a newer one) to exit 0, with
    /// none of its workers left.
    fn oneshot_done(&self, pool: usize, generation: u64) -> bool {
        self.pools[pool]
            .slots
            .iter()
            .all(|s| s.current.is_none() && s.done.is_some_and(|ran| ran >= generation))
            && !self.workers.values().any(|w| w.pool == pool)
    }

    /// The `after` pools of a pool that are not ready yet (not every slot serving; for a
    /// `oneshot` pool, not done): it does not start before they are.
    fn unmet_dependencies(&self, pool: usize) -> Vec<Arc<str>> {
        self.pools[pool]
            .spec
            .after
            .iter()
            .filter_map(|name| {
                let dep = self.pool_index(name)?;
                let p = &self.pools[dep];
                let met = if p.spec.oneshot {
                    self.oneshot_done(dep, p.generation)
                } else {
                    p.started
                        && p.slots.iter().all(|s| {
                            s.current.is_some_and(|id| {
                                self.workers.get(&id).is_some_and(Worker::is_ready)
                            })
                        })
                };
                (!met).then(|| p.name.clone())
            })
            .collect()
    }

    /// Whether one of a pool's `after` pools is rolling out, or a `oneshot` one is running:
    /// the pool's own rollout waits for it (migrations before the code that needs them).
    fn dependency_busy(&self, pool: usize) -> bool {
        self.pools[pool].spec.after.iter().any(|name| {
            self.pool_index(name).is_some_and(|dep| {
                let p = &self.pools[dep];
                p.rollout.is_some()
                    || (p.spec.oneshot && !self.oneshot_done(dep, p.spawn_target().0))
            })
        })
    }

    /// Starts the replacements the pool's rollout budget allows: while fewer than
    /// `size + max_surge` of its workers are alive, a replacement starts beside an outdated
    /// worker; past that, while more than `size - max_unavailable` slots serve, an outdated
    /// worker is stopped first and its slot refilled once it has exited. With the defaults
    /// (`max_surge = 1`, `max_unavailable = 0`) that is one slot at a time, its replacement
    /// ready before the old worker is asked to stop; `strict` is `0` and `1`.
    fn start_next_replacement(&mut self, pool: usize, now: Instant) {
        // A oneshot pool is run again, not replaced beside itself (`fill_empty_slots`).
        if self.pools[pool].spec.oneshot || self.dependency_busy(pool) {
            return;
        }
        let p = &self.pools[pool];
        if p.rollout
            .as_ref()
            .is_some_and(|r| !p.prepared(r.generation, &r.spec))
        {
            return;
        }
        let size = p.slots.len();
        let (surge, unavailable) = p.spawn_target().1.rollout_budget(size);
        let mut alive = self.workers.values().filter(|w| w.pool == pool).count();
        let mut serving = p
            .slots
            .iter()
            .filter(|s| s.current.is_some_and(|id| self.workers[&id].is_ready()))
            .count();
        let outdated = |s: &Slot| -> Option<StopReason> {
            if s.replacement.is_some() {
                return None;
            }
            let worker = &self.workers[&s.current?];
            if !matches!(worker.phase, Phase::Ready { .. }) {
                return None;
            }
            match &p.rollout {
                Some(rollout) if worker.generation < rollout.generation => {
                    Some(StopReason::Rollout)
                }
                _ => s.pending,
            }
        };
        let due: Vec<(usize, StopReason)> = p
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| outdated(s).map(|r| (i, r)))
            .collect();
        for (slot, reason) in due {
            if alive < size + surge {
                let id = self.spawn(pool, slot, now);
                let s = &mut self.pools[pool].slots[slot];
                s.replacement = Some((id, reason));
                s.pending = None;
                alive += 1;
            } else if serving > size.saturating_sub(unavailable) {
                let s = &mut self.pools[pool].slots[slot];
                s.pending = None;
                let old = s.current.expect("outdated implies current");
                self.stop(old, reason, now);
                serving -= 1;
            } else {
                break;
            }
        }
    }

    fn finish_rollout(&mut self, pool: usize, now: Instant) {
        let p = &self.pools[pool];
        let Some(rollout) = &p.rollout else { return };
        let done = if rollout.spec.oneshot {
            self.oneshot_done(pool, rollout.generation)
        } else {
            p.slots.iter().all(|s| {
                s.replacement.is_none()
                    && s.current.is_some_and(|id| {
                        let w = &self.workers[&id];
                        w.generation >= rollout.generation && matches!(w.phase, Phase::Ready { .. })
                    })
            })
        };
        if !done {
            return;
        }
        let p = &mut self.pools[pool];
        let rollout = p.rollout.take().expect("checked above");
        p.generation = rollout.generation;
        p.spec = rollout.spec;
        self.out.notices.push(Notice::RolloutFinished {
            pool: p.name.clone(),
            generation: rollout.generation,
            replaced: rollout.replaced,
            elapsed: now.saturating_duration_since(rollout.started),
        });
    }

    /// Runs the pool's `before_start` for the generation it moves to, when that generation
    /// has one that has not passed and none runs: a rollout's at once (once the pools it is
    /// `after` are not busy), the pool's own after its backoff.
    fn run_hook_if_due(&mut self, pool: usize, now: Instant) {
        let p = &self.pools[pool];
        let (generation, spec) = p.newest();
        if p.retired || p.hook.running.is_some() || p.prepared(generation, &spec) {
            return;
        }
        let waits = match p.rollout {
            Some(_) => self.dependency_busy(pool),
            None => p.hook.retry_at.is_some_and(|at| at > now),
        };
        if waits {
            return;
        }
        let p = &mut self.pools[pool];
        p.hook.running = Some(HookRun {
            generation,
            started: now,
            deadline: now + spec.before_start_timeout,
        });
        p.hook.retry_at = None;
        self.out.actions.push(Action::RunHook {
            pool: p.name.clone(),
            generation,
            spec,
        });
        self.out.notices.push(Notice::HookStarted {
            pool: p.name.clone(),
            generation,
        });
    }

    fn on_hook_exited(
        &mut self,
        pool: &str,
        generation: u64,
        result: Result<(), String>,
        now: Instant,
    ) {
        let Some(index) = self.pool_index(pool) else {
            return;
        };
        let p = &mut self.pools[index];
        // A run that was stopped (superseded, timed out, its pool removed) was dealt with then.
        let Some(run) = p.hook.running.filter(|run| run.generation == generation) else {
            return;
        };
        p.hook.running = None;
        match result {
            Ok(()) => {
                p.hook.passed = p.hook.passed.max(generation);
                p.hook.failures = 0;
                p.hook.retry_at = None;
                p.hook.last_error = None;
                self.out.notices.push(Notice::HookFinished {
                    pool: p.name.clone(),
                    generation,
                    elapsed: now.saturating_duration_since(run.started),
                });
            }
            Err(why) => self.hook_failed(index, generation, why, now),
        }
    }

    /// The pool's `before_start` failed for `generation`: a rollout to it stops (the old
    /// workers serve on); while the pool's own generation cannot start either (its first
    /// start), the command is run again after a backoff.
    fn hook_failed(&mut self, pool: usize, generation: u64, why: String, now: Instant) {
        let p = &mut self.pools[pool];
        let aborted = p
            .rollout
            .take_if(|rollout| rollout.generation == generation);
        p.hook.last_error = Some((generation, why.clone()));
        let retry_in = if p.prepared(p.generation, &p.spec) {
            None
        } else {
            p.hook.failures = p.hook.failures.saturating_add(1);
            let delay = backoff(p.spec.restart_delay, p.hook.failures);
            p.hook.retry_at = Some(now + delay);
            Some(delay)
        };
        self.out.notices.push(Notice::HookFailed {
            pool: p.name.clone(),
            generation,
            why: why.clone(),
            failures: if retry_in.is_some() {
                p.hook.failures
            } else {
                0
            },
            retry_in,
        });
        if let Some(rollout) = aborted {
            self.out.notices.push(Notice::RolloutAborted {
                pool: p.name.clone(),
                generation,
                replaced: rollout.replaced,
                size: p.slots.len(),
                why: format!("before_start failed: {why}"),
            });
        }
    }

    /// Kills the pool's `before_start` if one runs (the pool or everything stops).
    fn stop_hook(&mut self, pool: usize) {
        let p = &mut self.pools[pool];
        if let Some(run) = p.hook.running.take() {
            self.out.actions.push(Action::StopHook {
                pool: p.name.clone(),
                generation: run.generation,
            });
        }
    }

    fn spawn(&mut self, pool: usize, slot: usize, now: Instant) -> WorkerId {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let p = &self.pools[pool];
        let (generation, spec) = p.spawn_target();
        self.out.actions.push(Action::Spawn {
            id,
            pool: p.name.clone(),
            slot,
            generation,
            spec: spec.clone(),
        });
        let deadline = now + spec.ready_timeout;
        self.workers.insert(
            id,
            Worker {
                id,
                pool,
                slot,
                generation,
                pid: None,
                spawned_at: now,
                status_logged: None,
                seen_listening: None,
                signal_at: None,
                phase: Phase::Starting {
                    deadline,
                    ready_at: None,
                },
                ttl_at: None,
                announced_stop: false,
                cut: false,
                status: None,
                spec,
                watchdog_at: None,
                last_alive: now,
                over_memory_since: None,
            },
        );
        id
    }

    // ----- helpers ------------------------------------------------------------------------

    fn is_current(&self, pool: usize, slot: usize, id: WorkerId) -> bool {
        self.pools[pool]
            .slots
            .get(slot)
            .is_some_and(|s| s.current == Some(id))
    }

    /// Whether a worker detached from this slot is still alive.
    fn has_detached(&self, pool: usize, slot: usize) -> bool {
        self.workers
            .values()
            .any(|w| w.pool == pool && w.slot == slot && matches!(w.phase, Phase::Stopping { .. }))
    }

    fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools
            .iter()
            .position(|p| !p.retired && &*p.name == name)
    }

    /// Remembers how a slot's worker ended, and counts it as a restart when the slot goes on.
    fn record_exit(&mut self, worker: &Worker, status: ExitStatus, cause: ExitCause, now: Instant) {
        let counted = !matches!(
            cause,
            ExitCause::Stopped(StopReason::Shutdown | StopReason::Scale | StopReason::PoolRemoved)
                | ExitCause::Completed
        ) && self.shutdown.is_none();
        let pool = &mut self.pools[worker.pool];
        if counted {
            *pool
                .restarts
                .entry(Cow::Borrowed(cause.as_str()))
                .or_default() += 1;
        }
        if let Some(slot) = pool.slots.get_mut(worker.slot) {
            slot.last_exit = Some(LastExit {
                status,
                cause,
                at: now,
            });
            if counted {
                slot.restarts += 1;
            }
        }
    }

    fn reference(&self, worker: &Worker) -> WorkerRef {
        WorkerRef {
            pool: self.pools[worker.pool].name.clone(),
            slot: worker.slot,
            id: worker.id,
            pid: worker.pid,
            generation: worker.generation,
        }
    }

    fn refuse(&mut self, why: String) {
        self.out.notices.push(Notice::Refused { why });
    }

    /// `ttl` ± 10%, so that workers started together are not all recycled together.
    fn jitter(&mut self, ttl: Duration) -> Duration {
        // xorshift64*: plenty for spreading deadlines; not for anything secret.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let random = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let unit = (random >> 11) as f64 / (1u64 << 53) as f64; // in [0, 1)
        ttl.mul_f64(0.9 + 0.2 * unit)
    }
}

/// The pause before the next start in a slot after `failures` failed starts in a row:
/// `restart_delay`, then doubling, capped at [`MAX_BACKOFF`].
pub fn backoff(restart_delay: Duration, failures: u32) -> Duration {
    if failures <= 1 {
        return restart_delay.min(MAX_BACKOFF);
    }
    let step = restart_delay.max(MIN_BACKOFF_STEP);
    let factor = 1u32 << (failures - 1).min(16);
    step.saturating_mul(factor).min(MAX_BACKOFF)
}

impl Plan {
    /// What the plan knows of each pool and worker, for `ustad status` (CPU and memory are
    /// left for the caller to fill in).
    pub fn status(&self, now: Instant) -> Vec<status::PoolStatus> {
        let secs = |since: Instant| now.saturating_duration_since(since).as_secs_f64();
        self.pools
            .iter()
            .enumerate()
            .filter(|(_, pool)| !pool.retired)
            .map(|(index, pool)| {
                let mut workers: Vec<&Worker> =
                    self.workers.values().filter(|w| w.pool == index).collect();
                workers.sort_by_key(|w| (w.slot, w.id));
                let workers = workers
                    .into_iter()
                    .map(|w| {
                        let slot = pool.slots.get(w.slot);
                        let (state, stop_reason) = match w.phase {
                            Phase::Starting { .. } => (status::WorkerState::Starting, None),
                            Phase::Ready { .. } => (status::WorkerState::Ready, None),
                            Phase::Stopping { reason, .. } => (
                                status::WorkerState::Stopping,
                                Some(reason.as_str().to_owned()),
                            ),
                        };
                        status::WorkerStatus {
                            id: w.id.0,
                            slot: w.slot,
                            pid: w.pid,
                            generation: w.generation,
                            state,
                            stop_reason,
                            uptime_secs: secs(w.spawned_at),
                            restarts: slot.map_or(0, |s| s.restarts),
                            last_exit: slot.and_then(|s| s.last_exit).map(|exit| {
                                status::LastExitStatus {
                                    status: exit.status.to_string(),
                                    reason: exit.cause.as_str().to_owned(),
                                    secs_ago: secs(exit.at),
                                }
                            }),
                            status: w.status.clone(),
                            cpu_percent: None,
                            cpu_seconds: None,
                            rss_bytes: None,
                            listening: w.seen_listening.as_ref().map(|(at, socket)| {
                                status::ListeningStatus {
                                    socket: socket.to_string(),
                                    after_secs: at
                                        .saturating_duration_since(w.spawned_at)
                                        .as_secs_f64(),
                                }
                            }),
                        }
                    })
                    .collect();
                let exit_status = |exit: LastExit| status::LastExitStatus {
                    status: exit.status.to_string(),
                    reason: exit.cause.as_str().to_owned(),
                    secs_ago: secs(exit.at),
                };
                let waiting = pool
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.current.is_none() && s.replacement.is_none())
                    .filter_map(|(slot, s)| {
                        let next = s.respawn_at.filter(|at| *at > now);
                        if next.is_none() && !s.parked {
                            return None;
                        }
                        Some(status::WaitingSlot {
                            slot,
                            failures: s.failures,
                            next_attempt_secs: next
                                .map(|at| at.saturating_duration_since(now).as_secs_f64()),
                            stopped: s.parked,
                            last_exit: s.last_exit.map(exit_status),
                        })
                    })
                    .collect();
                let ready = pool
                    .slots
                    .iter()
                    .filter(|s| {
                        s.current
                            .and_then(|id| self.workers.get(&id))
                            .is_some_and(Worker::is_ready)
                    })
                    .count();
                status::PoolStatus {
                    name: pool.name.to_string(),
                    size: pool.slots.len(),
                    ready,
                    generation: pool.generation,
                    rollout: pool.rollout.as_ref().map(|r| status::RolloutStatus {
                        generation: r.generation,
                        replaced: r.replaced,
                        size: pool.slots.len(),
                        elapsed_secs: secs(r.started),
                    }),
                    restarts: pool
                        .restarts
                        .iter()
                        .map(|(reason, n)| (reason.to_string(), *n))
                        .collect(),
                    workers,
                    waiting,
                    waiting_for: if pool.started {
                        Vec::new()
                    } else {
                        self.unmet_dependencies(index)
                            .iter()
                            .map(ToString::to_string)
                            .collect()
                    },
                    done: pool.spec.oneshot && self.oneshot_done(index, pool.generation),
                    before_start: pool.hook_status(now),
                }
            })
            .collect()
    }

    /// The stop signal of a live worker.
    pub fn stop_signal_of(&self, id: WorkerId) -> Option<Signal> {
        self.workers.get(&id).map(|w| w.spec.stop_signal)
    }

    /// The kill timeout of a live worker.
    pub fn kill_timeout_of(&self, id: WorkerId) -> Option<Duration> {
        self.workers.get(&id).map(|w| w.spec.kill_timeout)
    }
}
