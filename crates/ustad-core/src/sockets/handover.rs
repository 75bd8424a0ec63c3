//! The bound sockets across an upgrade: described by fd number, and rebuilt from the fds the
//! new program takes back, each as it was bound (shared, round-robin, or a `reuseport` socket
//! per slot), with the Unix socket files it created and the sockets it inherited.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use socket2::Socket;

use super::{Bound, Listeners};
use crate::handover::{HandedFds, Keep};

/// [`Listeners`] as numbers, for the handover document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedListeners {
    sockets: Vec<(String, HandedSocket)>,
    unix_paths: Vec<PathBuf>,
    inherited: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HandedSocket {
    Shared(RawFd),
    Handed(RawFd),
    ReusePort {
        address: SocketAddr,
        backlog: u32,
        /// (pool, slot, fd); the probe bound first is `("", usize::MAX)`.
        per_slot: Vec<(String, usize, RawFd)>,
    },
}

impl Listeners {
    /// Describes every socket, marking each to survive the exec.
    ///
    /// # Errors
    /// When an fd's flags cannot be changed.
    pub fn hand_over(&self, keep: &mut Keep) -> io::Result<HandedListeners> {
        let mut sockets = Vec::with_capacity(self.sockets.len());
        for (name, bound) in &self.sockets {
            let handed = match bound {
                Bound::Shared(socket) => HandedSocket::Shared(keep.fd(socket.as_fd())?),
                Bound::Handed(socket) => HandedSocket::Handed(keep.fd(socket.as_fd())?),
                Bound::ReusePort {
                    address,
                    backlog,
                    per_slot,
                } => {
                    let mut slots = Vec::with_capacity(per_slot.len());
                    for ((pool, slot), socket) in per_slot {
                        slots.push((pool.clone(), *slot, keep.fd(socket.as_fd())?));
                    }
                    HandedSocket::ReusePort {
                        address: *address,
                        backlog: *backlog,
                        per_slot: slots,
                    }
                }
            };
            sockets.push((name.clone(), handed));
        }
        Ok(HandedListeners {
            sockets,
            unix_paths: self.unix_paths.clone(),
            inherited: self.inherited.clone(),
        })
    }

    /// The sockets `handed` describes, from the fds handed over.
    ///
    /// # Errors
    /// When one of them was not handed over.
    pub fn take_over(handed: HandedListeners, fds: &mut HandedFds) -> io::Result<Listeners> {
        let mut sockets = IndexMap::with_capacity(handed.sockets.len());
        for (name, socket) in handed.sockets {
            let what = format!("socket {name}");
            let bound = match socket {
                HandedSocket::Shared(fd) => Bound::Shared(Socket::from(fds.get(fd, &what)?)),
                HandedSocket::Handed(fd) => Bound::Handed(Socket::from(fds.get(fd, &what)?)),
                HandedSocket::ReusePort {
                    address,
                    backlog,
                    per_slot,
                } => {
                    let mut slots = std::collections::HashMap::with_capacity(per_slot.len());
                    for (pool, slot, fd) in per_slot {
                        slots.insert((pool, slot), Socket::from(fds.get(fd, &what)?));
                    }
                    Bound::ReusePort {
                        address,
                        backlog,
                        per_slot: slots,
                    }
                }
            };
            sockets.insert(name, bound);
        }
        Ok(Listeners {
            sockets,
            unix_paths: handed.unix_paths,
            inherited: handed.inherited,
            changes: 0,
        })
    }
}
