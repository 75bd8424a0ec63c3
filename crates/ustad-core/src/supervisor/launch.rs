//! Launching a worker: its sockets and message channel made ready, the process spawned, its
//! output relayed, its channel wired to the embedding program, and a task that reports its
//! exit to the loop.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tracing::error;

use super::link;
use super::listen_watch::Expected;
use super::{Ended, Supervisor};
use crate::config::{IpcSpec, PoolSpec, Readiness};
use crate::ipc::Outbox;
use crate::output::Source;
use crate::plan::{Event, ExitStatus, WorkerId, WorkerRef};
use crate::spawn::{WorkerLaunch, spawn_worker, wants_notify};

impl Supervisor {
    /// Starts a worker; what happened is the plan's next event (`Spawned` or `SpawnFailed`).
    pub(super) fn launch(
        &mut self,
        id: WorkerId,
        pool: &str,
        slot: usize,
        generation: u64,
        spec: &Arc<PoolSpec>,
    ) -> Event {
        if let Err(error) = self.listeners.ensure_slot(&spec.sockets, pool, slot) {
            return Event::SpawnFailed {
                id,
                error: error.to_string(),
            };
        }
        let pair = match spec.ipc.map(|_| channel_pair()).transpose() {
            Ok(pair) => pair,
            Err(error) => {
                return Event::SpawnFailed {
                    id,
                    error: format!("cannot create the message channel: {error}"),
                };
            }
        };
        let launch = WorkerLaunch {
            worker: Some((id, slot)),
            pool,
            generation,
            spec,
            sockets: self.listeners.fds(&spec.sockets, pool, slot),
            notify_socket: wants_notify(spec).then(|| self.notify.path()),
            ipc: pair.as_ref().map(|(_, child)| child.as_fd()),
        };
        let hint = launch.address_in_use_hint();
        let mut child = match spawn_worker(&launch) {
            Ok(child) => child,
            Err(error) => {
                return Event::SpawnFailed {
                    id,
                    error: error.to_string(),
                };
            }
        };
        let Some(pid) = child.id() else {
            return Event::SpawnFailed {
                id,
                error: "the process vanished at once".to_owned(),
            };
        };
        self.output.attach_child(
            Source::Worker {
                pool,
                slot,
                id: id.0,
            },
            &mut child,
            spec,
            Some(hint),
        );
        let worker = WorkerRef {
            pool: Arc::from(pool),
            slot,
            id,
            pid: Some(pid),
            generation,
        };
        let parent = pair.map(|(parent, child)| {
            drop(child);
            parent
        });
        self.wire_channel(&worker, parent, spec.ipc);
        if let Some(guard) = &mut self.guard {
            guard.watch(pid);
        }
        self.watch_exit(id, pid, child);
        if spec.ready == Readiness::Listening {
            self.watch_listening(&worker, spec);
        }
        Event::Spawned { id, pid }
    }

    /// Watches a starting worker of a `ready = "listening"` pool until it listens on its
    /// sockets.
    pub(super) fn watch_listening(&mut self, worker: &WorkerRef, spec: &PoolSpec) {
        let (id, pool, slot) = (worker.id, &*worker.pool, worker.slot);
        let Some(pid) = worker.pid else { return };
        {
            let sockets = self
                .listeners
                .fds(&spec.sockets, pool, slot)
                .into_iter()
                .filter_map(|(name, fd)| {
                    Some(Expected {
                        inode: crate::listening::inode_of(fd)?,
                        name: Arc::from(name),
                    })
                })
                .collect();
            let label = format!("{pool}.{slot} (id {id}, pid {pid})");
            let now = std::time::Instant::now();
            self.listen_watch
                .watch(id, pid, label, sockets, spec.ready_timeout, now);
        }
    }

    /// Tells the program of the new worker and, when the worker has a message channel (the
    /// primary's end is `parent`), starts it.
    pub(super) fn wire_channel(
        &mut self,
        worker: &WorkerRef,
        parent: Option<OwnedFd>,
        ipc: Option<IpcSpec>,
    ) {
        let channel = match (parent, ipc) {
            (Some(parent), Some(ipc)) => Some((parent, ipc, Outbox::new(crate::ipc::OUTBOX_BYTES))),
            _ => None,
        };
        let sink = self.program.as_ref().and_then(|program| {
            let outbox = channel
                .as_ref()
                .map(|(_, ipc, outbox)| (outbox.clone(), *ipc));
            program.spawned(worker, outbox)
        });
        let Some((parent, ipc, outbox)) = channel else {
            return;
        };
        match link::start_channel(
            parent,
            worker.id,
            ipc,
            self.lifecycle.clone(),
            sink,
            outbox.clone(),
            self.channel_runtime.as_ref(),
        ) {
            Ok((conns, socket)) => {
                self.channels.insert(
                    worker.id,
                    link::Outboxes {
                        frames: outbox,
                        conns,
                        protocol: ipc.protocol,
                        socket,
                    },
                );
            }
            Err(error) => {
                outbox.close();
                error!("worker {worker}: cannot use its message channel: {error}");
            }
        }
    }

    /// Reports the worker's exit to the loop once its process ends (tokio reaps it).
    pub(super) fn watch_exit(&self, id: WorkerId, pid: u32, mut child: tokio::process::Child) {
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => ExitStatus::from(status),
                Err(error) => {
                    error!("waiting for worker pid {pid} failed: {error}");
                    ExitStatus::Code(-1)
                }
            };
            let _ = exits.send(Ended::Worker(id, status));
        });
    }
}

/// The two ends of a worker's message channel: the primary's, and the worker's.
fn channel_pair() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
}
