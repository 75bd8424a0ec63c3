//! `/metrics` and `/healthz` over HTTP, so that Prometheus can scrape a primary and a load
//! balancer or Kubernetes can probe it, with no agent beside it.
//!
//! Nothing here keeps counters of its own: every scrape renders a [`ClusterStatus`] snapshot
//! that the supervisor hands over on request ([`StatusSource`]), so the numbers are exactly
//! what `ustad status` shows. The server runs on the supervisor's own thread, so it is built
//! to be unable to hold it up: connections are bounded in number and in time, and a client
//! that floods it costs the supervisor at most one snapshot per [`SNAPSHOT_MAX_AGE`].
//!
//! # The format
//!
//! The body is the [OpenMetrics] text format (`application/openmetrics-text; version=1.0.0`),
//! written by the Prometheus project's `prometheus-client` crate. That is the format Prometheus
//! asks for first in its default `Accept` header (its `scrape_protocols` list), and the only
//! text format that crate writes: labelling the same bytes `text/plain; version=0.0.4` would
//! be wrong, as the classic parser refuses the `info` type and the `# EOF` line is
//! OpenMetrics'.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ustad_instance_info` | info | `name`, `version` |
//! | `ustad_uptime_seconds` | gauge | |
//! | `ustad_pool_size` | gauge | `pool` |
//! | `ustad_pool_ready` | gauge | `pool` |
//! | `ustad_pool_generation` | gauge | `pool` |
//! | `ustad_rollout_in_progress` | gauge (0 or 1) | `pool` |
//! | `ustad_workers` | gauge | `pool`, `state` (`starting`, `ready`, `stopping`, all three always present) |
//! | `ustad_restarts_total` | counter | `pool`, `reason` (a reason appears with its first restart) |
//! | `ustad_worker_resident_memory_bytes` | gauge | `pool`, `slot`, `id` (when known) |
//! | `ustad_worker_cpu_seconds_total` | counter | `pool`, `slot`, `id` (when known) |
//! | `ustad_slot_failed_starts` | gauge | `pool`, `slot` (an empty slot waiting for its next attempt) |
//! | `ustad_slot_next_attempt_seconds` | gauge | `pool`, `slot` (the same slots) |
//!
//! [OpenMetrics]: https://prometheus.io/docs/specs/om/open_metrics_spec/

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use crate::status::{ClusterStatus, WorkerState};

/// How the server asks the supervisor for a snapshot: it sends a [`oneshot::Sender`], and the
/// supervisor answers on it with the cluster's current [`ClusterStatus`].
///
/// The supervisor owns the receiving end; when it drops it, [`serve`] returns.
pub type StatusSource = mpsc::Sender<oneshot::Sender<ClusterStatus>>;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a scrape waits for the supervisor's snapshot before it gets a 503.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a snapshot is reused. Requests within this time of the last snapshot (or waiting
/// for the same one) share it, so no client can make the supervisor compute more than one
/// snapshot in this time. A probe therefore sees a change at most this late.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// How long a client has to send its request line and headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a connection may last, reading the request and writing the response included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Read buffer per connection, which bounds the size of a request's headers (hyper's minimum).
const MAX_REQUEST_BUFFER: usize = 8 * 1024;

