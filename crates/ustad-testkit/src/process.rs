//! Child processes that cannot outlive the test: each in its own process group, killed with the
//! whole group on drop, and killed by the kernel if the test dies first.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::sys;

/// How often [`ProcessGuard::wait_timeout`] polls the child.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A spawned child that leads its own process group and takes that group down with it.
///
/// On drop, the guard sends SIGKILL to the whole group (`kill(-pgid, SIGKILL)`), which includes
/// any grandchildren that stayed in it, and reaps the child.
///
/// # Caveats
///
/// The child gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the test process even if the
/// test is killed. Linux ties that signal to the *thread* that forked the child, not to the
/// process: create the guard on the test's own thread. A guard created on a helper thread that
/// then exits kills the child at once.
///
/// The death signal reaches only the direct child: grandchildren that left its process group
/// survive the test's death (they are still killed by the guard's drop if they stayed in the
/// group).
pub struct ProcessGuard {
    child: Child,
    pid: u32,
    status: Option<ExitStatus>,
}

impl fmt::Debug for ProcessGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGuard")
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

impl ProcessGuard {
    /// Spawns `cmd` as the leader of a new process group, with a parent-death signal.
    ///
    /// Stdio and environment are whatever `cmd` says; see [`pass_fds`] to hand it sockets.
    /// (Each call adds a `pre_exec` hook to `cmd`: spawn a given `Command` once.)
    ///
    /// # Errors
    ///
    /// Whatever [`Command::spawn`] returns.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        cmd.process_group(0);
        sys::kill_on_parent_death(cmd);
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok(Self {
            child,
            pid,
            status: None,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's process group id (the same number as its pid).
    pub fn pgid(&self) -> u32 {
        self.pid
    }

    /// The underlying child, to take its piped stdio.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` to the child only.
    ///
    /// # Errors
    ///
    /// `ESRCH` if the child has already been reaped (its pid may have been reused since).
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        rustix::process::kill_process(to_pid(self.pid), sig)?;
        Ok(())
    }

    /// Sends `sig` to every process in the child's process group.
    ///
    /// # Errors
    ///
    /// `ESRCH` if the group has no member left.
    pub fn signal_group(&self, sig: Signal) -> io::Result<()> {
        rustix::process::kill_process_group(to_pid(self.pid), sig)?;
        Ok(())
    }

    /// Reaps the child if it has exited, without blocking.
    ///
    /// # Errors
    ///
    /// Whatever [`Child::try_wait`] returns.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit, and returns its status (`None` if it is still
    /// running). Polls every few milliseconds.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(e) => panic!("waiting for pid {}: {e}", self.pid),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends SIGKILL to the whole process group and reaps the child (what drop does).
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.signal_group(Signal::KILL);
        if let Some(status) = self.status {
            return status;
        }
        // The child may have left the group (setsid): kill it by pid too.
        let _ = rustix::process::kill_process(to_pid(self.pid), Signal::KILL);
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("reaping pid {}: {e}", self.pid));
        self.status = Some(status);
        status
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        // Kill the group even if the child was already reaped: grandchildren may remain in it.
        // While the group has a member its id cannot be handed to a new process; once it is
        // empty, only a stranger that reused the pid *and* leads its own group could be hit.
        let _ = self.signal_group(Signal::KILL);
        if self.status.is_none() {
            let _ = rustix::process::kill_process(to_pid(self.pid), Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// Arranges for `fds` to be the child's fds 3, 4, … (in order), the way a socket-activated
/// process expects them, and marks every other inherited fd above them close-on-exec.
///
/// Sets no environment: add `LISTEN_FDS` (and `LISTEN_PID`, which only the child itself can
/// know: run it through `/bin/sh -c 'LISTEN_PID=$$ exec "$0" "$@"'`) yourself. The fds are closed
/// in this process when `cmd` is dropped.
///
/// # Caveats
///
/// If the test process happens to hold the internal pipe that [`Command::spawn`] uses to report
/// an exec failure at one of the target numbers, that pipe is replaced: an exec failure is then
/// no longer reported as a spawn error. Spawn programs that exist.
///
/// # Panics
///
/// If more than 64 fds are given.
pub fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) {
    sys::pass_fds(cmd, fds);
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let Some(pid_) = Pid::from_raw(raw) else {
        return false;
    };
    match rustix::process::test_kill_process(pid_) {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => {}
        Err(_) => return false,
    }
    match proc_stat(pid) {
        Some(stat) => !stat.is_dead(),
        // Gone between the two checks.
        None => false,
    }
}

/// Waits (polling every few milliseconds) until process `pid` is gone or a zombie; false if it
/// is still alive after `timeout`. A SIGKILL is delivered asynchronously: `kill` returns before
/// the target is dead.
pub fn wait_dead(pid: u32, timeout: Duration) -> bool {
    poll_until(timeout, || !pid_alive(pid))
}

/// Waits (polling every few milliseconds) until process group `pgid` has no live member; false
/// if some member is still alive after `timeout`.
pub fn wait_group_dead(pgid: u32, timeout: Duration) -> bool {
    poll_until(timeout, || !group_alive(pgid))
}

fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether process group `pgid` has a member that is not a zombie.
///
/// Scans `/proc`, so that zombies (which an init process in a container may never reap) do not
/// count as alive.
pub fn group_alive(pgid: u32) -> bool {
    !group_members(pgid).is_empty()
}

/// The pids of the live (non-zombie) members of process group `pgid`, from `/proc`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return members;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if proc_stat(pid).is_some_and(|stat| stat.pgrp == pgid && !stat.is_dead()) {
            members.push(pid);
        }
    }
    members.sort_unstable();
    members
}

/// The children of `ppid` (live or zombie), from `/proc`.
pub(crate) fn children_of(ppid: u32) -> Vec<(u32, u32)> {
    let mut children = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(pid).filter(|stat| stat.ppid == ppid) {
            children.push((pid, stat.pgrp));
        }
    }
    children
}

/// The few fields of `/proc/<pid>/stat` the helpers need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcStat {
    pub(crate) state: u8,
    pub(crate) ppid: u32,
    pub(crate) pgrp: u32,
}

impl ProcStat {
    pub(crate) fn is_dead(&self) -> bool {
        // Z: zombie, X: dead (being reaped).
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp …": comm may contain spaces and parentheses, so split after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid, pgrp })
}

fn to_pid(pid: u32) -> Pid {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("invalid pid {pid}"))
}
