//! Lifecycle notices as `tracing` events: a readable message, plus structured fields (`event`,
//! `pool`, `slot`, `id`, `pid`, …) that the JSON log format turns into keys for scripts and
//! tests.

use tracing::{error, info, warn};

use crate::plan::{ExitStatus, Notice, WorkerRef};

fn ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Logs one notice.
pub(crate) fn notice(notice: &Notice) {
    let event = notice.name();
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
            info!(event, pool, slot, id, pid, generation, "{notice}");
        }
        Notice::SpawnFailed { worker, error } => {
            let (pool, slot, id, _, generation) = worker_fields(worker);
            error!(event, pool, slot, id, generation, error = %error, "{notice}");
        }
        Notice::Ready { worker, after } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event,
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
            process,
            after,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event,
                pool,
                slot,
                id,
                pid,
                generation,
                socket = %socket,
                how = how.name(),
                process,
                after_ms = ms(*after),
                "{notice}"
            );
        }
        Notice::Stopping {
            worker,
            reason,
            signal,
            told,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            let grace_ms = told.map(ms);
            info!(event, pool, slot, id, pid, generation, reason = reason.as_str(), signal = %signal, grace_ms, "{notice}");
        }
        Notice::Killed { worker, cause } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            warn!(event, pool, slot, id, pid, generation, why = %cause, "{notice}");
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
                    event,
                    pool, slot, id, pid, generation, code, signal, reason, uptime_ms, "{notice}"
                );
            } else {
                info!(
                    event,
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
                warn!(event, pool, slot, delay_ms, failures, "{notice}");
            } else {
                info!(event, pool, slot, delay_ms, failures, "{notice}");
            }
        }
        Notice::ReplaceQueued { worker, reason } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(
                event,
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
            warn!(event, pool, slot, id, pid, generation, reason = reason.as_str(), why = %why, "{notice}");
        }
        Notice::RolloutStarted {
            pool,
            generation,
            trigger,
            superseded,
        } => {
            let pool = pool.to_string();
            let superseded = superseded.unwrap_or(0);
            info!(event, pool, generation, reason = %trigger, superseded, "{notice}");
        }
        Notice::RolloutFinished {
            pool,
            generation,
            replaced,
            elapsed,
        } => {
            let pool = pool.to_string();
            info!(
                event,
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
            error!(event, pool, generation, replaced, size, why = %why, "{notice}");
        }
        Notice::Scaled { pool, from, to } => {
            let pool = pool.to_string();
            info!(event, pool, from, to, "{notice}");
        }
        Notice::Waiting { pool, on } => {
            let pool = pool.to_string();
            let on: Vec<&str> = on.iter().map(|p| &**p).collect();
            info!(event, pool, on = on.join(","), "{notice}");
        }
        Notice::PoolDone { pool, generation } => {
            let pool = pool.to_string();
            info!(event, pool, generation, "{notice}");
        }
        Notice::HookStarted { pool, generation } => {
            let pool = pool.to_string();
            info!(event, pool, generation, "{notice}");
        }
        Notice::HookFinished {
            pool,
            generation,
            elapsed,
        } => {
            let pool = pool.to_string();
            info!(
                event,
                pool,
                generation,
                elapsed_ms = ms(*elapsed),
                "{notice}"
            );
        }
        Notice::HookFailed {
            pool,
            generation,
            why,
            failures,
            retry_in,
        } => {
            let pool = pool.to_string();
            let delay_ms = retry_in.map(ms);
            error!(event, pool, generation, why = %why, failures, delay_ms, "{notice}");
        }
        Notice::Status {
            worker,
            text,
            suppressed,
        } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            info!(event, pool, slot, id, pid, generation, text = %text, suppressed, "{notice}");
        }
        Notice::Refused { why } => warn!(event, why = %why, "{notice}"),
        Notice::ShutdownStarted { immediate, workers } => {
            info!(event, graceful = !immediate, workers, "{notice}");
        }
        Notice::AllStopped => info!(event, "{notice}"),
        Notice::PoolAdded { pool, size } => {
            let pool = pool.to_string();
            info!(event, pool, size, "{notice}");
        }
        Notice::PoolRemoved { pool, workers } => {
            let pool = pool.to_string();
            info!(event, pool, workers, "{notice}");
        }
        Notice::Hung { worker, silent_for } => {
            let (pool, slot, id, pid, generation) = worker_fields(worker);
            error!(
                event,
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
                event,
                pool, slot, id, pid, generation, rss, limit, "{notice}"
            );
        }
    }
}
