//! Answering control requests (`ustad status`, `scale`, `restart`, `stop`, `logs`, `top`,
//! `reload`) in the supervisor loop, and publishing lifecycle events to the clients that
//! follow them.
//!
//! Nothing here waits: replies go into each client's bounded channel with `try_send`, and a
//! client whose channel is full is dropped (its connection closes), never waited for.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc};

use super::Supervisor;
use crate::config::value::parse_duration;
use crate::control::protocol::{EventRecord, Progress, Reply, Request};
use crate::control::server::Call;
use crate::plan::{Event, Notice, RolloutTrigger, WorkerId};

/// A `reload --wait` client and the rolls it waits for.
#[derive(Debug)]
pub(super) struct ReloadWaiter {
    replies: mpsc::Sender<Reply>,
    /// What the reload did, to say again in the final answer.
    applied: String,
    /// Pool → finished (`Some(Ok)`), stopped (`Some(Err)`) or rolling (`None`).
    pools: BTreeMap<String, Option<Result<(), String>>>,
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |t| t.as_secs_f64())
}

impl Supervisor {
    pub(super) fn on_call(&mut self, call: Call) {
        let Call { request, replies } = call;
        match request {
            Request::Status {} => {
                let status = self.status();
                let _ = replies.try_send(Reply::Status(status));
            }
            Request::Scale { pool, size, delta } => {
                let reply = self.scale(&pool, size, delta);
                let _ = replies.try_send(reply);
            }
            Request::Restart { pool, worker } => {
                let reply = match (pool, worker) {
                    (Some(pool), None) => self.checked(
                        Event::Rollout {
                            pool: Some(pool.clone()),
                            trigger: RolloutTrigger::Restart,
                            spec: None,
                        },
                        format!("rolling restart of pool {pool} started"),
                    ),
                    (None, Some(id)) => self.checked(
                        Event::Replace { id: WorkerId(id) },
                        format!("worker {id} will be replaced once its successor is ready"),
                    ),
                    _ => Reply::error("restart needs a pool or a worker id, not both"),
                };
                let _ = replies.try_send(reply);
            }
            Request::Stop {
                worker: Some(id),
                timeout: _,
            } => {
                let reply = self.checked(
                    Event::StopWorker { id: WorkerId(id) },
                    format!(
                        "worker {id} is stopping; its slot stays empty until its pool is restarted or scaled"
                    ),
                );
                let _ = replies.try_send(reply);
            }
            Request::Kill {
                pool,
                worker,
                signal,
            } => {
                let reply = self.kill(pool.as_deref(), worker, signal.as_deref());
                let _ = replies.try_send(reply);
            }
            Request::Stop {
                timeout,
                worker: None,
            } => {
                let timeout = match timeout.as_deref().map(parse_duration).transpose() {
                    Ok(timeout) => timeout,
                    Err(error) => {
                        let _ = replies.try_send(Reply::error(error));
                        return;
                    }
                };
                let workers = self.plan.workers().count();
                tracing::info!(event = "control", "stop requested by a control client");
                self.service.stopping();
                self.handle(Event::Shutdown {
                    immediate: false,
                    timeout,
                });
                let _ = replies.try_send(Reply::done(format!(
                    "stopping {workers} worker{}",
                    if workers == 1 { "" } else { "s" }
                )));
                // The connection closes when the primary exits: that is the client's signal.
                self.stop_waiters.push(replies);
            }
            Request::Logs {
                pool,
                lines,
                follow,
            } => self.logs(pool, lines, follow, replies),
            Request::Events {} => self.subscribers.push(replies),
            Request::Reload { pools, wait } => self.reload_request(&pools, wait, replies),
            Request::Upgrade { binary } => self.upgrade_request(binary, Some(replies)),
        }
    }

    /// Handles an event, answering `done` with `message`, or `error` with the plan's refusal.
    fn checked(&mut self, event: Event, message: String) -> Reply {
        let outcome = self.plan.handle(event, Instant::now());
        let refusal = outcome.refusal().map(str::to_owned);
        self.perform(outcome);
        match refusal {
            Some(why) => Reply::error(why),
            None => Reply::done(message),
        }
    }

