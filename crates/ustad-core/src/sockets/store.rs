//! The sockets the service manager kept in its file descriptor store (systemd's fdstore, see
//! [`crate::fdstore`]) and hands back when it restarts a primary that died: each is taken
//! back if it still is the socket the configuration asks for, else closed and dropped.
//!
//! Why: a restarted primary that binds afresh would fail on a Unix socket the store still
//! holds ("another process is listening on it"), and a stored TCP socket it does not take would
//! keep accepting connections nobody serves. So every stored socket is either taken or named
//! for [`FDSTOREREMOVE`](ustad_proto::notify::FDSTOREREMOVE), and taken ones are what a worker
//! gets, with the connections queued on them while no primary ran.
//!
//! Names, in `LISTEN_FDNAMES`: `ustad/NAME` for the socket `[sockets.NAME]`, and
//! `ustad/NAME/POOL/SLOT` for the socket of one slot of a `reuseport` socket. Configuration
//! names cannot hold `/`, so these never collide with a socket unit's `FileDescriptorName=`.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::RawFd;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Config, ListenAddr, SocketMode, SocketSpec};

/// What the names of stored sockets start with.
pub(super) const PREFIX: &str = "ustad/";

/// Which socket a stored fd is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StoreName {
    /// `ustad/NAME`: a `shared` or `round-robin` socket.
    Socket(String),
    /// `ustad/NAME/POOL/SLOT`: a `reuseport` socket's socket for one slot.
    Slot {
        socket: String,
        pool: String,
        slot: usize,
    },
}

impl StoreName {
    /// The name of a stored fd, if it is one of ustad's.
    pub(crate) fn parse(fdname: &str) -> Option<StoreName> {
        let rest = fdname.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [socket] if !socket.is_empty() => Some(StoreName::Socket((*socket).to_owned())),
            [socket, pool, slot] if !socket.is_empty() && !pool.is_empty() => {
                Some(StoreName::Slot {
                    socket: (*socket).to_owned(),
                    pool: (*pool).to_owned(),
                    slot: slot.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for StoreName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreName::Socket(socket) => write!(f, "{PREFIX}{socket}"),
            StoreName::Slot { socket, pool, slot } => {
                write!(f, "{PREFIX}{socket}/{pool}/{slot}")
            }
        }
    }
}

/// A `reuseport` socket's socket for one slot: (pool, slot) and the socket.
pub(super) type SlotSocket = ((String, usize), Socket);

/// The sockets the service manager handed back from its store, sorted against a
/// configuration: those to take, by socket name, and the names of those closed.
#[derive(Debug, Default)]
pub struct StoredSockets {
    /// `ustad/NAME`: the socket `[sockets.NAME]` (`shared` or `round-robin`).
    pub(super) sockets: HashMap<String, Socket>,
    /// `ustad/NAME/POOL/SLOT`: the slots' sockets of the `reuseport` socket `[sockets.NAME]`.
    pub(super) slots: HashMap<String, Vec<SlotSocket>>,
    /// Names to drop from the store: their sockets were closed.
    dropped: Vec<String>,
}

impl StoredSockets {
    /// Takes each stored socket that still serves `config` as the socket (or slot) it is
    /// named after; closes the others. `unit` names the sockets a socket unit passed: those
    /// are not taken from the store.
    pub(super) fn sort(
        stored: Vec<(String, RawFd, Socket)>,
        config: &Config,
        unit: &[&str],
    ) -> StoredSockets {
        let mut sorted = StoredSockets::default();
        for (fdname, fd, socket) in stored {
            match place(&fdname, &socket, config, unit) {
                Ok(Placed::Socket(name)) if !sorted.sockets.contains_key(&name) => {
                    log_taken(&fdname, fd, &socket);
                    sorted.sockets.insert(name, socket);
                }
                Ok(Placed::Slot(name, key)) => {
                    let slots = sorted.slots.entry(name).or_default();
                    if slots.iter().any(|(taken, _)| *taken == key) {
                        sorted.drop_socket(fdname, fd, "another fd of that name was taken");
                    } else {
                        log_taken(&fdname, fd, &socket);
                        slots.push((key, socket));
                    }
                }
                Ok(Placed::Socket(_)) => {
                    sorted.drop_socket(fdname, fd, "another fd of that name was taken");
                }
                Err(why) => sorted.drop_socket(fdname, fd, &why),
            }
        }
        sorted
    }

    /// The names to drop from the store: the sockets sorted out, now closed.
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    fn drop_socket(&mut self, fdname: String, fd: RawFd, why: &str) {
        tracing::info!(
            event = "dropped_from_store",
            name = %fdname,
            fd,
            "{fdname}: fd {fd} from the service manager's fd store is closed: {why}"
        );
        self.dropped.push(fdname);
    }
}

/// Where a stored socket goes, or why it goes nowhere.
fn place(fdname: &str, socket: &Socket, config: &Config, unit: &[&str]) -> Result<Placed, String> {
    let name = StoreName::parse(fdname).ok_or("it is not a name ustad gives")?;
    let (socket_name, slot) = match &name {
        StoreName::Socket(socket) => (socket, None),
        StoreName::Slot { socket, pool, slot } => (socket, Some((pool, *slot))),
    };
    let spec = config
        .sockets
        .get(socket_name)
        .ok_or("the configuration has no such socket any more")?;
    if unit.contains(&socket_name.as_str()) {
        return Err("the service manager passed this socket from its socket unit".to_owned());
    }
    let reuseport = spec.mode == SocketMode::ReusePort;
    let placed = match slot {
        None if !reuseport => Placed::Socket(socket_name.clone()),
        Some((pool, slot)) if reuseport => {
            let serves = config
                .pools
                .get(pool)
                .is_some_and(|spec| spec.sockets.contains(socket_name) && slot < spec.size.count());
            if !serves {
                return Err(format!("pool {pool} has no slot {slot} on this socket"));
            }
            Placed::Slot(socket_name.clone(), (pool.clone(), slot))
        }
        _ => return Err(format!("the socket's mode is now {}", spec.mode)),
    };
    fits(socket, spec)?;
    Ok(placed)
}

/// What a stored socket is taken as.
enum Placed {
    /// The socket of this name.
    Socket(String),
    /// A slot's socket of the `reuseport` socket of this name.
    Slot(String, (String, usize)),
}

fn log_taken(fdname: &str, fd: RawFd, socket: &Socket) {
    let address = socket
        .local_addr()
        .map(|a| super::describe(&a))
        .unwrap_or_else(|e| format!("? ({e})"));
    tracing::info!(
        event = "taken_from_store",
        name = %fdname,
        fd,
        address = %address,
        "{fdname}: fd {fd} from the service manager's fd store, still listening on {address}"
    );
}

/// Whether a stored socket still is the one `spec` asks for: a listening stream socket on
/// the configured address (any port for port 0), and for a Unix socket, its file still there.
fn fits(socket: &Socket, spec: &SocketSpec) -> Result<(), String> {
    let listening =
        socket.r#type().ok() == Some(Type::STREAM) && socket.is_listener().unwrap_or(false);
    if !listening {
        return Err("it is not a listening stream socket".to_owned());
    }
    let local = socket
        .local_addr()
        .map_err(|error| format!("its address cannot be read: {error}"))?;
    let same = match &spec.listen {
        ListenAddr::Tcp(configured) => {
            let domain = socket.domain().ok();
            let tcp = domain == Some(Domain::IPV4) || domain == Some(Domain::IPV6);
            tcp && local.as_socket().is_some_and(|address| {
                address.ip() == configured.ip()
                    && (configured.port() == 0 || address.port() == configured.port())
            })
        }
        ListenAddr::Unix(path) => local.as_pathname() == Some(path.as_path()) && is_socket(path),
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "it listens on {}, the configuration on {}",
            super::describe(&local),
            spec.listen
        ))
    }
}

