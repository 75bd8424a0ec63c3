//! The sockets ustad passed: read once from `USTAD_PRELOAD_FDS` when the library is loaded,
//! then consulted on every `bind`, `listen`, `shutdown` and `unlink`.
//!
//! `USTAD_PRELOAD_FDS` lists, comma-separated, `FD:INODE` for each socket (the socket's inode,
//! which identifies it while it is open), followed by `:MAJOR:MINOR:INO` (the device and inode
//! of its socket file) for a Unix socket bound to a path:
//! `3:81234,4:81240:0:25:1234567`. The fd numbers alone would not do: a program may close
//! fd 3 and get that number back for something else, and the worker's children inherit the
//! variable whether or not they inherit the fds. A socket counts only while its fd still holds
//! the socket of that inode.

use crate::addr::{FileId, Target, rank};

/// The most sockets the library keeps track of (a pool has a handful).
pub(crate) const MAX_SOCKETS: usize = 16;

/// One socket ustad passed, as the variable names it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Passed {
    /// Where the worker received it.
    pub(crate) fd: i32,
    /// Its inode: while `fd` has it, `fd` is ustad's socket.
    pub(crate) inode: u64,
    /// Its socket file, for a Unix socket bound to a path.
    pub(crate) file: Option<FileId>,
}

/// Reads `USTAD_PRELOAD_FDS`; entries that cannot be read are skipped, and at most
/// [`MAX_SOCKETS`] are kept.
pub(crate) fn parse(value: &[u8]) -> impl Iterator<Item = Passed> + '_ {
    value
        .split(|b| *b == b',')
        .filter_map(parse_entry)
        .take(MAX_SOCKETS)
}

fn parse_entry(entry: &[u8]) -> Option<Passed> {
    let mut fields = entry.split(|b| *b == b':');
    let mut next = || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
    let fd = i32::try_from(next()?).ok()?;
    let inode = next()?;
    let file = match next() {
        None => None,
        Some(major) => Some(FileId {
            dev_major: u32::try_from(major).ok()?,
            dev_minor: u32::try_from(next()?).ok()?,
            ino: next()?,
        }),
    };
    if next().is_some() || fd < 0 {
        return None;
    }
    Some(Passed { fd, inode, file })
}

/// A socket ustad passed, with the address it is bound to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) passed: Passed,
    pub(crate) target: Target,
}

/// Every socket ustad passed that this process had when the library was loaded.
#[derive(Debug)]
pub(crate) struct Table {
    held: [Option<Held>; MAX_SOCKETS],
}

impl Table {
    pub(crate) fn new(held: impl IntoIterator<Item = Held>) -> Table {
        let mut table = Table {
            held: [None; MAX_SOCKETS],
        };
        for (slot, held) in table.held.iter_mut().zip(held) {
            *slot = Some(held);
        }
        table
    }

    /// Whether there is nothing to intercept.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.iter().all(Option::is_none)
    }

    fn iter(&self) -> impl Iterator<Item = &Held> {
        self.held.iter().flatten()
    }

    /// The sockets a program binding `requested` should get, best match first.
    pub(crate) fn candidates(&self, requested: &Target) -> Candidates {
        let mut found = Candidates {
            held: [None; MAX_SOCKETS],
            len: 0,
        };
        for held in self.iter() {
            if let Some(rank) = rank(&held.target, requested) {
                found.held[found.len] = Some((rank, *held));
                found.len += 1;
            }
        }
        // Stable: among equal ranks, the pool's first socket first.
        found.held[..found.len].sort_by_key(|entry| entry.map(|(rank, _)| u8::MAX - rank));
        found
    }

    /// The socket of this inode, if ustad passed it.
    pub(crate) fn by_inode(&self, inode: u64) -> Option<&Held> {
        self.iter().find(|held| held.passed.inode == inode)
    }

    /// The socket ustad passed at this fd.
    pub(crate) fn by_fd(&self, fd: i32) -> Option<&Held> {
        self.iter().find(|held| held.passed.fd == fd)
    }

    /// Whether ustad passed a Unix socket bound to this file.
    pub(crate) fn holds_file(&self, file: FileId) -> bool {
        self.iter().any(|held| held.passed.file == Some(file))
    }

    /// Whether any socket ustad passed is bound to a path (else `unlink` needs no look).
    pub(crate) fn has_files(&self) -> bool {
        self.iter().any(|held| held.passed.file.is_some())
    }
}

/// The sockets matching an address, best first (no allocation).
#[derive(Debug)]
pub(crate) struct Candidates {
    held: [Option<(u8, Held)>; MAX_SOCKETS],
    len: usize,
}

impl Candidates {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Held> {
        self.held[..self.len].iter().flatten().map(|(_, held)| held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_lists_fds_inodes_and_socket_files() {
        let parsed: Vec<Passed> = parse(b"3:81234,4:81240:0:25:1234567").collect();
        assert_eq!(
            parsed,
            [
                Passed {
                    fd: 3,
                    inode: 81234,
                    file: None
                },
                Passed {
                    fd: 4,
                    inode: 81240,
                    file: Some(FileId {
                        dev_major: 0,
                        dev_minor: 25,
                        ino: 1234567
                    })
                }
            ]
        );
    }

    #[test]
    fn entries_that_cannot_be_read_are_skipped() {
        let parsed: Vec<i32> = parse(b",x:1,3,-1:5,4:7:1,5:9:1:2:3:4,6:10, 7:11,8:12")
            .map(|p| p.fd)
            .collect();
        assert_eq!(parsed, [6, 8]);
        assert_eq!(parse(b"").count(), 0);
        let many = (0..40)
            .map(|i| format!("{i}:{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse(many.as_bytes()).count(), MAX_SOCKETS);
    }

    fn held(fd: i32, address: &str) -> Held {
        Held {
            passed: Passed {
                fd,
                inode: 100 + fd as u64,
                file: None,
            },
            target: Target::Ip(address.parse().unwrap()),
        }
    }

    #[test]
    fn the_closest_match_comes_first() {
        let table = Table::new([
            held(3, "127.0.0.1:3000"),
            held(4, "[::1]:3000"),
            held(5, "127.0.0.1:4000"),
        ]);
        let fds = |requested: &str| -> Vec<i32> {
            table
                .candidates(&Target::Ip(requested.parse().unwrap()))
                .iter()
                .map(|h| h.passed.fd)
                .collect()
        };
        assert_eq!(fds("[::]:3000"), [4, 3], "same family first");
        assert_eq!(fds("0.0.0.0:3000"), [3, 4]);
        assert_eq!(fds("[::1]:3000"), [4, 3]);
        assert_eq!(fds("127.0.0.1:4000"), [5]);
        assert!(fds("127.0.0.1:5000").is_empty());
        assert!(table.by_inode(104).is_some());
        assert!(table.by_inode(99).is_none());
        assert_eq!(table.by_fd(4).map(|h| h.passed.inode), Some(104));
        assert!(table.by_fd(6).is_none());
        assert!(!table.has_files());
        assert!(!table.is_empty());
        assert!(Table::new([]).is_empty());
    }
}
