//! Primary ↔ worker messages between two real processes, measured the way the targets of
//! docs/benchmarks.md ("IPC") are stated: one-way messages/s each way, round-trip latency
//! (p50, p99) with 1 in flight, round trips/s with 100 and 1,000 in flight, what `dispatch`
//! adds to a round trip, and memory under a flood the program does not read.
//!
//! ```sh
//! cargo bench -p ustad --bench ipc_report               # 5 runs, medians
//! IPC_RUNS=1 IPC_OUT=ustad.jsonl cargo bench -p ustad --bench ipc_report
//! ```
//!
//! A plain program (`harness = false`), not criterion: it reports percentiles. `bench/ipc.sh`
//! runs it side by side with Node's `cluster` (`bench/node/ipc-echo.js`), which prints the same
//! keys. Knobs (environment): `IPC_RUNS` (5), `IPC_MESSAGES` (one-way, 500,000),
//! `IPC_ROUND_TRIPS` (1 in flight, 20,000), `IPC_PIPELINED` (100 and 1,000 in flight,
//! 300,000), `IPC_FLOOD` (1,000,000), `IPC_STALL_MS` (1,000), `IPC_OUT` (append one JSON line
//! per run to this file), `IPC_BENCH_RUNTIME` (`multi` or `current`, both sides), `IPC_ONLY`
//! (some of `floor,w2p,p2w,rtt1,rtt100,rtt1000,dispatch100,flood`: to profile one),
//! `IPC_WARMUP` (1; 0 to skip the warm-up, e.g. to count syscalls).

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{Bench, Via, percentile};
use serde_json::json;
use ustad::Role;

/// Set in the child process of the floor measurement, to `block` or `tokio`.
const FLOOR_CHILD: &str = "IPC_FLOOR_CHILD";

fn main() {
    if let Ok(mode) = std::env::var(FLOOR_CHILD) {
        floor::echo(&mode);
        return;
    }
    // First: in a worker (this binary, re-executed with the same arguments), nothing else runs.
    let primary = match ustad::role() {
        Role::Worker(worker) => common::worker(worker),
        Role::Primary(primary) => primary,
    };
    let knob = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(default)
    };
    let runs = knob("IPC_RUNS", 5);
    let messages = knob("IPC_MESSAGES", 500_000);
    let round_trips = knob("IPC_ROUND_TRIPS", 20_000);
    let pipelined = knob("IPC_PIPELINED", 300_000);
    let flood = knob("IPC_FLOOD", 1_000_000);
    let stall = Duration::from_millis(knob("IPC_STALL_MS", 1000));
    let out = std::env::var("IPC_OUT").ok();
    let warm_up = knob("IPC_WARMUP", 1) != 0;
    let only = std::env::var("IPC_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);

    let runtime = common::runtime();
    runtime.block_on(async move {
        let mut bench = Bench::start(primary).await;
        // Warm up both sides: allocations, lazy channels, the CPU's frequency.
        if warm_up {
            bench.round_trips(Via::Request, 20_000, 1, false).await;
            bench.round_trips(Via::Request, 50_000, 100, false).await;
            bench.worker_to_primary(50_000).await;
        }

        let mut all = Vec::new();
        for run in 1..=runs {
            let mut r = serde_json::Map::new();
            let mut put = |key: &str, value: f64| {
                r.insert(key.to_owned(), json!(value));
            };
            // What the machine allows: the same frame bounced between two processes over a
            // socketpair with nothing else, blocking and on the runtime the bench uses.
            for mode in ["block", "tokio"].into_iter().filter(|_| wanted("floor")) {
                // On a thread of its own: the tokio floor starts a runtime of its own.
                let mut s = std::thread::spawn(move || floor::round_trips(mode, round_trips))
                    .join()
                    .expect("the floor measurement");
                s.sort();
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                put(&format!("floor_{mode}_p50_us"), us(percentile(&s, 50.0)));
                put(&format!("floor_{mode}_p99_us"), us(percentile(&s, 99.0)));
            }
            if wanted("w2p") {
                let elapsed = bench.worker_to_primary(messages).await;
                put("w2p_per_s", messages as f64 / elapsed.as_secs_f64());
            }
            if wanted("p2w") {
                let elapsed = bench.primary_to_worker(messages).await;
                put("p2w_per_s", messages as f64 / elapsed.as_secs_f64());
            }

            // Request and dispatch with 1 in flight, interleaved in blocks so that both see
            // the same machine (others share it).
            let (mut request, mut dispatch) = (Vec::new(), Vec::new());
            let (mut request_time, mut dispatch_time) = (Duration::ZERO, Duration::ZERO);
            let blocks = if wanted("rtt1") { 10 } else { 0 };
            for _ in 0..blocks {
                let (t, s) = bench
                    .round_trips(Via::Request, round_trips / blocks, 1, true)
                    .await;
                request_time += t;
                request.extend(s);
                let (t, s) = bench
                    .round_trips(Via::Dispatch, round_trips / blocks, 1, true)
                    .await;
                dispatch_time += t;
                dispatch.extend(s);
            }
            request.sort();
            dispatch.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            if blocks > 0 {
                put("rtt1_p50_us", us(percentile(&request, 50.0)));
                put("rtt1_p99_us", us(percentile(&request, 99.0)));
                put(
                    "rtt1_per_s",
                    request.len() as f64 / request_time.as_secs_f64(),
                );
                put("dispatch1_p50_us", us(percentile(&dispatch, 50.0)));
                put("dispatch1_p99_us", us(percentile(&dispatch, 99.0)));
                put(
                    "dispatch_overhead_us",
                    us(percentile(&dispatch, 50.0)) - us(percentile(&request, 50.0)),
                );
            }

            for in_flight in [100, 1000]
                .into_iter()
                .filter(|n| wanted(&format!("rtt{n}")))
            {
                let (t, mut s) = bench
                    .round_trips(Via::Request, pipelined, in_flight, true)
                    .await;
                s.sort();
                put(
                    &format!("rtt{in_flight}_per_s"),
                    pipelined as f64 / t.as_secs_f64(),
                );
                put(&format!("rtt{in_flight}_p50_us"), us(percentile(&s, 50.0)));
                put(&format!("rtt{in_flight}_p99_us"), us(percentile(&s, 99.0)));
            }
            if wanted("dispatch100") {
                let (t, _) = bench
                    .round_trips(Via::Dispatch, pipelined, 100, false)
                    .await;
                put("dispatch100_per_s", pipelined as f64 / t.as_secs_f64());
            }

            if flood > 0 && wanted("flood") {
                let (memory, t) = bench.flood_with_stalled_reader(flood, stall).await;
                put("flood_primary_mb", memory.primary_kb as f64 / 1024.0);
                put("flood_worker_mb", memory.worker_kb as f64 / 1024.0);
                put("flood_s", t.as_secs_f64());
            }

            r.insert("impl".to_owned(), json!("ustad"));
            r.insert("run".to_owned(), json!(run));
            let line = serde_json::Value::Object(r);
            eprintln!("ustad run {run}/{runs}: {line}");
            if let Some(path) = &out {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("IPC_OUT opens");
                writeln!(file, "{line}").expect("IPC_OUT written");
            }
            all.push(line);
        }
        bench.stop().await;
        print_medians(&all);
    });
}

