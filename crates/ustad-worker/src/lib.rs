//! The worker side of ustad: what a process started by the supervisor receives, and how it
//! talks back. No async runtime, no CLI: a worker depends on this crate alone.
//!
//! # What a worker receives
//!
//! - **Listening sockets** as fds 3, 4, … with `LISTEN_FDS=<n>`, `LISTEN_FDNAMES=<a>:<b>…` and
//!   `LISTEN_PID=<its own pid>`: systemd's socket activation. Every worker of a pool shares the
//!   same sockets (the supervisor opened them once), so the kernel spreads connections over
//!   whoever is accepting, and a worker that stops accepting leaves its queued connections to
//!   the others. Take them with [`listen_fds`].
//! - **A notification socket** in `NOTIFY_SOCKET`, speaking the `sd_notify` protocol: send
//!   `READY=1` once serving (the supervisor holds back a rollout until then), `STOPPING=1` when
//!   draining, `STATUS=…` for humans, and `USTAD_REQUEST=restart` to ask for a replacement.
//!   Use [`Notifier`] or [`notify`].
//! - **Its identity**: `USTAD_POOL`, `USTAD_WORKER_ID` and `USTAD_WORKER_INDEX`, read by
//!   [`Identity::from_env`].
//! - **SIGTERM** to stop: finish in-flight work, then exit 0.
//!
//! All readers treat unset variables as "not running under ustad" and malformed ones as an
//! [`Error`] naming the variable. None of them changes the environment.
//!
//! # Example
//!
//! A blocking worker that serves one line per connection:
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let identity = ustad_worker::Identity::from_env()?;
//!     let mut listeners = Vec::new();
//!     for fd in ustad_worker::listen_fds()? {
//!         listeners.push(fd.into_tcp_listener()?);
//!     }
//!     let listener = listeners.pop().ok_or("no sockets: run me under `ustad run`")?;
//!     if let Some(notifier) = ustad_worker::Notifier::from_env()? {
//!         notifier.ready()?;
//!     }
//!     for stream in listener.incoming() {
//!         let who = identity.as_ref().map_or("?".to_owned(), |id| id.to_string());
//!         writeln!(stream?, "hello from {who}")?;
//!     }
//!     Ok(())
//! }
//! ```

mod channel;
mod error;
mod identity;
mod listen;
mod notify;
mod sys;

/// Names of the environment variables a supervisor sets for its workers: those of
/// [`ustad_proto::env`], the one list both the supervisor and this crate use.
pub use ustad_proto::env as vars;

use std::ffi::OsStr;

pub use channel::{max_frame, take_channel};
pub use error::Error;
pub use identity::Identity;
pub use listen::{ListenFd, listen_fds};
pub use notify::{Notifier, notify};

/// An environment value as UTF-8, or an error naming the variable.
fn env_str<'a>(var: &'static str, value: Option<&'a OsStr>) -> Result<Option<&'a str>, Error> {
    value
        .map(|value| {
            value
                .to_str()
                .ok_or_else(|| Error::invalid_env(var, &value.to_string_lossy(), "not valid UTF-8"))
        })
        .transpose()
}
