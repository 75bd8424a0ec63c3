//! Pools' `before_start` commands: started when the plan says, killed when it says, and their
//! end reported back to it. The plan decides which generation waits for which run
//! (`plan::Hook`); here are only the processes.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::error;

use super::process_groups::signal_group;
use super::{Ended, Supervisor};
use crate::config::{PoolSpec, Signal};
use crate::output::Source;
use crate::plan::{Event, ExitStatus};

/// The `before_start` commands running: pool → (generation, process group).
pub(super) type Running = HashMap<Arc<str>, (u64, u32)>;

impl Supervisor {
    /// Starts `pool`'s `before_start` for `generation`. `None` once it runs (its end is an
    /// [`Ended::Hook`]); the plan's event at once if it could not be started.
    pub(super) fn run_hook(
        &mut self,
        pool: &Arc<str>,
        generation: u64,
        spec: &Arc<PoolSpec>,
    ) -> Option<Event> {
        let failed = |why: String| Event::HookExited {
            pool: pool.to_string(),
            generation,
            result: Err(why),
        };
        let mut child = match crate::spawn::spawn_before_start(pool, generation, spec) {
            Ok(child) => child,
            Err(error) => return Some(failed(format!("could not be started: {error}"))),
        };
        let Some(pid) = child.id() else {
            return Some(failed("the process vanished at once".to_owned()));
        };
        self.output
            .attach_child(Source::BeforeStart { pool }, &mut child, spec, None);
        if let Some(guard) = &mut self.guard {
            guard.watch(pid);
        }
        self.hooks.insert(pool.clone(), (generation, pid));
        let exits = self.exits.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => ExitStatus::from(status),
                Err(error) => {
                    error!("waiting for pool {pool}'s before_start (pid {pid}) failed: {error}");
                    ExitStatus::Code(-1)
                }
            };
            let _ = exits.send(Ended::Hook {
                pool,
                generation,
                pid,
                status,
            });
        });
        None
    }

    /// Kills the process group of `pool`'s `before_start` for `generation`, if it runs.
    pub(super) fn stop_hook(&mut self, pool: &str, generation: u64) {
        if let Some(&(running, pid)) = self.hooks.get(pool) {
            if running == generation {
                signal_group(pid, Signal::KILL);
            }
        }
    }

    /// A `before_start` ended: what it left behind in its process group is killed (a build's
    /// stray daemon must not outlive it), and the plan hears how it went.
    pub(super) fn on_hook_exit(
        &mut self,
        pool: Arc<str>,
        generation: u64,
        pid: u32,
        status: ExitStatus,
    ) {
        if self.hooks.get(&pool) == Some(&(generation, pid)) {
            self.hooks.remove(&pool);
        }
        signal_group(pid, Signal::KILL);
        if let Some(guard) = &mut self.guard {
            guard.forget(pid);
        }
        let result = match status {
            ExitStatus::Code(0) => Ok(()),
            status => Err(format!("exited with {status}")),
        };
        self.handle(Event::HookExited {
            pool: pool.to_string(),
            generation,
            result,
        });
    }
}
