//! Primary ↔ worker messages between two real processes, with criterion: one-way throughput of
//! small `{type, n}` messages each way, echo round trips with 1 and 100 in flight through
//! `Cluster::request` and through `Cluster::dispatch`.
//!
//! ```sh
//! cargo bench -p ustad --bench ipc                 # every bench
//! cargo bench -p ustad --bench ipc -- round_trip   # a subset
//! ```
//!
//! Criterion reports means (and throughput); the percentiles, the comparison with Node and
//! the targets are `ipc_report`'s and `bench/ipc.sh`'s (docs/benchmarks.md, "IPC").
//!
//! The bench binary is also its own worker: the primary re-executes it with the same
//! arguments, so `ustad::role()` comes before criterion reads them.

mod common;

use std::time::Duration;

use common::{Bench, Via};
use criterion::{Criterion, SamplingMode, Throughput};
use ustad::Role;

fn main() {
    let primary = match ustad::role() {
        Role::Worker(worker) => common::worker(worker),
        Role::Primary(primary) => primary,
    };
    let runtime = common::runtime();
    let mut bench = runtime.block_on(Bench::start(primary));
    // Short and few samples: the machine is shared, and each sample is many messages anyway.
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    {
        let mut group = criterion.benchmark_group("ipc/one_way");
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(Throughput::Elements(1));
        group.bench_function("worker_to_primary", |b| {
            b.iter_custom(|messages| runtime.block_on(bench.worker_to_primary(messages)));
        });
        group.bench_function("primary_to_worker", |b| {
            b.iter_custom(|messages| runtime.block_on(bench.primary_to_worker(messages)));
        });
        group.finish();
    }

    {
        let mut group = criterion.benchmark_group("ipc/round_trip");
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(Throughput::Elements(1));
        for (name, via, in_flight) in [
            ("request/1_in_flight", Via::Request, 1),
            ("dispatch/1_in_flight", Via::Dispatch, 1),
            ("request/100_in_flight", Via::Request, 100),
            ("dispatch/100_in_flight", Via::Dispatch, 100),
        ] {
            group.bench_function(name, |b| {
                b.iter_custom(|round_trips| {
                    runtime
                        .block_on(bench.round_trips(via, round_trips, in_flight, false))
                        .0
                });
            });
        }
        group.finish();
    }

    criterion.final_summary();
    runtime.block_on(bench.stop());
}
