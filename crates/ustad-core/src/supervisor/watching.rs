//! Pools with `watch`: one task per pool waits for its files to change ([`crate::watch`]) and
//! tells the loop, which rolls the pool. The tasks follow the configuration: started at
//! start (and by an upgrade's new program), restarted by a reload that changes a pool's
//! `watch` or `watch_ignore`, stopped with their pool.

use std::collections::HashMap;
use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Supervisor;
use crate::plan::{Event, RolloutTrigger};
use crate::watch::Watcher;

/// A pool's files changed: the pool, and some of the paths.
pub(super) type Changed = (String, Vec<PathBuf>);

/// The pools watched, each with what it watches.
#[derive(Debug, Default)]
pub(super) struct Watching {
    tasks: HashMap<String, Watch>,
}

#[derive(Debug)]
struct Watch {
    paths: Vec<PathBuf>,
    ignore: Vec<String>,
    task: JoinHandle<()>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        for watch in self.tasks.values() {
            watch.task.abort();
        }
    }
}

impl Supervisor {
    /// Starts, restarts or stops the pools' watch tasks to match the running configuration.
    pub(super) fn sync_watches(&mut self) {
        let config = &self.config;
        self.watching.tasks.retain(|pool, watch| {
            let same = config
                .pools
                .get(pool)
                .is_some_and(|spec| spec.watch == watch.paths && spec.watch_ignore == watch.ignore);
            if !same {
                watch.task.abort();
            }
            same
        });
        for (pool, spec) in &self.config.pools {
            if spec.watch.is_empty() || self.watching.tasks.contains_key(pool) {
                continue;
            }
            let watcher = match Watcher::new(pool, &spec.watch, &spec.watch_ignore) {
                Ok(watcher) => watcher,
                Err(error) => {
                    warn!(event = "watch_failed", pool = %pool, "pool {pool}: cannot watch its files: {error}");
                    continue;
                }
            };
            info!(
                event = "watching",
                pool = %pool,
                directories = watcher.directories(),
                "pool {pool}: watching {} ({} directories); a change rolls the pool",
                spec.watch
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                watcher.directories()
            );
            let task = tokio::spawn(watch(pool.clone(), watcher, self.watch_changes.clone()));
            self.watching.tasks.insert(
                pool.clone(),
                Watch {
                    paths: spec.watch.clone(),
                    ignore: spec.watch_ignore.clone(),
                    task,
                },
            );
        }
    }

    /// A watched pool's files changed: it rolls, unless the cluster is stopping.
    pub(super) fn on_files_changed(&mut self, (pool, paths): Changed) {
        if self.plan.is_shutting_down() || !self.config.pools.contains_key(&pool) {
            return;
        }
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        info!(
            event = "files_changed",
            pool = %pool,
            paths = %shown.join(", "),
            "pool {pool}: {} changed: rolling",
            shown.join(", ")
        );
        self.handle(Event::Rollout {
            pool: Some(pool),
            trigger: RolloutTrigger::Restart,
            spec: None,
        });
    }
}

/// Reports each batch of changes of `pool`'s files until the loop is gone.
async fn watch(pool: String, mut watcher: Watcher, changes: mpsc::UnboundedSender<Changed>) {
    loop {
        match watcher.changes().await {
            Ok(paths) => {
                if changes.send((pool.clone(), paths)).is_err() {
                    return;
                }
            }
            Err(error) => {
                warn!(event = "watch_failed", pool = %pool, "pool {pool}: watching its files failed: {error}; its changes no longer roll it");
                return;
            }
        }
    }
}
