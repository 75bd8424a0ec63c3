//! The only `unsafe` in the testkit: hooks that run between fork and exec, and borrowing a raw
//! fd number that the process inherited.
//!
//! Nothing in a `pre_exec` hook allocates, locks or logs: the child of a multi-threaded test
//! process may only make async-signal-safe calls until it execs.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::Signal;

/// The most fds [`pass_fds`] places (a fixed bound, so the hook needs no allocation).
pub(crate) const MAX_PASSED_FDS: usize = 64;

/// Makes the child receive SIGKILL when the thread that spawns it exits.
///
/// Fails the spawn (with `ESRCH`) if the parent died before the death signal was armed.
pub(crate) fn kill_on_parent_death(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    let hook = move || -> io::Result<()> {
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        // The parent may have exited between fork and prctl; then nobody would kill us.
        if rustix::process::getppid() != Some(parent) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook only makes two system calls (prctl, getppid) and builds an io::Error from
    // an errno, which does not allocate: all async-signal-safe.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Places `fds` at 3, 4, … in the child (without close-on-exec), and marks every other fd above
/// them close-on-exec so that nothing else the test process holds leaks into the child.
///
/// The fds stay open in the parent until the `Command` is dropped.
///
/// # Panics
///
/// If more than [`MAX_PASSED_FDS`] fds are given.
pub(crate) fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) {
    assert!(
        fds.len() <= MAX_PASSED_FDS,
        "pass_fds: at most {MAX_PASSED_FDS} fds, got {}",
        fds.len()
    );
    let count = fds.len();
    let mut sources = [-1 as RawFd; MAX_PASSED_FDS];
    for (slot, fd) in sources.iter_mut().zip(&fds) {
        *slot = fd.as_raw_fd();
    }
    let mut scratch = [-1 as RawFd; MAX_PASSED_FDS];
    // `count <= 64`, so this cannot overflow.
    let first_free = 3 + count as libc::c_int;
    let hook = move || -> io::Result<()> {
        // Owning the fds here keeps them open until the Command is dropped.
        let _keep_open = &fds;
        // First move every source above the target range, so that placing fd i cannot clobber a
        // source that happens to sit at 3 + j.
        for i in 0..count {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own; async-signal-safe.
            let dup = unsafe { libc::fcntl(sources[i], libc::F_DUPFD_CLOEXEC, first_free) };
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            scratch[i] = dup;
        }
        for (i, &dup) in scratch.iter().enumerate().take(count) {
            let target = 3 + i as libc::c_int;
            // SAFETY: dup2 onto a small fd number; the new fd has no close-on-exec flag, which is
            // the point. async-signal-safe.
            if unsafe { libc::dup2(dup, target) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dup` is our own temporary copy. async-signal-safe.
            unsafe { libc::close(dup) };
        }
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing, it only sets flags.
        let marked = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first_free as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if marked != 0 {
            // Kernels before 5.11: set the flag one fd at a time.
            for fd in first_free..4096 {
                // SAFETY: fcntl on an fd number that may not be open (then it fails harmlessly).
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
        }
        Ok(())
    };
    // SAFETY: the hook makes only fcntl, dup2, close and close_range calls on fixed-size arrays
    // captured before the fork: no allocation, no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Runs `f` with fd number `fd` borrowed, or returns `None` if that fd is not open.
///
/// For probing fds a process inherited (such as `LISTEN_FDS`), where only the number is known.
/// The caller must not close `fd` from another thread while `f` runs.
pub(crate) fn with_raw_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if the fd is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the fd is open (checked above) and the borrow does not outlive `f`; nothing in
    // this crate closes inherited fds while probing them.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Some(f(borrowed))
}
