//! A snapshot of a running cluster, as `ustad status`, `ustad top` and `/metrics` show it.
//!
//! These are plain serializable data: the control protocol sends them as JSON
//! (`docs/control.md`), so field names are part of the protocol. The plan fills in what it
//! knows ([`crate::plan::Plan::status`]); the supervisor adds what `/proc` says (CPU, memory).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The instance's name (`--name`, or the config file's stem).
    pub name: String,
    /// The primary's pid.
    pub pid: u32,
    /// Seconds since the primary started.
    pub uptime_secs: f64,
    /// The configuration file, when there is one.
    pub config_file: Option<PathBuf>,
    /// A shutdown is under way.
    pub shutting_down: bool,
    /// The pools, in configuration order.
    pub pools: Vec<PoolStatus>,
    /// The version of ustad the primary runs (after an upgrade, the new one).
    #[serde(default)]
    pub version: String,
    /// The primary's last upgrade of itself (`ustad upgrade`), when it had one.
    #[serde(default)]
    pub upgrade: Option<UpgradeStatus>,
}

/// The primary's last upgrade: its program replaced in place, its workers kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeStatus {
    /// Upgrades since the primary started.
    pub count: u32,
    /// The version of ustad it ran before.
    pub from: String,
    /// The program it runs now.
    pub binary: PathBuf,
    /// When (seconds since the Unix epoch).
    pub time: f64,
    /// Milliseconds from the old program's last act (writing its state) to the new one's
    /// first loop: the time nothing answered the control socket.
    pub switch_ms: f64,
    /// Workers the new program took over, with their pids.
    pub workers_kept: usize,
    /// Workers that had exited when the new program looked (replaced as crashes are).
    pub workers_lost: usize,
}

impl ClusterStatus {
    /// Whether every pool has a ready worker in every slot (what `/healthz` reports).
    pub fn healthy(&self) -> bool {
        !self.shutting_down && self.pools.iter().all(|pool| pool.ready >= pool.size)
    }
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Its name.
    pub name: String,
    /// Slots (the configured or scaled size).
    pub size: usize,
    /// Slots whose worker is ready.
    pub ready: usize,
    /// The generation its workers are (re)started with outside a rollout.
    pub generation: u64,
    /// A rolling restart in progress.
    pub rollout: Option<RolloutStatus>,
    /// Workers that ended and were replaced, by reason (`crash`, `rollout`, `ttl`, `memory`,
    /// `watchdog`, `request`, `restart`, `ready_timeout`, `announced`).
    pub restarts: BTreeMap<String, u64>,
    /// Its live workers (starting, ready and stopping), by slot.
    pub workers: Vec<WorkerStatus>,
    /// Empty slots: waiting before their next worker starts (backing off after failed starts,
    /// or after ready workers died faster than the pool may replace them at once), or emptied
    /// by an operator.
    #[serde(default)]
    pub waiting: Vec<WaitingSlot>,
    /// The pools it waits for before it starts (`after`), while it does.
    #[serde(default)]
    pub waiting_for: Vec<String>,
    /// A `oneshot` pool whose every worker exited 0.
    #[serde(default)]
    pub done: bool,
    /// Its `before_start` command, while it runs or since it last failed.
    #[serde(default)]
    pub before_start: Option<HookStatus>,
}

/// A pool's `before_start` command: running, or failed (until it next succeeds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookStatus {
    /// The generation it runs, or last failed, for.
    pub generation: u64,
    /// Seconds it has been running; `None` when it is not running.
    pub running_secs: Option<f64>,
    /// Failures in a row for the pool's first start (0 when only a rollout's failed).
    pub failures: u32,
    /// Seconds until it runs again, when the pool's first start waits for it.
    pub next_attempt_secs: Option<f64>,
    /// What went wrong the last time it failed.
    pub last_error: Option<String>,
}

