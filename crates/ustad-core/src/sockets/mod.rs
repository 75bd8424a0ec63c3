//! The listening sockets the primary binds before any worker starts and holds for its whole
//! life, so that no connection is refused while a worker restarts.
//!
//! - `shared`: one socket; every worker of every pool naming it accepts from the same queue.
//! - `reuseport`: one `SO_REUSEPORT` socket per (pool, slot); the kernel hashes each new
//!   connection to one of them. Slot `i`'s socket goes to the worker in slot `i` and to its
//!   replacements, so connections queued on it wait for the replacement instead of failing.
//!
//! # Socket activation
//! When a service manager started the primary with sockets of its own (`LISTEN_FDS` for the
//! primary's pid, see [`Activation`]), each is taken as the `[sockets.NAME]` that
//! `LISTEN_FDNAMES` names, instead of binding that socket's `listen` address:
//! - a socket of the configuration that was not passed is bound as usual (and logged);
//! - a passed socket whose name matches no `[sockets.NAME]` is an error: the service manager
//!   would keep it open, and its clients would wait forever instead of being refused;
//! - a passed socket must be a listening stream socket of the configured family (TCP for an IP
//!   address, Unix for `unix:`); its address and backlog are the socket unit's to decide;
//! - a `reuseport` socket that was passed is one socket, shared by every slot as in `shared`
//!   mode (with a warning): binding more on its address would need the privileges activation
//!   spares ustad, and they would reset their queued connections when ustad restarts;
//! - the Unix socket file of a passed socket belongs to the service manager, and is never
//!   removed.
//!
//! # Caveats
//! - An `SO_REUSEPORT` socket resets the connections still queued on it when its last holder
//!   closes it; the primary therefore closes a slot's socket only when the pool shrinks.
//! - `O_NONBLOCK` belongs to the shared socket description: a worker that sets it sets it for
//!   every worker holding the same socket.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Config, ListenAddr, SocketMode, SocketSpec};

mod activation;
mod handover;
mod store;

pub use self::activation::{Activation, ActivationError, listen_fds_from};
pub use self::handover::HandedListeners;
pub use self::store::StoredSockets;

/// The sockets of a configuration cannot be opened; nothing was started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// A socket could not be bound.
    #[error("cannot listen on {address} (socket `{socket}`): {source}")]
    Bind {
        /// The socket's name.
        socket: String,
        /// The address.
        address: String,
        /// The OS error, e.g. address in use or permission denied.
        #[source]
        source: io::Error,
    },
    /// The sockets passed by the service manager (socket activation) cannot be used.
    #[error(transparent)]
    Activation(#[from] ActivationError),
}

#[derive(Debug)]
enum Bound {
    Shared(Socket),
    /// `round-robin`: accepted by the primary, never passed to workers.
    Handed(Socket),
    ReusePort {
        /// The address with the port actually bound (port 0 resolved by the first bind).
        address: SocketAddr,
        backlog: u32,
        per_slot: HashMap<(String, usize), Socket>,
    },
}

impl Bound {
    /// One socket bound elsewhere (a service manager's), as `mode` uses it: `reuseport`
    /// becomes one socket for every slot.
    fn whole(socket: Socket, mode: SocketMode) -> Bound {
        if mode == SocketMode::RoundRobin {
            Bound::Handed(socket)
        } else {
            Bound::Shared(socket)
        }
    }
}

/// Every socket of a configuration, bound.
#[derive(Debug)]
pub struct Listeners {
    sockets: IndexMap<String, Bound>,
    /// Unix socket files this process created, removed on drop.
    unix_paths: Vec<PathBuf>,
    /// Sockets passed by the service manager rather than bound.
    inherited: Vec<String>,
    /// Counts the changes to the set of sockets, for [`Listeners::changes`].
    changes: u64,
}

impl Listeners {
    /// Binds every socket of `config` (for `reuseport` sockets, one per slot of every pool
    /// that uses them), or fails without leaving any bound. Sockets passed to this process by
    /// its service manager are taken instead of bound ([`Activation::from_env`],
    /// [`Listeners::bind_with`]).
    pub fn bind(config: &Config) -> Result<Listeners, BindError> {
        Listeners::bind_with(config, Activation::from_env()?)
    }

