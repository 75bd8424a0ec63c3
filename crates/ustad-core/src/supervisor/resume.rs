//! The new program's side of an upgrade (see `upgrade`): the handover document read, the fds
//! it lists taken back, and the workers adopted. Each worker is watched through the pidfd the
//! old program opened (its parent, before any exit of it was reaped: the pidfd names that
//! process, never one that reuses its pid); one that exited during the exec is reaped and
//! replaced as any exited worker is.
//!
//! If the document cannot be read, the workers are not left unsupervised: the new program
//! stops them gracefully (their stop signal, then SIGKILL after their kill timeout) and
//! starts the cluster afresh from its configuration ([`take_back_children`]).

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
use tokio::io::Interest;
use tracing::{error, info, warn};

use super::upgrade::{Document, record};
use super::{Ended, Supervisor};
use crate::config::{Config, Readiness};
use crate::handover::HandedFds;
use crate::output::Source;
use crate::plan::{Clock, ExitStatus, STATE_VERSION, WorkerId};

/// What a previous program of this process handed over: the document, and the fds it lists.
#[derive(Debug)]
pub struct Handover {
    pub(super) document: Document,
    pub(super) fds: HandedFds,
}

/// Why a handover cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The document cannot be read from its fd.
    #[error("cannot read the handover document (fd {fd}): {source}")]
    Read {
        /// Its fd.
        fd: RawFd,
        /// Why.
        source: io::Error,
    },
    /// Written by a program whose state this one does not know.
    #[error(
        "the handover document is state version {found}; this program reads version {STATE_VERSION}"
    )]
    Version {
        /// Its version.
        found: u32,
    },
    /// Not a document of the known shape.
    #[error("the handover document cannot be read: {0}")]
    Malformed(String),
}

impl Handover {
    /// Reads the document in the memfd `fd` (from `--handover=FD`) and takes every fd it
    /// lists.
    ///
    /// # Errors
    /// When it cannot be read, or is not a document this program reads; the fds are not
    /// taken then.
    pub fn read(fd: RawFd) -> Result<Handover, HandoverError> {
        // Through /proc, so that the fd itself is taken only with the others.
        let text = std::fs::read_to_string(format!("/proc/self/fd/{fd}"))
            .map_err(|source| HandoverError::Read { fd, source })?;
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned = serde_json::from_str(&text)
            .map_err(|error| HandoverError::Malformed(error.to_string()))?;
        if versioned.version != STATE_VERSION {
            return Err(HandoverError::Version {
                found: versioned.version,
            });
        }
        let document: Document = serde_json::from_str(&text)
            .map_err(|error| HandoverError::Malformed(error.to_string()))?;
        let mut numbers = document.fds.clone();
        numbers.push(fd);
        let mut fds = HandedFds::take(&numbers);
        // Read already: closed here.
        drop(fds.get(fd, "the handover document"));
        Ok(Handover { document, fds })
    }

    /// The configuration the previous program ran.
    pub fn config(&self) -> &Config {
        &self.document.config
    }

    /// The previous program's preload library memfd, at the number its workers were given in
    /// `LD_PRELOAD` (`/proc/<pid>/fd/<fd>`): put this program's library there, so that the
    /// programs those workers start from now on still find one (see
    /// [`crate::preload::keep_memfd`]). `None` when it was not handed over.
    pub fn take_preload(&mut self) -> Option<OwnedFd> {
        let fd = self.document.preload?;
        self.fds.get(fd, "the preload library").ok()
    }
}

/// A worker that crossed the exec, with its pidfd.
pub(super) struct Adopted {
    id: WorkerId,
    pid: u32,
    pidfd: OwnedFd,
}

impl Supervisor {
    /// Takes over the workers, their pipes and channels, the lingering groups and the log
    /// lines of the document; returns the workers to watch (those it cannot take over, or
    /// that the document does not list, are reported as exited).
    pub(super) fn adopt(&mut self, handover: &mut Handover, clock: Clock) -> Vec<Adopted> {
        let mut adopted = Vec::new();
        let document = &handover.document;
        for handed in &document.workers {
            let id = WorkerId(handed.id);
            let pipes = handed
                .pipes
                .map(|fd| fd.and_then(|fd| handover.fds.get(fd, "a worker's pipe").ok()));
            let channel = handed
                .channel
                .and_then(|fd| handover.fds.get(fd, "a worker's channel").ok());
            let planned = self.plan.worker(id).map(|worker| {
                let starting = matches!(worker.phase, crate::plan::Phase::Starting { .. });
                (worker.spec().clone(), starting)
            });
            let (Some(worker), Some((spec, starting))) = (self.plan.worker_ref(id), planned) else {
                warn!(
                    "upgrade: worker {id} (pid {}) is not in the plan; not taken over",
                    handed.pid
                );
                continue;
            };
            let source = Source::Worker {
                pool: &worker.pool,
                slot: worker.slot,
                id: id.0,
            };
            self.output.attach_pipes(source, pipes, &spec, None);
            self.wire_channel(&worker, channel, spec.ipc);
            if starting && spec.ready == Readiness::Listening {
                self.watch_listening(&worker, &spec);
            }
            match handover.fds.get(handed.pidfd, "a worker's pidfd") {
                Ok(pidfd) => adopted.push(Adopted {
                    id,
                    pid: handed.pid,
                    pidfd,
                }),
                Err(why) => {
                    warn!(
                        event = "upgrade_lost",
                        "upgrade: worker {worker} (pid {}) cannot be taken over ({why}); it counts as exited",
                        handed.pid
                    );
                    let _ = self.exits.send(Ended::Worker(id, ExitStatus::Code(-1)));
                }
            }
        }
        // A worker of the plan that the document does not list was gone before the old
        // program could hand it over (its exit not yet heard): it counts as exited, its
        // status unknown.
        let listed: std::collections::HashSet<u64> =
            document.workers.iter().map(|handed| handed.id).collect();
        let unlisted: Vec<(WorkerId, u32)> = self
            .plan
            .workers()
            .filter(|worker| !listed.contains(&worker.id.0))
            .filter_map(|worker| Some((worker.id, worker.pid?)))
            .collect();
        for (id, pid) in unlisted {
            warn!(
                event = "upgrade_lost",
                "upgrade: worker {id} (pid {pid}) was gone before it could be handed over; it counts as exited (status unknown)"
            );
            let _ = self.exits.send(Ended::Worker(id, ExitStatus::Code(-1)));
        }
        for &(pgid, deadline_ns) in &document.lingering {
            let deadline = clock.to_instant(deadline_ns).unwrap_or_else(Instant::now);
            self.lingering.push(super::Lingering { pgid, deadline });
        }
        self.aborted = document.aborted.clone();
        for line in &document.log {
            self.logbook.record(line.clone());
        }
        adopted
    }

