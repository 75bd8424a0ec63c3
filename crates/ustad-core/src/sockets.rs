//! The listening sockets the primary binds before any worker starts and holds for its whole
//! life, so that no connection is refused while a worker restarts.
//!
//! - `shared`: one socket; every worker of every pool naming it accepts from the same queue.
//! - `reuseport`: one `SO_REUSEPORT` socket per (pool, slot); the kernel hashes each new
//!   connection to one of them. Slot `i`'s socket goes to the worker in slot `i` and to its
//!   replacements, so connections queued on it wait for the replacement instead of failing.
//!
//! # Caveats
//! - An `SO_REUSEPORT` socket resets the connections still queued on it when its last holder
//!   closes it; the primary therefore closes a slot's socket only when the pool shrinks.
//! - `O_NONBLOCK` belongs to the shared socket description: a worker that sets it sets it for
//!   every worker holding the same socket.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Config, ListenAddr, SocketMode, SocketSpec};

/// A socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} (socket `{socket}`): {source}")]
pub struct BindError {
    /// The socket's name.
    pub socket: String,
    /// The address.
    pub address: String,
    /// The OS error, e.g. address in use or permission denied.
    #[source]
    pub source: io::Error,
}

#[derive(Debug)]
enum Bound {
    Shared(Socket),
    ReusePort {
        /// The address with the port actually bound (port 0 resolved by the first bind).
        address: SocketAddr,
        backlog: u32,
        per_slot: HashMap<(String, usize), Socket>,
    },
}

/// Every socket of a configuration, bound.
#[derive(Debug)]
pub struct Listeners {
    sockets: IndexMap<String, Bound>,
    /// Unix socket files this process created, removed on drop.
    unix_paths: Vec<PathBuf>,
}

impl Listeners {
    /// Binds every socket of `config` (for `reuseport` sockets, one per slot of every pool
    /// that uses them), or fails without leaving any bound.
    pub fn bind(config: &Config) -> Result<Listeners, BindError> {
        let mut listeners = Listeners {
            sockets: IndexMap::new(),
            unix_paths: Vec::new(),
        };
        for (name, spec) in &config.sockets {
            let bound = listeners.bind_one(name, spec)?;
            listeners.sockets.insert(name.clone(), bound);
        }
        for (pool, spec) in &config.pools {
            for slot in 0..spec.size.count() {
                listeners.ensure_slot(&spec.sockets, pool, slot)?;
            }
        }
        Ok(listeners)
    }

    fn bind_one(&mut self, name: &str, spec: &SocketSpec) -> Result<Bound, BindError> {
        let fail = |source| BindError {
            socket: name.to_owned(),
            address: spec.listen.to_string(),
            source,
        };
        match (&spec.listen, spec.mode) {
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
                None => bind_tcp(*address, *backlog, true).map_err(|source| BindError {
                    socket: name.clone(),
                    address: address.to_string(),
                    source,
                })?,
            };
            per_slot.insert(key, socket);
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
                };
                Some((name.as_str(), socket.as_fd()))
            })
            .collect()
    }

    /// Closes the `reuseport` sockets of a pool's slots from `from_slot` on (after a shrink).
    pub fn release_slots(&mut self, pool: &str, from_slot: usize) {
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
                    Bound::Shared(socket) => match socket.local_addr() {
                        Ok(addr) => match addr.as_socket() {
                            Some(tcp) => tcp.to_string(),
                            None => addr.as_pathname().map_or_else(
                                || "unix:?".to_owned(),
                                |p| format!("unix:{}", p.display()),
                            ),
                        },
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
    /// Binds a socket that a reloaded configuration added.
    ///
    /// # Errors
    /// When it cannot be bound (address in use…); nothing changes then.
    pub fn add(&mut self, name: &str, spec: &SocketSpec) -> Result<(), BindError> {
        let bound = self.bind_one(name, spec)?;
        self.sockets.insert(name.to_owned(), bound);
        Ok(())
    }

    /// Closes a socket that a reloaded configuration removed (once no worker needs it any
    /// more), removing the Unix socket file it created.
    pub fn remove(&mut self, name: &str, spec: &SocketSpec) {
        if self.sockets.shift_remove(name).is_none() {
            return;
        }
        if let ListenAddr::Unix(path) = &spec.listen {
            if let Some(at) = self.unix_paths.iter().position(|p| p == path) {
                let _ = std::fs::remove_file(path);
                self.unix_paths.remove(at);
            }
        }
    }

    /// Whether a socket of this name is open.
    pub fn contains(&self, name: &str) -> bool {
        self.sockets.contains_key(name)
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
        assert_eq!(error.source.kind(), io::ErrorKind::AddrInUse);
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
}