    /// [`Listeners::bind`], taking the sockets of `activation` instead of binding the
    /// configuration's sockets of the same names (see the [module docs](self)).
    ///
    /// # Errors
    /// When a socket cannot be bound, or a passed socket matches no socket of `config` or
    /// cannot serve as the one it matches; every passed socket is checked before anything is
    /// bound.
    pub fn bind_with(config: &Config, mut activation: Activation) -> Result<Listeners, BindError> {
        let stored = activation.take_stored(config);
        Listeners::bind_taking(config, activation, stored)
    }

    /// [`Listeners::bind_with`], taking the sockets `stored` (from the service manager's fd
    /// store, [`Activation::take_stored`]) too: each is what it was before the primary
    /// restarted, with the connections queued on it meanwhile.
    ///
    /// # Errors
    /// As [`Listeners::bind_with`].
    pub fn bind_taking(
        config: &Config,
        activation: Activation,
        mut stored: StoredSockets,
    ) -> Result<Listeners, BindError> {
        let mut listeners = Listeners {
            sockets: IndexMap::new(),
            unix_paths: Vec::new(),
            inherited: Vec::new(),
            changes: 0,
        };
        let passed: Vec<String> = activation.names().map(str::to_owned).collect();
        let mut matched = activation.match_sockets(config.sockets.iter())?;
        for (name, spec) in &config.sockets {
            let bound = match matched.iter().position(|(n, _, _)| n == name) {
                Some(at) => {
                    let (_, fd, socket) = matched.swap_remove(at);
                    log_inherited(name, spec, fd, &socket);
                    listeners.inherited.push(name.clone());
                    Bound::whole(socket, spec.mode)
                }
                None => {
                    if !passed.is_empty() {
                        tracing::info!(
                            event = "not_inherited",
                            socket = %name,
                            address = %spec.listen,
                            "socket {name} was not passed by the service manager (LISTEN_FDNAMES={}): binding {} itself",
                            passed.join(":"),
                            spec.listen
                        );
                    }
                    match listeners.take_stored(name, spec, &mut stored) {
                        Some(bound) => bound,
                        None => listeners.bind_one(name, spec)?,
                    }
                }
            };
            listeners.sockets.insert(name.clone(), bound);
        }
        for (pool, spec) in &config.pools {
            for slot in 0..spec.size.count() {
                listeners.ensure_slot(&spec.sockets, pool, slot)?;
            }
        }
        Ok(listeners)
    }

    /// The socket `[sockets.name]` as the fd store kept it, if it did.
    fn take_stored(
        &mut self,
        name: &str,
        spec: &SocketSpec,
        stored: &mut StoredSockets,
    ) -> Option<Bound> {
        let backlog = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
        if let Some(socket) = stored.sockets.remove(name) {
            // listen() again: the configuration's backlog may have changed meanwhile.
            let _ = socket.listen(backlog);
            if let ListenAddr::Unix(path) = &spec.listen {
                self.unix_paths.push(path.clone());
            }
            return Some(Bound::whole(socket, spec.mode));
        }
        let slots = stored.slots.remove(name)?;
        let address = slots
            .first()
            .and_then(|(_, socket)| store::tcp_address(socket))?;
        let per_slot = slots
            .into_iter()
            .map(|(key, socket)| {
                let _ = socket.listen(backlog);
                (key, socket)
            })
            .collect();
        Some(Bound::ReusePort {
            address,
            backlog: spec.backlog,
            per_slot,
        })
    }

    fn bind_one(&mut self, name: &str, spec: &SocketSpec) -> Result<Bound, BindError> {
        let fail = |source| BindError::Bind {
            socket: name.to_owned(),
            address: spec.listen.to_string(),
            source,
        };
        match (&spec.listen, spec.mode) {
            (ListenAddr::Tcp(address), SocketMode::RoundRobin) => Ok(Bound::Handed(
                bind_tcp(*address, spec.backlog, false).map_err(fail)?,
            )),
            (ListenAddr::Unix(path), SocketMode::RoundRobin) => {
                let socket = bind_unix(path, spec.backlog).map_err(fail)?;
                self.unix_paths.push(path.clone());
                Ok(Bound::Handed(socket))
            }
            (ListenAddr::Tcp(address), SocketMode::Shared) => Ok(Bound::Shared(
                bind_tcp(*address, spec.backlog, false).map_err(fail)?,
            )),
            (ListenAddr::Tcp(address), SocketMode::ReusePort) => {
                // Bind a probe to resolve port 0 and to report errors before any worker runs;
                // it becomes the socket of the first slot that asks.
                let probe = bind_tcp(*address, spec.backlog, true).map_err(fail)?;
                let resolved = local_tcp_addr(&probe).map_err(fail)?;
                let mut per_slot = HashMap::new();
                per_slot.insert((String::new(), usize::MAX), probe);
                Ok(Bound::ReusePort {
                    address: resolved,
                    backlog: spec.backlog,
                    per_slot,
                })
            }
            (ListenAddr::Unix(path), _) => {
                let socket = bind_unix(path, spec.backlog).map_err(fail)?;
                self.unix_paths.push(path.clone());
                Ok(Bound::Shared(socket))
            }
        }
    }

