//! What both IPC benches share: the bench worker (this same binary, re-executed by the primary)
//! and the primary's measurements over the real channel between the two processes.
//!
//! Every message is the small `{"type": …, "n": …}` object that `bench/node/ipc-echo.js`
//! sends too, so the numbers compare with Node's `cluster` `worker.send`/`process.send`.

// Each bench binary uses its own part of this module.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use ustad::{Cluster, Event, FromPrimary, Pool, Primary, Worker, WorkerRef};

/// The pool of the one bench worker.
pub const POOL: &str = "bench";
/// No single request of a bench takes this long unless something is broken.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The messages, all `{"type": …, "n": …}` on the wire (`sync` has no `n`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// The small message of the one-way benches.
    Small { n: u64 },
    /// A request answered with the same `echo`.
    Echo { n: u64 },
    /// A request: the worker sends `n` `small` messages to the primary, then answers `count`.
    Flood { n: u64 },
    /// A request: the worker answers `count` with the `small` messages it has received (all
    /// those sent before the `sync`: the channel keeps order).
    Sync,
    /// The answer to `flood` and `sync`.
    Count { n: u64 },
}

/// The runtime of either side: `IPC_BENCH_RUNTIME=current` for a current-thread runtime,
/// else tokio's default multi-thread one (what the examples and most programs use).
pub fn runtime() -> Runtime {
    match std::env::var("IPC_BENCH_RUNTIME").as_deref() {
        Ok("current") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => Runtime::new(),
    }
    .expect("a tokio runtime")
}

