//! The primary's side of the guard (see `sys::fork_guard`): tells it which process groups to
//! kill should the primary die.

use std::io::{self, Write};
use std::os::fd::OwnedFd;

use rustix::process::Pid;
use tracing::warn;

use crate::sys::{self, GUARD_FORGET, GUARD_RECORD, GUARD_WATCH};

#[derive(Debug)]
pub(super) struct Guard {
    /// `None` once closed.
    pipe: Option<std::fs::File>,
    pid: Pid,
    broken: bool,
}

impl Guard {
    pub(super) fn start() -> io::Result<Guard> {
        let (pipe, pid): (OwnedFd, Pid) = sys::fork_guard()?;
        Ok(Guard {
            pipe: Some(pipe.into()),
            pid,
            broken: false,
        })
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
        let _ = rustix::process::waitpid(Some(self.pid), rustix::process::WaitOptions::empty());
    }
}
