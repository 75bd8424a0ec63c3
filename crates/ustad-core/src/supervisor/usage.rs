//! CPU and memory of the workers' process groups, sampled from `/proc` only when someone
//! asks (`ustad status`, `/metrics`) or a pool has a `max_memory`: an idle primary reads
//! nothing. With them, the cluster's status and the enforcement of `max_memory`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::plan::{Event, WorkerId};
use crate::procfs;
use crate::status::ClusterStatus;

/// How often memory is checked when a pool has `max_memory`.
pub(super) const MEMORY_INTERVAL: Duration = Duration::from_secs(1);
/// CPU % is measured over at least this long; a sooner sample reuses the last figure.
const MIN_CPU_WINDOW: Duration = Duration::from_millis(250);

impl Supervisor {
    /// A snapshot of the cluster, with CPU and memory read from `/proc` now.
    pub(super) fn status(&mut self) -> ClusterStatus {
        let now = Instant::now();
        let workers: Vec<(WorkerId, u32)> = self
            .plan
            .workers()
            .filter_map(|w| Some((w.id, w.pid?)))
            .collect();
        let samples = self.usage.sample(&workers, now);
        let mut pools = self.plan.status(now);
        for worker in pools.iter_mut().flat_map(|p| p.workers.iter_mut()) {
            if let Some(sample) = samples.get(&WorkerId(worker.id)) {
                worker.cpu_seconds = Some(sample.cpu_seconds);
                worker.cpu_percent = sample.cpu_percent;
                worker.rss_bytes = Some(sample.rss_bytes);
            }
        }
        ClusterStatus {
            name: self.name.clone(),
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            config_file: self.config_file.clone(),
            shutting_down: self.plan.is_shutting_down(),
            pools,
            version: crate::VERSION.to_owned(),
            upgrade: self.upgraded.clone(),
        }
    }

    /// Whether a pool has a `max_memory` to enforce.
    pub(super) fn watches_memory(&self) -> bool {
        self.plan
            .workers()
            .any(|w| w.spec().max_memory.is_some() && w.is_ready())
    }

    /// Tells the plan the memory of each ready worker whose pool has a `max_memory` (the plan
    /// decides which is over, for how long).
    pub(super) fn check_memory(&mut self) {
        let workers: Vec<(WorkerId, u32)> = self
            .plan
            .workers()
            .filter(|w| w.spec().max_memory.is_some() && w.is_ready())
            .filter_map(|w| Some((w.id, w.pid?)))
            .collect();
        let samples = self.usage.sample(&workers, Instant::now());
        for (id, sample) in samples {
            self.handle(Event::Memory {
                id,
                rss: sample.rss_bytes,
            });
        }
    }
}

/// One worker's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Sample {
    pub(super) cpu_seconds: f64,
    pub(super) cpu_percent: Option<f64>,
    pub(super) rss_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Previous {
    ticks: u64,
    at: Instant,
    percent: Option<f64>,
}

/// The previous sample of each worker, for CPU %.
#[derive(Debug, Default)]
pub(super) struct Usage {
    previous: HashMap<WorkerId, Previous>,
}

impl Usage {
    /// Samples these workers (id, process group) now.
    pub(super) fn sample(
        &mut self,
        workers: &[(WorkerId, u32)],
        now: Instant,
    ) -> HashMap<WorkerId, Sample> {
        let groups: Vec<u32> = workers.iter().map(|(_, pgid)| *pgid).collect();
        let usage = procfs::group_usage(&groups);
        let per_second = procfs::ticks_per_second().max(1) as f64;
        let mut samples = HashMap::new();
        for (id, pgid) in workers {
            let Some(group) = usage.get(pgid) else {
                continue;
            };
            let percent = match self.previous.get(id) {
                Some(previous) if now.duration_since(previous.at) < MIN_CPU_WINDOW => {
                    samples.insert(
                        *id,
                        Sample {
                            cpu_seconds: group.cpu_ticks as f64 / per_second,
                            cpu_percent: previous.percent,
                            rss_bytes: group.rss_bytes,
                        },
                    );
                    continue;
                }
                Some(previous) => {
                    let window = now.duration_since(previous.at).as_secs_f64();
                    let used = group.cpu_ticks.saturating_sub(previous.ticks) as f64 / per_second;
                    Some(100.0 * used / window)
                }
                None => None,
            };
            self.previous.insert(
                *id,
                Previous {
                    ticks: group.cpu_ticks,
                    at: now,
                    percent,
                },
            );
            samples.insert(
                *id,
                Sample {
                    cpu_seconds: group.cpu_ticks as f64 / per_second,
                    cpu_percent: percent,
                    rss_bytes: group.rss_bytes,
                },
            );
        }
        self.previous
            .retain(|id, _| workers.iter().any(|(worker, _)| worker == id));
        samples
    }
}