    /// Makes sure every `reuseport` socket in `sockets` has a socket for (`pool`, `slot`).
    pub fn ensure_slot(
        &mut self,
        sockets: &[String],
        pool: &str,
        slot: usize,
    ) -> Result<(), BindError> {
        for name in sockets {
            let Some(Bound::ReusePort {
                address,
                backlog,
                per_slot,
            }) = self.sockets.get_mut(name)
            else {
                continue;
            };
            let key = (pool.to_owned(), slot);
            if per_slot.contains_key(&key) {
                continue;
            }
            let socket = match per_slot.remove(&(String::new(), usize::MAX)) {
                Some(probe) => probe,
                None => bind_tcp(*address, *backlog, true).map_err(|source| BindError::Bind {
                    socket: name.clone(),
                    address: address.to_string(),
                    source,
                })?,
            };
            per_slot.insert(key, socket);
            self.changes += 1;
        }
        Ok(())
    }

    /// The fds a worker in (`pool`, `slot`) receives, in the order of `sockets`. Call
    /// [`Listeners::ensure_slot`] first; unknown or missing sockets are skipped.
    pub fn fds<'a>(
        &'a self,
        sockets: &'a [String],
        pool: &str,
        slot: usize,
    ) -> Vec<(&'a str, BorrowedFd<'a>)> {
        sockets
            .iter()
            .filter_map(|name| {
                let socket = match self.sockets.get(name)? {
                    Bound::Shared(socket) => socket,
                    Bound::ReusePort { per_slot, .. } => per_slot.get(&(pool.to_owned(), slot))?,
                    Bound::Handed(_) => return None,
                };
                Some((name.as_str(), socket.as_fd()))
            })
            .collect()
    }

    /// Closes the `reuseport` sockets of a pool's slots from `from_slot` on (after a shrink).
    pub fn release_slots(&mut self, pool: &str, from_slot: usize) {
        self.changes += 1;
        for bound in self.sockets.values_mut() {
            if let Bound::ReusePort { per_slot, .. } = bound {
                per_slot.retain(|(p, slot), _| p != pool || *slot < from_slot);
            }
        }
    }

    /// Each socket's name and the address it actually listens on (port 0 resolved).
    pub fn addresses(&self) -> Vec<(String, String)> {
        self.sockets
            .iter()
            .map(|(name, bound)| {
                let address = match bound {
                    Bound::Shared(socket) | Bound::Handed(socket) => match socket.local_addr() {
                        Ok(addr) => describe(&addr),
                        Err(e) => format!("? ({e})"),
                    },
                    Bound::ReusePort { address, .. } => address.to_string(),
                };
                (name.clone(), address)
            })
            .collect()
    }
}

impl Listeners {
    /// The `round-robin` sockets, which the primary accepts from itself: name and fd.
    pub fn handed(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.sockets
            .iter()
            .filter_map(|(name, bound)| match bound {
                Bound::Handed(socket) => Some((name.as_str(), socket.as_fd())),
                _ => None,
            })
            .collect()
    }

    /// Binds a socket that a reloaded configuration added.
    ///
    /// # Errors
    /// When it cannot be bound (address in use…); nothing changes then.
    pub fn add(&mut self, name: &str, spec: &SocketSpec) -> Result<(), BindError> {
        let bound = self.bind_one(name, spec)?;
        self.sockets.insert(name.to_owned(), bound);
        self.changes += 1;
        Ok(())
    }

