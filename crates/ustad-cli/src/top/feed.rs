//! The two threads that talk to the primary for `ustad top`: one asks for a snapshot every
//! interval, one keeps an `events` stream open (and reopens it when it breaks). Both hand
//! what they get to the screen loop over a channel, so that a slow primary never freezes the
//! keyboard.
//!
//! The control client blocks, and an `events` stream is quiet for as long as nothing happens:
//! the events thread cannot be woken to stop. Neither needs to be: both end when they find the
//! channel closed, and `ustad top` exits its process right after the screen loop anyway.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::Duration;

use ustad_core::control::client;
use ustad_core::control::protocol::{Reply, Request};
use ustad_core::status::ClusterStatus;

use super::model::{Update, means_gone};

/// How long a `status` answer may take before the screen says that there is none.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause before reopening a broken events stream; doubled up to the cap while it
/// keeps failing, so that a primary that refuses `events` is not asked every second forever.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(8);

/// One snapshot, or why there is none (and whether the primary is gone).
pub(crate) fn fetch_status(socket: &Path) -> Result<ClusterStatus, (io::Error, bool)> {
    let failed = |error: io::Error| {
        let gone = means_gone(error.kind());
        (error, gone)
    };
    let answer = client::send(socket, &Request::Status {}).map_err(failed)?;
    answer.set_timeout(Some(STATUS_TIMEOUT)).map_err(failed)?;
    match answer.finish(|_| ()).map_err(failed)? {
        Reply::Status(status) => Ok(status),
        Reply::Error { message } => Err((io::Error::other(message), false)),
        other => Err((
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to `status`: {other:?}"),
            ),
            false,
        )),
    }
}

/// Asks for a snapshot every `interval` (the first after one interval: the caller has one)
/// until the primary is gone or nobody listens.
pub(crate) fn spawn_status(
    socket: PathBuf,
    interval: Duration,
    updates: Sender<Update>,
) -> io::Result<()> {
    thread::Builder::new()
        .name("top-status".into())
        .spawn(move || {
            loop {
                thread::sleep(interval);
                let (update, gone) = match fetch_status(&socket) {
                    Ok(status) => (Update::Status(status), false),
                    Err((error, gone)) => (
                        Update::StatusFailed {
                            message: error.to_string(),
                            gone,
                        },
                        gone,
                    ),
                };
                if updates.send(update).is_err() || gone {
                    return;
                }
            }
        })
        .map(drop)
}

/// Keeps an `events` stream open, passing each event on.
pub(crate) fn spawn_events(socket: PathBuf, updates: Sender<Update>) -> io::Result<()> {
    thread::Builder::new()
        .name("top-events".into())
        .spawn(move || {
            let mut pause = RECONNECT_FIRST;
            loop {
                let (lost, got_any) = follow_events(&socket, &updates);
                let Some(message) = lost else {
                    return; // nobody listens any more
                };
                if updates.send(Update::EventsLost { message }).is_err() {
                    return;
                }
                pause = if got_any {
                    RECONNECT_FIRST
                } else {
                    (pause * 2).min(RECONNECT_CAP)
                };
                thread::sleep(pause);
            }
        })
        .map(drop)
}

/// Reads one `events` stream to its end: why it ended (`None` when the channel closed), and
/// whether it delivered anything.
fn follow_events(socket: &Path, updates: &Sender<Update>) -> (Option<String>, bool) {
    let mut answer = match client::send(socket, &Request::Events {}) {
        Ok(answer) => answer,
        Err(error) => return (Some(error.to_string()), false),
    };
    if updates.send(Update::EventsConnected).is_err() {
        return (None, false);
    }
    let mut got_any = false;
    loop {
        let update = match answer.next_reply() {
            Ok(Some(Reply::Event(event))) => Update::Event(event),
            Ok(Some(Reply::Error { message })) => return (Some(message), got_any),
            Ok(Some(_)) => continue, // nothing else belongs in this stream; skip it
            Ok(None) => return (Some("the primary closed the stream".into()), got_any),
            Err(error) => return (Some(error.to_string()), got_any),
        };
        got_any = true;
        if updates.send(update).is_err() {
            return (None, got_any);
        }
    }
}
