//! Every `unsafe` block of the engine: what runs in a worker between `fork` and `exec`, and the
//! calls std, rustix and tokio have no safe form for here: taking ownership of the fds a
//! service manager passed to the primary ([`take_listen_fds`]), reading `CLOCK_MONOTONIC`
//! ([`monotonic_usec`]), registering an fd with the reactor for one direction only
//! ([`register_fd`]), reading a notify datagram's credentials, whose pid may be 0
//! ([`recv_datagram`]), dropping stack pages a deep call left behind
//! ([`release_stack_below`]), and an upgrade's re-execution in place: the signal mask kept
//! across it ([`mask_signals`], [`exec_in_place`]) and the fds handed over taken back
//! ([`take_handed_fds`]), and the primary's scheduling attributes ([`sched_attr`],
//! [`set_sched_attr`], which have no wrapper in libc or rustix, and [`keep_priority`]).
//!
//! Between `fork` and `exec` the child is a copy of a possibly multi-threaded process: it may
//! only make async-signal-safe calls. Nothing here allocates, locks or logs after the fork.
//! Everything the child needs (argv, envp, the fd plan, the `LISTEN_PID=` buffer) is built
//! before the fork by [`ExecImage::new`].
//!
//! # Caveats
//! - `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process.
//!   Workers must be spawned from the supervisor's own long-lived thread (a tokio
//!   `current_thread` runtime on the main thread), never from `spawn_blocking`.
//! - `PR_SET_PDEATHSIG` is cleared when the worker execs a set-user-ID or set-group-ID program
//!   or one with file capabilities.

#![allow(unsafe_code)]

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::process::{Pid, getpid, getppid, set_parent_process_death_signal};
use ustad_proto::env::LISTEN_PID;

/// The first fd a worker's sockets are placed at (`SD_LISTEN_FDS_START`).
pub(crate) use ustad_proto::env::LISTEN_FDS_START;

/// The length of `LISTEN_PID=`.
const LISTEN_PID_PREFIX_LEN: usize = LISTEN_PID.len() + 1;
/// `LISTEN_PID=` + up to 20 digits + NUL.
const LISTEN_PID_LEN: usize = LISTEN_PID_PREFIX_LEN + 21;

/// An `execve` call prepared in advance: argv, envp and the `LISTEN_PID=` slot that the child
/// fills with its own pid.
pub(crate) struct ExecImage {
    program: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    /// A heap buffer holding `LISTEN_PID=<pid>\0`, written by the child after the fork. Owned
    /// through a raw pointer because `envp_ptrs` points into it too.
    listen_pid: *mut [u8; LISTEN_PID_LEN],
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

// SAFETY: the raw pointers point into heap buffers owned by the same value (the CStrings and
// the `listen_pid` box), which stay put when the value moves. They are only dereferenced by
// `execve` and by `fill_listen_pid`, in the forked child, which has a single thread.
unsafe impl Send for ExecImage {}
// SAFETY: as above; a shared `&ExecImage` gives no access to the buffers.
unsafe impl Sync for ExecImage {}

impl ExecImage {
    /// Prepares `execve(program, argv, envp)`; with `listen_pid`, envp gets a
    /// `LISTEN_PID=<the child's own pid>` entry filled in after the fork.
    pub(crate) fn new(
        program: CString,
        argv: Vec<CString>,
        envp: Vec<CString>,
        listen_pid: bool,
    ) -> ExecImage {
        let mut buffer = Box::new([0u8; LISTEN_PID_LEN]);
        // `LISTEN_PID=`, written before the fork: the child writes only the digits after it.
        buffer[..LISTEN_PID.len()].copy_from_slice(LISTEN_PID.as_bytes());
        buffer[LISTEN_PID.len()] = b'=';
        let listen_pid_ptr = Box::into_raw(buffer);
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([ptr::null()])
            .collect();
        let mut envp_ptrs: Vec<*const c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        if listen_pid {
            envp_ptrs.push(listen_pid_ptr.cast::<c_char>().cast_const());
        }
        envp_ptrs.push(ptr::null());
        ExecImage {
            program,
            _argv: argv,
            _envp: envp,
            listen_pid: listen_pid_ptr,
            argv_ptrs,
            envp_ptrs,
        }
    }

