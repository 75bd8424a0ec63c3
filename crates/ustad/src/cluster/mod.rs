//! The primary's handle on a running cluster, [`Cluster`]: events, messages, requests,
//! round-robin by tag, task dispatch, and the operator's commands (scale, restart, stop).
//!
//! The supervisor runs on its own thread (a current-thread runtime: workers die with the
//! thread that forked them). It tells the [`Hub`] of every worker's life as it happens, on the
//! supervisor's thread; the hub keeps the handle's state (which workers are ready, their
//! channels, tasks in flight) and feeds the [`Event`] stream. Workers' channels run on the
//! program's own runtime when it has one: a worker's messages and requests go from its
//! channel's reader straight into the event stream, and replies straight to the request waiting
//! for them ([`sink`]). Sending never goes through the supervisor either: the handle encodes
//! into each worker's outbox directly, waiting when it is full (backpressure). Which worker a
//! message or task goes to is decided in [`routing`], from plain data.

mod event;
mod hub;
mod routing;
mod sink;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use ustad_core::config::Config;
use ustad_core::config::value::format_duration;
use ustad_core::control::protocol::{Reply, Request};
use ustad_core::control::server::Call;
use ustad_core::ipc::Kind;
use ustad_core::plan::WorkerId;
use ustad_core::status::ClusterStatus;
use ustad_core::supervisor::{self, Link, Options};

pub use self::event::{Event, PoolName, WorkerInfo, WorkerRef, WorkerState};
use self::hub::{Conn, Hub, Shared};
pub use crate::channel::{IncomingRequest, Message};
use crate::channel::{Pending, await_reply, send};
use crate::error::{Error, RequestError};

/// Events [`Cluster::events`] holds unread: beyond them lifecycle events are dropped, and
/// workers' channels wait for room.
const EVENTS: usize = 1024;
/// How many times [`Cluster::dispatch`] tries a task on another worker after one died.
const DISPATCH_ATTEMPTS: u32 = 3;

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
        let (calls, calls_rx) = mpsc::channel(64);
        let (stopped_tx, stopped) = watch::channel(false);
        let (events_tx, events_rx) = mpsc::channel(EVENTS);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
        let shared = Arc::new(Shared::new(
            calls,
            limits,
            stopped,
            events_tx,
            started_tx.clone(),
        ));
        options.link = Some(Link {
            program: Arc::new(Hub(shared.clone())),
            runtime: channel_runtime(),
            calls: calls_rx,
        });
        let finished = shared.clone();
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
                if let Err(error) = runtime.block_on(supervisor::run(config, options)) {
                    let _ = started_tx.send(Err(error.into()));
                }
                finished.finish();
                // Stopped now, even if the program has yet to read the last events.
                let _ = stopped_tx.send(true);
            })?;
        match started_rx.recv() {
            // The supervisor thread is detached: it ends once the cluster has stopped.
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
        self.shared.lock().serving_workers(pool)
    }

    /// Every live worker (of `pool`, or of every pool), by id, with its state: starting,
    /// ready or stopping (Node's `cluster.workers`).
    pub fn live_workers(&self, pool: Option<&str>) -> Vec<WorkerInfo> {
        self.shared.lock().live_workers(pool)
    }

    /// A live worker, with its state and whether its channel is open (Node's
    /// `worker.isConnected()`); `None` once it has exited (Node's `worker.isDead()`).
    pub fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.shared.lock().worker(id)
    }

    /// Sends `signal` (`"SIGTERM"`, `"SIGUSR1"`…) to a worker's process group (Node's
    /// `worker.kill(signal)`). A worker the signal ends is replaced, as any that dies; to
    /// stop one for good, use [`Cluster::disconnect`].
    ///
    /// # Errors
    /// An unknown worker or signal, or a stopped cluster.
    pub async fn kill(&self, worker: WorkerId, signal: &str) -> Result<(), Error> {
        self.call(Request::Kill {
            pool: None,
            worker: Some(worker.0),
            signal: Some(signal.to_owned()),
        })
        .await
        .map(drop)
    }

    /// Stops a worker gracefully without a replacement (Node's `worker.disconnect()`): its
    /// slot stays empty until the pool is restarted or scaled.
    ///
    /// # Errors
    /// An unknown or stopping worker, or a stopped cluster.
    pub async fn disconnect(&self, worker: WorkerId) -> Result<(), Error> {
        self.call(Request::Stop {
            timeout: None,
            worker: Some(worker.0),
        })
        .await
        .map(drop)
    }

    fn conn(&self, worker: WorkerId) -> Result<Arc<Conn>, RequestError> {
        self.shared
            .lock()
            .conn(worker)
            .ok_or(RequestError::NoWorker(worker.0))
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
        let conn = self.conn(worker)?;
        let gone = RequestError::WorkerGone(worker.0);
        let (outbox, protocol) = (&conn.outbox, conn.protocol);
        send(
            outbox,
            protocol,
            &Kind::Msg,
            message,
            conn.max_message,
            gone,
        )
        .await
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
        let targets = self.shared.lock().serving_conns(pool);
        let mut sent = 0;
        for conn in targets {
            match send(
                &conn.outbox,
                conn.protocol,
                &Kind::Msg,
                message,
                conn.max_message,
                RequestError::Stopped,
            )
            .await
            {
                Ok(()) => sent += 1,
                Err(RequestError::Stopped) => {}
                Err(error) => return Err(error),
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
        let conn = self.conn(worker)?;
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let reply = conn.pending.register(id);
        // Forgotten however this ends (a timeout drops this future).
        let _forget = Forget(&conn.pending, id);
        let gone = RequestError::WorkerGone(worker.0);
        send(
            &conn.outbox,
            conn.protocol,
            &Kind::Req { id },
            request,
            conn.max_message,
            gone,
        )
        .await?;
        await_reply(reply, RequestError::WorkerGone(worker.0)).await
    }

    /// The ready worker of `pool` least recently picked for `tag` (each tag rotates on its
    /// own, over the workers that are ready and not stopping at the time).
    pub fn round_robin(&self, pool: &str, tag: &str) -> Option<WorkerRef> {
        self.shared.lock().round_robin(pool, tag)
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
            let taken = self.shared.lock().take_dispatch_slot(pool, limit, tried);
            if let Some(worker) = taken {
                return Ok(worker);
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
        self.shared.lock().release_dispatch_slot(worker);
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
            worker: None,
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

/// Where workers' channels run. On the program's runtime when it is a current-thread one: the
/// channel's reader then wakes the task waiting for a reply on the same thread, with no hop to
/// another thread. With a multi-thread runtime that hop is there either way, and the
/// supervisor's own current-thread loop serves the channels better than the program's
/// scheduler (1.4× the round trips/s with 100 in flight, measured side by side), so they run on
/// the supervisor's thread (docs/benchmarks.md, "IPC", change 2).
fn channel_runtime() -> Option<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .ok()
        .filter(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}
