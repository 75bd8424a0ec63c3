//! What `ustad top` knows about the cluster, updated from what the feed threads report.
//!
//! Kept apart from the terminal so that the decisions — when the primary counts as gone, when
//! to leave — are plain functions of (state, update, now), tested without a primary.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use ustad_core::control::protocol::EventRecord;
use ustad_core::status::ClusterStatus;

/// Events kept for the "recent events" pane; more than any terminal shows.
pub(crate) const MAX_EVENTS: usize = 200;

/// How long "ustad (pid N) is gone" stays on screen before `top` exits by itself.
pub(crate) const GONE_GRACE: Duration = Duration::from_secs(2);

/// What a feed thread reports.
#[derive(Debug)]
pub(crate) enum Update {
    /// A fresh snapshot.
    Status(ClusterStatus),
    /// A `status` request failed; `gone` when nothing listens any more.
    StatusFailed { message: String, gone: bool },
    /// The events stream is (again) open.
    EventsConnected,
    /// A lifecycle event.
    Event(EventRecord),
    /// The events stream broke; the feed reconnects.
    EventsLost { message: String },
}

/// The primary stopped answering for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone {
    /// Its pid, from the last snapshot.
    pub(crate) pid: u32,
    /// When it was noticed.
    pub(crate) since: Instant,
}

/// Everything the view shows.
#[derive(Debug)]
pub(crate) struct Model {
    /// The last snapshot (kept on screen when a later request fails).
    pub(crate) status: ClusterStatus,
    /// Why the last `status` request failed, while it keeps failing.
    pub(crate) problem: Option<String>,
    /// Recent events, newest last.
    pub(crate) events: VecDeque<EventRecord>,
    /// Why the events stream is down, while it is.
    pub(crate) events_problem: Option<String>,
    /// Set once the primary is gone; never cleared.
    pub(crate) gone: Option<Gone>,
}

impl Model {
    /// A model that starts from the first snapshot.
    pub(crate) fn new(status: ClusterStatus) -> Model {
        Model {
            status,
            problem: None,
            events: VecDeque::new(),
            events_problem: None,
            gone: None,
        }
    }

    /// Takes in one update.
    pub(crate) fn apply(&mut self, update: Update, now: Instant) {
        match update {
            Update::Status(status) => {
                // After "gone", a snapshot could only come from a new primary on the same socket:
                // the one this view was about is still gone.
                if self.gone.is_none() {
                    self.status = status;
                    self.problem = None;
                }
            }
            Update::StatusFailed { message, gone } => {
                self.problem = Some(message);
                if gone && self.gone.is_none() {
                    self.gone = Some(Gone {
                        pid: self.status.pid,
                        since: now,
                    });
                }
            }
            Update::EventsConnected => self.events_problem = None,
            Update::Event(event) => {
                self.events_problem = None;
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(event);
            }
            Update::EventsLost { message } => self.events_problem = Some(message),
        }
    }

    /// Whether `top` should exit by itself: the primary has been gone a moment.
    pub(crate) fn should_exit(&self, now: Instant) -> bool {
        self.gone
            .is_some_and(|gone| now.saturating_duration_since(gone.since) >= GONE_GRACE)
    }

    /// How `top` ends when it ends now: an error once the primary is gone.
    pub(crate) fn outcome(&self) -> anyhow::Result<()> {
        match self.gone {
            Some(gone) => Err(anyhow::anyhow!("ustad (pid {}) is gone", gone.pid)),
            None => Ok(()),
        }
    }
}

/// Whether a failed request means that the primary is gone (rather than slow or confused):
/// nothing listens on the socket, it is not there, or the primary hung up without answering.
pub(crate) fn means_gone(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn status(pid: u32) -> ClusterStatus {
        ClusterStatus {
            name: "demo".into(),
            pid,
            uptime_secs: 10.0,
            config_file: None,
            shutting_down: false,
            pools: Vec::new(),
            version: String::new(),
            upgrade: None,
        }
    }

    pub(crate) fn event(time: f64, name: &str) -> EventRecord {
        EventRecord {
            time,
            event: name.into(),
            pool: Some("web".into()),
            id: Some(3),
            slot: Some(0),
            pid: Some(1003),
            generation: Some(1),
            code: None,
            signal: None,
            reason: None,
            message: format!("worker {name}"),
        }
    }

    #[test]
    fn a_refused_connection_means_gone_and_top_exits_after_the_grace() {
        let start = Instant::now();
        let mut model = Model::new(status(42));
        model.apply(
            Update::StatusFailed {
                message: "timed out".into(),
                gone: false,
            },
            start,
        );
        assert_eq!(model.gone, None, "a slow primary is not gone");
        assert!(model.outcome().is_ok());

        model.apply(
            Update::StatusFailed {
                message: "refused".into(),
                gone: true,
            },
            start,
        );
        assert!(!model.should_exit(start));
        assert!(model.should_exit(start + GONE_GRACE));
        let error = model.outcome().unwrap_err().to_string();
        assert_eq!(error, "ustad (pid 42) is gone");

        // A later answer on the same socket is another primary: still gone.
        model.apply(Update::Status(status(43)), start);
        assert_eq!(model.status.pid, 42);
        assert!(model.gone.is_some());
    }

    #[test]
    fn a_fresh_snapshot_clears_the_problem() {
        let now = Instant::now();
        let mut model = Model::new(status(1));
        model.apply(
            Update::StatusFailed {
                message: "timed out".into(),
                gone: false,
            },
            now,
        );
        assert!(model.problem.is_some());
        model.apply(Update::Status(status(1)), now);
        assert_eq!(model.problem, None);
    }

    #[test]
    fn events_are_bounded_and_reconnects_noted() {
        let now = Instant::now();
        let mut model = Model::new(status(1));
        for i in 0..MAX_EVENTS + 5 {
            model.apply(Update::Event(event(i as f64, "ready")), now);
        }
        assert_eq!(model.events.len(), MAX_EVENTS);
        assert_eq!(model.events.front().unwrap().time, 5.0);
        model.apply(
            Update::EventsLost {
                message: "closed".into(),
            },
            now,
        );
        assert_eq!(model.events_problem.as_deref(), Some("closed"));
        model.apply(Update::EventsConnected, now);
        assert_eq!(model.events_problem, None);
    }

    #[test]
    fn gone_is_told_by_the_error_kind() {
        assert!(means_gone(io::ErrorKind::ConnectionRefused));
        assert!(means_gone(io::ErrorKind::NotFound));
        assert!(means_gone(io::ErrorKind::UnexpectedEof));
        assert!(!means_gone(io::ErrorKind::WouldBlock));
        assert!(!means_gone(io::ErrorKind::TimedOut));
        assert!(!means_gone(io::ErrorKind::InvalidData));
    }
}
