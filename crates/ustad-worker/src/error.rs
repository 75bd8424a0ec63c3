//! The one error type of this crate.

use std::io;
use std::os::fd::RawFd;

/// What can go wrong when a worker reads what its supervisor handed it.
///
/// Grouped by what to do about it: `InvalidEnv`, `MissingEnv` and `MissingFd` mean the process was started
/// wrongly (fix the supervisor or the command line); `WrongSocketKind` means the configuration
/// gives this worker a kind of socket it cannot serve; the rest are bugs or resource limits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable set by the supervisor has a value this crate cannot use.
    #[error("{var}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable, e.g. `LISTEN_FDS`.
        var: &'static str,
        /// Its value (lossily converted to UTF-8).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An environment variable is missing while related ones are set.
    #[error("{var} is unset, but {reason}")]
    MissingEnv {
        /// The missing variable, e.g. `USTAD_WORKER_ID`.
        var: &'static str,
        /// Why it is expected.
        reason: &'static str,
    },
    /// `LISTEN_FDS` promises an fd that is not open in this process.
    #[error("LISTEN_FDS promises fd {fd}, but it is not open in this process: {source}")]
    MissingFd {
        /// The missing fd.
        fd: RawFd,
        /// The error from `fcntl`.
        source: io::Error,
    },
    /// `USTAD_IPC_FD` names an fd that is not open, or it was already taken.
    #[error("USTAD_IPC_FD names fd {fd}, which cannot be used: {reason}")]
    Channel {
        /// The fd.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// [`listen_fds`](crate::listen_fds) was called a second time: the fds belong to whoever
    /// took them first.
    #[error("the inherited listening sockets were already taken by an earlier listen_fds() call")]
    AlreadyTaken,
    /// An inherited socket is not the kind the caller asked for.
    #[error("listening socket {name:?} (fd {fd}) is {found}, not {expected}")]
    WrongSocketKind {
        /// The socket's name from `LISTEN_FDNAMES`.
        name: String,
        /// The socket's fd number.
        fd: RawFd,
        /// What the caller asked for, e.g. "a listening TCP socket".
        expected: &'static str,
        /// What it is, e.g. "a Unix stream socket".
        found: String,
    },
    /// The socket used to send notifications could not be created.
    #[error("cannot create a socket to notify the supervisor: {source}")]
    NotifySocket {
        /// The error from `socket(2)`.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn invalid_env(var: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Error::InvalidEnv {
            var,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}
