//! The primary's handle on a running cluster: events, messages, requests, round-robin by tag,
//! task dispatch, and the operator's commands (scale, restart, stop).
//!
//! The supervisor runs on its own thread (a current-thread runtime: workers die with the
//! thread that forked them). A pump task on that thread turns the supervisor's link into this
//! handle's state (which workers are ready, their channels, requests in flight) and into the
//! [`Event`] stream. Sending never goes through the supervisor loop: the handle writes to each
//! worker's channel directly, waiting when the channel is full (backpressure).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};
use ustad_core::config::Config;
use ustad_core::config::value::format_duration;
use ustad_core::control::protocol::{Reply, Request};
use ustad_core::control::server::Call;
use ustad_core::ipc::Kind;
use ustad_core::plan::{ExitCause, ExitStatus, StopReason, WorkerId};
use ustad_core::status::ClusterStatus;
use ustad_core::supervisor::{self, Inbound, Link, LinkEvent, Options};

pub use crate::channel::{IncomingRequest, Message};
use crate::channel::{Pending, await_reply, encode};
use crate::error::{Error, RequestError};

/// Events queued for [`Cluster::events`] before the pump waits for the program.
const EVENTS: usize = 1024;
/// How many times [`Cluster::dispatch`] tries a task on another worker after one died.
const DISPATCH_ATTEMPTS: u32 = 3;

/// A worker, as events and methods name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRef {
    /// Unique for the life of the primary.
    pub id: WorkerId,
    /// Its pool.
    pub pool: String,
    /// Its slot (`0..size`), kept by its replacements.
    pub slot: usize,
    /// Its generation (rolling restarts increase it).
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
}

/// What happens in the cluster.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Spawned(WorkerRef),
    /// It called `ready()`.
    Ready(WorkerRef),
    /// It sent a message.
    Message {
        /// From whom.
        worker: WorkerRef,
        /// What.
        message: Message,
    },
    /// It sent a request; answer it.
    Request {
        /// From whom.
        worker: WorkerRef,
        /// What.
        request: IncomingRequest,
    },
    /// It was asked to stop.
    Stopping {
        /// Which.
        worker: WorkerRef,
        /// Why.
        reason: StopReason,
    },
    /// It exited.
    Exited {
        /// Which.
        worker: WorkerRef,
        /// How.
        status: ExitStatus,
        /// Why.
        cause: ExitCause,
    },
}

#[derive(Debug)]
struct Entry {
    worker: WorkerRef,
    ready: bool,
    stopping: bool,
    outbox: Option<mpsc::Sender<Bytes>>,
    pending: Arc<Pending>,
    in_flight: usize,
    /// The largest frame body the worker accepts.
    max_message: usize,
}

impl Entry {
    fn serving(&self) -> bool {
        self.ready && !self.stopping && self.outbox.is_some()
    }
}

#[derive(Debug, Default)]
struct State {
    workers: BTreeMap<WorkerId, Entry>,
    /// (pool, tag) → worker → when it was last picked.
    picks: HashMap<(String, String), HashMap<WorkerId, u64>>,
    clock: u64,
}

#[derive(Debug)]
struct Shared {
    calls: mpsc::Sender<Call>,
    state: Mutex<State>,
    /// Workers became ready, or dispatch slots freed up.
    changed: Notify,
    next_request: AtomicU64,
    limits: HashMap<String, usize>,
    stopped: watch::Receiver<bool>,
    /// The program took the event stream: until then, workers' messages are dropped.
    listening: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running cluster. See the [crate docs](crate).
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    events: Mutex<Option<mpsc::Receiver<Event>>>,
}