    /// Closes a socket that a reloaded configuration removed (once no worker needs it any
    /// more), removing the Unix socket file it created.
    pub fn remove(&mut self, name: &str, spec: &SocketSpec) {
        if self.sockets.shift_remove(name).is_none() {
            return;
        }
        self.changes += 1;
        if let ListenAddr::Unix(path) = &spec.listen {
            if let Some(at) = self.unix_paths.iter().position(|p| p == path) {
                let _ = std::fs::remove_file(path);
                self.unix_paths.remove(at);
            }
        }
    }

    /// How many times the set of sockets changed (one added, removed, or bound for a slot):
    /// what [`Listeners::to_store`] returns is new when this is.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The sockets to keep in the service manager's fd store, by the name each is stored
    /// under: every socket this process bound (those a socket unit passed are the service
    /// manager's already), and each slot's socket of a `reuseport` socket (not the one
    /// bound before any slot took it).
    pub fn to_store(&self) -> Vec<(String, BorrowedFd<'_>)> {
        let mut stored = Vec::new();
        for (name, bound) in &self.sockets {
            if self.is_inherited(name) {
                continue;
            }
            match bound {
                Bound::Shared(socket) | Bound::Handed(socket) => {
                    let stored_as = store::StoreName::Socket(name.clone());
                    stored.push((stored_as.to_string(), socket.as_fd()));
                }
                Bound::ReusePort { per_slot, .. } => {
                    let mut slots: Vec<_> = per_slot.iter().collect();
                    slots.sort_by_key(|(key, _)| *key);
                    for ((pool, slot), socket) in slots {
                        if pool.is_empty() {
                            continue;
                        }
                        let stored_as = store::StoreName::Slot {
                            socket: name.clone(),
                            pool: pool.clone(),
                            slot: *slot,
                        };
                        stored.push((stored_as.to_string(), socket.as_fd()));
                    }
                }
            }
        }
        stored
    }

    /// Whether a socket of this name is open.
    pub fn contains(&self, name: &str) -> bool {
        self.sockets.contains_key(name)
    }

    /// Whether the socket of this name was passed by the service manager (socket activation)
    /// rather than bound. Its address is the socket unit's, not the configuration's: a reload
    /// that changes its `listen` should keep it rather than [`remove`](Listeners::remove) it.
    pub fn is_inherited(&self, name: &str) -> bool {
        self.inherited.iter().any(|n| n == name)
    }
}

/// Logs which passed socket serves as `[sockets.name]`, where it listens, and what of the
/// configuration it overrides.
fn log_inherited(name: &str, spec: &SocketSpec, fd: RawFd, socket: &Socket) {
    let address = socket
        .local_addr()
        .map(|a| describe(&a))
        .unwrap_or_else(|e| format!("? ({e})"));
    let configured = spec.listen.to_string();
    let note = if address == configured {
        String::new()
    } else {
        format!(" (the configured {configured} is not bound)")
    };
    tracing::info!(
        event = "inherited",
        socket = %name,
        fd,
        address = %address,
        "socket {name}: fd {fd} from the service manager, listening on {address}{note}"
    );
    if spec.mode == SocketMode::ReusePort {
        tracing::warn!(
            event = "inherited_reuseport",
            socket = %name,
            fd,
            "socket {name} is `reuseport` in the configuration, but the service manager passed one socket: every worker accepts from it, as with mode = \"shared\" (write that to silence this warning)"
        );
    }
}