    /// Writes the calling process's pid into the `LISTEN_PID=` buffer. Async-signal-safe.
    fn fill_listen_pid(&mut self) {
        let mut digits = [0u8; 20];
        let mut n = getpid().as_raw_nonzero().get().unsigned_abs();
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // SAFETY: `listen_pid` came from `Box::into_raw` in `new` and is freed only in `drop`;
        // `&mut self` guarantees no other access through this value right now.
        let buffer = unsafe { &mut *self.listen_pid };
        let start = LISTEN_PID_PREFIX_LEN;
        for (i, digit) in digits[..len].iter().rev().enumerate() {
            buffer[start + i] = *digit;
        }
        buffer[start + len] = 0;
    }
}

impl Drop for ExecImage {
    fn drop(&mut self) {
        // SAFETY: `listen_pid` came from `Box::into_raw` in `new` and is freed only here.
        drop(unsafe { Box::from_raw(self.listen_pid) });
    }
}

/// Arranges for `command` to become the worker: dies with the primary, gets `fds` as
/// 3, 4, …, marks every other inherited fd close-on-exec, learns its own pid for
/// `LISTEN_PID`, and is executed with `image` (never with the `Command`'s own program and
/// environment, which only serve `std` as descriptions).
///
/// `fds` must not be in the range `3..3 + fds.len()` and no fd std opens for the spawn may be
/// either (see [`reserve_low_fds`]), so that moving the fds into place clobbers nothing.
pub(crate) fn prepare_worker(
    command: &mut tokio::process::Command,
    mut image: ExecImage,
    fds: Vec<OwnedFd>,
    credentials: Option<crate::accounts::Credentials>,
    parent: Pid,
) {
    let raw_fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // Built before the fork: the child may not allocate.
    let identity = credentials.map(|c| {
        let groups: Vec<rustix::process::Gid> = c
            .groups
            .iter()
            .map(|gid| rustix::process::Gid::from_raw(*gid))
            .collect();
        (
            rustix::process::Uid::from_raw(c.uid),
            rustix::process::Gid::from_raw(c.gid),
            groups,
        )
    });
    // The owned fds are closed in the parent when `command` is dropped after spawning.
    let keep_alive = fds;
    let first_unused = LISTEN_FDS_START + raw_fds.len() as RawFd;
    let child_setup = move || -> io::Result<()> {
        let _ = &keep_alive;
        // Another identity first: changing it clears the parent-death signal. Groups, then
        // the group, then the user (after which the others could no longer be changed). These
        // are raw syscalls for this thread only, which is the whole child after the fork.
        if let Some((uid, gid, groups)) = &identity {
            rustix::thread::set_thread_groups(groups)?;
            rustix::thread::set_thread_res_gid(*gid, *gid, *gid)?;
            rustix::thread::set_thread_res_uid(*uid, *uid, *uid)?;
        }
        // Die with the primary; if it already died before the prctl, its pid is gone.
        set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        if getppid() != Some(parent) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        for (index, fd) in raw_fds.iter().enumerate() {
            let target = LISTEN_FDS_START + index as RawFd;
            // SAFETY: dup2 is async-signal-safe; `fd` is open (owned by `keep_alive`) and the
            // caller guarantees it is outside the target range. The new fd has no CLOEXEC.
            if unsafe { libc::dup2(*fd, target) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Any fd this process inherited without CLOEXEC (from whoever started the primary)
        // must not leak into workers. The flag form keeps std's own error pipe usable. Linux
        // 5.11+; older kernels refuse it, and then only our own (already CLOEXEC) fds exist.
        // SAFETY: close_range is a plain syscall with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first_unused as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
        }
        image.fill_listen_pid();
        // SAFETY: execve is async-signal-safe; program, argv and envp are NUL-terminated
        // strings in NULL-terminated arrays, all built before the fork and owned by `image`.
        unsafe {
            libc::execve(
                image.program.as_ptr(),
                image.argv_ptrs.as_ptr(),
                image.envp_ptrs.as_ptr(),
            );
        }
        Err(io::Error::last_os_error())
    };
    // SAFETY: `child_setup` only makes async-signal-safe calls (setgroups, setresgid,
    // setresuid, prctl, getppid, dup2, close_range, getpid, execve) and writes into memory it
    // owns; it neither allocates nor locks (io::Error::from_raw_os_error / last_os_error do
    // not allocate).
    unsafe {
        command.pre_exec(child_setup);
    }
}

/// Most process groups the guard tracks at once (workers alive, plus groups outliving them).
pub(crate) const GUARD_CAPACITY: usize = 4096;

/// One record on the guard's pipe: an operation byte and a pgid.
pub(crate) const GUARD_RECORD: usize = 5;
/// Track a process group.
pub(crate) const GUARD_WATCH: u8 = b'+';
/// Stop tracking a process group.
pub(crate) const GUARD_FORGET: u8 = b'-';
/// The guard's name (`/proc/PID/comm`), NUL-terminated for `PR_SET_NAME`.
pub(crate) const GUARD_NAME: &std::ffi::CStr = c"ustad-guard";

/// Forks the guard: a process that outlives the primary for an instant, to SIGKILL the
/// process groups of its workers when the primary dies, whatever killed it. Workers die with
/// the primary through `PR_SET_PDEATHSIG`, but what *they* started does not; the guard takes
/// their whole groups down.
///
/// The guard is a plain `fork` without `exec`: between the two it may only make
/// async-signal-safe calls, so it runs a loop of raw `read`s on a pipe into a table on its own
/// stack, and `kill`s and `_exit`s when the pipe reaches end-of-file, which happens exactly
/// when every copy of the write end is closed: when the primary has exited or died. Returns the
/// write end (close-on-exec, so no worker inherits it) and the guard's pid.
///
/// `cleanup` lists paths the guard removes when the primary is gone, in order (a socket file
/// before its directory): files are unlinked, directories removed when empty. A primary that
/// exits normally has removed them already; one that was SIGKILLed leaves no stale socket.
pub(crate) fn fork_guard(cleanup: &[CString]) -> io::Result<(OwnedFd, Pid)> {
    // Built before the fork: the guard may not allocate.
    let cleanup: Vec<*const libc::c_char> = cleanup.iter().map(|path| path.as_ptr()).collect();
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let read_fd = read_end.as_raw_fd();
    let write_fd = write_end.as_raw_fd();
    // SAFETY: fork is async-signal-safe; the child only makes async-signal-safe calls (see
    // `guard_loop`) and never returns from this function.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: in the forked child; `guard_loop` never returns. The paths point into
            // `CString`s the caller keeps alive, copied into the child's address space.
            unsafe { guard_loop(read_fd, write_fd, &cleanup) }
        }
        pid => {
            drop(read_end);
            let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::other("fork returned pid 0"))?;
            Ok((write_end, pid))
        }
    }
}

