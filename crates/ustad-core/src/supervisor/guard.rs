//! The primary's side of the guard (see `sys::fork_guard`): tells it which process groups to
//! kill should the primary die.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::process::Pid;
use tracing::warn;

use crate::sys::{self, GUARD_FORGET, GUARD_RECORD, GUARD_WATCH};

/// A [`Guard`] as numbers, for an upgrade's handover document.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct HandedGuard {
    pid: u32,
    pipe: std::os::fd::RawFd,
}

#[derive(Debug)]
pub(super) struct Guard {
    /// `None` once closed.
    pipe: Option<std::fs::File>,
    pid: Pid,
    broken: bool,
    reaped: bool,
}

impl Guard {
    /// Forks a guard that, once the primary is gone, kills the groups it was told to watch
    /// and removes the `cleanup` paths (see `sys::fork_guard`).
    pub(super) fn start(cleanup: &[PathBuf]) -> io::Result<Guard> {
        let cleanup = cleanup
            .iter()
            .map(|path| CString::new(path.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let (pipe, pid): (OwnedFd, Pid) = sys::fork_guard(&cleanup)?;
        Ok(Guard {
            pipe: Some(pipe.into()),
            pid,
            broken: false,
            reaped: false,
        })
    }

    /// Describes the guard for an upgrade's handover document: its pid, and its pipe, marked
    /// to survive the exec (the guard must never see end-of-file while the primary lives).
    pub(super) fn hand_over(&self, keep: &mut crate::handover::Keep) -> io::Result<HandedGuard> {
        let pipe = self
            .pipe
            .as_ref()
            .filter(|_| !self.broken)
            .ok_or_else(|| io::Error::other("the guard's pipe is closed"))?;
        Ok(HandedGuard {
            pid: self.pid(),
            pipe: keep.fd(pipe)?,
        })
    }

    /// The guard `handed` describes, a child of this process since before the exec.
    pub(super) fn take_over(
        handed: &HandedGuard,
        fds: &mut crate::handover::HandedFds,
    ) -> io::Result<Guard> {
        let pipe = fds.get(handed.pipe, "the guard's pipe")?;
        let pid = Pid::from_raw(i32::try_from(handed.pid).unwrap_or(0))
            .ok_or_else(|| io::Error::other(format!("guard pid {} is not a pid", handed.pid)))?;
        Ok(Guard {
            pipe: Some(pipe.into()),
            pid,
            broken: false,
            reaped: false,
        })
    }

    /// Reaps the guard if it has exited (it only does so on its own when it was killed).
    pub(super) fn has_exited(&mut self) -> bool {
        if !self.reaped {
            self.reaped = matches!(
                rustix::process::waitpid(Some(self.pid), rustix::process::WaitOptions::NOHANG),
                Ok(Some(_)) | Err(_)
            );
        }
        self.reaped
    }

    pub(super) fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get().unsigned_abs()
    }

    /// From now on, the guard kills this process group if the primary dies.
    pub(super) fn watch(&mut self, pgid: u32) {
        self.send(GUARD_WATCH, pgid);
    }

    /// The group is gone (or handled): the guard forgets it.
    pub(super) fn forget(&mut self, pgid: u32) {
        self.send(GUARD_FORGET, pgid);
    }

    fn send(&mut self, op: u8, pgid: u32) {
        let Some(pipe) = self.pipe.as_mut().filter(|_| !self.broken) else {
            return;
        };
        let mut record = [0u8; GUARD_RECORD];
        record[0] = op;
        record[1..].copy_from_slice(&(pgid as i32).to_ne_bytes());
        // A record is smaller than PIPE_BUF, so the write is atomic.
        if let Err(error) = pipe.write_all(&record) {
            self.broken = true;
            warn!(
                event = "guard_lost",
                "the guard process is gone ({error}): if ustad is killed, what workers started may outlive it"
            );
        }
    }
}

impl Drop for Guard {
    /// Closes the pipe, so the guard exits at once, and reaps it.
    fn drop(&mut self) {
        drop(self.pipe.take());
        if self.reaped {
            // Waiting again could block on an unrelated child that reused the pid.
            return;
        }
        let _ = rustix::process::waitpid(Some(self.pid), rustix::process::WaitOptions::empty());
    }
}
