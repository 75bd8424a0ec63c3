//! The only `unsafe` in this crate: taking ownership of the fds inherited through socket
//! activation, and of the message channel a library primary passes.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};

/// The first inherited fd (`SD_LISTEN_FDS_START`).
pub(crate) use ustad_proto::env::LISTEN_FDS_START;

/// Set once the inherited fds have been turned into [`OwnedFd`]s, so that no fd is ever owned
/// twice (a second owner would close it under the first).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why [`take_listen_fds`] failed.
#[derive(Debug)]
pub(crate) enum TakeError {
    /// An earlier call already took the fds.
    AlreadyTaken,
    /// `3 + count` overflows the fd range.
    TooMany,
    /// The fd is not open (or `fcntl` failed on it for another reason).
    Fd { fd: RawFd, source: io::Error },
}

/// Takes ownership of fds `3..3 + count`, marking each close-on-exec.
///
/// Succeeds at most once per process; on failure nothing is taken (and nothing closed), and a
/// later call may try again. The caller has checked that `LISTEN_PID` names this process, which
/// is what makes these fds ours: the supervisor placed them there for us alone.
pub(crate) fn take_listen_fds(count: usize) -> Result<Vec<OwnedFd>, TakeError> {
    let end = RawFd::try_from(count)
        .ok()
        .and_then(|count| LISTEN_FDS_START.checked_add(count))
        .ok_or(TakeError::TooMany)?;
    let fds: Vec<RawFd> = (LISTEN_FDS_START..end).collect();
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(TakeError::AlreadyTaken);
    }
    // Check every fd before owning any, so that a failure leaves the fds untouched.
    for &fd in &fds {
        // SAFETY: the borrow lives only for this one `fcntl` call. Nothing else in this process
        // owns fds handed over by socket activation (`TAKEN` guards against a second taker),
        // so nothing can close it during the call; if it is not open, `fcntl` reports EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = fcntl_getfd(borrowed)
            .and_then(|flags| fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC))
            .map_err(|err| TakeError::Fd {
                fd,
                source: err.into(),
            });
        if let Err(err) = flags {
            TAKEN.store(false, Ordering::Release);
            return Err(err);
        }
    }
    let owned = fds
        .into_iter()
        .map(|fd| {
            // SAFETY: `fd` is open (checked above) and, per the socket activation protocol with
            // LISTEN_PID naming us, ours alone; `TAKEN` makes this the only `OwnedFd` for it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    Ok(owned)
}

/// Set once the channel fd has been taken.
static CHANNEL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of `fd`, the message channel the primary named in `USTAD_IPC_FD`, marking
/// it close-on-exec. Succeeds at most once per process.
pub(crate) fn take_channel_fd(fd: RawFd) -> Result<OwnedFd, TakeError> {
    if fd < LISTEN_FDS_START {
        return Err(TakeError::Fd {
            fd,
            source: io::Error::new(io::ErrorKind::InvalidInput, "below 3 (stdio)"),
        });
    }
    if CHANNEL_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(TakeError::AlreadyTaken);
    }
    // SAFETY: as in `take_listen_fds`: a borrow for one `fcntl` call; `CHANNEL_TAKEN` makes
    // this the only taker of the fd the primary placed for us, so nothing closes it meanwhile.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(err) =
        fcntl_getfd(borrowed).and_then(|flags| fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC))
    {
        CHANNEL_TAKEN.store(false, Ordering::Release);
        return Err(TakeError::Fd {
            fd,
            source: err.into(),
        });
    }
    // SAFETY: `fd` is open (checked above) and was passed to this process alone by the
    // primary; `CHANNEL_TAKEN` makes this the only `OwnedFd` for it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