/// The guard's whole life, in the forked child.
///
/// # Safety
/// Must only be called in a freshly forked child; it never returns. Every pointer in `cleanup`
/// must point to a NUL-terminated string.
unsafe fn guard_loop(read_fd: RawFd, write_fd: RawFd, cleanup: &[*const libc::c_char]) -> ! {
    // SAFETY (for the block): plain syscalls with integer arguments and stack buffers.
    unsafe {
        libc::close(write_fd);
        // Keep only the pipe: the guard must not hold the primary's sockets or pipes open.
        if read_fd > 3 {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                (read_fd - 1) as libc::c_uint,
                0,
            );
        }
        libc::syscall(
            libc::SYS_close_range,
            (read_fd + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0,
        );
        // A group of its own, deaf to the terminal and to the signals meant for the primary.
        libc::setpgid(0, 0);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGPIPE,
        ] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_NAME, GUARD_NAME.as_ptr());
        let mut groups = [0 as libc::pid_t; GUARD_CAPACITY];
        let mut count = 0usize;
        let mut record = [0u8; GUARD_RECORD];
        let mut filled = 0usize;
        loop {
            let n = libc::read(
                read_fd,
                record[filled..].as_mut_ptr().cast(),
                GUARD_RECORD - filled,
            );
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            filled += n as usize;
            if filled < GUARD_RECORD {
                continue;
            }
            filled = 0;
            let pgid = libc::pid_t::from_ne_bytes([record[1], record[2], record[3], record[4]]);
            match record[0] {
                GUARD_WATCH if count < GUARD_CAPACITY => {
                    groups[count] = pgid;
                    count += 1;
                }
                GUARD_FORGET => {
                    if let Some(i) = groups[..count].iter().position(|g| *g == pgid) {
                        count -= 1;
                        groups[i] = groups[count];
                    }
                }
                _ => {}
            }
        }
        // The primary is gone (or done): whatever it still ran goes with it.
        for pgid in &groups[..count] {
            libc::kill(-*pgid, libc::SIGKILL);
        }
        for path in cleanup {
            // One of the two applies; the other fails harmlessly, as both do for a path the
            // primary removed itself.
            if libc::unlink(*path) != 0 {
                libc::rmdir(*path);
            }
        }
        libc::_exit(0)
    }
}

