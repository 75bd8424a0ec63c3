//! The hub follows workers' lives for the program: the supervisor tells it (through
//! [`Program`], on the supervisor's thread) of each spawn, readiness, stop and exit, and it keeps
//! what the [`Cluster`](super::Cluster) handle works from (which workers serve, their channels,
//! tasks in flight) and publishes the lifecycle [`Event`]s.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};
use ustad_core::config::{IpcProtocol, IpcSpec};
use ustad_core::control::server::Call;
use ustad_core::ipc::Outbox;
use ustad_core::plan::WorkerId;
use ustad_core::supervisor::{FrameSink, LinkEvent, Program};

use super::event::{Event, PoolName, WorkerInfo, WorkerRef, WorkerState};
use super::routing::{self, Candidate, Rotations};
use super::sink::WorkerSink;
use crate::channel::Pending;
use crate::error::{Error, RequestError};

/// A worker's channel, as the handle uses it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) outbox: Outbox,
    pub(super) pending: Pending,
    /// The largest frame body the worker accepts.
    pub(super) max_message: usize,
    /// What its channel speaks.
    pub(super) protocol: IpcProtocol,
}

/// One worker, as the hub follows it.
#[derive(Debug)]
struct Entry {
    worker: WorkerRef,
    ready: bool,
    stopping: bool,
    conn: Option<Arc<Conn>>,
    in_flight: usize,
    /// `Event::Disconnected` was published (its channel was cut, or it exited).
    disconnected: bool,
}

impl Entry {
    fn info(&self) -> WorkerInfo {
        let state = match (self.stopping, self.ready) {
            (true, _) => WorkerState::Stopping,
            (false, true) => WorkerState::Ready,
            (false, false) => WorkerState::Starting,
        };
        WorkerInfo {
            worker: self.worker.clone(),
            state,
            connected: self.conn.as_ref().is_some_and(|c| !c.outbox.is_closed()),
        }
    }

    fn serving(&self) -> bool {
        self.ready && !self.stopping && self.conn.as_ref().is_some_and(|c| !c.outbox.is_closed())
    }

    fn candidate(&self) -> Candidate {
        Candidate {
            id: self.worker.id,
            slot: self.worker.slot,
            in_flight: self.in_flight,
        }
    }
}

/// The workers the supervisor has spawned and not yet seen exit, and the round-robin
/// rotations over them.
#[derive(Debug, Default)]
pub(super) struct State {
    workers: BTreeMap<WorkerId, Entry>,
    rotations: Rotations,
}

impl State {
    /// A live worker, with where it is in its life.
    pub(super) fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.workers.get(&id).map(Entry::info)
    }

    /// Every live worker (of `pool`, or of every pool), by id.
    pub(super) fn live_workers(&self, pool: Option<&str>) -> Vec<WorkerInfo> {
        self.workers
            .values()
            .filter(|e| pool.is_none_or(|pool| e.worker.pool == pool))
            .map(Entry::info)
            .collect()
    }

    /// The serving workers of `pool`.
    pub(super) fn serving_workers(&self, pool: &str) -> Vec<WorkerRef> {
        serving(&self.workers, pool)
            .map(|e| e.worker.clone())
            .collect()
    }

    /// The channels of the serving workers of `pool`.
    pub(super) fn serving_conns(&self, pool: &str) -> Vec<Arc<Conn>> {
        serving(&self.workers, pool)
            .filter_map(|e| e.conn.clone())
            .collect()
    }

    /// A worker's channel, while it has one (it is gone once the worker exited or was cut off).
    pub(super) fn conn(&self, worker: WorkerId) -> Option<Arc<Conn>> {
        self.workers
            .get(&worker)
            .and_then(|entry| entry.conn.clone())
    }

    /// The next serving worker of `pool` for `tag`, in its rotation ([`Rotations::pick`]).
    pub(super) fn round_robin(&mut self, pool: &str, tag: &str) -> Option<WorkerRef> {
        let candidates = serving(&self.workers, pool).map(Entry::candidate);
        let chosen = self.rotations.pick(pool, tag, candidates)?;
        self.workers.get(&chosen).map(|e| e.worker.clone())
    }

    /// Takes a dispatch slot on the serving worker of `pool` that [`routing::least_loaded`]
    /// picks; `None` when none has room.
    pub(super) fn take_dispatch_slot(
        &mut self,
        pool: &str,
        limit: usize,
        tried: &[WorkerId],
    ) -> Option<WorkerId> {
        let candidates = serving(&self.workers, pool).map(Entry::candidate);
        let chosen = routing::least_loaded(candidates, limit, tried)?;
        if let Some(entry) = self.workers.get_mut(&chosen) {
            entry.in_flight += 1;
        }
        Some(chosen)
    }

    /// Frees the dispatch slot a task took on `worker`, if it is still there.
    pub(super) fn release_dispatch_slot(&mut self, worker: WorkerId) {
        if let Some(entry) = self.workers.get_mut(&worker) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

/// The workers of `pool` that are ready, not stopping, and whose channel is open, by id: the
/// ones that get messages and work.
fn serving<'a>(
    workers: &'a BTreeMap<WorkerId, Entry>,
    pool: &'a str,
) -> impl Iterator<Item = &'a Entry> {
    workers
        .values()
        .filter(move |e| e.worker.pool == pool && e.serving())
}

