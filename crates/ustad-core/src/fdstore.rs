//! What the primary keeps in its service manager's file descriptor store (systemd's fdstore,
//! enabled by `FileDescriptorStoreMax=` in the unit): a copy of every listening socket it
//! bound, kept in step as reloads and scaling add and close sockets.
//!
//! Why: when the primary dies (a crash, an OOM kill), its guard stops every worker and
//! systemd starts ustad again (`Restart=on-failure`). Without the store, the listening sockets
//! close with the primary: connections are refused until the new one has bound again, and
//! those queued are reset. With it, systemd holds the sockets across the restart; connections
//! wait in their queues, and the new primary takes the sockets back
//! ([`crate::sockets::StoredSockets`]) and serves them. An upgrade (`ustad upgrade`) needs none
//! of this: the sockets cross the exec themselves.
//!
//! The store is used when the service manager says it has one: systemd 254 and later set
//! `FDSTORE` to `FileDescriptorStoreMax=`. A socket ustad closes must leave the store too
//! (`FDSTOREREMOVE=1`): systemd's copy would keep it listening, and the connections the kernel
//! put in its queue would wait forever.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

use ustad_proto::env::FDSTORE;

use crate::service::ServiceNotifier;
use crate::sockets::Listeners;

/// Which socket an fd is: `st_dev` and `st_ino` of its inode in sockfs, the same for every
/// copy of the fd and different for every other socket.
pub type SocketId = (u64, u64);

/// The sockets sent to the service manager's store, and how to keep them in step.
#[derive(Debug, Default)]
pub struct FdStore {
    /// How many fds the store takes; 0: there is no store.
    capacity: usize,
    /// What the store holds, as sent: name and socket.
    sent: BTreeMap<String, SocketId>,
    /// The [`Listeners::changes`] last sent.
    synced: Option<u64>,
    /// The store was found too small, and that was logged.
    full: bool,
}

/// What to tell the service manager to bring its store in step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Names whose fds to drop (`FDSTOREREMOVE=1`): closed, or now another socket.
    pub remove: Vec<String>,
    /// Names to send (`FDSTORE=1`).
    pub store: Vec<String>,
}

impl FdStore {
    /// The store the service manager offers, from `FDSTORE`: none when it is unset, not a
    /// number, or 0.
    pub fn from_env() -> FdStore {
        let capacity = std::env::var(FDSTORE)
            .ok()
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        FdStore::new(capacity)
    }

    /// A store that takes `capacity` fds (0: none).
    pub fn new(capacity: usize) -> FdStore {
        FdStore {
            capacity,
            ..FdStore::default()
        }
    }