/// Makes sure fds `3..upto` are open in this process, filling holes with `/dev/null`, so that
/// the pipes std creates while spawning land above the range a worker's sockets are moved
/// into. The returned fds must stay open until the spawn is done (they are close-on-exec).
pub(crate) fn reserve_low_fds(upto: RawFd) -> io::Result<Vec<OwnedFd>> {
    let mut reserved = Vec::new();
    loop {
        // Each open returns the lowest free fd; once that is at or above `upto`, no hole is
        // left below it.
        let fd: OwnedFd = std::fs::File::open("/dev/null")?.into();
        if fd.as_raw_fd() >= upto {
            return Ok(reserved);
        }
        reserved.push(fd);
    }
}

/// Whether [`take_listen_fds`] has run: an fd may have only one owner.
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of fds `3..3 + count`, which the service manager passed to this process
/// (socket activation, `LISTEN_FDS`), and marks each close-on-exec so that no child inherits
/// it. Returns each fd number with the fd, or with why it cannot be taken: `EBADF` when it is
/// not open, `ENOTSOCK` when it is open but not a socket (then it is left alone, not closed).
///
/// Only the first call takes anything; later calls return `None`.
pub(crate) fn take_listen_fds(count: usize) -> Option<Vec<(RawFd, io::Result<OwnedFd>)>> {
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    let taken = (0..count)
        .map_while(|i| {
            let fd = LISTEN_FDS_START.checked_add(RawFd::try_from(i).ok()?)?;
            Some((fd, take_listen_fd(fd)))
        })
        .collect();
    Some(taken)
}

fn take_listen_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above); the borrow ends before anything closes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    // SAFETY: `fd` is an open socket that was open when this process was executed (the
    // service manager's promise, checked by `LISTEN_PID`): the primary closes none of fds
    // 3.. before this point, so the kernel cannot have given this number to anything else,
    // and `LISTEN_FDS_TAKEN` makes this the only place that takes ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` expects it (the clock
/// behind `std::time::Instant`, which does not expose its value).
pub(crate) fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec it is given; CLOCK_MONOTONIC exists
    // on every Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

/// A datagram received with its ancillary data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReceivedDatagram {
    /// Its length, which is more than the buffer when it was truncated.
    pub(crate) len: usize,
    /// It did not fit in the buffer.
    pub(crate) truncated: bool,
    /// Ancillary data did not fit (more fds than [`DATAGRAM_MAX_FDS`]).
    pub(crate) control_truncated: bool,
    /// The sender's pid, as the kernel stamped it (`SO_PASSCRED`): `None` when it did not,
    /// or said 0 (a sender outside this process's pid namespace).
    pub(crate) pid: Option<u32>,
    /// File descriptors that came along, all closed already.
    pub(crate) fds: usize,
}

/// File descriptors read (and closed) along with one datagram; more are dropped by the kernel.
pub(crate) const DATAGRAM_MAX_FDS: usize = 16;

/// Room for one `SCM_CREDENTIALS` and one `SCM_RIGHTS` of [`DATAGRAM_MAX_FDS`] fds, in 8-byte
/// words (so that the buffer is aligned for `cmsghdr`).
const DATAGRAM_CONTROL_WORDS: usize = {
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    let bytes = unsafe {
        libc::CMSG_SPACE(size_of::<libc::ucred>() as u32)
            + libc::CMSG_SPACE((DATAGRAM_MAX_FDS * size_of::<libc::c_int>()) as u32)
    };
    (bytes as usize).div_ceil(8)
};