/// The bench worker: echoes requests, counts messages, floods on demand. Never returns.
pub fn worker(worker: Worker) -> ! {
    let runtime = runtime();
    let result = runtime.block_on(serve(worker));
    if let Err(error) = result {
        eprintln!("bench worker: {error}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

async fn serve(worker: Worker) -> Result<(), ustad::Error> {
    worker.ready().await?;
    let stopping = worker.clone();
    tokio::spawn(async move {
        stopping.stopped().await;
        std::process::exit(0);
    });
    let mut received = 0u64;
    while let Some(next) = worker.recv().await? {
        match next {
            FromPrimary::Message(message) => {
                if let Ok(Msg::Small { .. }) = message.decode() {
                    received += 1;
                }
            }
            FromPrimary::Request(request) => {
                let answer = match request.decode() {
                    Ok(Msg::Echo { n }) => Msg::Echo { n },
                    Ok(Msg::Sync) => Msg::Count { n: received },
                    Ok(Msg::Flood { n: count }) => {
                        for n in 0..count {
                            worker.send(&Msg::Small { n }).await?;
                        }
                        Msg::Count { n: count }
                    }
                    other => {
                        let _ = request.fail(&format!("unexpected {other:?}")).await;
                        continue;
                    }
                };
                let _ = request.reply(&answer).await;
            }
        }
    }
    Ok(())
}

/// How a round trip is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// [`Cluster::request`] to the worker.
    Request,
    /// [`Cluster::dispatch`] to the pool (of one worker).
    Dispatch,
}

/// The primary's side: a cluster of one bench worker, ready.
#[derive(Debug)]
pub struct Bench {
    pub cluster: Arc<Cluster>,
    events: mpsc::Receiver<Event>,
    pub worker: WorkerRef,
}

impl Bench {
    /// Starts the pool and waits for its worker to be ready.
    pub async fn start(primary: Primary) -> Bench {
        let name = format!("ustad-ipc-bench-{}", std::process::id());
        let cluster = primary
            .name(&name)
            .pool(
                POOL,
                Pool::new(1)
                    // Room for the most requests any bench keeps in flight.
                    .max_in_flight(100_000)
                    .restart_delay(Duration::from_secs(60)),
            )
            .start()
            .expect("the bench cluster starts");
        let mut events = cluster.events().expect("first call");
        let worker = loop {
            match tokio::time::timeout(TIMEOUT, events.recv()).await {
                Ok(Some(Event::Ready(worker))) => break worker,
                Ok(Some(Event::Exited { worker, status, .. })) => {
                    panic!("bench worker {} exited: {status:?}", worker.id)
                }
                Ok(Some(_)) => {}
                other => panic!("the bench worker did not get ready: {other:?}"),
            }
        };
        Bench {
            cluster: Arc::new(cluster),
            events,
            worker,
        }
    }

    /// Stops the worker.
    pub async fn stop(self) {
        let _ = self.cluster.stop(Some(Duration::from_secs(5))).await;
    }

    /// The time the worker takes to send `count` small messages that the program receives
    /// (and decodes) as events.
    pub async fn worker_to_primary(&mut self, count: u64) -> Duration {
        let cluster = self.cluster.clone();
        let id = self.worker.id;
        let started = Instant::now();
        let flood = tokio::spawn(async move {
            cluster
                .request::<_, Msg>(id, &Msg::Flood { n: count }, TIMEOUT)
                .await
        });
        let mut seen = 0;
        while seen < count {
            match self.events.recv().await {
                Some(Event::Message { message, .. }) => {
                    if let Ok(Msg::Small { .. }) = message.decode() {
                        seen += 1;
                    }
                }
                Some(Event::Exited { worker, status, .. }) => {
                    panic!("bench worker {} exited: {status:?}", worker.id)
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            }
        }
        let elapsed = started.elapsed();
        flood
            .await
            .expect("the flood task")
            .expect("the flood is answered");
        elapsed
    }

    /// The time the program takes to send `count` small messages that the worker receives and
    /// decodes (a `sync` request after them says when).
    pub async fn primary_to_worker(&self, count: u64) -> Duration {
        let id = self.worker.id;
        let before = self.sync().await;
        let started = Instant::now();
        for n in 0..count {
            self.cluster
                .send(id, &Msg::Small { n })
                .await
                .expect("send");
        }
        let after = self.sync().await;
        let elapsed = started.elapsed();
        assert_eq!(after - before, count, "the worker got every message");
        elapsed
    }

    async fn sync(&self) -> u64 {
        match self
            .cluster
            .request(self.worker.id, &Msg::Sync, TIMEOUT)
            .await
        {
            Ok(Msg::Count { n }) => n,
            other => panic!("sync: {other:?}"),
        }
    }

    /// `total` echo round trips, `in_flight` at a time: the time they took, and with
    /// `latencies`, each one's latency.
    pub async fn round_trips(
        &self,
        via: Via,
        total: u64,
        in_flight: u64,
        latencies: bool,
    ) -> (Duration, Vec<Duration>) {
        let in_flight = in_flight.clamp(1, total.max(1));
        let started = Instant::now();
        if in_flight == 1 {
            let samples = echo_loop(&self.cluster, self.worker.id, via, 0, total, latencies).await;
            return (started.elapsed(), samples);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..in_flight {
            // Task `task` makes round trips task, task + in_flight, …: `total` in all.
            let count = total / in_flight + u64::from(task < total % in_flight);
            let cluster = self.cluster.clone();
            let id = self.worker.id;
            tasks.spawn(async move {
                echo_loop(&cluster, id, via, task * 1_000_000_000, count, latencies).await
            });
        }
        let mut samples = Vec::new();
        while let Some(done) = tasks.join_next().await {
            samples.extend(done.expect("an echo task"));
        }
        (started.elapsed(), samples)
    }

    /// Peak resident memory of the primary and of the worker (kB), and the time taken, when the
    /// worker sends `count` messages while the program does not read its events for `stall`.
    pub async fn flood_with_stalled_reader(
        &mut self,
        count: u64,
        stall: Duration,
    ) -> (Memory, Duration) {
        let pid = self.worker.pid;
        let before = Memory::now(pid);
        let started = Instant::now();
        let cluster = self.cluster.clone();
        let id = self.worker.id;
        let flood = tokio::spawn(async move {
            cluster
                .request::<_, Msg>(id, &Msg::Flood { n: count }, TIMEOUT * 4)
                .await
        });
        let mut peak = before;
        let stalled = Instant::now();
        while stalled.elapsed() < stall {
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(Memory::now(pid));
        }
        let mut seen = 0;
        while seen < count {
            match self.events.recv().await {
                Some(Event::Message { message, .. }) => {
                    if let Ok(Msg::Small { .. }) = message.decode() {
                        seen += 1;
                    }
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            }
            if seen % 50_000 == 0 {
                peak = peak.max(Memory::now(pid));
            }
        }
        let elapsed = started.elapsed();
        flood
            .await
            .expect("the flood task")
            .expect("the flood is answered");
        peak = peak.max(Memory::now(pid));
        (
            Memory {
                primary_kb: peak.primary_kb.saturating_sub(before.primary_kb),
                worker_kb: peak.worker_kb.saturating_sub(before.worker_kb),
            },
            elapsed,
        )
    }
}

async fn echo_loop(
    cluster: &Cluster,
    worker: ustad::WorkerId,
    via: Via,
    first: u64,
    count: u64,
    latencies: bool,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(if latencies { count as usize } else { 0 });
    for n in first..first + count {
        let started = Instant::now();
        let echo = Msg::Echo { n };
        let answer: Msg = match via {
            Via::Request => cluster.request(worker, &echo, TIMEOUT).await,
            Via::Dispatch => cluster.dispatch(POOL, &echo).await,
        }
        .expect("an echo");
        if latencies {
            samples.push(started.elapsed());
        }
        assert!(matches!(answer, Msg::Echo { n: back } if back == n));
    }
    samples
}

/// Resident memory (VmRSS) of the primary and of the worker, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub primary_kb: u64,
    pub worker_kb: u64,
}

impl Memory {
    fn now(worker: u32) -> Memory {
        Memory {
            primary_kb: rss_kb("self"),
            worker_kb: rss_kb(&worker.to_string()),
        }
    }

    fn max(self, other: Memory) -> Memory {
        Memory {
            primary_kb: self.primary_kb.max(other.primary_kb),
            worker_kb: self.worker_kb.max(other.worker_kb),
        }
    }
}

fn rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The `p`th percentile (0..=100) of `samples`, sorted.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
