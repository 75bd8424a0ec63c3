//! `ProcessGuard`: group kill on drop, parent-death signal, liveness helpers; `helper_bin`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ustad_testkit::process::{
    ProcessGuard, group_alive, group_members, pid_alive, wait_dead, wait_group_dead,
};
use ustad_testkit::report::WorkerReport;
use ustad_testkit::{TEST_WORKER, helper_bin};

use crate::util::{Spawn, spawn_worker, test_worker};

const T: Duration = Duration::from_secs(20);

#[test]
fn drop_kills_the_whole_group_including_a_grandchild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let worker = spawn_worker(Spawn {
        // The grandchild ignores SIGTERM; the guard uses SIGKILL anyway.
        args: &["--grandchild", "--report", path.to_str().unwrap()],
        ..Spawn::default()
    });
    let pgid = worker.pgid();
    let report = WorkerReport::wait_for(&path, T);
    let grandchild = report.grandchild_pid.expect("a grandchild");
    assert_eq!(report.pgid, pgid);
    assert!(pid_alive(grandchild));
    let members = group_members(pgid);
    assert!(
        members.contains(&worker.pid()) && members.contains(&grandchild),
        "{members:?}"
    );

    drop(worker);
    assert!(wait_dead(grandchild, T), "grandchild {grandchild} survived");
    assert!(
        wait_group_dead(pgid, T),
        "group {pgid}: {:?}",
        group_members(pgid)
    );
    assert!(!group_alive(pgid));
}

/// The parent-death signal is tied to the thread that spawned the child.
#[test]
fn the_child_dies_with_the_thread_that_spawned_it() {
    let pid = std::thread::spawn(|| {
        let guard = ProcessGuard::spawn(&mut Command::new(test_worker())).unwrap();
        let pid = guard.pid();
        // Leak the guard: only the kernel's parent-death signal can kill the child now.
        std::mem::forget(guard);
        pid
    })
    .join()
    .unwrap();
    assert!(wait_dead(pid, T), "pid {pid} outlived its spawning thread");
    // Reap the zombie the forgotten guard left behind.
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::WaitOptions::empty(),
    );
}

#[test]
fn signal_and_wait_timeout() {
    let mut guard = ProcessGuard::spawn(Command::new("sleep").arg("100")).unwrap();
    assert!(pid_alive(guard.pid()));
    assert_eq!(guard.wait_timeout(Duration::from_millis(50)), None);
    guard.signal(ustad_testkit::Signal::TERM).unwrap();
    let status = guard.wait_timeout(T).expect("sleep dies of SIGTERM");
    assert!(!status.success());
    assert!(!pid_alive(guard.pid()));
    // Reaped: signalling it again must not hit a recycled pid.
    assert!(guard.signal(ustad_testkit::Signal::TERM).is_err());
}

#[test]
fn pid_alive_is_false_for_zombies() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    // Not reaped yet: a zombie once it exits.
    assert!(wait_dead(pid, T));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "still a zombie"
    );
    child.wait().unwrap();
}

#[test]
fn helper_bin_finds_siblings_of_the_ustad_binary() {
    // Any binary in the same directory stands in for `ustad`.
    let found = helper_bin(test_worker(), TEST_WORKER);
    assert_eq!(found, test_worker());
}

#[test]
#[should_panic(expected = "cargo build -p ustad-testkit --bins")]
fn helper_bin_says_how_to_build_a_missing_helper() {
    helper_bin(test_worker(), "no-such-helper");
}
