//! Watching the starting workers of `ready = "listening"` pools until they are seen waiting
//! for connections ([`crate::listening`]), and telling the plan.
//!
//! Only starting workers are looked at, and each at intervals that grow with the time it has
//! been starting (an eighth of it, from 2 ms to 100 ms): a worker that boots in 100 ms is seen
//! within about 12 ms of listening, one that takes seconds costs ten looks a second, and a
//! primary whose workers are all ready does no work at all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::listening;
use crate::plan::{Event, WorkerId};

/// The first look comes this soon after the spawn, and looks never come closer together.
const MIN_INTERVAL: Duration = Duration::from_millis(2);
/// Looks never come further apart.
const MAX_INTERVAL: Duration = Duration::from_millis(100);
/// After this long without being seen listening (or half its `ready_timeout`, when that is
/// sooner), a worker is named in the log with what to do.
const SLOW_WARNING: Duration = Duration::from_secs(10);

/// A socket a worker is expected to wait on: its inode and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Expected {
    pub(super) inode: u64,
    pub(super) name: Arc<str>,
}

#[derive(Debug)]
struct Watched {
    pid: u32,
    /// For the log: `web.0 (id 3, pid 1234)`.
    label: String,
    sockets: Vec<Expected>,
    spawned: Instant,
    next_look: Instant,
    warn_after: Duration,
    warned: bool,
}

/// The workers being watched.
#[derive(Debug, Default)]
pub(super) struct ListenWatch {
    watched: BTreeMap<WorkerId, Watched>,
}

impl ListenWatch {
    /// Starts watching a worker spawned at `now`, which is killed unless ready within
    /// `ready_timeout`.
    pub(super) fn watch(
        &mut self,
        id: WorkerId,
        pid: u32,
        label: String,
        sockets: Vec<Expected>,
        ready_timeout: Duration,
        now: Instant,
    ) {
        self.watched.insert(
            id,
            Watched {
                pid,
                label,
                sockets,
                spawned: now,
                next_look: now + MIN_INTERVAL,
                warn_after: SLOW_WARNING.min(ready_timeout / 2),
                warned: false,
            },
        );
    }

    /// Stops watching a worker (ready, stopping, or gone).
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.watched.remove(&id);
    }

    /// When the next look is due.
    pub(super) fn next_look(&self) -> Option<Instant> {
        self.watched.values().map(|w| w.next_look).min()
    }

    /// Looks at every worker whose look is due, with `find` (in production
    /// [`listening::find`]); returns an event for each one seen listening, and forgets it.
    pub(super) fn look(
        &mut self,
        now: Instant,
        mut find: impl FnMut(u32, &[u64]) -> Option<listening::Sighting>,
    ) -> Vec<Event> {
        let mut seen = Vec::new();
        for (id, watched) in &mut self.watched {
            if watched.next_look > now {
                continue;
            }
            let inodes: Vec<u64> = watched.sockets.iter().map(|s| s.inode).collect();
            if let Some(sighting) = find(watched.pid, &inodes) {
                let socket = watched
                    .sockets
                    .iter()
                    .find(|s| s.inode == sighting.inode)
                    .map_or_else(|| Arc::from("?"), |s| s.name.clone());
                seen.push(Event::Listening {
                    id: *id,
                    socket,
                    how: sighting.how,
                    process: sighting.pid,
                });
                continue;
            }
            let starting_for = now.saturating_duration_since(watched.spawned);
            watched.next_look = now + interval(starting_for);
            if starting_for >= watched.warn_after && !watched.warned {
                watched.warned = true;
                let names: Vec<&str> = watched.sockets.iter().map(|s| &*s.name).collect();
                warn!(
                    event = "not_listening",
                    id = id.0,
                    pid = watched.pid,
                    "worker {} has not been seen waiting for connections on socket {} after {}: \
                     if it binds its own port, have it take the socket ustad passes (fd 3, \
                     LISTEN_FDS); if it accepts through io_uring or is ready some other way, set \
                     its pool's ready = \"notify\" or \"delay:…\"",
                    watched.label,
                    names.join(", "),
                    crate::config::value::format_duration(Duration::from_millis(
                        u64::try_from(starting_for.as_millis()).unwrap_or(u64::MAX)
                    ))
                );
            }
        }
        for event in &seen {
            if let Event::Listening { id, .. } = event {
                self.watched.remove(id);
            }
        }
        seen
    }
}

/// The pause before the next look at a worker that has been starting this long.
fn interval(starting_for: Duration) -> Duration {
    (starting_for / 8).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listening::{Sighting, Wait};

    const MS: Duration = Duration::from_millis(1);
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn http(inode: u64) -> Vec<Expected> {
        vec![
            Expected {
                inode,
                name: Arc::from("http"),
            },
            Expected {
                inode: inode + 1,
                name: Arc::from("admin"),
            },
        ]
    }

    #[test]
    fn looks_grow_apart_from_2ms_to_100ms() {
        assert_eq!(interval(Duration::ZERO), 2 * MS);
        assert_eq!(interval(80 * MS), 10 * MS);
        assert_eq!(interval(Duration::from_secs(5)), 100 * MS);
    }

    #[test]
    fn a_worker_is_looked_at_when_due_and_forgotten_once_seen() {
        let mut watch = ListenWatch::default();
        let start = Instant::now();
        watch.watch(WorkerId(7), 1234, "web.0".into(), http(50), TIMEOUT, start);
        assert_eq!(watch.next_look(), Some(start + 2 * MS));
        let mut looks = Vec::new();
        let events = watch.look(start + MS, |pid, _| {
            looks.push(pid);
            None
        });
        assert!(events.is_empty() && looks.is_empty(), "not due yet");
        let events = watch.look(start + 2 * MS, |pid, inodes| {
            looks.push(pid);
            assert_eq!(inodes, [50, 51]);
            None
        });
        assert!(events.is_empty());
        assert_eq!(looks, [1234]);
        let at = start + 400 * MS;
        let events = watch.look(at, |pid, _| {
            Some(Sighting {
                pid: pid + 1,
                inode: 51,
                how: Wait::Poll,
            })
        });
        match events.as_slice() {
            [
                Event::Listening {
                    id,
                    socket,
                    how,
                    process,
                },
            ] => {
                assert_eq!(
                    (*id, &**socket, *how, *process),
                    (WorkerId(7), "admin", Wait::Poll, 1235)
                );
            }
            other => panic!("expected one Listening event, got {other:?}"),
        }
        assert_eq!(watch.next_look(), None, "nothing left to watch");
    }

    #[test]
    fn forgotten_workers_are_not_looked_at() {
        let mut watch = ListenWatch::default();
        let start = Instant::now();
        watch.watch(WorkerId(1), 10, "web.0".into(), http(5), TIMEOUT, start);
        watch.watch(WorkerId(2), 20, "web.1".into(), http(5), TIMEOUT, start);
        watch.forget(WorkerId(1));
        let mut looked = Vec::new();
        watch.look(start + Duration::from_secs(1), |pid, _| {
            looked.push(pid);
            None
        });
        assert_eq!(looked, [20]);
        assert_eq!(
            watch.next_look(),
            Some(start + Duration::from_secs(1) + interval(Duration::from_secs(1)))
        );
    }
}