    /// `kill`: a signal to the process groups of a worker, or of a pool's workers.
    fn kill(&mut self, pool: Option<&str>, worker: Option<u64>, signal: Option<&str>) -> Reply {
        let signal = match signal.map(str::parse::<crate::config::Signal>).transpose() {
            Ok(signal) => signal.unwrap_or(crate::config::Signal::TERM),
            Err(error) => return Reply::error(error),
        };
        let targets: Vec<(String, u32)> = match (pool, worker) {
            (Some(pool), None) => {
                if !self.plan.pools().any(|(name, _)| name == pool) {
                    return Reply::error(format!("no pool named `{pool}`"));
                }
                self.plan
                    .workers()
                    .filter(|w| self.plan.pool_of(w) == pool)
                    .filter_map(|w| Some((self.plan.worker_ref(w.id)?.to_string(), w.pid?)))
                    .collect()
            }
            (None, Some(id)) => match self.plan.worker(WorkerId(id)) {
                Some(w) => match (self.plan.worker_ref(w.id), w.pid) {
                    (Some(name), Some(pid)) => vec![(name.to_string(), pid)],
                    _ => return Reply::error(format!("worker {id} has no process yet")),
                },
                None => return Reply::error(format!("no worker with id {id}")),
            },
            _ => return Reply::error("kill needs a pool or a worker id, not both"),
        };
        for (name, pid) in &targets {
            tracing::info!(
                event = "control",
                pid,
                signal = %signal,
                "sending {signal} to worker {name}'s process group, as a control client asked"
            );
            super::process_groups::signal_group(*pid, signal);
        }
        Reply::done(format!(
            "sent {signal} to {} worker{}",
            targets.len(),
            if targets.len() == 1 { "" } else { "s" }
        ))
    }

    fn scale(&mut self, pool: &str, size: Option<usize>, delta: Option<i64>) -> Reply {
        let Some(current) = self
            .plan
            .pools()
            .find(|(name, _)| *name == pool)
            .map(|p| p.1)
        else {
            return Reply::error(format!("no pool named `{pool}`"));
        };
        let target = match (size, delta) {
            (Some(size), None) => size,
            (None, Some(delta)) => {
                let target = i64::try_from(current)
                    .ok()
                    .and_then(|current| current.checked_add(delta));
                match target {
                    Some(target) if target < 0 => {
                        return Reply::error(format!(
                            "pool `{pool}` has {current} worker{}: it cannot shrink by {}",
                            if current == 1 { "" } else { "s" },
                            delta.unsigned_abs()
                        ));
                    }
                    Some(target) => usize::try_from(target).unwrap_or(usize::MAX),
                    None => usize::MAX,
                }
            }
            _ => return Reply::error("scale needs a size or a delta, not both"),
        };
        let max = crate::config::value::max_workers();
        if target > max {
            return Reply::error(format!(
                "pool `{pool}` cannot have {target} workers: this machine runs at most {max} processes (kernel.pid_max, kernel.threads-max)"
            ));
        }
        if target == current {
            return Reply::done(format!("pool {pool} already has {current} workers"));
        }
        self.checked(
            Event::Scale {
                pool: pool.to_owned(),
                size: target,
            },
            format!("pool {pool} scaled from {current} to {target}"),
        )
    }

