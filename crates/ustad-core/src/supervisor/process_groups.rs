//! What is left of workers once they exit: the other members of their process groups
//! (lingering until a deadline), processes that escaped a group and were adopted (reaped, and
//! stopped at exit), and the guard that kills every group should the primary die.

use std::io;
use std::time::{Duration, Instant};

use rustix::process::{Pid, kill_process_group, set_child_subreaper, test_kill_process_group};
use tracing::{debug, error, warn};

use super::Supervisor;
use super::guard::Guard;
use crate::config::Signal;
use crate::plan::{Phase, Plan, WorkerId};
use crate::procfs;

/// Makes the primary a child subreaper (`PR_SET_CHILD_SUBREAPER`): processes escaping a
/// worker's process group are re-parented to it rather than to init.
pub(super) fn enable_subreaper() -> io::Result<()> {
    // rustix passes the pid as prctl's flag argument: any non-zero value turns it on.
    set_child_subreaper(Some(rustix::process::getpid())).map_err(io::Error::from)
}

/// A process group whose leader (the worker) has exited while other members remain: they get
/// SIGKILL at `deadline` unless they are gone by then.
#[derive(Debug)]
pub(super) struct Lingering {
    pub(super) pgid: u32,
    pub(super) deadline: Instant,
}

impl Supervisor {
    /// A worker exited: the other members of its process group outlive it only until the
    /// deadline of its stop (or, after a crash, for one kill_timeout after the stop signal).
    pub(super) fn linger(&mut self, id: WorkerId) {
        let Some(worker) = self.plan.worker(id) else {
            return;
        };
        let Some(pgid) = worker.pid else {
            return;
        };
        let now = Instant::now();
        if group_exists(pgid) {
            let deadline = match worker.phase {
                Phase::Stopping { kill_at, .. } => kill_at.unwrap_or(now),
                _ => {
                    signal_group(pgid, worker_stop_signal(&self.plan, id));
                    now + worker_kill_timeout(&self.plan, id)
                }
            };
            debug!(
                pgid,
                "worker pid {pgid} exited; the rest of its process group has until its deadline"
            );
            self.lingering.push(Lingering { pgid, deadline });
        } else if let Some(guard) = &mut self.guard {
            guard.forget(pgid);
        }
    }

    /// When the next lingering group is to be killed.
    pub(super) fn lingering_deadline(&self) -> Option<Instant> {
        self.lingering.iter().map(|l| l.deadline).min()
    }

    /// An immediate shutdown: what lingers is killed now.
    pub(super) fn kill_lingering_now(&mut self) {
        let now = Instant::now();
        for lingering in &mut self.lingering {
            lingering.deadline = now;
        }
        self.settle_lingering(Some(now));
    }

    /// Forgets groups that are gone; with `now`, kills those past their deadline.
    pub(super) fn settle_lingering(&mut self, now: Option<Instant>) {
        let mut released = Vec::new();
        self.lingering.retain(|lingering| {
            let alive = group_exists(lingering.pgid);
            let expired = now.is_some_and(|now| lingering.deadline <= now);
            if alive && expired {
                warn!(
                    event = "killed",
                    pgid = lingering.pgid,
                    "killing what is left of the process group of exited worker pid {}",
                    lingering.pgid
                );
                signal_group(lingering.pgid, Signal::KILL);
            }
            let keep = alive && !expired;
            if !keep {
                released.push(lingering.pgid);
            }
            keep
        });
        if let Some(guard) = &mut self.guard {
            for pgid in released {
                guard.forget(pgid);
            }
        }
    }