    /// Reports each adopted worker's exit to the loop once its process ends (reaped here
    /// through its pidfd).
    pub(super) fn watch_adopted(&self, adopted: Adopted) {
        let exits = self.exits.clone();
        let Adopted { id, pid, pidfd } = adopted;
        let pidfd = match crate::sys::register_fd(pidfd, Interest::READABLE) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                error!("upgrade: cannot watch worker pid {pid}: {error}");
                return;
            }
        };
        tokio::spawn(async move {
            let status = loop {
                let Ok(mut ready) = pidfd.readable().await else {
                    break ExitStatus::Code(-1);
                };
                match waitid(
                    WaitId::PidFd(pidfd.get_ref().as_fd()),
                    WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
                ) {
                    Ok(Some(status)) => {
                        break match (status.exit_status(), status.terminating_signal()) {
                            (Some(code), _) if status.exited() => ExitStatus::Code(code),
                            (_, Some(signal)) => ExitStatus::Signal(signal),
                            _ => ExitStatus::Code(-1),
                        };
                    }
                    Ok(None) => ready.clear_ready(),
                    Err(error) => {
                        error!("waiting for worker pid {pid} failed: {error}");
                        break ExitStatus::Code(-1);
                    }
                }
            };
            let _ = exits.send(Ended::Worker(id, status));
        });
    }
}

/// When a handover cannot be taken, clears the ground for a fresh start: stops this
/// process's children (the previous program's workers, which are still its children)
/// gracefully, their whole process groups, within `grace`, then kills what is left, and reaps
/// them; closes every fd inherited across the exec ([`crate::handover::close_leftovers`]); and
/// waits for the previous guard to exit. The guard ignores SIGTERM, and exits when its pipe
/// closes, removing the control socket's path as it goes: the fresh start must bind after
/// that, or its new socket would be unlinked.
pub fn take_back_children(grace: Duration) {
    let guard = crate::sys::GUARD_NAME.to_str().unwrap_or_default();
    let (guards, children): (Vec<u32>, Vec<u32>) = crate::procfs::own_children()
        .into_iter()
        .partition(|pid| crate::procfs::comm(*pid).is_some_and(|name| name == guard));
    stop_children(&children, grace);
    crate::handover::close_leftovers();
    let gone = |pid: &u32| crate::procfs::stat(*pid).is_none_or(|stat| stat.state == 'Z');
    let deadline = Instant::now() + Duration::from_secs(2);
    while !guards.iter().all(gone) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &pid in &guards {
        if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
        }
    }
}

/// Stops `children` and their process groups: SIGTERM, then SIGKILL after `grace`.
fn stop_children(children: &[u32], grace: Duration) {
    if children.is_empty() {
        return;
    }
    warn!(
        event = "upgrade_fallback",
        "stopping the {} processes the previous program left (SIGTERM to their process groups, SIGKILL after {}s)",
        children.len(),
        grace.as_secs()
    );
    let signal_all = |signal: rustix::process::Signal| {
        for &pid in children {
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = rustix::process::kill_process_group(pid, signal);
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    };
    signal_all(rustix::process::Signal::TERM);
    let deadline = Instant::now() + grace;
    let reap = || {
        while let Ok(Some(_)) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {}
    };
    while Instant::now() < deadline {
        reap();
        if children
            .iter()
            .all(|pid| crate::procfs::stat(*pid).is_none_or(|stat| stat.state == 'Z'))
        {
            reap();
            info!("the previous program's processes have stopped");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_all(rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_millis(50));
    reap();
}

/// The status record of this upgrade: the switch lasted from the document's writing to now.
pub(super) fn upgrade_record(
    handover: &Handover,
    clock: Clock,
    kept: usize,
    lost: usize,
) -> crate::status::UpgradeStatus {
    let now = clock.to_monotonic(Instant::now());
    let switch_ms = now.saturating_sub(handover.document.written_ns) as f64 / 1e6;
    record(&handover.document, switch_ms, kept, lost)
}
