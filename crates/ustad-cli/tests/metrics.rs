//! `--metrics ADDR`: `/metrics` is valid OpenMetrics whose values follow the cluster (workers,
//! restarts, memory), `/healthz` turns 503 while a pool lacks a ready worker and 200 again
//! once it is replaced, and an address that cannot be bound stops ustad before any worker.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use ustad_testkit::Signal;

use crate::util::{Run, TIMEOUT, pid, test_worker};

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// A reply: status code, header block, body.
struct Reply {
    code: u16,
    head: String,
    body: String,
}

/// `GET path` on a fresh connection, with a 10 s bound on the whole exchange.
fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    // The server closes the connection after one reply.
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("reading the reply to GET {path}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("incomplete reply to GET {path}: {raw:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    Reply {
        code,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Parses `/metrics` with a strict OpenMetrics parser.
fn scrape(addr: SocketAddr) -> Exposition {
    let reply = get(addr, "/metrics");
    assert_eq!(reply.code, 200, "GET /metrics: {}", reply.body);
    assert!(
        reply
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        reply.head
    );
    openmetrics_parser::openmetrics::parse_openmetrics(&reply.body)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics ({e:?}):\n{}", reply.body))
}

/// The values of the samples of `family` whose labels include `labels`.
fn values(m: &Exposition, family: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let Some(family) = m.families.get(family) else {
        return Vec::new();
    };
    family
        .iter_samples()
        .filter(|sample| {
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
        .collect()
}

/// The one value of `family` with `labels`, if there is exactly one.
fn value(m: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    match values(m, family, labels)[..] {
        [value] => Some(value),
        _ => None,
    }
}

/// Scrapes until `check` passes (snapshots are reused for up to a second), or panics with
/// the last scrape after [`TIMEOUT`].
#[track_caller]
fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let m = scrape(addr);
        if check(&m) {
            return m;
        }
        if Instant::now() >= deadline {
            panic!("/metrics never showed {what}; last scrape:\n{m}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Gets `/healthz` until its status is `code`, and returns the reply.
#[track_caller]
fn healthz_until(addr: SocketAddr, code: u16) -> Reply {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = get(addr, "/healthz");
        if reply.code == code {
            return reply;
        }
        if Instant::now() >= deadline {
            panic!(
                "/healthz never answered {code}; last: {} {:?}",
                reply.code, reply.body
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(pid: u32, signal: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a valid pid");
    rustix::process::kill_process(pid, signal).expect("sending a signal to a worker");
}

/// `ustad run` of a 2-worker pool `web` with metrics on a free port; returns the run and the
/// metrics address.
/// Each worker says it is ready `ready_after` after it starts.
fn start(ready_after: &str) -> (Run, SocketAddr) {
    let worker = test_worker();
    let run = Run::start(&[
        "run",
        "--name",
        "shop",
        "--pool",
        "web",
        "-w",
        "2",
        "--ready",
        "notify",
        "--min-uptime",
        "100ms",
        "--metrics",
        "127.0.0.1:0",
        "--",
        &worker,
        "--ready-after",
        ready_after,
    ]);
    let event = run.cluster.wait_event(|e| e.is("metrics"), TIMEOUT);
    let addr = event
        .str("address")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {event}"));
    (run, addr)
}

#[test]
fn metrics_follow_the_cluster_workers_restarts_and_memory() {
    let (mut run, addr) = start("0");
    let ready = run.wait_ready(2);
    let web = [("pool", "web")];

    let m = scrape_until(addr, "2 ready workers", |m| {
        value(m, "ustad_workers", &[("pool", "web"), ("state", "ready")]) == Some(2.0)
    });
    assert_eq!(
        value(
            &m,
            "ustad_workers",
            &[("pool", "web"), ("state", "starting")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "ustad_workers",
            &[("pool", "web"), ("state", "stopping")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&m, "ustad_pool_size", &web), Some(2.0));
    assert_eq!(value(&m, "ustad_pool_ready", &web), Some(2.0));
    assert_eq!(value(&m, "ustad_rollout_in_progress", &web), Some(0.0));
    assert_eq!(value(&m, "ustad_instance", &[("name", "shop")]), Some(1.0));
    assert!(value(&m, "ustad_uptime_seconds", &[]).is_some_and(|s| s > 0.0));

    // Each worker's memory, by its id: known once the supervisor has sampled /proc.
    let m = scrape_until(addr, "the memory of both workers", |m| {
        ready.iter().all(|worker| {
            let id = worker.u64("id").unwrap().to_string();
            let slot = worker.u64("slot").unwrap().to_string();
            let labels = [
                ("pool", "web"),
                ("slot", slot.as_str()),
                ("id", id.as_str()),
            ];
            value(m, "ustad_worker_resident_memory_bytes", &labels).is_some_and(|b| b > 0.0)
        })
    });
    assert_eq!(values(&m, "ustad_worker_cpu_seconds", &web).len(), 2);

    // A worker killed with SIGKILL is a crash, counted once it is replaced.
    let victim = &ready[1];
    kill(pid(victim), Signal::KILL);
    run.cluster.wait_event(
        |e| e.is("exited") && e.u64("id") == victim.u64("id"),
        TIMEOUT,
    );
    run.wait_ready(3);
    let m = scrape_until(addr, "one crash and 2 ready workers", |m| {
        value(m, "ustad_restarts", &[("pool", "web"), ("reason", "crash")]) == Some(1.0)
            && value(m, "ustad_workers", &[("pool", "web"), ("state", "ready")]) == Some(2.0)
    });
    let victim_id = victim.u64("id").unwrap().to_string();
    assert!(
        values(
            &m,
            "ustad_worker_resident_memory_bytes",
            &[("id", &victim_id)]
        )
        .is_empty(),
        "no series for a worker that is gone"
    );
    run.stop();
}

#[test]
fn healthz_is_503_while_a_pool_lacks_a_ready_worker() {
    // A ready worker that dies is replaced at once; its replacement takes 1.5 s to be ready:
    // long enough to see the hole, short enough to see it filled.
    let (mut run, addr) = start("1500");
    let ready = run.wait_ready(2);
    let reply = healthz_until(addr, 200);
    assert_eq!(reply.body, "ok\n");

    let victim = &ready[0];
    kill(pid(victim), Signal::KILL);
    let reply = healthz_until(addr, 503);
    assert_eq!(reply.body, "web: 1/2 ready\n");
    let readies = run
        .cluster
        .events()
        .iter()
        .filter(|e| e.is("ready"))
        .count();
    assert_eq!(readies, 2, "503 is seen before the replacement is ready");

    run.wait_ready(3);
    let reply = healthz_until(addr, 200);
    assert_eq!(reply.body, "ok\n");
    assert_eq!(get(addr, "/nothing").code, 404);
    run.stop();
}

#[test]
fn a_metrics_address_in_use_stops_ustad_before_any_worker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let address = taken.local_addr().expect("its address").to_string();
    let worker = test_worker();
    let mut run = Run::start(&["run", "-w", "2", "--metrics", &address, "--", &worker]);
    let status = run.cluster.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", run.cluster.stderr_tail(20));
    let stderr = run.cluster.stderr_lines().join("\n");
    assert!(stderr.contains(&address), "the address is named:\n{stderr}");
    assert!(
        !run.cluster.events().iter().any(|e| e.is("spawned")),
        "no worker started:\n{stderr}"
    );
}
