//! Lifecycle notices as `tracing` events: a readable message, plus structured fields (`event`,
//! `pool`, `slot`, `id`, `pid`, …) that the JSON log format turns into keys for scripts and
//! tests.

use tracing::{error, info, warn};

use crate::plan::{ExitStatus, Notice, WorkerRef};

fn ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A notice's event name (as in the JSON log), pool and worker id, for control clients.
pub(crate) fn describe(notice: &Notice) -> (&'static str, Option<String>, Option<u64>) {
    let of = |w: &WorkerRef| (Some(w.pool.to_string()), Some(w.id.0));
    let pool = |p: &std::sync::Arc<str>| (Some(p.to_string()), None);
    let (event, (pool, id)) = match notice {
        Notice::Spawned { worker } => ("spawned", of(worker)),
        Notice::SpawnFailed { worker, .. } => ("spawn_failed", of(worker)),
        Notice::Ready { worker, .. } => ("ready", of(worker)),
        Notice::Listening { worker, .. } => ("listening", of(worker)),
        Notice::Stopping { worker, .. } => ("stopping", of(worker)),
        Notice::Killed { worker, .. } => ("killed", of(worker)),
        Notice::Exited { worker, .. } => ("exited", of(worker)),
        Notice::RestartScheduled { pool: p, .. } => ("restart_scheduled", pool(p)),
        Notice::ReplaceQueued { worker, .. } => ("replace_queued", of(worker)),
        Notice::ReplaceAbandoned { worker, .. } => ("replace_abandoned", of(worker)),
        Notice::RolloutStarted { pool: p, .. } => ("rollout_started", pool(p)),
        Notice::RolloutFinished { pool: p, .. } => ("rollout_finished", pool(p)),
        Notice::RolloutAborted { pool: p, .. } => ("rollout_aborted", pool(p)),
        Notice::Scaled { pool: p, .. } => ("scaled", pool(p)),
        Notice::Status { worker, .. } => ("status", of(worker)),
        Notice::Refused { .. } => ("refused", (None, None)),
        Notice::ShutdownStarted { .. } => ("shutdown", (None, None)),
        Notice::AllStopped => ("stopped", (None, None)),
        Notice::PoolAdded { pool: p, .. } => ("pool_added", pool(p)),
        Notice::PoolRemoved { pool: p, .. } => ("pool_removed", pool(p)),
        Notice::Hung { worker, .. } => ("hung", of(worker)),
        Notice::OverMemory { worker, .. } => ("over_memory", of(worker)),
    };
    (event, pool, id)
}

