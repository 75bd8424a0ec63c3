//! `round-robin` sockets: the primary accepts each connection itself and hands it to a ready
//! worker over the worker's channel (`SCM_RIGHTS`), as Node's cluster does by default, so that
//! long-lived connections spread evenly even when the kernel's choice of accepting worker
//! would not (a shared socket favours whichever worker wakes first).
//!
//! The choice: the ready worker with the fewest connections handed so far, skipping workers
//! whose queue of connections is full (busy); a worker that becomes ready joins at the lowest
//! count, so the rotation stays even. With no ready worker, the primary stops accepting and
//! connections wait in the kernel's backlog, as they would for a restarting worker.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::link::Handed;
use crate::ipc::{self, Kind};
use crate::plan::{Notice, WorkerId};
use crate::sockets::Listeners;

#[derive(Debug)]
struct Target {
    id: WorkerId,
    handed: u64,
    conns: mpsc::Sender<Handed>,
}

/// The ready workers of each `round-robin` socket.
#[derive(Debug, Default)]
struct Table {
    targets: HashMap<String, Vec<Target>>,
}

/// Accepts on every `round-robin` socket (a task each) and hands each connection to a ready
/// worker.
#[derive(Debug, Default)]
pub(super) struct RoundRobinAcceptor {
    table: Arc<Mutex<Table>>,
    /// Signalled when a worker is added.
    added: Arc<Notify>,
    /// One accept loop per socket.
    tasks: Vec<JoinHandle<()>>,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(stream.into_std()?.into())
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok(stream.into_std()?.into())
            }
        }
    }
}

impl RoundRobinAcceptor {
    /// Starts an acceptor for each `round-robin` socket of `listeners`.
    pub(super) fn start(listeners: &Listeners) -> io::Result<RoundRobinAcceptor> {
        let mut acceptor = RoundRobinAcceptor::default();
        for (name, fd) in listeners.handed() {
            let socket = socket2::Socket::from(fd.try_clone_to_owned()?);
            socket.set_nonblocking(true)?;
            let is_ip = socket.local_addr()?.as_socket().is_some();
            let listener = if is_ip {
                Listener::Tcp(tokio::net::TcpListener::from_std(socket.into())?)
            } else {
                Listener::Unix(tokio::net::UnixListener::from_std(socket.into())?)
            };
            let task = tokio::spawn(accept_loop(
                name.to_owned(),
                listener,
                acceptor.table.clone(),
                acceptor.added.clone(),
            ));
            acceptor.tasks.push(task);
        }
        Ok(acceptor)
    }

    /// A worker is ready to take connections of `socket`.
    pub(super) fn add(&self, socket: &str, id: WorkerId, conns: mpsc::Sender<Handed>) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let targets = table.targets.entry(socket.to_owned()).or_default();
        let handed = targets.iter().map(|t| t.handed).min().unwrap_or(0);
        targets.retain(|t| t.id != id);
        targets.push(Target { id, handed, conns });
        drop(table);
        self.added.notify_waiters();
    }

    /// A worker takes no more connections (stopping or gone).
    pub(super) fn remove(&self, id: WorkerId) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for targets in table.targets.values_mut() {
            targets.retain(|t| t.id != id);
        }
    }

    /// Follows the workers' lives: ready workers take connections, stopping ones no more.
    pub(super) fn follow(
        &self,
        notice: &Notice,
        conns: impl Fn(WorkerId) -> Option<(Vec<String>, mpsc::Sender<Handed>)>,
    ) {
        match notice {
            Notice::Ready { worker, .. } => {
                if let Some((sockets, sender)) = conns(worker.id) {
                    for socket in sockets {
                        self.add(&socket, worker.id, sender.clone());
                    }
                }
            }
            Notice::Stopping { worker, .. }
            | Notice::Killed { worker, .. }
            | Notice::Exited { worker, .. } => self.remove(worker.id),
            _ => {}
        }
    }
}

impl Drop for RoundRobinAcceptor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    socket: String,
    listener: Listener,
    table: Arc<Mutex<Table>>,
    added: Arc<Notify>,
) {
    let frame = ipc::encode_simple(&Kind::Conn {
        socket: socket.clone(),
    });
    loop {
        // Accept only when someone can take the connection: until then it waits in the
        // kernel's backlog.
        loop {
            let notified = added.notified();
            let any = table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .targets
                .get(&socket)
                .is_some_and(|t| !t.is_empty());
            if any {
                break;
            }
            notified.await;
        }
        let fd = match listener.accept().await {
            Ok(fd) => fd,
            Err(error) => {
                tracing::debug!("round-robin socket {socket}: accept failed: {error}");
                if !matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        hand(&socket, &frame, fd, &table, &added).await;
    }
}

/// Gives the connection to the least served worker that has room, or waits for room.
async fn hand(
    socket: &str,
    frame: &bytes::Bytes,
    fd: OwnedFd,
    table: &Mutex<Table>,
    added: &Notify,
) {
    let mut connection = Some((frame.clone(), fd));
    loop {
        let notified = added.notified();
        let busy = {
            let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
            let Some(targets) = table.targets.get_mut(socket) else {
                return;
            };
            targets.sort_by_key(|t| (t.handed, t.id));
            let mut closed = Vec::new();
            let mut busy = None;
            for target in targets.iter_mut() {
                let Some(handed) = connection.take() else {
                    break;
                };
                match target.conns.try_send(handed) {
                    Ok(()) => target.handed += 1,
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        busy.get_or_insert((target.id, target.conns.clone()));
                        connection = Some(back);
                    }
                    Err(mpsc::error::TrySendError::Closed(back)) => {
                        closed.push(target.id);
                        connection = Some(back);
                    }
                }
            }
            targets.retain(|t| !closed.contains(&t.id));
            busy
        };
        let Some(handed) = connection.take() else {
            return;
        };
        match busy {
            // Every worker is busy: wait for the least served one (backpressure).
            Some((id, conns)) => {
                if conns.send(handed).await.is_ok() {
                    let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(target) = table
                        .targets
                        .get_mut(socket)
                        .and_then(|t| t.iter_mut().find(|t| t.id == id))
                    {
                        target.handed += 1;
                    }
                }
                return;
            }
            // Every worker went away meanwhile: wait for a new one.
            None => {
                connection = Some(handed);
                notified.await;
            }
        }
    }
}
