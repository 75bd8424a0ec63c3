//! Seeing from outside that a worker waits for connections on one of its sockets: how
//! `ready = "listening"` knows that an unmodified server is ready, without its help.
//!
//! The primary holds every listening socket, so connections are queued from the start; what it
//! cannot know from the socket alone is when a worker starts taking them. A server waits for
//! connections in one of a few ways, each visible to its parent in `/proc`:
//!
//! - **epoll** (libuv/Node, tokio/mio, Python's asyncio, Go's netpoller, nginx): the socket is
//!   registered in an epoll set. `/proc/PID/fdinfo/EPFD` lists each target's inode (`ino:`, in
//!   hex) and the events it waits for; a target with `EPOLLIN` whose inode is the socket's
//!   counts.
//! - **a thread blocked in `accept`/`accept4`** on it (Python's `socket.accept()`, a Rust
//!   `std::net::TcpListener::incoming()` loop): `/proc/PID/task/TID/syscall` shows the call and
//!   its first argument, the fd.
//! - **a thread in `poll`/`ppoll`/`select`/`pselect6`** with the socket in its set (Python's
//!   `http.server` and `socketserver`, gunicorn's sync workers): the call's arguments point into
//!   the process's memory, which its parent may read through `/proc/PID/mem`.
//!
//! The whole tree of the worker's process is searched, so `sh -c` and `npm start` wrappers that
//! start the real server as a child work. Reading another process's `syscall` and `mem` needs
//! the same permission as `ptrace`: a parent running as the same user (or root) has it, also
//! under Yama's `ptrace_scope = 1`; with `ptrace_scope = 3` only epoll is seen.
//!
//! # Caveats
//! What this cannot see: a server that accepts through io_uring, or one that never waits on the
//! socket it was given (it binds another port, or binds the pool's address itself where the
//! preload library cannot hand it ustad's socket: see [`crate::preload`]). Such a worker is not seen listening, and is
//! stopped at `ready_timeout` like any worker that does not become ready; its pool wants
//! `ready = "notify"` (or `"delay:…"`).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::FileExt;

/// How a worker was seen waiting for connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The socket is in an epoll set, for reading.
    Epoll,
    /// A thread is blocked in `accept`/`accept4` on it.
    Accept,
    /// A thread is in `poll`/`ppoll` with the socket in its set.
    Poll,
    /// A thread is in `select`/`pselect6` with the socket in its read set.
    Select,
}

impl Wait {
    /// The name shown in logs and status: `epoll`, `accept`, `poll`, `select`.
    pub fn name(self) -> &'static str {
        match self {
            Wait::Epoll => "epoll",
            Wait::Accept => "accept",
            Wait::Poll => "poll",
            Wait::Select => "select",
        }
    }
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A process seen waiting for connections on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    /// The process that waits (the worker, or a process it started).
    pub pid: u32,
    /// The socket's inode: which of the sockets asked about.
    pub inode: u64,
    /// How it waits.
    pub how: Wait,
}

/// How many processes of one worker's tree are searched at most: enough for any wrapper and
/// a pre-forking server, and a bound on the cost of one look at a fork bomb.
const MAX_PROCESSES: usize = 256;
/// How many `poll` entries of one call are read at most (the file-descriptor limit of most
/// servers; a larger set is read up to this many).
const MAX_POLL_ENTRIES: usize = 65_536;
/// The largest `select` set (`FD_SETSIZE` is 1024; some programs use larger ones).
const MAX_SELECT_FDS: u64 = 65_536;

/// Looks for a process in the tree of `root` (itself and its descendants) waiting for
/// connections on one of the sockets with these inodes. `None`: not (yet) seen.
pub fn find(root: u32, inodes: &[u64]) -> Option<Sighting> {
    if inodes.is_empty() {
        return None;
    }
    let tree = descendants(root);
    // epoll first: it needs no fd table and covers most servers.
    for &pid in &tree {
        if let Some(inode) = epoll_targets(pid).find(|inode| inodes.contains(inode)) {
            return Some(Sighting {
                pid,
                inode,
                how: Wait::Epoll,
            });
        }
    }
    for &pid in &tree {
        if let Some(sighting) = blocked_on(pid, inodes) {
            return Some(sighting);
        }
    }
    None
}

/// The inode of the socket (or any file) an fd of this process refers to.
pub fn inode_of(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|stat| stat.st_ino)
}

/// `root` and its descendants, parents first, at most [`MAX_PROCESSES`].
fn descendants(root: u32) -> Vec<u32> {
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() && tree.len() < MAX_PROCESSES {
        let pid = tree[next];
        next += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if tree.len() < MAX_PROCESSES && !tree.contains(&child) {
                    tree.push(child);
                }
            }
        }
    }
    tree
}

/// The fds of a process and the inode of each one that is a socket.
fn socket_fds(pid: u32) -> HashMap<u64, u64> {
    let mut sockets = HashMap::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return sockets;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(inode) = fs::read_link(entry.path())
            .ok()
            .and_then(|target| socket_inode(target.to_str()?))
        {
            sockets.insert(fd, inode);
        }
    }
    sockets
}