/// What the handle, the hub and the channels' sinks share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) calls: mpsc::Sender<Call>,
    state: Mutex<State>,
    /// Workers became ready, or dispatch slots freed up.
    pub(super) changed: Notify,
    pub(super) next_request: AtomicU64,
    pub(super) limits: HashMap<String, usize>,
    pub(super) stopped: watch::Receiver<bool>,
    /// The program took the event stream: until then, workers' messages are dropped.
    pub(super) listening: AtomicBool,
    /// The event stream's sending end, until the cluster stops (then the stream ends once the
    /// last channel has delivered its last message).
    events: Mutex<Option<mpsc::Sender<Event>>>,
    /// `Primary::start` waits for the supervisor to have bound its sockets.
    started: Mutex<Option<std::sync::mpsc::Sender<Result<(), Error>>>>,
}

impl Shared {
    pub(super) fn new(
        calls: mpsc::Sender<Call>,
        limits: HashMap<String, usize>,
        stopped: watch::Receiver<bool>,
        events: mpsc::Sender<Event>,
        started: std::sync::mpsc::Sender<Result<(), Error>>,
    ) -> Shared {
        Shared {
            calls,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            next_request: AtomicU64::new(1),
            limits,
            stopped,
            listening: AtomicBool::new(false),
            events: Mutex::new(Some(events)),
            started: Mutex::new(Some(started)),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lifecycle event for the stream: kept (up to the bound) even before the stream is
    /// taken, so that the first workers' events are not lost.
    pub(super) fn publish(&self, event: Event) {
        if let Some(events) = &*self.events.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = events.try_send(event);
        }
    }

    /// The supervisor has returned: every request still waiting fails, and the stream ends.
    pub(super) fn finish(&self) {
        let mut state = self.lock();
        for entry in state.workers.values() {
            if let Some(conn) = &entry.conn {
                conn.outbox.close();
                conn.pending.fail_all(&RequestError::Stopped);
            }
        }
        state.workers.clear();
        drop(state);
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.changed.notify_waiters();
    }
}

/// The supervisor's view of the handle: it keeps the handle's state as workers come and go,
/// and gives each worker's channel its [`WorkerSink`].
#[derive(Debug)]
pub(super) struct Hub(pub(super) Arc<Shared>);

impl Program for Hub {
    fn spawned(
        &self,
        spawned: &ustad_core::plan::WorkerRef,
        channel: Option<(Outbox, IpcSpec)>,
    ) -> Option<Box<dyn FrameSink>> {
        let shared = &self.0;
        let worker = WorkerRef {
            id: spawned.id,
            pool: PoolName::new(spawned.pool.clone()),
            slot: spawned.slot,
            generation: spawned.generation,
            pid: spawned.pid.unwrap_or_default(),
        };
        let conn = channel.map(|(outbox, ipc)| {
            Arc::new(Conn {
                outbox,
                pending: Pending::default(),
                max_message: ipc.max_message,
                protocol: ipc.protocol,
            })
        });
        shared.lock().workers.insert(
            worker.id,
            Entry {
                worker: worker.clone(),
                ready: false,
                stopping: false,
                conn: conn.clone(),
                in_flight: 0,
                disconnected: false,
            },
        );
        let events = shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        shared.publish(Event::Spawned(worker.clone()));
        Some(Box::new(WorkerSink {
            worker,
            conn: conn?,
            events: events?,
            shared: shared.clone(),
        }))
    }

    fn event(&self, event: LinkEvent) {
        let shared = &self.0;
        let mut state = shared.lock();
        let event = match event {
            LinkEvent::Started => {
                drop(state);
                let started = shared
                    .started
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(started) = started {
                    let _ = started.send(Ok(()));
                }
                return;
            }
            LinkEvent::Stopped => return,
            LinkEvent::ChannelClosed { id } => {
                // Cut off for breaking the protocol: no more work for it; it is being replaced.
                let Some(entry) = state.workers.get_mut(&id) else {
                    return;
                };
                let Some(conn) = entry.conn.take() else {
                    return;
                };
                entry.disconnected = true;
                let worker = entry.worker.clone();
                drop(state);
                conn.outbox.close();
                conn.pending.fail_all(&RequestError::WorkerGone(id.0));
                shared.changed.notify_waiters();
                Event::Disconnected(worker)
            }
            LinkEvent::SpawnFailed { pool, slot, error } => {
                drop(state);
                Event::SpawnFailed {
                    pool: PoolName::new(pool),
                    slot,
                    error,
                }
            }
            LinkEvent::Ready { id } => {
                let Some(entry) = state.workers.get_mut(&id) else {
                    return;
                };
                entry.ready = true;
                let worker = entry.worker.clone();
                drop(state);
                shared.changed.notify_waiters();
                Event::Ready(worker)
            }
            LinkEvent::Listening {
                id,
                socket,
                address,
            } => {
                let Some(entry) = state.workers.get(&id) else {
                    return;
                };
                Event::Listening {
                    worker: entry.worker.clone(),
                    socket: socket.to_string(),
                    address,
                }
            }
            LinkEvent::Stopping { id, reason } => {
                let Some(entry) = state.workers.get_mut(&id) else {
                    return;
                };
                entry.stopping = true;
                Event::Stopping {
                    worker: entry.worker.clone(),
                    reason,
                }
            }
            LinkEvent::Exited { id, status, cause } => {
                let Some(entry) = state.workers.remove(&id) else {
                    return;
                };
                state.rotations.forget(id);
                drop(state);
                if let Some(conn) = &entry.conn {
                    conn.outbox.close();
                    conn.pending.fail_all(&RequestError::WorkerGone(id.0));
                    if !entry.disconnected {
                        shared.publish(Event::Disconnected(entry.worker.clone()));
                    }
                }
                shared.changed.notify_waiters();
                Event::Exited {
                    worker: entry.worker,
                    status,
                    cause,
                }
            }
        };
        shared.publish(event);
    }
}