/// How long to stop accepting after running out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Renders a snapshot in the OpenMetrics text format (see the [module docs](self) for the
/// metrics).
///
/// Series of one family come in no particular order.
pub fn render(status: &ClusterStatus) -> String {
    let mut registry = Registry::with_prefix("ustad");

    registry.register(
        "instance",
        "The ustad instance: its name and ustad's version",
        Info::new(InstanceLabels {
            name: status.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }),
    );

    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(status.uptime_secs);
    registry.register_with_unit(
        "uptime",
        "Time since the primary started",
        Unit::Seconds,
        uptime,
    );

    // (A clone of a family shares its series: each needs its own.)
    let size = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
    let ready = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
    let generation = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
    let rollout = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
    let workers = Family::<WorkerStateLabels, Gauge<u64, AtomicU64>>::default();
    let restarts = Family::<RestartLabels, Counter>::default();
    let rss = Family::<WorkerLabels, Gauge<u64, AtomicU64>>::default();
    let cpu = Family::<WorkerLabels, Counter<f64, AtomicU64>>::default();
    let failed_starts = Family::<SlotLabels, Gauge<u64, AtomicU64>>::default();
    let next_attempt = Family::<SlotLabels, Gauge<f64, AtomicU64>>::default();

    for pool in &status.pools {
        let labels = PoolLabels {
            pool: pool.name.clone(),
        };
        size.get_or_create(&labels).set(pool.size as u64);
        ready.get_or_create(&labels).set(pool.ready as u64);
        generation.get_or_create(&labels).set(pool.generation);
        rollout
            .get_or_create(&labels)
            .set(u64::from(pool.rollout.is_some()));

        for state in [
            WorkerState::Starting,
            WorkerState::Ready,
            WorkerState::Stopping,
        ] {
            let count = pool.workers.iter().filter(|w| w.state == state).count();
            workers
                .get_or_create(&WorkerStateLabels {
                    pool: pool.name.clone(),
                    state: state.as_str(),
                })
                .set(count as u64);
        }

        for (reason, count) in &pool.restarts {
            restarts
                .get_or_create(&RestartLabels {
                    pool: pool.name.clone(),
                    reason: reason.clone(),
                })
                .inc_by(*count);
        }

        for worker in &pool.workers {
            let labels = WorkerLabels {
                pool: pool.name.clone(),
                slot: worker.slot as u64,
                id: worker.id,
            };
            if let Some(bytes) = worker.rss_bytes {
                rss.get_or_create(&labels).set(bytes);
            }
            if let Some(seconds) = worker.cpu_seconds {
                cpu.get_or_create(&labels).inc_by(seconds);
            }
        }

        for waiting in &pool.waiting {
            let labels = SlotLabels {
                pool: pool.name.clone(),
                slot: waiting.slot as u64,
            };
            let Some(next) = waiting.next_attempt_secs else {
                continue;
            };
            failed_starts
                .get_or_create(&labels)
                .set(u64::from(waiting.failures));
            next_attempt.get_or_create(&labels).set(next);
        }
    }

    registry.register(
        "pool_size",
        "Slots of the pool (its configured or scaled size)",
        size,
    );
    registry.register(
        "pool_ready",
        "Slots of the pool whose worker is ready",
        ready,
    );
    registry.register(
        "pool_generation",
        "The generation the pool's workers are started with outside a rollout",
        generation,
    );
    registry.register(
        "rollout_in_progress",
        "1 while a rolling restart of the pool is under way",
        rollout,
    );
    registry.register("workers", "Live workers by pool and state", workers);
    registry.register(
        "restarts",
        "Workers that ended and were replaced, by pool and reason",
        restarts,
    );
    registry.register_with_unit(
        "worker_resident_memory",
        "Resident memory of the worker's process group",
        Unit::Bytes,
        rss,
    );
    registry.register_with_unit(
        "worker_cpu",
        "CPU time (user and system) used by the live processes of the worker's process group",
        Unit::Seconds,
        cpu,
    );

    registry.register(
        "slot_failed_starts",
        "Failed starts in a row of an empty slot waiting for its next attempt (backoff)",
        failed_starts,
    );
    registry.register_with_unit(
        "slot_next_attempt",
        "Time until an empty slot's next attempt to start a worker",
        Unit::Seconds,
        next_attempt,
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// What `/healthz` says about a snapshot: `None` when healthy ([`ClusterStatus::healthy`]),
/// else one line per reason, such as `web: 1/2 ready`.
fn unhealthy_reasons(status: &ClusterStatus) -> Option<String> {
    if status.healthy() {
        return None;
    }
    let mut reasons = String::new();
    if status.shutting_down {
        reasons.push_str("shutting down\n");
    }
    for pool in status.pools.iter().filter(|pool| pool.ready < pool.size) {
        let _ = writeln!(reasons, "{}: {}/{} ready", pool.name, pool.ready, pool.size);
    }
    Some(reasons)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    name: String,
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabels {
    pool: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    pool: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    pool: String,
    slot: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    pool: String,
    slot: u64,
    id: u64,
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the supervisor drops the
/// receiving end of `status` (returns `Ok`) or accepting fails for good (returns the error).
///
/// - `/metrics`: 200 with [`render`] of a snapshot, as [`CONTENT_TYPE_OPENMETRICS`].
/// - `/healthz`: 200 `ok` when every pool has a ready worker in every slot and no shutdown is
///   under way, else 503 with one line per reason (`web: 1/2 ready`, `shutting down`).
/// - Either: 503 if the supervisor has not answered within [`SNAPSHOT_TIMEOUT`].
/// - Other paths: 404; other methods: 405.
///
/// Each connection serves one request (no keep-alive), runs as a task of its own, and is
/// closed if its headers take more than 5 s or the whole exchange more than 30 s; at most
/// [`MAX_CONNECTIONS`] are served at once. Dropping or aborting the returned future closes
/// every connection it has open.
///
/// # Errors
///
/// The error of [`TcpListener::accept`] when it is not one that passes (a connection aborted
/// by its client, running out of file descriptors or memory: those are logged and retried).
///
/// # Caveats
///
/// Must run inside a tokio runtime with time enabled; it is fine on a `current_thread` one, as
/// nothing in it blocks.
pub async fn serve(listener: TcpListener, status: StatusSource) -> io::Result<()> {
    serve_with(listener, status, Limits::default()).await
}

/// The bounds [`serve`] applies; tests shrink them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
    connection_timeout: Duration,
    snapshot_timeout: Duration,
    snapshot_max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            connection_timeout: CONNECTION_TIMEOUT,
            snapshot_timeout: SNAPSHOT_TIMEOUT,
            snapshot_max_age: SNAPSHOT_MAX_AGE,
        }
    }
}

async fn serve_with(listener: TcpListener, status: StatusSource, limits: Limits) -> io::Result<()> {
    let snapshots = Arc::new(Snapshots {
        source: status.clone(),
        limits,
        last: Mutex::new(None),
    });
    // Owned here, so that dropping this future aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!(event = "metrics_error", error = %e, "a metrics connection panicked");
                    }
                }
            }
            accepted = listener.accept(), if connections.len() < limits.max_connections => {
                match accepted {
                    Ok((stream, _peer)) => {
                        connections.spawn(serve_connection(stream, Arc::clone(&snapshots)));
                    }
                    Err(e) => match accept_error(&e) {
                        AcceptError::Passing => debug!(error = %e, "metrics: accept"),
                        AcceptError::Exhausted => {
                            warn!(event = "metrics_error", error = %e, "metrics: cannot accept connections; retrying in 1s");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                        AcceptError::Fatal => return Err(e),
                    },
                }
            }
            () = status.closed() => return Ok(()),
        }
    }
}

