//! CPU and memory of the workers' process groups, sampled from `/proc` only when someone
//! asks (`ustad status`, `/metrics`) or a pool has a `max_memory`: an idle primary reads
//! nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::plan::WorkerId;
use crate::procfs;

/// How often memory is checked when a pool has `max_memory`.
pub(super) const MEMORY_INTERVAL: Duration = Duration::from_secs(1);
/// CPU % is measured over at least this long; a sooner sample reuses the last figure.
const MIN_CPU_WINDOW: Duration = Duration::from_millis(250);

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