    fn logs(
        &mut self,
        pool: Option<String>,
        lines: usize,
        follow: bool,
        replies: mpsc::Sender<Reply>,
    ) {
        if let Some(pool) = &pool {
            if !self.plan.pools().any(|(name, _)| name == pool) {
                let _ = replies.try_send(Reply::error(format!("no pool named `{pool}`")));
                return;
            }
        }
        // Subscribed before the recent lines are read, so none falls in between.
        let mut new_lines = self.logbook.follow();
        for line in self.logbook.recent(pool.as_deref(), lines) {
            if replies.try_send(Reply::Log((*line).clone())).is_err() {
                return;
            }
        }
        if !follow {
            let _ = replies.try_send(Reply::done(""));
            return;
        }
        tokio::spawn(async move {
            loop {
                let line = match new_lines.recv().await {
                    Ok(line) => line,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!("a log follower missed {missed} lines");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if pool.as_deref().is_some_and(|p| p != line.pool) {
                    continue;
                }
                // A follower that does not read is dropped rather than buffered for.
                if replies.try_send(Reply::Log((*line).clone())).is_err() {
                    return;
                }
            }
        });
    }

    fn reload_request(&mut self, pools: &[String], wait: bool, replies: mpsc::Sender<Reply>) {
        tracing::info!(event = "control", "reload requested by a control client");
        self.aborted.clear();
        let reloaded = self.reload(pools);
        self.service.reloading();
        self.service.update(&self.plan.status(Instant::now()));
        match reloaded {
            Err(error) => {
                tracing::error!(event = "reload_failed", "{error}");
                let _ = replies.try_send(Reply::error(error));
            }
            Ok(applied) if !wait || applied.rolled.is_empty() => {
                let _ = replies.try_send(Reply::done(applied.message));
            }
            Ok(applied) => {
                // A roll may already have stopped (a command that cannot start fails at once).
                let pools = applied
                    .rolled
                    .into_iter()
                    .map(|pool| {
                        let failed = self
                            .aborted
                            .iter()
                            .find(|(p, _)| *p == pool)
                            .map(|(_, why)| Err(why.clone()));
                        (pool, failed)
                    })
                    .collect();
                self.reload_waiters.push(ReloadWaiter {
                    replies,
                    applied: applied.message,
                    pools,
                });
                self.settle_reload_waiters();
            }
        }
    }

    /// Answers the `reload --wait` clients whose rolls are all over: finished when the pool
    /// has no rollout left and every slot is ready, failed when its rollout was aborted.
    fn settle_reload_waiters(&mut self) {
        if self.reload_waiters.is_empty() {
            return;
        }
        let pools = self.plan.status(Instant::now());
        let mut waiters = std::mem::take(&mut self.reload_waiters);
        waiters.retain_mut(|waiter| {
            for (name, outcome) in &mut waiter.pools {
                if outcome.is_some() {
                    continue;
                }
                match pools.iter().find(|p| p.name == *name) {
                    None => *outcome = Some(Err(format!("pool {name} was removed"))),
                    Some(pool) if pool.rollout.is_none() && pool.ready >= pool.size => {
                        *outcome = Some(Ok(()));
                        let _ = waiter.replies.try_send(Reply::Progress(Progress {
                            pool: name.clone(),
                            replaced: pool.size,
                            size: pool.size,
                            state: "finished".to_owned(),
                        }));
                    }
                    Some(_) => {}
                }
            }
            if waiter.pools.values().any(Option::is_none) {
                return !waiter.replies.is_closed();
            }
            let failures: Vec<&str> = waiter
                .pools
                .values()
                .filter_map(|o| o.as_ref().and_then(|r| r.as_ref().err()))
                .map(String::as_str)
                .collect();
            let last = if failures.is_empty() {
                Reply::done(format!(
                    "{}\nrolling restart finished: {}",
                    waiter.applied,
                    waiter.pools.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            } else {
                Reply::error(failures.join("; "))
            };
            let _ = waiter.replies.try_send(last);
            false
        });
        self.reload_waiters = waiters;
    }

    fn progress(&self, pool: &str, state: &str) -> Reply {
        let (replaced, size) = self
            .plan
            .status(Instant::now())
            .into_iter()
            .find(|p| p.name == pool)
            .map_or((0, 0), |p| match p.rollout {
                Some(rollout) => (rollout.replaced, rollout.size),
                None => (p.size, p.size),
            });
        Reply::Progress(Progress {
            pool: pool.to_owned(),
            replaced,
            size,
            state: state.to_owned(),
        })
    }

    /// Tells event followers and reload waiters about a notice.
    pub(super) fn publish(&mut self, notice: &Notice) {
        if !self.subscribers.is_empty() {
            let worker = notice.worker();
            let (code, signal, reason) = match notice {
                Notice::Exited { status, cause, .. } => {
                    let (code, signal) = match status {
                        crate::plan::ExitStatus::Code(code) => (Some(*code), None),
                        crate::plan::ExitStatus::Signal(signal) => (None, Some(*signal)),
                    };
                    (code, signal, Some(cause.as_str()))
                }
                Notice::Stopping { reason, .. } => (None, None, Some(reason.as_str())),
                _ => (None, None, None),
            };
            let record = Reply::Event(EventRecord {
                time: unix_now(),
                event: notice.name().to_owned(),
                pool: notice.pool().map(ToString::to_string),
                id: worker.map(|w| w.id.0),
                slot: worker.map(|w| w.slot),
                pid: worker.and_then(|w| w.pid),
                generation: worker.map(|w| w.generation),
                code,
                signal,
                reason: reason.map(str::to_owned),
                message: notice.to_string(),
            });
            self.subscribers
                .retain(|subscriber| subscriber.try_send(record.clone()).is_ok());
        }
        if let Notice::RolloutAborted { pool, why, .. } = notice {
            let why = format!("the rolling restart of pool {pool} stopped: {why}");
            if self.aborted.len() < 64 {
                self.aborted.push((pool.to_string(), why.clone()));
            }
            for waiter in &mut self.reload_waiters {
                if let Some(outcome @ None) = waiter.pools.get_mut(&**pool) {
                    *outcome = Some(Err(why.clone()));
                }
            }
        }
        if self.reload_waiters.is_empty() {
            return;
        }
        let pool = match notice {
            Notice::Ready { worker, .. } => worker.pool.to_string(),
            Notice::RolloutFinished { pool, .. }
            | Notice::RolloutAborted { pool, .. }
            | Notice::PoolRemoved { pool, .. } => pool.to_string(),
            _ => return,
        };
        let progress = self.progress(&pool, "rolling");
        for waiter in &self.reload_waiters {
            if waiter.pools.get(&pool).is_some_and(Option::is_none) {
                let _ = waiter.replies.try_send(progress.clone());
            }
        }
        self.settle_reload_waiters();
    }
}