/// Receives one datagram without blocking, with the sender's credentials, closing any fds it
/// carried. rustix reads `SCM_CREDENTIALS` into a `Pid` that may not be 0, while the kernel
/// writes 0 for a sender outside the receiver's pid namespace: a process that can reach the
/// socket from another namespace must not be able to make that value.
pub(crate) fn recv_datagram(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<ReceivedDatagram> {
    let mut control = [0u64; DATAGRAM_CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control);
    // SAFETY: the msghdr points at `iov` (which points at `buffer`) and at `control`, all
    // alive and exclusively borrowed for the call, with their true lengths.
    let len = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut message,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    let mut received = ReceivedDatagram {
        len,
        truncated: message.msg_flags & libc::MSG_TRUNC != 0 || len > buffer.len(),
        control_truncated: message.msg_flags & libc::MSG_CTRUNC != 0,
        pid: None,
        fds: 0,
    };
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, bounded by the
    // msg_controllen it set; each payload is read unaligned and only when its header says it
    // is long enough. Every fd of an SCM_RIGHTS payload is a new fd the kernel installed for
    // this call (close-on-exec), owned by nobody else, so it is closed exactly once here.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            let (level, kind, total) = (
                (*header).cmsg_level,
                (*header).cmsg_type,
                (*header).cmsg_len,
            );
            let payload = total.saturating_sub(libc::CMSG_LEN(0) as usize);
            let data = libc::CMSG_DATA(header);
            if level == libc::SOL_SOCKET {
                if kind == libc::SCM_CREDENTIALS && payload >= size_of::<libc::ucred>() {
                    let credentials = ptr::read_unaligned(data.cast::<libc::ucred>());
                    received.pid = u32::try_from(credentials.pid).ok().filter(|pid| *pid > 0);
                } else if kind == libc::SCM_RIGHTS {
                    let count = payload / size_of::<libc::c_int>();
                    for n in 0..count {
                        let fd = ptr::read_unaligned(data.cast::<libc::c_int>().add(n));
                        if fd >= 0 {
                            drop(OwnedFd::from_raw_fd(fd));
                        }
                    }
                    received.fds += count;
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok(received)
}

/// Registers `fd` with the current tokio runtime's reactor for `interest` only (tokio's own
/// sockets register for both directions).
///
/// # Errors
/// When there is no runtime, or the reactor refuses the fd.
pub(crate) fn register_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open fd, its `as_raw_fd` always returns that same fd,
    // and it stays open (owned by the `AsyncFd`) until the `AsyncFd` is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(Into::into)
}

/// A user account as the system's user database (`/etc/passwd`, or NSS) has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: std::path::PathBuf,
}

/// Calls a reentrant lookup of the user or group database (`getpwnam_r`, `getgrnam_r`) with
/// `call(entry, buffer, length, result)`, growing the buffer on `ERANGE` (up to 1 MiB). The
/// entry it filled (whose strings point into the buffer returned with it), or `None`.
///
/// # Safety
/// `T` must be a plain C struct for which all zeroes is valid, and `call` a `get*nam_r`
/// function of that struct.
unsafe fn lookup_entry<T>(
    call: impl Fn(*mut T, *mut libc::c_char, usize, *mut *mut T) -> libc::c_int,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: the caller promises all zeroes is a valid `T`.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut result: *mut T = ptr::null_mut();
        let code = call(
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut result,
        );
        if code == libc::ERANGE && buffer.len() < 1024 * 1024 {
            buffer.resize(buffer.len() * 4, 0);
            continue;
        }
        if code != 0 {
            return Err(io::Error::from_raw_os_error(code));
        }
        // The strings stay where they are: moving the Vec does not move its heap buffer.
        return Ok((!result.is_null()).then_some((entry, buffer)));
    }
}

/// The account of user `name` (`getpwnam_r`); `None` when there is none.
pub(crate) fn user_account(name: &str) -> io::Result<Option<Account>> {
    let name_c = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `passwd` is plain old data; getpwnam_r is called with a NUL-terminated name and
    // the pointers and length `lookup_entry` gives, all valid for the call.
    let found = unsafe {
        lookup_entry(|entry, buffer, length, result| {
            libc::getpwnam_r(name_c.as_ptr(), entry, buffer, length, result)
        })
    }?;
    let Some((passwd, _strings)) = found else {
        return Ok(None);
    };
    // SAFETY: on success `pw_dir` points to a NUL-terminated string in `_strings`, alive here.
    let home = unsafe { std::ffi::CStr::from_ptr(passwd.pw_dir) };
    Ok(Some(Account {
        name: name.to_owned(),
        uid: passwd.pw_uid,
        gid: passwd.pw_gid,
        home: std::path::PathBuf::from(std::ffi::OsStr::from_bytes(home.to_bytes())),
    }))
}

