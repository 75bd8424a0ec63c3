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