    /// Whether there is a store to keep sockets in.
    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Tells the service manager to drop the fds stored under `names` (sockets a restarted
    /// primary did not take back).
    pub fn drop_names(&self, service: &ServiceNotifier, names: &[String]) {
        if !self.is_enabled() {
            return;
        }
        for name in names {
            service.remove_stored(name);
        }
    }

    /// Brings the store in step with `listeners`, when they changed since the last call.
    pub fn sync(&mut self, service: &ServiceNotifier, listeners: &Listeners) {
        if !self.is_enabled() || self.synced == Some(listeners.changes()) {
            return;
        }
        self.synced = Some(listeners.changes());
        let current: Vec<(String, BorrowedFd<'_>, SocketId)> = listeners
            .to_store()
            .into_iter()
            .filter_map(|(name, fd)| {
                let id = socket_id(fd)?;
                Some((name, fd, id))
            })
            .collect();
        let ids: Vec<(String, SocketId)> = current
            .iter()
            .map(|(name, _, id)| (name.clone(), *id))
            .collect();
        let changes = changes(&self.sent, &ids);
        for name in &changes.remove {
            service.remove_stored(name);
            self.sent.remove(name);
        }
        for name in &changes.store {
            let Some((_, fd, id)) = current.iter().find(|(n, _, _)| n == name) else {
                continue;
            };
            if self.sent.len() >= self.capacity {
                if !self.full {
                    self.full = true;
                    tracing::warn!(
                        event = "fd_store_full",
                        "the service manager's fd store takes {} fds (FileDescriptorStoreMax=), ustad has {} sockets to keep there: {name} and those after it close when the primary dies; raise FileDescriptorStoreMax=",
                        self.capacity,
                        ids.len()
                    );
                }
                continue;
            }
            if service.store_fd(name, *fd).is_ok() {
                self.sent.insert(name.clone(), *id);
            }
        }
        if !changes.remove.is_empty() || !changes.store.is_empty() {
            tracing::debug!(
                event = "fd_store",
                stored = self.sent.len(),
                "the service manager's fd store holds {} sockets of ustad ({} sent, {} dropped)",
                self.sent.len(),
                changes.store.len(),
                changes.remove.len()
            );
        }
    }
}

/// What to remove from and send to a store that holds `sent`, so that it holds `current`: a
/// name no longer there, or now naming another socket, is removed (before that other socket
/// is sent); a name new or changed is sent.
pub fn changes(sent: &BTreeMap<String, SocketId>, current: &[(String, SocketId)]) -> Changes {
    let mut result = Changes::default();
    for (name, id) in sent {
        let now = current.iter().find(|(n, _)| n == name).map(|(_, id)| id);
        if now != Some(id) {
            result.remove.push(name.clone());
        }
    }
    for (name, id) in current {
        if sent.get(name) != Some(id) {
            result.store.push(name.clone());
        }
    }
    result
}

fn socket_id(fd: BorrowedFd<'_>) -> Option<SocketId> {
    let stat = rustix::fs::fstat(fd).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(entries: &[(&str, u64)]) -> BTreeMap<String, SocketId> {
        entries
            .iter()
            .map(|(name, ino)| ((*name).to_owned(), (1, *ino)))
            .collect()
    }

    fn current(entries: &[(&str, u64)]) -> Vec<(String, SocketId)> {
        entries
            .iter()
            .map(|(name, ino)| ((*name).to_owned(), (1, *ino)))
            .collect()
    }

    #[test]
    fn the_first_sync_sends_everything() {
        let changes = changes(
            &BTreeMap::new(),
            &current(&[("ustad/http", 10), ("ustad/rp/web/0", 11)]),
        );
        assert_eq!(changes.remove, Vec::<String>::new());
        assert_eq!(changes.store, ["ustad/http", "ustad/rp/web/0"]);
    }

    #[test]
    fn closed_sockets_are_removed_and_replaced_ones_removed_then_sent() {
        let before = sent(&[
            ("ustad/http", 10),
            ("ustad/rp/web/0", 11),
            ("ustad/rp/web/1", 12),
        ]);
        // A shrink closed slot 1; a reload moved `http` to another address (a new socket).
        let after = current(&[("ustad/http", 20), ("ustad/rp/web/0", 11)]);
        let changes = changes(&before, &after);
        assert_eq!(changes.remove, ["ustad/http", "ustad/rp/web/1"]);
        assert_eq!(changes.store, ["ustad/http"]);
        assert_eq!(
            super::changes(&sent(&[("ustad/a", 1)]), &current(&[("ustad/a", 1)])),
            Changes::default()
        );
    }

    /// A service manager's notify socket: each datagram with the inodes of the fds it carried.
    struct Manager {
        _dir: tempfile::TempDir,
        socket: std::os::unix::net::UnixDatagram,
        service: ServiceNotifier,
    }

    impl Manager {
        fn new() -> Manager {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            let service = ServiceNotifier::new(path.as_os_str()).unwrap();
            Manager {
                _dir: dir,
                socket,
                service,
            }
        }

        fn received(&self) -> Vec<(String, Vec<u64>)> {
            use std::mem::MaybeUninit;
            use std::os::fd::AsFd;

            use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
            let mut messages = Vec::new();
            loop {
                let mut buffer = [0u8; 512];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
                let Ok(received) =
                    rustix::net::recvmsg(&self.socket, &mut iov, &mut control, RecvFlags::empty())
                else {
                    return messages;
                };
                let mut inodes = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = message {
                        for fd in fds {
                            inodes.push(socket_id(fd.as_fd()).unwrap().1);
                        }
                    }
                }
                let text = String::from_utf8(buffer[..received.bytes].to_vec()).unwrap();
                messages.push((text, inodes));
            }
        }
    }

    fn reuseport_listeners(size: usize) -> Listeners {
        use crate::config::{Command, Config, PoolSpec, Size, SocketMode, SocketSpec};
        let mut config = Config::default();
        let mut socket = SocketSpec::new("127.0.0.1:0".parse().unwrap());
        socket.mode = SocketMode::ReusePort;
        config.sockets.insert("http".into(), socket);
        let mut pool = PoolSpec::new(Command::new(["x"]).unwrap());
        pool.size = Size::fixed(size).unwrap();
        pool.sockets = vec!["http".into()];
        config.pools.insert("web".into(), pool);
        Listeners::bind(&config).unwrap()
    }

    fn inode_of(listeners: &Listeners, name: &str) -> u64 {
        let (_, fd) = listeners
            .to_store()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        socket_id(fd).unwrap().1
    }

    #[test]
    fn sync_sends_each_socket_once_and_removes_the_closed_ones() {
        let manager = Manager::new();
        let mut listeners = reuseport_listeners(2);
        let mut store = FdStore::new(8);
        store.sync(&manager.service, &listeners);
        assert_eq!(
            manager.received(),
            [
                (
                    "FDSTORE=1\nFDNAME=ustad/http/web/0\n".to_owned(),
                    vec![inode_of(&listeners, "ustad/http/web/0")]
                ),
                (
                    "FDSTORE=1\nFDNAME=ustad/http/web/1\n".to_owned(),
                    vec![inode_of(&listeners, "ustad/http/web/1")]
                ),
            ]
        );
        store.sync(&manager.service, &listeners);
        assert_eq!(manager.received(), [], "nothing changed, nothing sent");
        listeners.release_slots("web", 1);
        store.sync(&manager.service, &listeners);
        assert_eq!(
            manager.received(),
            [(
                "FDSTOREREMOVE=1\nFDNAME=ustad/http/web/1\n".to_owned(),
                vec![]
            )]
        );
        listeners
            .ensure_slot(&["http".to_owned()], "web", 1)
            .unwrap();
        store.sync(&manager.service, &listeners);
        let received = manager.received();
        assert_eq!(received.len(), 1, "{received:?}");
        assert_eq!(received[0].0, "FDSTORE=1\nFDNAME=ustad/http/web/1\n");
    }

    #[test]
    fn a_store_too_small_takes_what_fits_and_no_store_takes_nothing() {
        let manager = Manager::new();
        let listeners = reuseport_listeners(3);
        FdStore::new(2).sync(&manager.service, &listeners);
        assert_eq!(manager.received().len(), 2);
        let mut none = FdStore::new(0);
        assert!(!none.is_enabled());
        none.sync(&manager.service, &listeners);
        none.drop_names(&manager.service, &["ustad/http".to_owned()]);
        assert_eq!(manager.received(), []);
        FdStore::new(1).drop_names(&manager.service, &["ustad/old".to_owned()]);
        assert_eq!(
            manager.received(),
            [("FDSTOREREMOVE=1\nFDNAME=ustad/old\n".to_owned(), vec![])]
        );
    }
}