/// The gid of group `name` (`getgrnam_r`); `None` when there is none.
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    let name_c = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: as for `user_account`, with `group` and getgrnam_r.
    let found = unsafe {
        lookup_entry(|entry, buffer, length, result| {
            libc::getgrnam_r(name_c.as_ptr(), entry, buffer, length, result)
        })
    }?;
    Ok(found.map(|(group, _strings): (libc::group, _)| group.gr_gid))
}

/// The groups user `name` belongs to, `primary` included (`getgrouplist`).
pub(crate) fn user_groups(name: &str, primary: u32) -> io::Result<Vec<u32>> {
    let name_c = CString::new(name).map_err(io::Error::other)?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` holds `count` gids; getgrouplist writes at most that many and sets
        // `count` to how many there are.
        let found = unsafe {
            libc::getgrouplist(name_c.as_ptr(), primary, groups.as_mut_ptr(), &mut count)
        };
        let count = usize::try_from(count).unwrap_or(0);
        if found >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        if count <= groups.len() || count > 65_536 {
            return Err(io::Error::other(format!(
                "cannot list the groups of user {name}"
            )));
        }
        groups.resize(count, 0);
    }
}

/// Blocks (`block`) or unblocks the `signals` for this thread. An upgrade blocks the signals
/// the primary answers before it executes its new program: the mask and what is pending
/// survive `execve`, while the handlers do not, so a signal that comes while the new program
/// starts waits for its handlers instead of taking its default action (SIGTERM would end the
/// primary, SIGTTIN stop it).
pub(crate) fn mask_signals(signals: &[i32], block: bool) -> io::Result<()> {
    // SAFETY: sigemptyset/sigaddset only write into the set they are given, which lives on
    // this stack frame and is initialised by sigemptyset before it is read.
    let set = unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        for &signal in signals {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    };
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: `set` is an initialised signal set; the old mask is not asked for (null).
    match unsafe { libc::pthread_sigmask(how, &set, ptr::null_mut()) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Replaces this process's program with `program`, run with `argv` and the current
/// environment, keeping its pid, its children, its signal mask and every fd not marked
/// close-on-exec. Returns only if `execve` failed, with why.
///
/// Unlike `std::process::Command::exec`, which resets the signal mask first, this keeps the
/// mask: see [`mask_signals`].
pub(crate) fn exec_in_place(program: &CString, argv: &[CString]) -> io::Error {
    let mut pointers: Vec<*const c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
    pointers.push(ptr::null());
    // SAFETY: `program` and every element of `argv` are NUL-terminated strings that outlive
    // the call, and `pointers` is NULL-terminated; execv reads `environ` as it stands. It
    // returns only on failure.
    unsafe { libc::execv(program.as_ptr(), pointers.as_ptr()) };
    io::Error::last_os_error()
}

/// Whether [`take_handed_fds`] has run: an fd may have only one owner.
static HANDED_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the fds the previous program of this process handed over across its
/// upgrade (listed in the handover document it wrote), each marked close-on-exec again.
/// Each number is taken at most once; a number that is not open, or listed twice, gets an
/// error instead of an fd.
///
/// Only the first call takes anything; later calls return `None`.
pub(crate) fn take_handed_fds(fds: &[RawFd]) -> Option<Vec<io::Result<OwnedFd>>> {
    if HANDED_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let taken = fds
        .iter()
        .map(|&fd| {
            if fd < 0 || !seen.insert(fd) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("fd {fd} is listed twice or is not an fd"),
                ));
            }
            // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if `fd` is not open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is open, and has been since this program was executed: the
            // previous program cleared its close-on-exec flag and wrote its number in the
            // handover document just before `execve`, so no part of this program opened it
            // or owns it (an open number is never handed out again). The `seen` set and
            // `HANDED_FDS_TAKEN` make this the one owner of each number.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
            Ok(owned)
        })
        .collect();
    Some(taken)
}

/// Marks each of `fds` close-on-exec (again, after an upgrade's exec failed).
pub(crate) fn close_on_exec(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: F_SETFD only sets the fd's close-on-exec flag, and fails with EBADF if the
        // number is not open. Should a number have been closed and reused since it was
        // collected, the flag is still right: every fd the primary opens is close-on-exec.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Closes each of `fds` that is open and not close-on-exec (see
/// `handover::close_leftovers`).
pub(crate) fn close_inherited(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: F_GETFD only reads the fd's flags; it fails if `fd` is not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        // SAFETY: `fd` is open and not close-on-exec. Every fd this program opens is
        // close-on-exec (std, tokio, socket2 and rustix open them so), so this one was
        // inherited across the exec and nothing here owns it: closing it cannot pull an fd
        // from under an owner.
        unsafe { libc::close(fd) };
    }
}

/// Gives the kernel back the pages of the main thread's stack that lie more than `keep` bytes
/// below `near`, the address of a local of the caller: pages that a deep call which has returned
/// left resident, and that nothing reads before writing them again. Does nothing when `near` is
/// not on the main thread's stack (`[stack]` in `/proc/self/maps`).
pub(crate) fn release_stack_below(near: usize, keep: usize) -> io::Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let stack = maps
        .lines()
        .find(|line| line.ends_with("[stack]"))
        .and_then(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        });
    let Some((start, end)) = stack else {
        return Ok(());
    };
    if !(start..end).contains(&near) {
        return Ok(());
    }
    let below = near.saturating_sub(keep) & !(rustix::param::page_size() - 1);
    if below <= start {
        return Ok(());
    }
    // SAFETY: [start, below) is part of the main thread's stack mapping and lies `keep` bytes
    // or more below a live local of the caller, so below every live frame: nothing there is read
    // before it is written again (a signal handler's frame goes right below the current one,
    // within `keep`). MADV_DONTNEED only drops the pages; they come back as zero pages when the
    // stack grows into them again.
    let result = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            below - start,
            libc::MADV_DONTNEED,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's scheduling policy, flags and nice value (`sched_getattr`).
pub(crate) fn sched_attr() -> io::Result<libc::sched_attr> {
    // SAFETY: sched_attr is plain integers, for which all zeroes is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as libc::c_uint;
    // SAFETY: the kernel writes at most `size` bytes into `attr`, which is that large; pid 0
    // is the calling thread; flags must be 0.
    let done = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Sets the calling thread's scheduling attributes (`sched_setattr`).
pub(crate) fn set_sched_attr(attr: &libc::sched_attr) -> io::Result<()> {
    let mut attr = *attr;
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: the kernel reads `attr.size` bytes from `attr`, which is that large and lives
    // across the call; pid 0 is the calling thread; flags must be 0.
    let done = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the program `command` starts run at the calling thread's nice value when that is
/// below 0: a raised primary's children start at nice 0 (`SCHED_RESET_ON_FORK`, see
/// `priority`), which is right for workers, not for a helper the primary waits on (an
/// upgrade's check). The helper, this process's own user, may go back to the value its parent
/// has (the parent got there with the privilege both share).
pub(crate) fn keep_priority(command: &mut tokio::process::Command) {
    let nice = match sched_attr() {
        Ok(attr) if attr.sched_nice < 0 => attr.sched_nice,
        _ => return,
    };
    // SAFETY: the closure runs in the child between fork and exec, where it only makes one
    // async-signal-safe call (setpriority, on the child's own and only thread); a failure
    // leaves the child at nice 0, which is what it would have been.
    unsafe {
        command.pre_exec(move || {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_pid_is_written_in_place_with_a_terminating_nul() {
        let mut image = ExecImage::new(
            CString::new("/bin/true").unwrap(),
            vec![CString::new("true").unwrap()],
            vec![CString::new("A=1").unwrap()],
            true,
        );
        image.fill_listen_pid();
        // SAFETY: the pointer is valid for the image's lifetime; test-only read.
        let written = unsafe { std::ffi::CStr::from_ptr(image.envp_ptrs[1]) };
        assert_eq!(
            written.to_str().unwrap(),
            format!("LISTEN_PID={}", std::process::id())
        );
        assert!(image.envp_ptrs[2].is_null());
        assert!(image.argv_ptrs[1].is_null());
    }

    #[test]
    fn reserving_low_fds_returns_only_fds_below_the_limit() {
        // Other test threads open and close fds concurrently, so only what the call returns
        // can be checked here; the integration tests check what workers receive.
        let reserved = reserve_low_fds(40).unwrap();
        let raw: Vec<RawFd> = reserved.iter().map(AsRawFd::as_raw_fd).collect();
        assert!(raw.iter().all(|fd| (3..40).contains(fd)), "{raw:?}");
        let mut distinct = raw.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), raw.len());
    }
}