/// Logs one notice.
pub(crate) fn notice(notice: &Notice) {
    let worker_fields = |w: &WorkerRef| {
        (
            w.pool.to_string(),
            w.slot as u64,
            w.id.0,
            w.pid.map_or(0, u64::from),
            w.generation,
        )
    };
    match notice {
        Notice::Spawned { worker, .. } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event = "spawned",
                pool, slot, id, pid, generation, "{notice}"
            );
        }
        Notice::SpawnFailed { worker, error } => {
            let (pool, slot, id, _, generation) = worker_fields(worker);
            error!(event = "spawn_failed", pool, slot, id, generation, error = %error, "{notice}");
        }
        Notice::Ready { worker, after } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event = "ready",
                pool,
                slot,
                id,
                pid,
                generation,
                after_ms = ms(*after),
                "{notice}"
            );
        }
        Notice::Listening {
            worker,
            socket,
            how,
            after,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event = "listening",
                pool,
                slot,
                id,
                pid,
                generation,
                socket = %socket,
                how = how.name(),
                after_ms = ms(*after),
                "{notice}"
            );
        }
        Notice::Stopping {
            worker,
            reason,
            signal,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(event = "stopping", pool, slot, id, pid, generation, reason = reason.as_str(), signal = %signal, "{notice}");
        }
        Notice::Killed { worker, cause } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            warn!(event = "killed", pool, slot, id, pid, generation, why = %cause, "{notice}");
        }
        Notice::Exited {
            worker,
            status,
            cause,
            uptime,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            let reason = cause.as_str();
            let uptime_ms = ms(*uptime);
            let (code, signal) = match status {
                ExitStatus::Code(code) => (Some(*code), None),
                ExitStatus::Signal(signal) => (None, Some(*signal)),
            };
            if matches!(cause, crate::plan::ExitCause::Crashed) {
                warn!(
                    event = "exited",
                    pool, slot, id, pid, generation, code, signal, reason, uptime_ms, "{notice}"
                );
            } else {
                info!(
                    event = "exited",
                    pool, slot, id, pid, generation, code, signal, reason, uptime_ms, "{notice}"
                );
            }
        }
        Notice::RestartScheduled {
            pool,
            slot,
            delay,
            failures,
        } => {
            let pool = pool.to_string();
            let delay_ms = ms(*delay);
            if *failures > 0 {
                warn!(
                    event = "restart_scheduled",
                    pool, slot, delay_ms, failures, "{notice}"
                );
            } else {
                info!(
                    event = "restart_scheduled",
                    pool, slot, delay_ms, failures, "{notice}"
                );
            }
        }
        Notice::ReplaceQueued { worker, reason } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event = "replace_queued",
                pool,
                slot,
                id,
                pid,
                generation,
                reason = reason.as_str(),
                "{notice}"
            );
        }
        Notice::ReplaceAbandoned {
            worker,
            reason,
            why,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            warn!(event = "replace_abandoned", pool, slot, id, pid, generation, reason = reason.as_str(), why = %why, "{notice}");
        }
        Notice::RolloutStarted {
            pool,
            generation,
            trigger,
            superseded,
        } => {
            let pool = pool.to_string();
            let superseded = superseded.unwrap_or(0);
            info!(event = "rollout_started", pool, generation, reason = %trigger, superseded, "{notice}");
        }
        Notice::RolloutFinished {
            pool,
            generation,
            replaced,
            elapsed,
        } => {
            let pool = pool.to_string();
            info!(
                event = "rollout_finished",
                pool,
                generation,
                replaced,
                elapsed_ms = ms(*elapsed),
                "{notice}"
            );
        }
        Notice::RolloutAborted {
            pool,
            generation,
            replaced,
            size,
            why,
        } => {
            let pool = pool.to_string();
            error!(event = "rollout_aborted", pool, generation, replaced, size, why = %why, "{notice}");
        }
        Notice::Scaled { pool, from, to } => {
            let pool = pool.to_string();
            info!(event = "scaled", pool, from, to, "{notice}");
        }
        Notice::Status { worker, text } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(event = "status", pool, slot, id, pid, generation, text = %text, "{notice}");
        }
        Notice::Refused { why } => warn!(event = "refused", why = %why, "{notice}"),
        Notice::ShutdownStarted { immediate, workers } => {
            info!(
                event = "shutdown",
                graceful = !immediate,
                workers,
                "{notice}"
            );
        }
        Notice::AllStopped => info!(event = "stopped", "{notice}"),
        Notice::PoolAdded { pool, size } => {
            let pool = pool.to_string();
            info!(event = "pool_added", pool, size, "{notice}");
        }
        Notice::PoolRemoved { pool, workers } => {
            let pool = pool.to_string();
            info!(event = "pool_removed", pool, workers, "{notice}");
        }
        Notice::Hung { worker, silent_for } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            error!(
                event = "hung",
                pool,
                slot,
                id,
                pid,
                generation,
                silent_ms = ms(*silent_for),
                "{notice}"
            );
        }
        Notice::OverMemory { worker, rss, limit } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            warn!(
                event = "over_memory",
                pool, slot, id, pid, generation, rss, limit, "{notice}"
            );
        }
    }
}
