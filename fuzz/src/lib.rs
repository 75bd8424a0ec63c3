//! What the fuzz targets share: a reader that hands out a stream in the chunks the fuzzer
//! chooses, a way to run the readers' futures without a runtime, and a pretend process layer
//! that drives a [`Plan`] with synthetic time, as `plan/tests.rs` does, with the events the
//! fuzzer picks.
//!
//! Each target calls the primary's real entry points for one kind of input; a panic anywhere
//! (an overflow, an index out of bounds, an `unwrap`) is a finding.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use tokio::io::{AsyncRead, ReadBuf};
use ustad_core::config::value::parse_duration;
use ustad_core::config::{Config, Signal};
use ustad_core::listening::Wait;
use ustad_core::plan::{
    Action, Event, ExitStatus, Outcome, Plan, RolloutTrigger, WorkerId, WorkerMessage,
};

/// Runs a future whose I/O never waits (it reads from memory) to completion.
///
/// # Panics
/// When the future is still pending after many polls: the harness, not the code under test,
/// is wrong then.
pub fn run<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
    panic!("a future over an in-memory stream stayed pending");
}

/// A stream over `data` that returns at most one chunk per read, with sizes the fuzzer chose:
/// frames and lines split anywhere, as a socket may split them.
#[derive(Debug)]
pub struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl<'a> Chunked<'a> {
    /// `data`, read in chunks of `sizes` (cycled; a size of 0 means 1).
    pub fn new(data: &'a [u8], sizes: Vec<usize>) -> Chunked<'a> {
        Chunked {
            data,
            sizes,
            next: 0,
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = match self.sizes.get(self.next % self.sizes.len().max(1)) {
            Some(size) => (*size).max(1),
            None => usize::MAX,
        };
        self.next = self.next.wrapping_add(1);
        let n = size.min(buf.remaining()).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Chunk sizes for [`Chunked`] from the fuzzer's bytes: mostly small, sometimes whole.
pub fn chunk_sizes(u: &mut Unstructured<'_>) -> Vec<usize> {
    let count = u.int_in_range(0..=8).unwrap_or(0);
    (0..count)
        .map(|_| match u.int_in_range(0..=3).unwrap_or(0) {
            0 => usize::MAX,
            1 => u.int_in_range(1..=8).unwrap_or(1),
            _ => u.int_in_range(1..=70_000).unwrap_or(1),
        })
        .collect()
}

/// The most workers a fuzzed configuration may ask for and still be run through the plan:
/// enough for rollouts over several slots and pools, few enough to keep each run fast.
pub const SIM_MAX_WORKERS: usize = 32;

/// A time step of the pretend clock.
#[derive(Debug, Arbitrary)]
pub enum Step {
    /// A few milliseconds.
    Millis(u16),
    /// Straight to the plan's next deadline.
    NextDeadline,
    /// Any number of seconds, up to centuries and beyond.
    Secs(u64),
}

/// A worker-side status, as a datagram or a frame may say it.
#[derive(Debug, Arbitrary)]
pub enum Said {
    /// `READY=1`.
    Ready,
    /// `STOPPING=1`.
    Stopping,
    /// `STATUS=…`.
    Status(String),
    /// `USTAD_REQUEST=restart`.
    RequestRestart,
    /// `WATCHDOG=1`.
    Watchdog,
    /// `WATCHDOG=trigger`.
    WatchdogTrigger,
}

impl From<Said> for WorkerMessage {
    fn from(said: Said) -> WorkerMessage {
        match said {
            Said::Ready => WorkerMessage::Ready,
            Said::Stopping => WorkerMessage::Stopping,
            Said::Status(text) => WorkerMessage::Status(text),
            Said::RequestRestart => WorkerMessage::RequestRestart,
            Said::Watchdog => WorkerMessage::Watchdog,
            Said::WatchdogTrigger => WorkerMessage::WatchdogTrigger,
        }
    }
}

/// What happens next to the plan: the passing of time, what its workers do, what an
/// operator asks.
#[derive(Debug, Arbitrary)]
pub enum Op {
    /// Time passes; the plan is ticked at every deadline on the way.
    Advance(Step),
    /// The next spawns fail (the command is missing).
    FailSpawns(u8),
    /// A live worker (by index among the live ones) exits.
    Exit {
        /// Which.
        worker: u8,
        /// Code or signal.
        signal: bool,
        /// The code or signal number.
        number: i32,
    },
    /// A live worker says something (notify datagram or lifecycle frame).
    Say {
        /// Which.
        worker: u8,
        /// What.
        said: Said,
    },
    /// A process of a live worker is seen listening on a socket of the config.
    Listening {
        /// Which.
        worker: u8,
        /// Which socket (by index), or one that does not exist.
        socket: u8,
    },
    /// A rolling restart of a pool (by index, or one that does not exist) or every pool.
    Rollout {
        /// Which pool.
        pool: Option<u8>,
        /// With the pool's settings as a reload would bring them (else: the current ones).
        reload: bool,
    },
    /// A pool (by index) scaled.
    Scale {
        /// Which pool.
        pool: u8,
        /// To what size (kept small).
        size: u8,
    },
    /// The primary stops.
    Shutdown {
        /// Kill at once.
        immediate: bool,
        /// `ustad stop --timeout`, as the control request carries it.
        timeout: Option<String>,
    },
    /// A pool (by index) is removed by a reload.
    RemovePool(u8),
    /// A pool (a copy of one, by index) is added by a reload.
    AddPool(u8),
    /// An operator replaces a worker (by index among the live ones, or any id).
    Replace(u8),
    /// A worker breaks the message protocol.
    Cut(u8),
    /// A worker's memory is measured.
    Memory {
        /// Which.
        worker: u8,
        /// Bytes.
        rss: u64,
    },
}

/// A pretend process layer around a [`Plan`]: spawns succeed at once (or fail, when told),
/// signals and kills are noted, processes exit only when an [`Op`] says so.
#[derive(Debug)]
pub struct Sim {
    /// The plan under test.
    pub plan: Plan,
    config: Config,
    /// The pretend clock.
    pub now: Instant,
    next_pid: u32,
    fail_spawns: u8,
    /// Live workers, with their pids once spawned.
    alive: BTreeMap<WorkerId, Option<u32>>,
    added: usize,
}

/// How many deadlines one [`Step`] may pass before the rest is left for later: a
/// configuration of nanosecond timeouts jumped forward by centuries would tick for ever.
const TICKS_PER_STEP: usize = 256;

impl Sim {
    /// Starts a plan for `config` at the current time.
    pub fn start(config: &Config, seed: u64) -> Sim {
        let mut sim = Sim {
            plan: Plan::new(config, seed),
            config: config.clone(),
            now: Instant::now(),
            next_pid: 1000,
            fail_spawns: 0,
            alive: BTreeMap::new(),
            added: 0,
        };
        let outcome = sim.plan.start(sim.now);
        sim.apply(outcome);
        sim
    }

    /// Performs what the plan decided, feeding spawns back, then ticks if a deadline passed.
    fn apply(&mut self, outcome: Outcome) {
        let mut queue = vec![outcome];
        let mut steps = 0usize;
        while let Some(outcome) = queue.pop() {
            steps += 1;
            assert!(steps < 100_000, "the plan keeps answering its own answers");
            for notice in &outcome.notices {
                let _ = notice.to_string();
            }
            for action in outcome.actions {
                match action {
                    Action::Spawn { id, .. } => {
                        let event = if self.fail_spawns > 0 {
                            self.fail_spawns -= 1;
                            Event::SpawnFailed {
                                id,
                                error: "no such program".to_owned(),
                            }
                        } else {
                            self.next_pid = self.next_pid.wrapping_add(1);
                            self.alive.insert(id, Some(self.next_pid));
                            Event::Spawned {
                                id,
                                pid: self.next_pid,
                            }
                        };
                        queue.push(self.plan.handle(event, self.now));
                    }
                    // A `before_start` ends at once: failing while spawns fail, else passing.
                    Action::RunHook {
                        pool, generation, ..
                    } => {
                        let result = if self.fail_spawns > 0 {
                            self.fail_spawns -= 1;
                            Err("exited with exit code 1".to_owned())
                        } else {
                            Ok(())
                        };
                        let event = Event::HookExited {
                            pool: pool.to_string(),
                            generation,
                            result,
                        };
                        queue.push(self.plan.handle(event, self.now));
                    }
                    Action::Signal { .. }
                    | Action::Kill { .. }
                    | Action::AskToStop { .. }
                    | Action::StopHook { .. }
                    | Action::Exit => {}
                }
            }
        }
        if self.plan.next_deadline().is_some_and(|d| d <= self.now) {
            let outcome = self.plan.tick(self.now);
            self.apply(outcome);
        }
        // The supervisor sleeps until the next deadline: one in the past would spin it.
        assert!(
            self.plan.next_deadline().is_none_or(|d| d > self.now),
            "a deadline is left in the past after tick"
        );
    }

    /// Hands the plan one event now, and performs its answer.
    pub fn handle(&mut self, event: Event) {
        let outcome = self.plan.handle(event, self.now);
        self.apply(outcome);
    }

    fn live(&self, index: u8) -> Option<WorkerId> {
        let count = self.alive.len();
        (count > 0).then(|| self.alive.keys().nth(usize::from(index) % count).copied())?
    }

    fn pool_name(&self, index: u8) -> Option<String> {
        let names: Vec<&str> = self.plan.pools().map(|(name, _)| name).collect();
        match names.len() {
            0 => None,
            n => names.get(usize::from(index) % n).map(|n| (*n).to_owned()),
        }
    }

    /// Moves the clock, ticking at each deadline on the way (at most [`TICKS_PER_STEP`]).
    fn advance(&mut self, step: Step) {
        let end = match step {
            Step::Millis(ms) => self.now.checked_add(Duration::from_millis(ms.into())),
            Step::NextDeadline => self.plan.next_deadline().map(|d| d.max(self.now)),
            Step::Secs(secs) => self.now.checked_add(Duration::from_secs(secs)),
        };
        // Only the clock of the harness can run out: the plan never adds to its own.
        let Some(end) = end else { return };
        for _ in 0..TICKS_PER_STEP {
            let Some(deadline) = self.plan.next_deadline().filter(|d| *d <= end) else {
                break;
            };
            self.now = deadline.max(self.now);
            let outcome = self.plan.tick(self.now);
            self.apply(outcome);
        }
        self.now = end.max(self.now);
        let outcome = self.plan.tick(self.now);
        self.apply(outcome);
    }

    /// Plays one [`Op`].
    pub fn play(&mut self, op: Op) {
        match op {
            Op::Advance(step) => self.advance(step),
            Op::FailSpawns(n) => self.fail_spawns = n % 8,
            Op::Exit {
                worker,
                signal,
                number,
            } => {
                if let Some(id) = self.live(worker) {
                    self.alive.remove(&id);
                    let status = if signal {
                        ExitStatus::Signal(number)
                    } else {
                        ExitStatus::Code(number)
                    };
                    self.handle(Event::Exited { id, status });
                }
            }
            Op::Say { worker, said } => {
                if let Some(id) = self.live(worker) {
                    let message = said.into();
                    self.handle(Event::Message { id, message });
                }
            }
            Op::Listening { worker, socket } => {
                if let Some(id) = self.live(worker) {
                    let names: Vec<&String> = self.config.sockets.keys().collect();
                    let name = match names.len() {
                        0 => "none".to_owned(),
                        n => names[usize::from(socket) % n].clone(),
                    };
                    let process = self.alive.get(&id).copied().flatten().unwrap_or(1);
                    self.handle(Event::Listening {
                        id,
                        socket: Arc::from(name),
                        how: Wait::Accept,
                        process,
                    });
                }
            }
            Op::Rollout { pool, reload } => {
                let pool = pool.and_then(|p| self.pool_name(p));
                let spec = match (&pool, reload) {
                    (Some(name), true) => self.config.pools.get(name).cloned().map(|mut spec| {
                        spec.stop_signal = Signal::INT;
                        Arc::new(spec)
                    }),
                    _ => None,
                };
                self.handle(Event::Rollout {
                    pool,
                    trigger: if reload {
                        RolloutTrigger::Reload
                    } else {
                        RolloutTrigger::Restart
                    },
                    spec,
                });
            }
            Op::Scale { pool, size } => {
                let total: usize = self.plan.pools().map(|(_, n)| n).sum();
                let size = usize::from(size % 8) + 1;
                if let Some(pool) = self.pool_name(pool)
                    && total + size <= SIM_MAX_WORKERS
                {
                    self.handle(Event::Scale { pool, size });
                }
            }
            Op::Shutdown { immediate, timeout } => {
                // As the supervisor reads `stop`'s timeout; a bad one is refused to the client.
                if let Ok(timeout) = timeout.as_deref().map(parse_duration).transpose() {
                    self.handle(Event::Shutdown { immediate, timeout });
                }
            }
            Op::RemovePool(pool) => {
                if let Some(name) = self.pool_name(pool) {
                    self.handle(Event::RemovePool { name });
                }
            }
            Op::AddPool(pool) => {
                let total: usize = self.plan.pools().map(|(_, n)| n).sum();
                let spec = self
                    .config
                    .pools
                    .values()
                    .nth(usize::from(pool) % self.config.pools.len().max(1))
                    .cloned();
                if let Some(spec) = spec
                    && total + spec.size.count() <= SIM_MAX_WORKERS
                {
                    self.added += 1;
                    let name = format!("added-{}", self.added);
                    let spec = Arc::new(spec);
                    self.handle(Event::AddPool { name, spec });
                }
            }
            Op::Replace(worker) => {
                let id = self.live(worker).unwrap_or(WorkerId(u64::from(worker)));
                self.handle(Event::Replace { id });
            }
            Op::Cut(worker) => {
                if let Some(id) = self.live(worker) {
                    let why = "a frame of length 0".to_owned();
                    self.handle(Event::Cut { id, why });
                }
            }
            Op::Memory { worker, rss } => {
                if let Some(id) = self.live(worker) {
                    self.handle(Event::Memory { id, rss });
                }
            }
        }
        // What `ustad status`, `/metrics` and the service status read after every event.
        let _ = self.plan.status(self.now);
    }
}

/// Whether `config` is small enough to be run through the plan (see [`SIM_MAX_WORKERS`]).
pub fn small_enough(config: &Config) -> bool {
    let mut total = 0usize;
    for pool in config.pools.values() {
        total = total.saturating_add(pool.size.count());
    }
    total <= SIM_MAX_WORKERS
}