enum AcceptError {
    /// One connection's trouble (it was reset before it was accepted…): go on.
    Passing,
    /// Out of fds or memory: wait a little, as retrying at once would spin.
    Exhausted,
    /// The listener itself is broken.
    Fatal,
}

fn accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EINTR
            | libc::EAGAIN
            | libc::EPROTO
            | libc::EPERM
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN,
        ) => AcceptError::Passing,
        _ => AcceptError::Fatal,
    }
}

async fn serve_connection(stream: TcpStream, snapshots: Arc<Snapshots>) {
    let limits = snapshots.limits;
    let service = service_fn(move |request| {
        let snapshots = Arc::clone(&snapshots);
        async move { Ok::<_, Infallible>(respond(&request, &snapshots).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BUFFER)
        .serve_connection(TokioIo::new(stream), service);
    match timeout(limits.connection_timeout, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "metrics: connection"),
        Err(_) => debug!("metrics: connection timed out"),
    }
}

async fn respond(request: &Request<Incoming>, snapshots: &Snapshots) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics or /healthz\n",
        );
    }
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let status = match snapshots.get().await {
        Ok(status) => status,
        Err(why) => return text(StatusCode::SERVICE_UNAVAILABLE, why.message()),
    };
    if path == "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from(render(&status))));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
        );
        response
    } else {
        match unhealthy_reasons(&status) {
            None => text(StatusCode::OK, "ok\n"),
            Some(reasons) => text(StatusCode::SERVICE_UNAVAILABLE, reasons),
        }
    }
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Snapshots from the supervisor, shared by the requests that arrive close together.
struct Snapshots {
    source: StatusSource,
    limits: Limits,
    /// The last snapshot and when it was taken. The lock is held while a new one is awaited,
    /// so that concurrent requests wait for that one instead of asking for their own.
    last: Mutex<Option<(Instant, Arc<ClusterStatus>)>>,
}