impl Cluster {
    pub(crate) fn start(
        config: Config,
        mut options: Options,
        limits: HashMap<String, usize>,
    ) -> Result<Cluster, Error> {
        let (link_events, link_events_rx) = mpsc::unbounded_channel();
        let (inbound, inbound_rx) = mpsc::channel(supervisor::OUTBOX);
        let (calls, calls_rx) = mpsc::channel(64);
        options.link = Some(Link {
            events: link_events,
            inbound,
            calls: calls_rx,
        });
        let (stopped_tx, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            calls,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            next_request: AtomicU64::new(1),
            limits,
            stopped,
            listening: std::sync::atomic::AtomicBool::new(false),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENTS);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
        let pump_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ustad-supervisor".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started_tx.send(Err(error.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let pump = tokio::spawn(pump(
                        pump_shared,
                        link_events_rx,
                        inbound_rx,
                        events_tx,
                        started_tx.clone(),
                    ));
                    if let Err(error) = supervisor::run(config, options).await {
                        let _ = started_tx.send(Err(error.into()));
                    }
                    // Stopped now, even if the program has yet to read the last events: the
                    // pump delivers them (it ends once they are read or the stream dropped).
                    let _ = stopped_tx.send(true);
                    let _ = pump.await;
                });
            })?;
        match started_rx.recv() {
            // The supervisor thread is detached: it ends once the cluster has stopped and its
            // last events are delivered.
            Ok(Ok(())) => Ok(Cluster {
                shared,
                events: Mutex::new(Some(events_rx)),
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Stopped)
            }
        }
    }

    /// The event stream; `None` after the first call. Lifecycle events are kept from the start
    /// (the latest are dropped when 1,024 are unread); workers' messages and requests are
    /// dropped until the stream is taken (a dropped request fails on the worker's side), and
    /// wait once it is (their senders slow down), which also delays replies to
    /// [`Cluster::request`]: read the stream while the cluster runs.
    pub fn events(&self) -> Option<mpsc::Receiver<Event>> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        if events.is_some() {
            self.shared.listening.store(true, Ordering::Release);
        }
        events
    }

    /// The workers of `pool` that are ready and not stopping.
    pub fn workers(&self, pool: &str) -> Vec<WorkerRef> {
        self.shared
            .lock()
            .workers
            .values()
            .filter(|e| e.worker.pool == pool && e.serving())
            .map(|e| e.worker.clone())
            .collect()
    }

    fn outbox(
        &self,
        worker: WorkerId,
    ) -> Result<(mpsc::Sender<Bytes>, Arc<Pending>, usize), RequestError> {
        let state = self.shared.lock();
        let entry = state
            .workers
            .get(&worker)
            .ok_or(RequestError::NoWorker(worker.0))?;
        let outbox = entry
            .outbox
            .clone()
            .ok_or(RequestError::NoWorker(worker.0))?;
        Ok((outbox, entry.pending.clone(), entry.max_message))
    }

    /// A worker's channel is closed (it died, its exit not yet reaped): stop picking it.
    fn lost(&self, worker: WorkerId) {
        if let Some(entry) = self.shared.lock().workers.get_mut(&worker) {
            entry.outbox = None;
        }
    }

    /// Sends `message` to a worker; waits while its channel is full.
    ///
    /// # Errors
    /// An unknown or exited worker, or a message that cannot be encoded.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        worker: WorkerId,
        message: &T,
    ) -> Result<(), RequestError> {
        let (outbox, _, max) = self.outbox(worker)?;
        let frame = encode(&Kind::Msg, message, max)?;
        outbox
            .send(frame)
            .await
            .map_err(|_| RequestError::WorkerGone(worker.0))
    }

    /// Sends `message` to every ready worker of `pool`; returns how many got it.
    ///
    /// # Errors
    /// A message that cannot be encoded.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        pool: &str,
        message: &T,
    ) -> Result<usize, RequestError> {
        let targets: Vec<(mpsc::Sender<Bytes>, usize)> = self
            .shared
            .lock()
            .workers
            .values()
            .filter(|e| e.worker.pool == pool && e.serving())
            .filter_map(|e| Some((e.outbox.clone()?, e.max_message)))
            .collect();
        let max = targets
            .iter()
            .map(|(_, max)| *max)
            .min()
            .unwrap_or(usize::MAX);
        let frame = encode(&Kind::Msg, message, max)?;
        let outboxes = targets.into_iter().map(|(outbox, _)| outbox);
        let mut sent = 0;
        for outbox in outboxes {
            if outbox.send(frame.clone()).await.is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends a request to a worker and waits for its reply, at most `timeout`.
    ///
    /// # Errors
    /// [`RequestError::Timeout`], [`RequestError::WorkerGone`] when it exits first,
    /// [`RequestError::Failed`] when it answers with a failure, or an encoding problem.
    pub async fn request<T, R>(
        &self,
        worker: WorkerId,
        request: &T,
        timeout: Duration,
    ) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        match tokio::time::timeout(timeout, self.request_unbounded(worker, request)).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    async fn request_unbounded<T, R>(
        &self,
        worker: WorkerId,
        request: &T,
    ) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let (outbox, pending, max) = self.outbox(worker)?;
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Kind::Req { id }, request, max)?;
        let reply = pending.register(id);
        // Forgotten however this ends (a timeout drops this future).
        let _forget = Forget(&pending, id);
        if outbox.send(frame).await.is_err() {
            self.lost(worker);
            return Err(RequestError::WorkerGone(worker.0));
        }
        await_reply(reply, RequestError::WorkerGone(worker.0)).await
    }

    /// The ready worker of `pool` least recently picked for `tag` (each tag rotates on its
    /// own, over the workers that are ready and not stopping at the time).
    pub fn round_robin(&self, pool: &str, tag: &str) -> Option<WorkerRef> {
        let mut state = self.shared.lock();
        let picks = state
            .picks
            .get(&(pool.to_owned(), tag.to_owned()))
            .cloned()
            .unwrap_or_default();
        let chosen = state
            .workers
            .values()
            .filter(|e| e.worker.pool == pool && e.serving())
            .min_by_key(|e| {
                (
                    picks.get(&e.worker.id).copied().unwrap_or(0),
                    e.worker.slot,
                    e.worker.id,
                )
            })
            .map(|e| e.worker.clone())?;
        state.clock += 1;
        let clock = state.clock;
        state
            .picks
            .entry((pool.to_owned(), tag.to_owned()))
            .or_default()
            .insert(chosen.id, clock);
        Some(chosen)
    }

    /// Runs a task on a worker of `pool`: the ready worker with the fewest tasks in flight,
    /// never more than the pool's `max_in_flight` per worker (it waits for room otherwise). If
    /// the worker exits before answering, the task goes to another one, up to 3 attempts.
    ///
    /// # Errors
    /// [`RequestError::Exhausted`] when every attempt lost its worker, [`RequestError::Failed`]
    /// when a worker answered with a failure (not retried: the task ran), an encoding problem,
    /// or [`RequestError::Stopped`].
    pub async fn dispatch<T, R>(&self, pool: &str, task: &T) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let limit = self.shared.limits.get(pool).copied().unwrap_or(64);
        let mut last = String::new();
        let mut tried = Vec::new();
        for _ in 0..DISPATCH_ATTEMPTS {
            let worker = self.acquire(pool, limit, &tried).await?;
            tried.push(worker);
            let result = self.request_unbounded::<T, R>(worker, task).await;
            self.release(worker);
            match result {
                Err(RequestError::WorkerGone(id) | RequestError::NoWorker(id)) => {
                    last = format!("worker {id} exited before it answered");
                }
                other => return other,
            }
        }
        Err(RequestError::Exhausted {
            pool: pool.to_owned(),
            attempts: DISPATCH_ATTEMPTS,
            last,
        })
    }

    /// Takes a dispatch slot on the least loaded ready worker, waiting for one; workers in
    /// `tried` (that lost this task already) only when no other is ready.
    async fn acquire(
        &self,
        pool: &str,
        limit: usize,
        tried: &[WorkerId],
    ) -> Result<WorkerId, RequestError> {
        loop {
            let changed = self.shared.changed.notified();
            {
                let mut state = self.shared.lock();
                let best = state
                    .workers
                    .values_mut()
                    .filter(|e| e.worker.pool == pool && e.serving() && e.in_flight < limit)
                    .min_by_key(|e| (tried.contains(&e.worker.id), e.in_flight, e.worker.slot));
                if let Some(entry) = best {
                    entry.in_flight += 1;
                    return Ok(entry.worker.id);
                }
            }
            if *self.shared.stopped.borrow() {
                return Err(RequestError::Stopped);
            }
            let mut stopped = self.shared.stopped.clone();
            tokio::select! {
                () = changed => {}
                _ = stopped.wait_for(|stopped| *stopped) => return Err(RequestError::Stopped),
            }
        }
    }

    fn release(&self, worker: WorkerId) {
        if let Some(entry) = self.shared.lock().workers.get_mut(&worker) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        self.shared.changed.notify_waiters();
    }

    async fn call(&self, request: Request) -> Result<Reply, Error> {
        let (replies, mut answer) = mpsc::channel(16);
        self.shared
            .calls
            .send(Call { request, replies })
            .await
            .map_err(|_| Error::Stopped)?;
        while let Some(reply) = answer.recv().await {
            if reply.is_final() {
                return match reply {
                    Reply::Error { message } => Err(Error::Refused(message)),
                    other => Ok(other),
                };
            }
        }
        Err(Error::Stopped)
    }

    /// Pools, workers, CPU and memory, as `ustad status` shows them.
    ///
    /// # Errors
    /// [`Error::Stopped`] once the cluster has stopped.
    pub async fn status(&self) -> Result<ClusterStatus, Error> {
        match self.call(Request::Status {}).await? {
            Reply::Status(status) => Ok(status),
            other => Err(Error::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Grows or shrinks a pool (shrinking stops the highest slots gracefully).
    ///
    /// # Errors
    /// An unknown pool, a size of 0, or a stopped cluster.
    pub async fn scale(&self, pool: &str, size: usize) -> Result<(), Error> {
        self.call(Request::Scale {
            pool: pool.to_owned(),
            size: Some(size),
            delta: None,
        })
        .await
        .map(drop)
    }

    /// Replaces every worker of a pool, one at a time (each replacement ready before the old
    /// worker is asked to stop).
    ///
    /// # Errors
    /// An unknown pool, or a stopped cluster.
    pub async fn restart(&self, pool: &str) -> Result<(), Error> {
        self.call(Request::Restart {
            pool: Some(pool.to_owned()),
            worker: None,
        })
        .await
        .map(drop)
    }

    /// Replaces one worker, rolling.
    ///
    /// # Errors
    /// An unknown or not serving worker, or a stopped cluster.
    pub async fn restart_worker(&self, worker: WorkerId) -> Result<(), Error> {
        self.call(Request::Restart {
            pool: None,
            worker: Some(worker.0),
        })
        .await
        .map(drop)
    }

    /// Stops every worker gracefully (each pool's `kill_timeout`, or `timeout`) and waits
    /// until the supervisor has exited.
    ///
    /// # Errors
    /// None in practice: a cluster that already stopped is fine.
    pub async fn stop(&self, timeout: Option<Duration>) -> Result<(), Error> {
        let request = Request::Stop {
            timeout: timeout.map(format_duration),
        };
        let _ = self.call(request).await;
        self.stopped().await;
        Ok(())
    }

    /// Waits until the cluster has stopped (after [`Cluster::stop`], SIGINT or SIGTERM):
    /// every worker has exited. Events still unread stay readable.
    pub async fn stopped(&self) {
        let mut stopped = self.shared.stopped.clone();
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }
}

/// Forgets a pending request when dropped.
struct Forget<'a>(&'a Pending, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

/// Turns the supervisor's link into the handle's state and the event stream.
async fn pump(
    shared: Arc<Shared>,
    mut link: mpsc::UnboundedReceiver<LinkEvent>,
    mut inbound: mpsc::Receiver<Inbound>,
    events: mpsc::Sender<Event>,
    started: std::sync::mpsc::Sender<Result<(), Error>>,
) {
    let mut link_open = true;
    let mut inbound_open = true;
    while link_open || inbound_open {
        tokio::select! {
            biased;
            event = link.recv(), if link_open => match event {
                Some(event) => {
                    if let Some(event) = on_link_event(&shared, event, &started) {
                        // Kept (up to the bound) even before the stream is taken, so that the
                        // first workers' events are not lost.
                        let _ = events.try_send(event);
                    }
                }
                None => link_open = false,
            },
            message = inbound.recv(), if inbound_open => match message {
                Some(message) => {
                    if let Some(event) = on_inbound(&shared, message) {
                        if shared.listening.load(Ordering::Acquire) {
                            let _ = events.send(event).await;
                        }
                    }
                }
                None => inbound_open = false,
            },
        }
    }
    let mut state = shared.lock();
    for entry in state.workers.values() {
        entry.pending.fail_all(&RequestError::Stopped);
    }
    state.workers.clear();
    drop(state);
    shared.changed.notify_waiters();
}

fn on_link_event(
    shared: &Shared,
    event: LinkEvent,
    started: &std::sync::mpsc::Sender<Result<(), Error>>,
) -> Option<Event> {
    let mut state = shared.lock();
    let event = match event {
        LinkEvent::Started => {
            let _ = started.send(Ok(()));
            return None;
        }
        LinkEvent::Stopped => return None,
        LinkEvent::ChannelClosed { id } => {
            // Cut off for breaking the protocol: no more work for it; it is being replaced.
            let entry = state.workers.get_mut(&id)?;
            entry.outbox = None;
            entry.pending.fail_all(&RequestError::WorkerGone(id.0));
            drop(state);
            shared.changed.notify_waiters();
            return None;
        }
        LinkEvent::Spawned {
            worker,
            pid,
            outbox,
            max_message,
        } => {
            let worker = WorkerRef {
                id: worker.id,
                pool: worker.pool.to_string(),
                slot: worker.slot,
                generation: worker.generation,
                pid,
            };
            state.workers.insert(
                worker.id,
                Entry {
                    worker: worker.clone(),
                    ready: false,
                    stopping: false,
                    outbox,
                    pending: Arc::new(Pending::default()),
                    in_flight: 0,
                    max_message,
                },
            );
            Event::Spawned(worker)
        }
        LinkEvent::Ready { id } => {
            let entry = state.workers.get_mut(&id)?;
            entry.ready = true;
            let worker = entry.worker.clone();
            drop(state);
            shared.changed.notify_waiters();
            Event::Ready(worker)
        }
        LinkEvent::Stopping { id, reason } => {
            let entry = state.workers.get_mut(&id)?;
            entry.stopping = true;
            Event::Stopping {
                worker: entry.worker.clone(),
                reason,
            }
        }
        LinkEvent::Exited { id, status, cause } => {
            let entry = state.workers.remove(&id)?;
            entry.pending.fail_all(&RequestError::WorkerGone(id.0));
            drop(state);
            shared.changed.notify_waiters();
            Event::Exited {
                worker: entry.worker,
                status,
                cause,
            }
        }
    };
    Some(event)
}

fn on_inbound(shared: &Shared, message: Inbound) -> Option<Event> {
    let Inbound { worker, envelope } = message;
    let (reference, outbox, pending, max) = {
        let state = shared.lock();
        let entry = state.workers.get(&worker.id)?;
        (
            entry.worker.clone(),
            entry.outbox.clone(),
            entry.pending.clone(),
            entry.max_message,
        )
    };
    match envelope.kind {
        Kind::Rep { .. } | Kind::Err { .. } => {
            pending.resolve(envelope);
            None
        }
        Kind::Req { id } => Some(Event::Request {
            worker: reference,
            request: IncomingRequest::new(id, envelope, outbox?, max),
        }),
        _ => Some(Event::Message {
            worker: reference,
            message: Message::new(envelope),
        }),
    }
}