    /// A guard only exits on its own when something killed it: start another one and tell it
    /// every process group there is to watch.
    pub(super) fn replace_lost_guard(&mut self) {
        let Some(guard) = &mut self.guard else { return };
        if !guard.has_exited() {
            return;
        }
        let lost = guard.pid();
        let mut guard = match Guard::start(&self.guard_cleanup) {
            Ok(guard) => guard,
            Err(error) => {
                self.guard = None;
                error!(
                    event = "guard_lost",
                    pid = lost,
                    "the guard process (pid {lost}) was killed and cannot be replaced ({error}): if ustad is killed, what workers started may outlive it"
                );
                return;
            }
        };
        let groups: Vec<u32> = self
            .plan
            .workers()
            .filter_map(|worker| worker.pid)
            .chain(self.lingering.iter().map(|lingering| lingering.pgid))
            .collect();
        for pgid in groups {
            guard.watch(pgid);
        }
        warn!(
            event = "guard_replaced",
            pid = lost,
            new_pid = guard.pid(),
            "the guard process (pid {lost}) was killed; started a new one (pid {})",
            guard.pid()
        );
        self.guard = Some(guard);
    }

    fn is_guard(&self, pid: u32) -> bool {
        self.guard.as_ref().is_some_and(|guard| guard.pid() == pid)
    }

    fn is_hook(&self, pid: u32) -> bool {
        self.hooks.values().any(|&(_, hook)| hook == pid)
    }

    /// Reaps zombies among this process's children that are not workers, hooks or the guard:
    /// processes adopted as a subreaper (or as PID 1). The others are reaped by their own tasks.
    pub(super) fn reap_adopted(&self) {
        for pid in procfs::own_children() {
            if self.plan.worker_by_pid(pid).is_some()
                || self.is_guard(pid)
                || self.is_hook(pid)
                || self.is_upgrade_check(pid)
            {
                continue;
            }
            if procfs::stat(pid).is_some_and(|stat| stat.state == 'Z') {
                if let Some(raw) = Pid::from_raw(pid as i32) {
                    let _ =
                        rustix::process::waitpid(Some(raw), rustix::process::WaitOptions::NOHANG);
                    debug!(pid, "reaped adopted process {pid}");
                }
            }
        }
    }

    /// At exit, every worker is gone; any process still a child of ours escaped a worker's
    /// process group (e.g. with `setsid`) and was adopted: ask it to stop, then kill it.
    pub(super) async fn kill_adopted_orphans(&self) {
        let orphans: Vec<u32> = procfs::own_children()
            .into_iter()
            .filter(|pid| !self.is_guard(*pid) && !self.is_hook(*pid))
            .filter(|pid| procfs::stat(*pid).is_some_and(|s| s.state != 'Z'))
            .collect();
        if orphans.is_empty() {
            self.reap_adopted();
            return;
        }
        for pid in &orphans {
            warn!(
                event = "orphan",
                pid,
                "stopping pid {pid} ({}), left behind by a worker",
                procfs::cmdline(*pid)
            );
            if let Some(raw) = Pid::from_raw(*pid as i32) {
                let _ = rustix::process::kill_process(raw, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            self.reap_adopted();
            if orphans
                .iter()
                .all(|pid| !procfs::own_children().contains(pid))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pid in orphans {
            if let Some(raw) = Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(raw, rustix::process::Signal::KILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.reap_adopted();
    }
}

fn worker_stop_signal(plan: &Plan, id: WorkerId) -> Signal {
    plan.stop_signal_of(id).unwrap_or(Signal::TERM)
}

pub(super) fn worker_kill_timeout(plan: &Plan, id: WorkerId) -> Duration {
    plan.kill_timeout_of(id).unwrap_or(Duration::from_secs(10))
}

/// Sends a signal to a process group; a group that is already gone is not an error.
pub(super) fn signal_group(pgid: u32, signal: Signal) {
    let (Some(pid), Some(signal)) = (
        Pid::from_raw(pgid as i32),
        rustix::process::Signal::from_named_raw(signal.number()),
    ) else {
        return;
    };
    if let Err(error) = kill_process_group(pid, signal) {
        if error != rustix::io::Errno::SRCH {
            warn!("cannot send {signal:?} to process group {pgid}: {error}");
        }
    }
}

fn group_exists(pgid: u32) -> bool {
    Pid::from_raw(pgid as i32).is_some_and(|pid| test_kill_process_group(pid).is_ok())
}