fn is_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

/// The address a stored `reuseport` socket listens on, for binding the slots that were not
/// stored into the same group.
pub(super) fn tcp_address(socket: &Socket) -> Option<std::net::SocketAddr> {
    socket
        .local_addr()
        .ok()
        .as_ref()
        .and_then(SockAddr::as_socket)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    use super::*;
    use crate::config::{Command, PoolSpec, Size};
    use crate::sockets::{Activation, Listeners};

    /// `[sockets.http]` (`http_mode`) and `[sockets.rp]` (`reuseport`), both used by `web`
    /// of `size` slots.
    fn config(http: &str, http_mode: SocketMode, rp: &str, size: usize) -> Config {
        let mut config = Config::default();
        for (name, listen, mode) in [("http", http, http_mode), ("rp", rp, SocketMode::ReusePort)] {
            let mut socket = SocketSpec::new(listen.parse().unwrap());
            socket.mode = mode;
            config.sockets.insert(name.into(), socket);
        }
        let mut pool = PoolSpec::new(Command::new(["x"]).unwrap());
        pool.size = Size::fixed(size).unwrap();
        pool.sockets = vec!["http".into(), "rp".into()];
        config.pools.insert("web".into(), pool);
        config
    }

    /// What a service manager keeps: a copy of each fd, by name.
    fn store_copies(listeners: &Listeners) -> Vec<(String, OwnedFd)> {
        listeners
            .to_store()
            .into_iter()
            .map(|(name, fd)| (name, fd.try_clone_to_owned().unwrap()))
            .collect()
    }

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn a_restarted_primary_takes_its_sockets_back_with_the_connections_queued_meanwhile() {
        let config = config("127.0.0.1:0", SocketMode::Shared, "127.0.0.1:0", 2);
        let sockets = ["http".to_owned(), "rp".to_owned()];
        let mut first = Listeners::bind(&config).unwrap();
        for slot in 0..2 {
            first.ensure_slot(&sockets, "web", slot).unwrap();
        }
        let mut names: Vec<String> = first.to_store().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, ["ustad/http", "ustad/rp/web/0", "ustad/rp/web/1"]);
        let inodes: Vec<(String, u64)> = first
            .to_store()
            .into_iter()
            .map(|(name, fd)| (name, inode(fd)))
            .collect();
        let address = first.addresses()[0].1.clone();
        let mut store = store_copies(&first);
        // The primary dies; the store's copies keep the sockets listening.
        drop(first);
        let mut waiting = TcpStream::connect(&address).expect("queued while no primary runs");
        waiting.write_all(b"hello").unwrap();
        // Left over from an earlier configuration, and a slot the pool no longer has.
        let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        store.push(("ustad/old".to_owned(), old.into()));
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        store.push(("ustad/rp/web/7".to_owned(), gone.into()));
        let mut activation = Activation::from_fds(store);
        let stored = activation.take_stored(&config);
        assert_eq!(stored.dropped(), ["ustad/old", "ustad/rp/web/7"]);
        let second = Listeners::bind_taking(&config, activation, stored).unwrap();
        for (name, fd) in second.to_store() {
            let before = inodes.iter().find(|(n, _)| *n == name).unwrap().1;
            assert_eq!(inode(fd), before, "{name} is the same socket");
        }
        assert_eq!(second.to_store().len(), 3);
        assert!(
            !second.is_inherited("http"),
            "ustad's own, not a socket unit's"
        );
        let http = second.fds(&sockets, "web", 0)[0]
            .1
            .try_clone_to_owned()
            .unwrap();
        let (mut accepted, _) = std::net::TcpListener::from(http).accept().unwrap();
        let mut hello = [0u8; 5];
        accepted.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"hello");
    }

    #[test]
    fn stored_sockets_that_no_longer_fit_are_closed_and_bound_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let unix = format!("unix:{}", path.display());
        let before = config(&unix, SocketMode::Shared, "127.0.0.1:0", 1);
        let mut first = Listeners::bind(&before).unwrap();
        first.ensure_slot(&["rp".to_owned()], "web", 0).unwrap();
        let store = store_copies(&first);
        // The primary dies without removing its socket file; the file is then removed.
        std::mem::forget(first);
        std::fs::remove_file(&path).unwrap();
        // Meanwhile `rp` became `shared` on another port.
        let mut after = config(&unix, SocketMode::Shared, "127.0.0.1:0", 1);
        after.sockets.get_mut("rp").unwrap().mode = SocketMode::Shared;
        let mut activation = Activation::from_fds(store);
        let stored = activation.take_stored(&after);
        assert_eq!(stored.dropped(), ["ustad/http", "ustad/rp/web/0"]);
        let second = Listeners::bind_taking(&after, activation, stored).unwrap();
        assert!(path.exists(), "bound anew");
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        let names: Vec<String> = second.to_store().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["ustad/http", "ustad/rp"]);
    }

    #[test]
    fn a_socket_a_socket_unit_passes_is_not_taken_from_the_store() {
        let config = config("127.0.0.1:0", SocketMode::Shared, "127.0.0.1:0", 1);
        let unit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unit_inode = inode(unit.as_fd());
        let stale = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut activation = Activation::from_fds([
            ("http".to_owned(), OwnedFd::from(unit)),
            ("ustad/http".to_owned(), OwnedFd::from(stale)),
        ]);
        let stored = activation.take_stored(&config);
        assert_eq!(stored.dropped(), ["ustad/http"]);
        let listeners = Listeners::bind_taking(&config, activation, stored).unwrap();
        assert!(listeners.is_inherited("http"));
        let names: Vec<String> = listeners.to_store().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["ustad/rp/web/0"],
            "`http` is the socket unit's to keep"
        );
        let sockets = ["http".to_owned()];
        let http = listeners.fds(&sockets, "web", 0)[0].1;
        assert_eq!(inode(http), unit_inode, "the socket unit's socket serves");
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        for name in [
            StoreName::Socket("http".to_owned()),
            StoreName::Slot {
                socket: "http".to_owned(),
                pool: "web".to_owned(),
                slot: 3,
            },
        ] {
            assert_eq!(StoreName::parse(&name.to_string()), Some(name));
        }
        assert_eq!(
            StoreName::Slot {
                socket: "a.b".to_owned(),
                pool: "web-1".to_owned(),
                slot: 0
            }
            .to_string(),
            "ustad/a.b/web-1/0"
        );
        for foreign in [
            "http",
            "ustad/",
            "ustad/http/web",
            "ustad/http/web/x",
            "ustad/http//0",
            "ustad/a/b/1/2",
            "ustad/http/web/-1",
        ] {
            assert_eq!(StoreName::parse(foreign), None, "{foreign}");
        }
    }
}
