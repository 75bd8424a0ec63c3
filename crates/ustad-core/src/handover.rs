//! File descriptors across an upgrade, when the primary executes its new program in place:
//! the old program marks each fd it hands over to survive `execve` and writes its number in
//! the handover document; the new program takes each number back, once, as the owner of that
//! fd ([`HandedFds`]).
//!
//! Each part of the primary that holds fds (sockets, the notify and control sockets, the
//! guard's pipe, workers' pipes and channels) describes what it holds as plain numbers
//! (`hand_over`) and is rebuilt from them (`take_over`); the document that carries them is
//! the supervisor's (`supervisor::upgrade`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};

/// Marks `fd` to survive (`true`) or not survive (`false`) the next `execve`.
///
/// # Errors
/// When its flags cannot be changed (it is not open).
pub fn keep_across_exec(fd: impl AsFd, keep: bool) -> io::Result<()> {
    let flags = if keep {
        rustix::io::FdFlags::empty()
    } else {
        rustix::io::FdFlags::CLOEXEC
    };
    rustix::io::fcntl_setfd(fd, flags).map_err(Into::into)
}

/// The fds a previous program of this process handed over, by number, until each is taken.
#[derive(Debug, Default)]
pub struct HandedFds {
    fds: HashMap<RawFd, io::Result<OwnedFd>>,
}

impl HandedFds {
    /// Takes ownership of `numbers` (the handover document's list): each must be open, and
    /// is listed once. Can be done once per process: a second call finds nothing.
    pub fn take(numbers: &[RawFd]) -> HandedFds {
        let taken = crate::sys::take_handed_fds(numbers).unwrap_or_default();
        HandedFds {
            fds: numbers.iter().copied().zip(taken).collect(),
        }
    }

    /// The fd handed over as `number`.
    ///
    /// # Errors
    /// When it was not handed over, could not be taken, or was taken already.
    pub fn get(&mut self, number: RawFd, what: &str) -> io::Result<OwnedFd> {
        match self.fds.remove(&number) {
            Some(Ok(fd)) => Ok(fd),
            Some(Err(error)) => Err(io::Error::new(
                error.kind(),
                format!("{what} (fd {number}): {error}"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{what} (fd {number}) was not handed over, or is taken twice"),
            )),
        }
    }

    /// The fds no part took: closed when this is dropped.
    pub fn untaken(&self) -> Vec<RawFd> {
        let mut left: Vec<RawFd> = self.fds.keys().copied().collect();
        left.sort_unstable();
        left
    }
}

/// The numbers of fds being handed over, collected from each part, each marked to survive
/// the exec; [`Keep::undo`] marks them close-on-exec again when the exec failed. It also owns
/// the fds opened only to be handed over ([`Keep::own`]): they live until the exec, and are
/// closed with it when the exec does not happen.
#[derive(Debug, Default)]
pub struct Keep {
    numbers: Vec<RawFd>,
    owned: Vec<OwnedFd>,
}

impl Keep {
    /// Marks `fd` to survive the exec and returns its number, for the document.
    ///
    /// # Errors
    /// When its flags cannot be changed.
    pub fn fd(&mut self, fd: impl AsFd) -> io::Result<RawFd> {
        use std::os::fd::AsRawFd;
        let fd = fd.as_fd();
        keep_across_exec(fd, true)?;
        let number = fd.as_raw_fd();
        self.numbers.push(number);
        Ok(number)
    }

    /// Marks `fd`, opened only to be handed over, to survive the exec, keeps it open until
    /// then and returns its number, for the document.
    ///
    /// # Errors
    /// When its flags cannot be changed (it is closed then).
    pub fn own(&mut self, fd: OwnedFd) -> io::Result<RawFd> {
        let number = self.fd(&fd)?;
        self.owned.push(fd);
        Ok(number)
    }

    /// Every number kept, in the order kept.
    pub fn numbers(&self) -> &[RawFd] {
        &self.numbers
    }

    /// The exec did not happen: every fd kept is close-on-exec again, as every fd of the
    /// primary is, and those opened only to be handed over are closed.
    pub fn undo(self) {
        crate::sys::close_on_exec(&self.numbers);
    }
}

/// Closes every fd from 3 up that is not close-on-exec: what a previous program handed over
/// and nothing took (every fd this program opens is close-on-exec). For a new program that
/// could not take its handover and starts afresh: the sockets must be closed to be bound again.
pub fn close_leftovers() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let numbers: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    crate::sys::close_inherited(&numbers);
}