/// An empty slot: waiting before its next attempt, or emptied by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingSlot {
    /// The slot.
    pub slot: usize,
    /// Failed starts in a row (0 when it waits after a ready worker's death).
    pub failures: u32,
    /// Seconds until the next attempt; `None` for a slot an operator emptied.
    pub next_attempt_secs: Option<f64>,
    /// An operator stopped its worker (`ustad stop ID`): it stays empty until the pool is
    /// restarted or scaled.
    #[serde(default)]
    pub stopped: bool,
    /// How the slot's last worker ended.
    pub last_exit: Option<LastExitStatus>,
}

impl HookStatus {
    /// One line for `status` and `top`: `before_start running for generation 3 (12s)`, or
    /// `before_start failed for generation 3: exited with exit code 1; next attempt in 4s`.
    pub fn describe(&self) -> String {
        let generation = self.generation;
        match (self.running_secs, &self.last_error) {
            (Some(secs), _) => {
                format!("before_start running for generation {generation} ({secs:.0}s)")
            }
            (None, error) => {
                let mut line = format!(
                    "before_start failed for generation {generation}: {}",
                    error.as_deref().unwrap_or("unknown error")
                );
                if let Some(secs) = self.next_attempt_secs {
                    line.push_str(&format!("; next attempt in {secs:.0}s"));
                }
                line
            }
        }
    }
}

/// A rolling restart in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The generation being rolled out.
    pub generation: u64,
    /// Slots already serving that generation.
    pub replaced: usize,
    /// Slots in all.
    pub size: usize,
    /// Seconds since it began.
    pub elapsed_secs: f64,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned, not ready yet.
    Starting,
    /// Serving.
    Ready,
    /// Asked to stop; waiting for it to exit.
    Stopping,
}

impl WorkerState {
    /// As shown in tables and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        }
    }
}

/// One worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its id (`USTAD_WORKER_ID`).
    pub id: u64,
    /// Its slot (`USTAD_WORKER_INDEX`).
    pub slot: usize,
    /// Its pid, once spawned.
    pub pid: Option<u32>,
    /// Its generation.
    pub generation: u64,
    /// Starting, ready or stopping.
    pub state: WorkerState,
    /// Why it is stopping, when it is.
    pub stop_reason: Option<String>,
    /// Seconds since it was spawned.
    pub uptime_secs: f64,
    /// Restarts of its slot so far.
    pub restarts: u32,
    /// How the previous worker of its slot ended.
    pub last_exit: Option<LastExitStatus>,
    /// Its last `STATUS=` line.
    pub status: Option<String>,
    /// CPU use of its process group over the last sampling interval, in % of one core.
    pub cpu_percent: Option<f64>,
    /// CPU time its process group has used, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its process group, in bytes.
    pub rss_bytes: Option<u64>,
    /// When it was seen waiting for connections (`ready = "listening"`), and on which socket.
    #[serde(default)]
    pub listening: Option<ListeningStatus>,
}

/// When and where a worker was seen listening.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListeningStatus {
    /// The socket's name.
    pub socket: String,
    /// Seconds from its spawn until it was seen.
    pub after_secs: f64,
}

impl WorkerStatus {
    /// A worker for the tests of what shows statuses (tables, `top`, `/metrics`): pid
    /// `1000 + id`, generation 1, nothing measured yet. Each test sets the figures it shows
    /// with `..WorkerStatus::fixture(…)`, so the list of fields is written once.
    #[doc(hidden)]
    pub fn fixture(id: u64, slot: usize, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            id,
            slot,
            pid: Some(1000 + id as u32),
            generation: 1,
            state,
            stop_reason: None,
            uptime_secs: 0.0,
            restarts: 0,
            last_exit: None,
            status: None,
            cpu_percent: None,
            cpu_seconds: None,
            rss_bytes: None,
            listening: None,
        }
    }
}

/// How a slot's previous worker ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastExitStatus {
    /// `exit code 1`, `SIGKILL`…
    pub status: String,
    /// `crash`, `rollout`, `ttl`…
    pub reason: String,
    /// Seconds ago.
    pub secs_ago: f64,
}
