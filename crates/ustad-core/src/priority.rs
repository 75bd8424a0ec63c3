//! The primary's CPU priority: above its workers', so that it answers, restarts, replaces and
//! upgrades promptly while they keep every core busy.
//!
//! For the scheduler the primary and its workers are one group (one session, one autogroup,
//! one cgroup): at the same nice value each busy worker weighs as much as the primary, so a
//! primary that needs 10 ms of CPU gets ~1/18 of a core under a load that keeps 34 workers busy
//! on 2 cores, and takes ~200 ms of wall time for it. systemd avoids this for itself by living
//! in a cgroup of its own, whose weight counts against a whole service, not against each of its
//! processes. The primary does the next best thing it can on its own: it runs at a lower nice
//! value (a larger weight) than its workers, and sets `SCHED_RESET_ON_FORK`, so that every
//! process it starts (workers, hooks, the guard, an upgrade's check) starts at nice 0 again,
//! as if the primary had not been raised. Its CPU use is small and in short bursts, so its
//! workers lose nothing measurable (docs/benchmarks.md, "Upgrading ustad itself").
//!
//! Lowering a nice value needs `CAP_SYS_NICE` (root) or an `RLIMIT_NICE` that allows it
//! (`LimitNICE=-10` in a systemd unit); without either the primary stays where it is, and says
//! so. It also stays where it is when it was started at another nice value than 0 or with a
//! real-time policy: that is the operator's choice, for it and its workers alike. The setting
//! survives an upgrade's `execve`, and the new program finds it in place.

use std::fmt;

/// The nice value the primary asks for by default (`--primary-nice`).
pub const DEFAULT_NICE: i32 = -10;

/// `SCHED_OTHER` and `SCHED_BATCH`: the policies a nice value means something for.
const NICE_POLICIES: [u32; 2] = [libc::SCHED_OTHER as u32, libc::SCHED_BATCH as u32];

/// What [`raise_primary`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Priority {
    /// The calling thread runs at `nice`, and what it starts at nice 0.
    Raised {
        /// Its nice value now.
        nice: i32,
        /// Whether it was so already (a previous program of this process, before an upgrade).
        already: bool,
    },
    /// Left as it was.
    Kept {
        /// Why.
        why: String,
    },
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Priority::Raised { nice, .. } => write!(
                f,
                "the primary runs at nice {nice}, the processes it starts at nice 0"
            ),
            Priority::Kept { why } => write!(f, "the primary keeps its priority: {why}"),
        }
    }
}

/// Runs the calling thread (the primary's supervisor thread, before it starts anything) at
/// nice `nice`, every process or thread it starts afterwards at nice 0; see the module's doc
/// for when it does not.
pub fn raise_primary(nice: i32) -> Priority {
    let kept = |why: String| Priority::Kept { why };
    let attr = match crate::sys::sched_attr() {
        Ok(attr) => attr,
        Err(error) => return kept(format!("cannot read its scheduling attributes: {error}")),
    };
    let reset_on_fork = libc::SCHED_FLAG_RESET_ON_FORK as u64;
    if attr.sched_flags & reset_on_fork != 0 && attr.sched_nice < 0 {
        return Priority::Raised {
            nice: attr.sched_nice,
            already: true,
        };
    }
    if !NICE_POLICIES.contains(&attr.sched_policy) {
        return kept(format!(
            "it runs under scheduling policy {}, not a nice value",
            attr.sched_policy
        ));
    }
    if attr.sched_nice != 0 {
        return kept(format!(
            "it was started at nice {}, which its workers get too",
            attr.sched_nice
        ));
    }
    if nice >= 0 {
        return kept(format!("--primary-nice is {nice}"));
    }
    let raised = libc::sched_attr {
        sched_flags: attr.sched_flags | reset_on_fork,
        sched_nice: nice,
        // The default time slice.
        sched_runtime: 0,
        ..attr
    };
    match crate::sys::set_sched_attr(&raised) {
        Ok(()) => Priority::Raised {
            nice,
            already: false,
        },
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => kept(format!(
            "nice {nice} is not permitted (it needs CAP_SYS_NICE, or an RLIMIT_NICE that allows it: LimitNICE={nice} in a systemd unit)"
        )),
        Err(error) => kept(format!("cannot set nice {nice}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of `pid` (field 19 of `/proc/PID/stat`).
    fn nice_of(pid: u32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn the_thread_is_raised_and_what_it_starts_is_not() {
        // A thread of its own: the test harness's other threads keep their priority.
        std::thread::spawn(|| {
            let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
            let before = nice_of(tid);
            match raise_primary(-3) {
                Priority::Raised { nice, already } => {
                    assert_eq!((nice, already), (-3, false));
                    assert_eq!(nice_of(tid), -3);
                    // A second call finds it done (as a new program after an upgrade does).
                    assert_eq!(
                        raise_primary(-3),
                        Priority::Raised {
                            nice: -3,
                            already: true
                        }
                    );
                    let mut child = std::process::Command::new("sleep")
                        .arg("5")
                        .spawn()
                        .unwrap();
                    let child_nice = nice_of(child.id());
                    child.kill().unwrap();
                    child.wait().unwrap();
                    assert_eq!(child_nice, 0, "a child starts at nice 0");
                }
                Priority::Kept { why } => {
                    // Not permitted here (no CAP_SYS_NICE), or the tests run at another nice
                    // value: nothing changed.
                    assert!(
                        why.contains("not permitted") || why.contains("started at nice"),
                        "{why}"
                    );
                    assert_eq!(nice_of(tid), before);
                }
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_primary_started_at_another_nice_value_keeps_it() {
        std::thread::spawn(|| {
            let mut attr = crate::sys::sched_attr().unwrap();
            // Higher than it was: always permitted.
            let started = (attr.sched_nice + 2).min(19);
            attr.sched_nice = started;
            crate::sys::set_sched_attr(&attr).unwrap();
            let Priority::Kept { why } = raise_primary(-10) else {
                panic!("raised")
            };
            assert!(why.contains(&format!("started at nice {started}")), "{why}");
            assert_eq!(crate::sys::sched_attr().unwrap().sched_nice, started);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn zero_asks_for_nothing() {
        std::thread::spawn(|| {
            let before = crate::sys::sched_attr().unwrap().sched_nice;
            assert!(matches!(raise_primary(0), Priority::Kept { .. }));
            assert_eq!(crate::sys::sched_attr().unwrap().sched_nice, before);
        })
        .join()
        .unwrap();
    }
}
