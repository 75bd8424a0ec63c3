//! The message channel a library primary gives each of its workers: one end of a Unix stream
//! socket pair, at the fd named by `USTAD_IPC_FD` (see `docs/protocol.md`).

use std::os::fd::{OwnedFd, RawFd};

use crate::error::Error;
use crate::sys::{self, TakeError};
use crate::vars::{USTAD_IPC_FD, USTAD_IPC_MAX_FRAME};

/// Takes this worker's end of the channel: `None` when there is none (a worker of the `ustad`
/// command, which speaks sd_notify instead). At most once per process.
///
/// # Errors
/// When `USTAD_IPC_FD` is not a number, names an fd that is not open, or was taken already.
pub fn take_channel() -> Result<Option<OwnedFd>, Error> {
    let value = std::env::var_os(USTAD_IPC_FD);
    let Some(text) = crate::env_str(USTAD_IPC_FD, value.as_deref())? else {
        return Ok(None);
    };
    let fd: RawFd = text
        .trim()
        .parse()
        .map_err(|_| Error::invalid_env(USTAD_IPC_FD, text, "not an fd number"))?;
    match sys::take_channel_fd(fd) {
        Ok(owned) => Ok(Some(owned)),
        Err(TakeError::AlreadyTaken) => Err(Error::Channel {
            fd,
            reason: "it was already taken".to_owned(),
        }),
        Err(TakeError::TooMany) => Err(Error::Channel {
            fd,
            reason: "out of range".to_owned(),
        }),
        Err(TakeError::Fd { source, .. }) => Err(Error::Channel {
            fd,
            reason: source.to_string(),
        }),
    }
}

/// The largest frame the primary accepts (`USTAD_IPC_MAX_FRAME`), if it said.
///
/// # Errors
/// When the variable is set but not a number.
pub fn max_frame() -> Result<Option<usize>, Error> {
    let value = std::env::var_os(USTAD_IPC_MAX_FRAME);
    crate::env_str(USTAD_IPC_MAX_FRAME, value.as_deref())?
        .map(|text| {
            text.trim()
                .parse()
                .map_err(|_| Error::invalid_env(USTAD_IPC_MAX_FRAME, text, "not a number of bytes"))
        })
        .transpose()
}
