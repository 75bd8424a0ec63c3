//! Datagrams on the notify socket: each is attributed to the worker that sent it (or a process
//! of its group) and its messages go to the plan; anything else is dropped, and logged no
//! more than a few times in a while, so that a hostile worker cannot flood the log.

use std::io;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Supervisor;
use crate::notify::Datagram;
use crate::plan::{Event, WorkerId};
use crate::procfs;

impl Supervisor {
    /// A datagram on the notify socket: the messages of a worker, or dropped (and logged,
    /// within the rate limit).
    pub(super) fn on_datagram(&mut self, received: io::Result<Datagram>) {
        let now = Instant::now();
        let datagram = match received {
            Ok(datagram) => datagram,
            Err(error) => {
                if let Some(suppressed) = self.rejections.allow(now) {
                    warn!(
                        event = "notify_error",
                        suppressed, "reading the notify socket failed: {error}"
                    );
                }
                return;
            }
        };
        let worker = datagram.pid.and_then(|pid| self.attribute(pid));
        match (worker, datagram.content) {
            (Some(id), Ok(messages)) => {
                for message in messages {
                    self.handle(Event::Message { id, message });
                }
            }
            (worker, content) => {
                let why = match (&worker, content) {
                    (None, _) => "the sender is not a worker of this primary".to_owned(),
                    (Some(_), Err(why)) => why,
                    (Some(_), Ok(_)) => unreachable!("handled above"),
                };
                if let Some(suppressed) = self.rejections.allow(now) {
                    let from = match worker.and_then(|id| self.plan.worker_ref(id)) {
                        Some(worker) => format!("worker {worker}"),
                        None => format!(
                            "pid {}",
                            datagram
                                .pid
                                .map_or_else(|| "?".to_owned(), |p| p.to_string())
                        ),
                    };
                    let pid = datagram.pid.unwrap_or(0);
                    warn!(event = "notify_rejected", pid, suppressed, why = %why, "notify datagram from {from} dropped: {why}");
                }
            }
        }
    }

    /// The worker a notify sender belongs to: the worker itself, or a process in its group.
    fn attribute(&self, pid: u32) -> Option<WorkerId> {
        if let Some(worker) = self.plan.worker_by_pid(pid) {
            return Some(worker.id);
        }
        let group = procfs::stat(pid)?.pgrp;
        self.plan.worker_by_pid(group).map(|w| w.id)
    }
}

/// Limits how often rejected notify datagrams are logged, so a hostile worker cannot flood
/// the log.
#[derive(Debug, Default)]
pub(super) struct RateLimit {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    const PER_WINDOW: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(10);

    /// Whether to log this one; also returns how many were suppressed since the last one.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW)
        {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < Self::PER_WINDOW {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_logged_ten_in_ten_seconds_then_counted() {
        let mut limit = RateLimit::default();
        let start = Instant::now();
        for _ in 0..RateLimit::PER_WINDOW {
            assert_eq!(limit.allow(start), Some(0));
        }
        assert_eq!(limit.allow(start + Duration::from_secs(1)), None);
        assert_eq!(limit.allow(start + Duration::from_secs(9)), None);
        // A new window: the next one is logged with the count of those that were not.
        assert_eq!(limit.allow(start + RateLimit::WINDOW), Some(2));
        assert_eq!(limit.allow(start + RateLimit::WINDOW), Some(0));
    }
}