/// The inodes of the targets of every epoll set this process holds that wait for input.
fn epoll_targets(pid: u32) -> impl Iterator<Item = u64> {
    let epolls: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]")
        })
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    epolls.into_iter().flat_map(move |fd| {
        fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .map(|info| epoll_input_targets(&info))
            .unwrap_or_default()
    })
}

/// A thread of this process blocked in `accept`, `poll` or `select` on one of the sockets.
fn blocked_on(pid: u32, inodes: &[u64]) -> Option<Sighting> {
    let mut calls = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        if let Some(call) = fs::read_to_string(task.path().join("syscall"))
            .ok()
            .and_then(|line| parse_syscall(&line))
            .and_then(WaitCall::from_syscall)
        {
            calls.push(call);
        }
    }
    if calls.is_empty() {
        return None;
    }
    let sockets = socket_fds(pid);
    let ours = |fd: u64| sockets.get(&fd).copied().filter(|i| inodes.contains(i));
    let memory = || fs::File::open(format!("/proc/{pid}/mem")).ok();
    for call in calls {
        let seen = match call {
            WaitCall::Accept { fd } => ours(fd).map(|inode| (inode, Wait::Accept)),
            WaitCall::Poll { fds, count } => {
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                let entries = count.min(MAX_POLL_ENTRIES);
                let mut bytes = vec![0; entries * POLLFD_SIZE];
                memory()
                    .and_then(|mem| mem.read_exact_at(&mut bytes, fds).ok())
                    .and_then(|()| polled_for_input(&bytes).find_map(ours))
                    .map(|inode| (inode, Wait::Poll))
            }
            WaitCall::Select { nfds, read_set } if read_set != 0 => {
                let nfds = nfds.min(MAX_SELECT_FDS);
                let mut bytes = vec![0; fd_set_bytes(nfds)];
                memory()
                    .and_then(|mem| mem.read_exact_at(&mut bytes, read_set).ok())
                    .and_then(|()| fds_in_set(&bytes, nfds).find_map(ours))
                    .map(|inode| (inode, Wait::Select))
            }
            WaitCall::Select { .. } => None,
        };
        if let Some((inode, how)) = seen {
            return Some(Sighting { pid, inode, how });
        }
    }
    None
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

const EPOLLIN: u64 = 0x1;

/// The inodes of the targets of an epoll fd's `fdinfo` that wait for input. Its lines read
/// `tfd:        3 events:       19 data: …  pos:0 ino:3c6e sdev:8` (`events` and `ino` in hex).
fn epoll_input_targets(fdinfo: &str) -> Vec<u64> {
    fdinfo
        .lines()
        .filter(|line| line.starts_with("tfd:"))
        .filter_map(|line| {
            let field = |name: &str| {
                let mut words = line.split_whitespace();
                words.find(|word| word.starts_with(name)).and_then(|word| {
                    // `ino:3c6e` is one word; `events:       19` is two.
                    let value = &word[name.len()..];
                    let value = if value.is_empty() {
                        words.next()?
                    } else {
                        value
                    };
                    u64::from_str_radix(value, 16).ok()
                })
            };
            let events = field("events:")?;
            let inode = field("ino:")?;
            (events & EPOLLIN != 0).then_some(inode)
        })
        .collect()
}

/// What `/proc/PID/task/TID/syscall` says: the call's number and its six arguments, when the
/// thread is blocked in a system call (`None` when it runs, or is not in one).
fn parse_syscall(line: &str) -> Option<(u64, [u64; 6])> {
    let mut words = line.split_whitespace();
    let number = words.next()?.parse::<u64>().ok()?;
    let mut args = [0; 6];
    for arg in &mut args {
        let word = words.next()?;
        *arg = u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()?;
    }
    Some((number, args))
}

/// The system calls a thread waits for connections in, with the arguments that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitCall {
    Accept { fd: u64 },
    Poll { fds: u64, count: u64 },
    Select { nfds: u64, read_set: u64 },
}

impl WaitCall {
    fn from_syscall((number, args): (u64, [u64; 6])) -> Option<WaitCall> {
        let number = i64::try_from(number).ok()?;
        let call = if number == libc::SYS_accept || number == libc::SYS_accept4 {
            WaitCall::Accept { fd: args[0] }
        } else if number == libc::SYS_ppoll || is_poll(number) {
            WaitCall::Poll {
                fds: args[0],
                count: args[1],
            }
        } else if number == libc::SYS_pselect6 || is_select(number) {
            WaitCall::Select {
                nfds: args[0],
                read_set: args[1],
            }
        } else {
            return None;
        };
        Some(call)
    }
}

// `poll` and `select` exist as system calls of their own on x86_64 only; elsewhere the C
// library uses `ppoll` and `pselect6`.
#[cfg(target_arch = "x86_64")]
fn is_poll(number: i64) -> bool {
    number == libc::SYS_poll
}
#[cfg(target_arch = "x86_64")]
fn is_select(number: i64) -> bool {
    number == libc::SYS_select
}
#[cfg(not(target_arch = "x86_64"))]
fn is_poll(_: i64) -> bool {
    false
}
#[cfg(not(target_arch = "x86_64"))]
fn is_select(_: i64) -> bool {
    false
}