enum Unavailable {
    /// The supervisor did not answer in time.
    Timeout,
    /// The supervisor is gone, or dropped the request (it is exiting).
    Closed,
}

impl Unavailable {
    fn message(&self) -> &'static str {
        match self {
            Unavailable::Timeout => "status unavailable: the supervisor did not answer in time\n",
            Unavailable::Closed => "status unavailable: ustad is exiting\n",
        }
    }
}

impl Snapshots {
    async fn get(&self) -> Result<Arc<ClusterStatus>, Unavailable> {
        let fetch = async {
            let mut last = self.last.lock().await;
            if let Some((taken, status)) = last.as_ref() {
                if taken.elapsed() < self.limits.snapshot_max_age {
                    return Ok(Arc::clone(status));
                }
            }
            let (reply, answer) = oneshot::channel();
            self.source
                .send(reply)
                .await
                .map_err(|_| Unavailable::Closed)?;
            let status = Arc::new(answer.await.map_err(|_| Unavailable::Closed)?);
            *last = Some((Instant::now(), Arc::clone(&status)));
            Ok(status)
        };
        timeout(self.limits.snapshot_timeout, fetch)
            .await
            .unwrap_or(Err(Unavailable::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::status::{PoolStatus, RolloutStatus, WorkerStatus};

    fn worker(id: u64, slot: usize, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            uptime_secs: 3.5,
            cpu_percent: Some(1.5),
            cpu_seconds: Some(0.25 * id as f64),
            rss_bytes: Some(1_048_576 * id),
            ..WorkerStatus::fixture(id, slot, state)
        }
    }

    /// `web` (2 slots, both ready, one crash, an old worker stopping in a rollout) and
    /// `jobs` (2 slots: one starting, one backing off after 3 failed starts).
    fn cluster() -> ClusterStatus {
        let mut stopping = worker(1, 0, WorkerState::Stopping);
        stopping.stop_reason = Some("rollout".to_owned());
        let mut starting = worker(5, 0, WorkerState::Starting);
        starting.cpu_seconds = None;
        starting.rss_bytes = None;
        ClusterStatus {
            name: "shop".to_owned(),
            pid: 42,
            uptime_secs: 12.5,
            config_file: None,
            shutting_down: false,
            pools: vec![
                PoolStatus {
                    name: "web".to_owned(),
                    size: 2,
                    ready: 2,
                    generation: 2,
                    rollout: Some(RolloutStatus {
                        generation: 2,
                        replaced: 1,
                        size: 2,
                        elapsed_secs: 1.0,
                    }),
                    restarts: BTreeMap::from([("crash".to_owned(), 1), ("rollout".to_owned(), 3)]),
                    workers: vec![
                        stopping,
                        worker(3, 0, WorkerState::Ready),
                        worker(4, 1, WorkerState::Ready),
                    ],
                    waiting: Vec::new(),
                    waiting_for: Vec::new(),
                    done: false,
                    before_start: None,
                },
                PoolStatus {
                    name: "jobs".to_owned(),
                    size: 2,
                    ready: 0,
                    generation: 1,
                    rollout: None,
                    restarts: BTreeMap::new(),
                    workers: vec![starting],
                    waiting: vec![crate::status::WaitingSlot {
                        slot: 1,
                        failures: 3,
                        next_attempt_secs: Some(4.5),
                        stopped: false,
                        last_exit: None,
                    }],
                    waiting_for: Vec::new(),
                    done: false,
                    before_start: None,
                },
            ],
            version: String::new(),
            upgrade: None,
        }
    }

    fn parse(text: &str) -> MetricsExposition<OpenMetricsType, OpenMetricsValue> {
        openmetrics_parser::openmetrics::parse_openmetrics(text)
            .unwrap_or_else(|e| panic!("not valid OpenMetrics ({e:?}):\n{text}"))
    }

    /// The value of the sample of `family` with these labels, if there is one.
    fn value(
        exposition: &MetricsExposition<OpenMetricsType, OpenMetricsValue>,
        family: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        let family = exposition
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family}"));
        family
            .iter_samples()
            .find(|sample| {
                let set = sample.get_labelset().expect("a sample of a family");
                labels
                    .iter()
                    .all(|(name, value)| set.get_label_value(name) == Some(value))
            })
            .map(|sample| match &sample.value {
                OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Info => 1.0,
                other => panic!("unexpected value {other:?}"),
            })
    }

    fn samples(
        exposition: &MetricsExposition<OpenMetricsType, OpenMetricsValue>,
        family: &str,
    ) -> usize {
        exposition.families[family].iter_samples().count()
    }

    #[test]
    fn render_is_valid_openmetrics_with_every_family() {
        let text = render(&cluster());
        assert!(text.ends_with("# EOF\n"), "{text}");
        let exposition = parse(&text);
        let types = [
            ("ustad_instance", OpenMetricsType::Info),
            ("ustad_uptime_seconds", OpenMetricsType::Gauge),
            ("ustad_pool_size", OpenMetricsType::Gauge),
            ("ustad_pool_ready", OpenMetricsType::Gauge),
            ("ustad_pool_generation", OpenMetricsType::Gauge),
            ("ustad_rollout_in_progress", OpenMetricsType::Gauge),
            ("ustad_workers", OpenMetricsType::Gauge),
            ("ustad_restarts", OpenMetricsType::Counter),
            ("ustad_worker_resident_memory_bytes", OpenMetricsType::Gauge),
            ("ustad_worker_cpu_seconds", OpenMetricsType::Counter),
            ("ustad_slot_failed_starts", OpenMetricsType::Gauge),
            ("ustad_slot_next_attempt_seconds", OpenMetricsType::Gauge),
        ];
        for (name, kind) in types {
            let family = exposition
                .families
                .get(name)
                .unwrap_or_else(|| panic!("no family {name} in:\n{text}"));
            assert_eq!(family.family_type, kind, "{name}");
        }
        assert_eq!(exposition.families.len(), types.len(), "{text}");
        assert!(text.contains("\nustad_instance_info{name=\"shop\",version=\""));
        assert!(text.contains("\nustad_restarts_total{pool=\"web\",reason=\"crash\"} 1\n"));
        assert!(text.contains("# UNIT ustad_worker_resident_memory_bytes bytes\n"));
    }

    #[test]
    fn render_values_match_the_snapshot() {
        let m = parse(&render(&cluster()));
        assert_eq!(value(&m, "ustad_uptime_seconds", &[]), Some(12.5));
        assert_eq!(value(&m, "ustad_instance", &[("name", "shop")]), Some(1.0));
        for (pool, size, ready, generation, rolling) in
            [("web", 2.0, 2.0, 2.0, 1.0), ("jobs", 2.0, 0.0, 1.0, 0.0)]
        {
            let pool = [("pool", pool)];
            assert_eq!(value(&m, "ustad_pool_size", &pool), Some(size));
            assert_eq!(value(&m, "ustad_pool_ready", &pool), Some(ready));
            assert_eq!(value(&m, "ustad_pool_generation", &pool), Some(generation));
            assert_eq!(value(&m, "ustad_rollout_in_progress", &pool), Some(rolling));
        }
        // Every state of every pool, zeros included.
        assert_eq!(samples(&m, "ustad_workers"), 6);
        for (pool, state, count) in [
            ("web", "starting", 0.0),
            ("web", "ready", 2.0),
            ("web", "stopping", 1.0),
            ("jobs", "starting", 1.0),
            ("jobs", "ready", 0.0),
            ("jobs", "stopping", 0.0),
        ] {
            assert_eq!(
                value(&m, "ustad_workers", &[("pool", pool), ("state", state)]),
                Some(count),
                "{pool} {state}"
            );
        }
        assert_eq!(samples(&m, "ustad_restarts"), 2);
        let restarts = |reason| value(&m, "ustad_restarts", &[("pool", "web"), ("reason", reason)]);
        assert_eq!(restarts("crash"), Some(1.0));
        assert_eq!(restarts("rollout"), Some(3.0));
        // Only workers whose usage is known: not the starting one of `jobs`.
        assert_eq!(samples(&m, "ustad_worker_resident_memory_bytes"), 3);
        assert_eq!(samples(&m, "ustad_worker_cpu_seconds"), 3);
        let worker = [("pool", "web"), ("slot", "1"), ("id", "4")];
        assert_eq!(
            value(&m, "ustad_worker_resident_memory_bytes", &worker),
            Some(4.0 * 1_048_576.0)
        );
        assert_eq!(value(&m, "ustad_worker_cpu_seconds", &worker), Some(1.0));
        // The stopping worker and its replacement share slot 0.
        let old = [("pool", "web"), ("slot", "0"), ("id", "1")];
        assert_eq!(value(&m, "ustad_worker_cpu_seconds", &old), Some(0.25));
        // The backing-off slot of `jobs`, and only it.
        let slot = [("pool", "jobs"), ("slot", "1")];
        assert_eq!(samples(&m, "ustad_slot_failed_starts"), 1);
        assert_eq!(value(&m, "ustad_slot_failed_starts", &slot), Some(3.0));
        assert_eq!(
            value(&m, "ustad_slot_next_attempt_seconds", &slot),
            Some(4.5)
        );
    }

    #[test]
    fn render_escapes_label_values() {
        let mut status = cluster();
        status.name = "a \"quoted\"\\ name\nwith a newline".to_owned();
        status.pools[0].name = "we\"b".to_owned();
        let m = parse(&render(&status));
        assert_eq!(
            value(&m, "ustad_instance", &[("name", &status.name)]),
            Some(1.0)
        );
        assert_eq!(
            value(&m, "ustad_pool_size", &[("pool", "we\"b")]),
            Some(2.0)
        );
    }

    #[test]
    fn render_without_pools_is_still_valid() {
        let mut status = cluster();
        status.pools.clear();
        let m = parse(&render(&status));
        // A family with no series is left out altogether.
        assert!(!m.families.contains_key("ustad_workers"));
        assert_eq!(value(&m, "ustad_uptime_seconds", &[]), Some(12.5));
    }

    #[test]
    fn unhealthy_reasons_name_the_pools_lacking_ready_workers() {
        let mut status = cluster();
        assert_eq!(
            unhealthy_reasons(&status).as_deref(),
            Some("jobs: 0/2 ready\n")
        );
        status.pools[0].ready = 1;
        status.shutting_down = true;
        assert_eq!(
            unhealthy_reasons(&status).as_deref(),
            Some("shutting down\nweb: 1/2 ready\njobs: 0/2 ready\n")
        );
        status.shutting_down = false;
        status.pools[0].ready = 2;
        status.pools[1].ready = 2;
        assert_eq!(unhealthy_reasons(&status), None);
    }

    // The server, over real sockets on 127.0.0.1, with a fake supervisor.

    /// Answers every snapshot request with `status` (after `delay`), counting them.
    fn fake_source(
        status: ClusterStatus,
        delay: Option<Duration>,
    ) -> (StatusSource, Arc<AtomicUsize>) {
        let (source, mut requests) = mpsc::channel::<oneshot::Sender<ClusterStatus>>(16);
        let asked = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&asked);
        tokio::spawn(async move {
            while let Some(reply) = requests.recv().await {
                count.fetch_add(1, Ordering::SeqCst);
                match delay {
                    // Holds the request unanswered, as a stuck supervisor would.
                    Some(delay) => {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            drop(reply);
                        });
                    }
                    None => {
                        let _ = reply.send(status.clone());
                    }
                }
            }
        });
        (source, asked)
    }

    struct Server {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    async fn start(source: StatusSource, limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve_with(listener, source, limits));
        Server { addr, task }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    struct Reply {
        code: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name).then(|| value.trim())
            })
        }
    }

    /// One raw HTTP/1.1 request; reads the reply until the server closes the connection.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        };
        let raw = timeout(Duration::from_secs(10), exchange)
            .await
            .expect("a reply within 10s");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete reply");
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        Reply {
            code,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    /// Limits for tests: short timeouts, and no reuse of snapshots unless a test asks for it.
    fn limits() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(5),
            snapshot_timeout: Duration::from_millis(300),
            snapshot_max_age: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics() {
        let (source, _) = fake_source(cluster(), None);
        let server = start(source, limits()).await;
        let reply = request(server.addr, "GET", "/metrics").await;
        assert_eq!(reply.code, 200, "{}", reply.body);
        assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE_OPENMETRICS));
        let m = parse(&reply.body);
        assert_eq!(
            value(&m, "ustad_workers", &[("pool", "web"), ("state", "ready")]),
            Some(2.0)
        );
        // A query string does not change the route.
        assert_eq!(request(server.addr, "GET", "/metrics?x=1").await.code, 200);
    }

    #[tokio::test]
    async fn healthz_is_ok_only_when_every_pool_is_ready() {
        let mut healthy = cluster();
        healthy.pools[1].ready = 2;
        let (source, _) = fake_source(healthy, None);
        let server = start(source, limits()).await;
        let reply = request(server.addr, "GET", "/healthz").await;
        assert_eq!((reply.code, reply.body.as_str()), (200, "ok\n"));
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );

        let (source, _) = fake_source(cluster(), None);
        let server = start(source, limits()).await;
        let reply = request(server.addr, "GET", "/healthz").await;
        assert_eq!(
            (reply.code, reply.body.as_str()),
            (503, "jobs: 0/2 ready\n")
        );
    }

    #[tokio::test]
    async fn other_paths_are_404_and_other_methods_405() {
        let (source, asked) = fake_source(cluster(), None);
        let server = start(source, limits()).await;
        assert_eq!(request(server.addr, "GET", "/").await.code, 404);
        assert_eq!(request(server.addr, "GET", "/metrics/x").await.code, 404);
        for method in ["POST", "PUT", "DELETE", "HEAD"] {
            let reply = request(server.addr, method, "/metrics").await;
            assert_eq!(reply.code, 405, "{method}");
            assert_eq!(reply.header("allow"), Some("GET"));
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            0,
            "no snapshot for a request that is refused"
        );
    }

    #[tokio::test]
    async fn a_supervisor_that_does_not_answer_means_503() {
        let (source, _) = fake_source(cluster(), Some(Duration::from_secs(3)));
        let server = start(source, limits()).await;
        let started = Instant::now();
        for path in ["/metrics", "/healthz"] {
            let reply = request(server.addr, "GET", path).await;
            assert_eq!(reply.code, 503, "{path}");
            assert!(reply.body.contains("did not answer"), "{}", reply.body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the snapshot timeout"
        );
    }

    #[tokio::test]
    async fn a_supervisor_that_drops_requests_means_503() {
        let (source, mut requests) = mpsc::channel::<oneshot::Sender<ClusterStatus>>(16);
        tokio::spawn(async move { while requests.recv().await.is_some() {} });
        let server = start(source, limits()).await;
        let reply = request(server.addr, "GET", "/healthz").await;
        assert_eq!(reply.code, 503);
        assert!(reply.body.contains("exiting"), "{}", reply.body);
    }

    #[tokio::test]
    async fn serve_returns_when_the_supervisor_is_gone() {
        let (source, requests) = mpsc::channel::<oneshot::Sender<ClusterStatus>>(16);
        let mut server = start(source, limits()).await;
        drop(requests);
        let result = timeout(Duration::from_secs(5), &mut server.task)
            .await
            .expect("serve returns")
            .expect("serve does not panic");
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn snapshots_are_shared_within_their_max_age() {
        let (source, asked) = fake_source(cluster(), None);
        let server = start(
            source,
            Limits {
                snapshot_max_age: Duration::from_secs(60),
                ..limits()
            },
        )
        .await;
        let replies = futures_join(server.addr, 8).await;
        assert!(replies.iter().all(|r| r.code == 200));
        assert_eq!(request(server.addr, "GET", "/healthz").await.code, 503);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "one snapshot for every request"
        );
    }

    /// `n` concurrent `GET /metrics`.
    async fn futures_join(addr: SocketAddr, n: usize) -> Vec<Reply> {
        let mut set = JoinSet::new();
        for _ in 0..n {
            set.spawn(request(addr, "GET", "/metrics"));
        }
        set.join_all().await
    }

    #[tokio::test]
    async fn a_silent_client_neither_blocks_others_nor_stays_long() {
        let (source, _) = fake_source(cluster(), None);
        let server = start(source, limits()).await;
        // Connects, sends half a request line, then nothing.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        silent.write_all(b"GET /met").await.unwrap();
        assert_eq!(request(server.addr, "GET", "/metrics").await.code, 200);
        // Closed after the header read timeout (300 ms here).
        let mut rest = Vec::new();
        let closed = timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the silent connection is closed");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_one() {
        let (source, _) = fake_source(cluster(), None);
        let server = start(
            source,
            Limits {
                max_connections: 2,
                header_read_timeout: Duration::from_secs(1),
                ..limits()
            },
        )
        .await;
        let _idle: Vec<TcpStream> = vec![
            TcpStream::connect(server.addr).await.unwrap(),
            TcpStream::connect(server.addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let reply = request(server.addr, "GET", "/metrics").await;
        assert_eq!(reply.code, 200);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(500),
            "served only once an idle connection timed out, after {waited:?}"
        );
    }

    #[test]
    fn accept_errors_of_one_connection_pass_and_a_broken_listener_is_fatal() {
        let kind = |errno| accept_error(&io::Error::from_raw_os_error(errno));
        assert!(matches!(kind(libc::ECONNABORTED), AcceptError::Passing));
        assert!(matches!(kind(libc::EMFILE), AcceptError::Exhausted));
        assert!(matches!(kind(libc::EBADF), AcceptError::Fatal));
        assert!(matches!(kind(libc::EINVAL), AcceptError::Fatal));
    }
}
