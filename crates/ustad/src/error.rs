//! Errors of the library.

/// Starting or running the cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pools and sockets do not make a valid configuration.
    #[error("invalid cluster: {0}")]
    Invalid(String),
    /// The supervisor failed (a socket could not be bound…).
    #[error(transparent)]
    Supervisor(#[from] ustad_core::supervisor::SupervisorError),
    /// An I/O error (the channel to the primary, a listener…).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A message could not be encoded or decoded.
    #[error("message encoding: {0}")]
    Json(#[from] serde_json::Error),
    /// The cluster has stopped.
    #[error("the cluster has stopped")]
    Stopped,
    /// The primary refused a request (unknown pool…).
    #[error("{0}")]
    Refused(String),
}

/// A request to a worker, or to the primary, did not get its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No answer within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The worker exited (or its channel closed) before it answered.
    #[error("worker {0} is gone")]
    WorkerGone(u64),
    /// No such worker, or it has no channel.
    #[error("no worker {0} to send to")]
    NoWorker(u64),
    /// The other side answered with an error.
    #[error("the request failed: {0}")]
    Failed(String),
    /// The answer did not fit the expected type, or the request could not be encoded.
    #[error("bad message: {0}")]
    Encoding(String),
    /// The message is larger than the other side accepts (`Pool::max_message`).
    #[error("a message of {size} bytes exceeds the limit of {max} bytes (max_message)")]
    TooLarge {
        /// The encoded message's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// No ready worker in the pool, after every retry.
    #[error("no worker of pool {pool} completed the task after {attempts} attempts: {last}")]
    Exhausted {
        /// The pool.
        pool: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The cluster has stopped.
    #[error("the cluster has stopped")]
    Stopped,
    /// The worker cannot take this (a request to a Node worker, which takes messages only).
    #[error("{0}")]
    NotSupported(&'static str),
}