fn print_medians(runs: &[serde_json::Value]) {
    let Some(first) = runs.first().and_then(|r| r.as_object()) else {
        return;
    };
    println!("| measure (median of {} runs) | ustad |", runs.len());
    println!("|---|---:|");
    for key in first.keys().filter(|k| *k != "impl" && *k != "run") {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        println!("| {key} | {median:.1} |");
    }
}

/// The floor: a request frame of the size the bench sends, bounced between this process and a
/// child over a socketpair by a loop that does nothing else. The child gets its end as stdin.
mod floor {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsFd as _;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const FRAME: &[u8] =
        b"\x2f\x00\x00\x00{\"t\":\"req\",\"id\":1,\"body\":{\"type\":\"echo\",\"n\":1}}";

    /// `count` round trips with a child that runs [`echo`]: their latencies.
    pub(super) fn round_trips(mode: &str, count: u64) -> Vec<Duration> {
        assert_eq!(FRAME.len() - 4, FRAME[0] as usize);
        let (mine, theirs) = UnixStream::pair().expect("a socketpair");
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .env(super::FLOOR_CHILD, mode)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .spawn()
            .expect("the floor child starts");
        let mut samples = Vec::with_capacity(count as usize);
        if mode == "block" {
            let mut stream = mine;
            let mut buffer = [0; FRAME.len()];
            for _ in 0..count {
                let started = Instant::now();
                stream.write_all(FRAME).expect("write");
                stream.read_exact(&mut buffer).expect("read");
                samples.push(started.elapsed());
            }
        } else {
            mine.set_nonblocking(true).expect("nonblocking");
            super::common::runtime().block_on(async {
                let mut stream = tokio::net::UnixStream::from_std(mine).expect("tokio stream");
                let mut buffer = [0; FRAME.len()];
                for _ in 0..count {
                    let started = Instant::now();
                    stream.write_all(FRAME).await.expect("write");
                    stream.read_exact(&mut buffer).await.expect("read");
                    samples.push(started.elapsed());
                }
            });
        }
        // Closing our end ends the child's loop.
        let _ = child.wait();
        samples
    }

    /// The child: echoes every frame until the socket closes.
    pub(super) fn echo(mode: &str) {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .expect("stdin is the socket");
        let stream = UnixStream::from(fd);
        let mut buffer = [0; FRAME.len()];
        if mode == "block" {
            let mut stream = stream;
            while stream.read_exact(&mut buffer).is_ok() {
                stream.write_all(&buffer).expect("write");
            }
        } else {
            stream.set_nonblocking(true).expect("nonblocking");
            super::common::runtime().block_on(async {
                let mut stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
                while stream.read_exact(&mut buffer).await.is_ok() {
                    stream.write_all(&buffer).await.expect("write");
                }
            });
        }
    }
}