/// An address as the configuration writes it: `127.0.0.1:8000`, `unix:/run/app.sock`, and
/// `unix:@name` for an abstract Unix socket.
fn describe(address: &SockAddr) -> String {
    if let Some(ip) = address.as_socket() {
        return ip.to_string();
    }
    if let Some(path) = address.as_pathname() {
        return format!("unix:{}", path.display());
    }
    match address.as_abstract_namespace() {
        Some(name) => format!("unix:@{}", String::from_utf8_lossy(name)),
        None => "unix:?".to_owned(),
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_tcp(address: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<Socket> {
    // socket2 creates sockets close-on-exec; workers get them through dup2 in the child.
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    // A restarted primary must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

fn local_tcp_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not a TCP socket"))
}

fn bind_unix(path: &Path, backlog: u32) -> io::Result<Socket> {
    remove_stale_unix_socket(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// A socket file left by a previous run that nobody listens on any more is removed; a live
/// one, or a file that is not a socket, is an error.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on it",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::config::{Command, PoolSpec, Size};

    fn config(listen: &str, mode: SocketMode, size: usize) -> Config {
        let mut config = Config::default();
        let mut socket = SocketSpec::new(listen.parse().unwrap());
        socket.mode = mode;
        config.sockets.insert("http".into(), socket);
        let mut pool = PoolSpec::new(Command::new(["x"]).unwrap());
        pool.size = Size::fixed(size).unwrap();
        pool.sockets = vec!["http".into()];
        config.pools.insert("web".into(), pool);
        config
    }

    #[test]
    fn a_shared_socket_is_one_fd_for_every_slot() {
        let listeners = Listeners::bind(&config("127.0.0.1:0", SocketMode::Shared, 3)).unwrap();
        let sockets = vec!["http".to_owned()];
        let a = listeners.fds(&sockets, "web", 0)[0].1.as_raw_fd();
        let b = listeners.fds(&sockets, "web", 2)[0].1.as_raw_fd();
        assert_eq!(a, b);
        let address = &listeners.addresses()[0].1;
        assert!(
            TcpStream::connect(address).is_ok(),
            "listening on {address}"
        );
    }

    #[test]
    fn reuseport_gives_each_slot_its_own_socket_on_one_port() {
        let mut listeners =
            Listeners::bind(&config("127.0.0.1:0", SocketMode::ReusePort, 2)).unwrap();
        let sockets = vec!["http".to_owned()];
        listeners.ensure_slot(&sockets, "web", 2).unwrap();
        let fds: Vec<_> = (0..3)
            .map(|slot| listeners.fds(&sockets, "web", slot)[0].1.as_raw_fd())
            .collect();
        assert!(fds[0] != fds[1] && fds[1] != fds[2] && fds[0] != fds[2]);
        let port = |slot| {
            let fd = listeners.fds(&sockets, "web", slot)[0].1;
            rustix::net::getsockname(fd).unwrap()
        };
        assert_eq!(format!("{:?}", port(0)), format!("{:?}", port(2)));
        listeners.release_slots("web", 1);
        assert!(listeners.fds(&sockets, "web", 1).is_empty());
        assert_eq!(listeners.fds(&sockets, "web", 0).len(), 1);
    }

    #[test]
    fn an_address_in_use_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let error = Listeners::bind(&config(&address, SocketMode::Shared, 1)).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen on {address} (socket `http`)")),
            "{error}"
        );
        let BindError::Bind { source, .. } = error else {
            panic!("{error:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn unix_sockets_replace_stale_files_but_not_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let listen = format!("unix:{}", path.display());
        {
            let listeners = Listeners::bind(&config(&listen, SocketMode::Shared, 1)).unwrap();
            let error = Listeners::bind(&config(&listen, SocketMode::Shared, 1)).unwrap_err();
            assert!(
                error.to_string().contains("another process is listening"),
                "{error}"
            );
            let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
            stream.write_all(b"x").unwrap();
            drop(listeners);
        }
        assert!(!path.exists(), "removed on drop");
        // A stale socket file (bound, then its owner gone without cleaning up) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let listeners = Listeners::bind(&config(&listen, SocketMode::Shared, 1)).unwrap();
        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        stream.write_all(b"x").unwrap();
        let mut nothing = [0u8; 1];
        stream.set_nonblocking(true).unwrap();
        assert!(
            stream.read(&mut nothing).is_err(),
            "connected, nobody answers yet"
        );
        drop(listeners);
    }

    /// A port on 127.0.0.1 that nothing listens on (bound, then released).
    fn free_address() -> String {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    }

    fn passed(name: &str, fd: impl Into<std::os::fd::OwnedFd>) -> Activation {
        Activation::from_fds([(name.to_owned(), fd.into())])
    }

    #[test]
    fn a_passed_socket_is_taken_instead_of_binding_the_configured_address() {
        let configured = free_address();
        let mut config = config(&configured, SocketMode::Shared, 2);
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.sock");
        config.sockets.insert(
            "admin".into(),
            SocketSpec::new(format!("unix:{}", admin.display()).parse().unwrap()),
        );
        let systemd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = systemd.local_addr().unwrap().to_string();
        let copy = systemd.try_clone().unwrap();
        let listeners = Listeners::bind_with(&config, passed("http", copy)).unwrap();
        assert_eq!(
            listeners.addresses(),
            [
                ("http".to_owned(), address.clone()),
                ("admin".to_owned(), format!("unix:{}", admin.display()))
            ],
            "http is the passed socket; admin, not passed, is bound"
        );
        assert!(listeners.is_inherited("http") && !listeners.is_inherited("admin"));
        assert_eq!(
            TcpStream::connect(&configured).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused,
            "the configured {configured} is not bound"
        );
        TcpStream::connect(&address).unwrap();
        drop(listeners);
        assert!(!admin.exists(), "ustad's own socket file is removed");
        TcpStream::connect(&address).expect("the service manager's socket stays open");
    }

    #[test]
    fn a_passed_reuseport_socket_is_shared_by_every_slot() {
        let mut listeners = Listeners::bind_with(
            &config(&free_address(), SocketMode::ReusePort, 2),
            passed("http", std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
        )
        .unwrap();
        let sockets = vec!["http".to_owned()];
        listeners.ensure_slot(&sockets, "web", 5).unwrap();
        let fds: Vec<_> = [0, 1, 5]
            .iter()
            .map(|slot| listeners.fds(&sockets, "web", *slot)[0].1.as_raw_fd())
            .collect();
        assert!(fds.iter().all(|fd| *fd == fds[0]), "{fds:?}");
        listeners.release_slots("web", 1);
        assert_eq!(listeners.fds(&sockets, "web", 1).len(), 1, "never closed");
    }

    #[test]
    fn every_passed_socket_must_match_one_configured_socket() {
        let config = config("127.0.0.1:0", SocketMode::Shared, 1);
        let listener = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = Listeners::bind_with(&config, passed("ustad.socket", listener())).unwrap_err();
        assert!(
            matches!(
                &error,
                BindError::Activation(ActivationError::UnknownName { name, defined, .. })
                    if name == "ustad.socket" && defined == &["http"]
            ),
            "{error}"
        );
        let twice = Activation::from_fds([
            ("http".to_owned(), listener().into()),
            ("http".to_owned(), listener().into()),
        ]);
        let error = Listeners::bind_with(&config, twice).unwrap_err();
        assert!(
            error.to_string().contains("are both named `http`"),
            "{error}"
        );
    }

    #[test]
    fn a_passed_socket_must_be_a_listening_stream_socket_of_the_configured_family() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let tcp = config("127.0.0.1:0", SocketMode::Shared, 1);
        let unix = config(&format!("unix:{}", path.display()), SocketMode::Shared, 1);
        let not_listening = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        not_listening
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let unix_listener = std::os::unix::net::UnixListener::bind(dir.path().join("y.sock"));
        let cases: Vec<(&Config, std::os::fd::OwnedFd, &str)> = vec![
            (
                &tcp,
                std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into(),
                "is a datagram socket (ListenDatagram=)",
            ),
            (&tcp, not_listening.into(), "is not listening"),
            (
                &tcp,
                unix_listener.unwrap().into(),
                "is not a TCP socket (it listens on unix:",
            ),
            (
                &unix,
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().into(),
                "is not a Unix socket (it listens on 127.0.0.1:",
            ),
        ];
        for (config, fd, expected) in cases {
            let number = fd.as_raw_fd();
            let error = Listeners::bind_with(config, passed("http", fd)).unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("socket activation: fd {number} (`http`) ")),
                "{message}"
            );
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
        }
        assert!(!path.exists(), "nothing was bound");
    }

    #[test]
    fn a_passed_unix_socket_file_is_left_to_the_service_manager() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let systemd = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let config = config(&format!("unix:{}", path.display()), SocketMode::Shared, 1);
        let listeners = Listeners::bind_with(&config, passed("http", systemd)).unwrap();
        assert_eq!(
            listeners.addresses(),
            [("http".to_owned(), format!("unix:{}", path.display()))]
        );
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(listeners);
        assert!(path.exists(), "the socket file is not removed");
    }

    #[test]
    fn without_passed_sockets_bind_with_binds_everything() {
        let listeners = Listeners::bind_with(
            &config("127.0.0.1:0", SocketMode::Shared, 1),
            Activation::default(),
        )
        .unwrap();
        assert!(!listeners.is_inherited("http"));
        TcpStream::connect(&listeners.addresses()[0].1).unwrap();
    }
}