/// `struct pollfd { int fd; short events; short revents; }`
const POLLFD_SIZE: usize = 8;
const POLLIN: i16 = 0x1;

/// The fds of an array of `struct pollfd` (native byte order) that wait for input.
fn polled_for_input(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(POLLFD_SIZE).filter_map(|entry| {
        let fd = i32::from_ne_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let events = i16::from_ne_bytes([entry[4], entry[5]]);
        // A negative fd is an entry the caller asks to skip.
        (fd >= 0 && events & POLLIN != 0).then_some(fd as u64)
    })
}

/// The size of an `fd_set` of `nfds` bits as the kernel reads it: whole `long`s.
fn fd_set_bytes(nfds: u64) -> usize {
    let word = std::mem::size_of::<libc::c_long>() as u64;
    usize::try_from(nfds.div_ceil(8 * word) * word).unwrap_or(0)
}

/// The fds below `nfds` whose bit is set in an `fd_set` (native `long`s).
fn fds_in_set(bytes: &[u8], nfds: u64) -> impl Iterator<Item = u64> + '_ {
    let word = std::mem::size_of::<libc::c_long>();
    bytes
        .chunks_exact(word)
        .enumerate()
        .flat_map(move |(index, chunk)| {
            let mut raw = [0u8; 8];
            raw[..word].copy_from_slice(chunk);
            let bits = u64::from_ne_bytes(raw);
            let base = (index * word * 8) as u64;
            (0..(word * 8) as u64)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| base + bit)
        })
        .filter(move |fd| *fd < nfds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_lines() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        9 events:       19 data:                9  pos:0 ino:3c6e sdev:8\n\
                    tfd:       12 events:        4 data:                c  pos:0 ino:3c70 sdev:8\n\
                    tfd:       13 events: 80000019 data:               d  pos:0 ino:1a sdev:9\n";
        // 0x4 is EPOLLOUT only: a socket written to, not waited on for connections.
        assert_eq!(epoll_input_targets(info), [0x3c6e, 0x1a]);
        assert!(epoll_input_targets("pos:\t0\nflags:\t02\n").is_empty());
        assert!(epoll_input_targets("tfd: 3 events: zz data: 0 pos:0 ino:1 sdev:0").is_empty());
    }

    #[test]
    fn syscall_lines() {
        let blocked = "288 0x3 0x7ffd5c 0x7ffd58 0x80800 0x0 0x0 0x7ffd5c40 0x7f1c2d";
        assert_eq!(
            parse_syscall(blocked),
            Some((288, [3, 0x7ffd5c, 0x7ffd58, 0x80800, 0, 0]))
        );
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(parse_syscall("-1 0x7ffd5c40 0x7f1c2d"), None);
        assert_eq!(parse_syscall("7 0x1 0x2"), None, "cut short");
    }

    #[test]
    fn the_calls_that_wait_for_connections() {
        let args = [5, 0x1000, 2, 0, 0, 0];
        let number = |n: i64| (n as u64, args);
        assert_eq!(
            WaitCall::from_syscall(number(libc::SYS_accept4)),
            Some(WaitCall::Accept { fd: 5 })
        );
        assert_eq!(
            WaitCall::from_syscall(number(libc::SYS_ppoll)),
            Some(WaitCall::Poll {
                fds: 5,
                count: 0x1000
            })
        );
        assert_eq!(
            WaitCall::from_syscall(number(libc::SYS_pselect6)),
            Some(WaitCall::Select {
                nfds: 5,
                read_set: 0x1000
            })
        );
        assert_eq!(WaitCall::from_syscall(number(libc::SYS_read)), None);
    }

    #[test]
    fn pollfd_arrays() {
        let mut bytes = Vec::new();
        for (fd, events) in [(3i32, POLLIN), (-1, POLLIN), (7, 0x4), (9, POLLIN | 0x4)] {
            bytes.extend_from_slice(&fd.to_ne_bytes());
            bytes.extend_from_slice(&events.to_ne_bytes());
            bytes.extend_from_slice(&0i16.to_ne_bytes());
        }
        assert_eq!(polled_for_input(&bytes).collect::<Vec<_>>(), [3, 9]);
    }

    #[test]
    fn fd_sets() {
        assert_eq!(fd_set_bytes(1), 8);
        assert_eq!(fd_set_bytes(64), 8);
        assert_eq!(fd_set_bytes(65), 16);
        assert_eq!(fd_set_bytes(1024), 128);
        let mut set = vec![0u8; 16];
        for fd in [0u64, 5, 64, 70] {
            let (word, bit) = ((fd / 64) as usize, fd % 64);
            let mut value = u64::from_ne_bytes(set[word * 8..word * 8 + 8].try_into().unwrap());
            value |= 1 << bit;
            set[word * 8..word * 8 + 8].copy_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(fds_in_set(&set, 128).collect::<Vec<_>>(), [0, 5, 64, 70]);
        assert_eq!(fds_in_set(&set, 65).collect::<Vec<_>>(), [0, 5, 64]);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
