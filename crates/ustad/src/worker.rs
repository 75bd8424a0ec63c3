//! A worker's side: who it is, its listeners, and its channel to the primary.
//!
//! The channel starts on first use, on the tokio runtime of the caller: the writer and reader
//! of `ustad_core::ipc::channel`, the same as the primary's. The writer writes what senders
//! gather in the channel's outbox (bounded in bytes: sending waits when the primary reads
//! slowly); the reader hands replies to the requests waiting for them and queues the primary's
//! messages and requests for [`Worker::recv`] (bounded too: a primary flooding a worker that
//! does not read is slowed down by the socket, not buffered for).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use ustad_core::config::IpcProtocol;
use ustad_core::ipc::channel::{Ended, Flow};
use ustad_core::ipc::{self, Kind, Outbox};
use ustad_proto::{env, notify};
use ustad_worker::{Identity, ListenFd, Notifier};

use crate::channel::{IncomingRequest, Message, Pending, await_reply, send};
use crate::error::{Error, RequestError};

/// Messages from the primary queued for [`Worker::recv`].
const INBOX: usize = 1024;

/// A connection the primary accepted on a `round-robin` socket and handed to this worker.
#[derive(Debug)]
pub struct Handed {
    /// The socket's name.
    pub socket: String,
    /// The connection.
    pub stream: HandedStream,
}

/// A handed connection, TCP or Unix.
#[derive(Debug)]
pub enum HandedStream {
    /// From a TCP socket.
    Tcp(std::net::TcpStream),
    /// From a Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Handed {
    /// The TCP connection, for tokio. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// When the connection is a Unix one, or cannot be registered.
    pub fn into_tokio_tcp(self) -> std::io::Result<tokio::net::TcpStream> {
        match self.stream {
            HandedStream::Tcp(stream) => {
                stream.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(stream)
            }
            HandedStream::Unix(_) => Err(std::io::Error::other(format!(
                "socket {} is a Unix socket, not TCP",
                self.socket
            ))),
        }
    }

    /// The Unix connection, for tokio. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// When the connection is a TCP one, or cannot be registered.
    pub fn into_tokio_unix(self) -> std::io::Result<tokio::net::UnixStream> {
        match self.stream {
            HandedStream::Unix(stream) => {
                stream.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(stream)
            }
            HandedStream::Tcp(_) => Err(std::io::Error::other(format!(
                "socket {} is a TCP socket, not Unix",
                self.socket
            ))),
        }
    }
}

/// What the primary sent: a message, or a request to answer.
#[derive(Debug)]
pub enum FromPrimary {
    /// A message.
    Message(Message),
    /// A request: answer it with [`IncomingRequest::reply`].
    Request(IncomingRequest),
}

/// This process, as a worker of its primary. See the [crate docs](crate). Cheap to clone:
/// clones share the same channel.
#[derive(Debug, Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    identity: Identity,
    generation: u64,
    socket: Mutex<Option<OwnedFd>>,
    max_frame: usize,
    listeners: Mutex<Option<Vec<ListenFd>>>,
    channel: OnceLock<Result<Channel, String>>,
    notifier: Option<Notifier>,
}

#[derive(Debug)]
struct Channel {
    outbox: Outbox,
    inbox: tokio::sync::Mutex<mpsc::Receiver<FromPrimary>>,
    pending: Arc<Pending>,
    next_request: AtomicU64,
    /// Set when the primary sends `stop`: the time left before the group is killed.
    stop: watch::Receiver<Option<Duration>>,
    /// Connections handed over by the primary.
    handed: tokio::sync::Mutex<mpsc::Receiver<Handed>>,
}

impl Worker {
    /// This process as a worker, if a primary started it (`USTAD_POOL` is set).
    pub(crate) fn from_env() -> Result<Option<Worker>, Error> {
        let worker_error = |e: ustad_worker::Error| Error::Invalid(e.to_string());
        let Some(identity) = Identity::from_env().map_err(worker_error)? else {
            return Ok(None);
        };
        let generation = std::env::var(env::USTAD_GENERATION)
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(1);
        let socket = ustad_worker::take_channel().map_err(worker_error)?;
        let max_frame = ustad_worker::max_frame()
            .map_err(worker_error)?
            .unwrap_or(ipc::DEFAULT_MAX_FRAME);
        let notifier = Notifier::from_env().map_err(worker_error)?;
        Ok(Some(Worker {
            inner: Arc::new(Inner {
                identity,
                generation,
                socket: Mutex::new(socket),
                max_frame,
                listeners: Mutex::new(None),
                channel: OnceLock::new(),
                notifier,
            }),
        }))
    }

    /// The pool this worker belongs to.
    pub fn pool(&self) -> &str {
        self.inner.identity.pool()
    }

    /// Its id: unique for the primary's life.
    pub fn id(&self) -> u64 {
        self.inner.identity.id()
    }

    /// Its slot, `0..size`, kept by its replacements.
    pub fn slot(&self) -> usize {
        self.inner.identity.index()
    }

    /// Its generation: rolling restarts start workers of a newer one.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    fn take_listener(&self, name: &str) -> Result<ListenFd, Error> {
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if listeners.is_none() {
            let fds = ustad_worker::listen_fds().map_err(|e| Error::Invalid(e.to_string()))?;
            *listeners = Some(fds);
        }
        let fds = listeners.as_mut().expect("filled above");
        let position = fds.iter().position(|fd| fd.name() == name).ok_or_else(|| {
            Error::Invalid(format!(
                "this worker has no listener named `{name}` (it has: {})",
                fds.iter()
                    .map(ListenFd::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Ok(fds.remove(position))
    }

    /// Takes the TCP listener named `name` (for `Pool::listen`, the pool's name).
    ///
    /// # Errors
    /// No such listener, already taken, or not TCP.
    pub fn tcp_listener(&self, name: &str) -> Result<std::net::TcpListener, Error> {
        self.take_listener(name)?
            .into_tcp_listener()
            .map_err(|e| Error::Invalid(e.to_string()))
    }

    /// [`Worker::tcp_listener`] as a tokio listener. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// As [`Worker::tcp_listener`].
    pub fn tokio_tcp_listener(&self, name: &str) -> Result<tokio::net::TcpListener, Error> {
        let listener = self.tcp_listener(name)?;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// Takes the Unix listener named `name`.
    ///
    /// # Errors
    /// No such listener, already taken, or not a Unix stream socket.
    pub fn unix_listener(&self, name: &str) -> Result<std::os::unix::net::UnixListener, Error> {
        self.take_listener(name)?
            .into_unix_listener()
            .map_err(|e| Error::Invalid(e.to_string()))
    }

    /// [`Worker::unix_listener`] as a tokio listener. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// As [`Worker::unix_listener`].
    pub fn tokio_unix_listener(&self, name: &str) -> Result<tokio::net::UnixListener, Error> {
        let listener = self.unix_listener(name)?;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::UnixListener::from_std(listener)?)
    }

    fn channel(&self) -> Result<&Channel, Error> {
        let channel = self.inner.channel.get_or_init(|| {
            let socket = self
                .inner
                .socket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| "this worker has no channel to its primary (it runs under the `ustad` command, not a library primary)".to_owned())?;
            Channel::start(socket, self.inner.max_frame).map_err(|e| e.to_string())
        });
        channel.as_ref().map_err(|e| Error::Invalid(e.clone()))
    }

    async fn send_frame(&self, frame: &[u8]) -> Result<(), Error> {
        let outbox = &self.channel()?.outbox;
        outbox
            .push(|buffer| {
                buffer.extend_from_slice(frame);
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Tells the primary this worker serves: it counts as ready, and a rolling restart moves
    /// on. Under the `ustad` command it sends `READY=1` to `NOTIFY_SOCKET` instead.
    ///
    /// # Errors
    /// When the primary cannot be told.
    pub async fn ready(&self) -> Result<(), Error> {
        if self.has_channel() {
            return self.send_frame(&ipc::encode_simple(&Kind::Ready)).await;
        }
        if let Some(notifier) = &self.inner.notifier {
            notifier
                .ready()
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    fn has_channel(&self) -> bool {
        match self.inner.channel.get() {
            Some(channel) => channel.is_ok(),
            None => self
                .inner
                .socket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
        }
    }

    /// Proof of life for a pool with a `watchdog`.
    ///
    /// # Errors
    /// When the primary cannot be told.
    pub async fn heartbeat(&self) -> Result<(), Error> {
        if self.has_channel() {
            return self.send_frame(&ipc::encode_simple(&Kind::Heartbeat)).await;
        }
        if let Some(notifier) = &self.inner.notifier {
            notifier
                .notify(&format!("{}={}", notify::WATCHDOG, notify::FLAG))
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// Asks to be replaced: the primary starts a successor and, once it is ready, stops this
    /// worker (see [`Worker::stopped`]).
    ///
    /// # Errors
    /// When the primary cannot be told.
    pub async fn request_restart(&self) -> Result<(), Error> {
        if self.has_channel() {
            return self.send_frame(&ipc::encode_simple(&Kind::Restart)).await;
        }
        if let Some(notifier) = &self.inner.notifier {
            notifier
                .request_restart()
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// Resolves when the primary asks this worker to stop (the `stop` message, SIGTERM or
    /// SIGINT), with the time it has before it is killed, when known. Finish what is in
    /// flight, then return from `main`.
    pub async fn stopped(&self) -> Option<Duration> {
        let mut stop = self.channel().ok().map(|c| c.stop.clone());
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let from_channel = async {
            match &mut stop {
                Some(stop) => match stop.wait_for(Option::is_some).await {
                    Ok(deadline) => *deadline,
                    // The primary is gone: so are we, soon.
                    Err(_) => Some(Duration::ZERO),
                },
                None => std::future::pending().await,
            }
        };
        let signal = async {
            match (&mut term, &mut int) {
                (Some(term), Some(int)) => tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                },
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            deadline = from_channel => deadline,
            () = signal => stop.and_then(|s| *s.borrow()),
        }
    }

    /// The next connection the primary accepted on one of this pool's `round-robin` sockets
    /// (see `Pool::listen_round_robin`); `None` once the channel has closed.
    ///
    /// # Errors
    /// No channel.
    pub async fn accept(&self) -> Result<Option<Handed>, Error> {
        let channel = self.channel()?;
        Ok(channel.handed.lock().await.recv().await)
    }

    /// Sends a message to the primary (an [`crate::Event::Message`] there); waits while the
    /// channel is full.
    ///
    /// # Errors
    /// No channel, a message that cannot be encoded, or a primary that is gone.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), Error> {
        let outbox = &self.channel()?.outbox;
        send(
            outbox,
            IpcProtocol::Ustad,
            &Kind::Msg,
            message,
            self.inner.max_frame,
            RequestError::Stopped,
        )
        .await
        .map_err(|error| match error {
            RequestError::Stopped => Error::Stopped,
            other => Error::Invalid(other.to_string()),
        })
    }

    /// The next message or request from the primary; `None` once the channel has closed.
    ///
    /// # Errors
    /// No channel.
    pub async fn recv(&self) -> Result<Option<FromPrimary>, Error> {
        let channel = self.channel()?;
        Ok(channel.inbox.lock().await.recv().await)
    }

    /// Sends a request to the primary (an [`crate::Event::Request`] there) and waits for the
    /// reply, at most `timeout`.
    ///
    /// # Errors
    /// [`RequestError::Timeout`], [`RequestError::Failed`] when the primary answers with a
    /// failure, [`RequestError::Stopped`] when the channel closes first, or an encoding
    /// problem.
    pub async fn request<T, R>(&self, request: &T, timeout: Duration) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let channel = self
            .channel()
            .map_err(|e| RequestError::Encoding(e.to_string()))?;
        let id = channel.next_request.fetch_add(1, Ordering::Relaxed);
        let reply = channel.pending.register(id);
        let exchange = async {
            let kind = Kind::Req { id };
            let max = self.inner.max_frame;
            let ustad = IpcProtocol::Ustad;
            send(
                &channel.outbox,
                ustad,
                &kind,
                request,
                max,
                RequestError::Stopped,
            )
            .await?;
            await_reply(reply, RequestError::Stopped).await
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        channel.pending.forget(id);
        result.unwrap_or(Err(RequestError::Timeout(timeout)))
    }
}

impl Channel {
    /// Starts the reader and writer tasks on the current tokio runtime.
    fn start(socket: OwnedFd, max_frame: usize) -> std::io::Result<Channel> {
        let stream = Arc::new(ipc::ChannelSocket::new(socket)?);
        let outbox = Outbox::new(ipc::OUTBOX_BYTES);
        outbox.attach(stream.clone());
        let (inbox_tx, inbox) = mpsc::channel(INBOX);
        let (stop_tx, stop) = watch::channel(None);
        let (handed_tx, handed) = mpsc::channel(INBOX);
        let pending = Arc::new(Pending::default());
        tokio::spawn(ipc::channel::write(outbox.clone(), stream.clone(), None));
        let reader = ipc::FdReader::new(stream);
        let mut receiver = FromPrimaryReceiver {
            replies: pending.clone(),
            answer: outbox.clone(),
            fds: reader.fds(),
            handed: handed_tx,
            stop: stop_tx,
            inbox: inbox_tx,
            max_frame,
        };
        tokio::spawn(async move {
            let answer = receiver.answer.clone();
            let ustad = IpcProtocol::Ustad;
            match ipc::channel::read(reader, ustad, max_frame, &answer, &mut receiver).await {
                Ended::Closed | Ended::Stopped => {}
                Ended::Lost(error) => tracing::error!("the channel to the primary broke: {error}"),
                Ended::Broken(why) => {
                    tracing::error!("the primary sent a frame this worker cannot read: {why}");
                }
            }
            receiver.replies.fail_all(&RequestError::Stopped);
            answer.close();
        });
        Ok(Channel {
            outbox,
            inbox: tokio::sync::Mutex::new(inbox),
            pending,
            next_request: AtomicU64::new(1),
            stop,
            handed: tokio::sync::Mutex::new(handed),
        })
    }
}

/// The worker's side of its channel: replies to the requests waiting for them, messages and
/// requests to [`Worker::recv`], connections to [`Worker::accept`], `stop` to
/// [`Worker::stopped`].
struct FromPrimaryReceiver {
    replies: Arc<Pending>,
    /// Where answers to requests go.
    answer: Outbox,
    /// The fds that came with `conn` frames.
    fds: ipc::ReceivedFds,
    handed: mpsc::Sender<Handed>,
    stop: watch::Sender<Option<Duration>>,
    inbox: mpsc::Sender<FromPrimary>,
    max_frame: usize,
}

impl ipc::channel::Receiver for FromPrimaryReceiver {
    async fn envelope(&mut self, envelope: ipc::Envelope) -> Flow {
        let delivered = match envelope.kind {
            Kind::Rep { .. } | Kind::Err { .. } => {
                self.replies.resolve(envelope);
                true
            }
            Kind::Conn { socket } => {
                let fd = self
                    .fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                let Some(fd) = fd else {
                    return Flow::Broken("a `conn` frame came without its fd".to_owned());
                };
                let connection = socket2::Socket::from(fd);
                let stream = match connection.local_addr() {
                    Ok(address) if address.as_socket().is_some() => {
                        HandedStream::Tcp(connection.into())
                    }
                    _ => HandedStream::Unix(connection.into()),
                };
                self.handed.send(Handed { socket, stream }).await.is_ok()
            }
            Kind::Stop { deadline_ms } => {
                let _ = self.stop.send(Some(Duration::from_millis(deadline_ms)));
                true
            }
            Kind::Req { id } => {
                let request =
                    IncomingRequest::new(id, envelope, self.answer.clone(), self.max_frame);
                self.inbox.send(FromPrimary::Request(request)).await.is_ok()
            }
            Kind::Msg => {
                let message = FromPrimary::Message(Message::new(envelope));
                self.inbox.send(message).await.is_ok()
            }
            _ => true,
        };
        // A receiving end dropped: the worker no longer listens.
        if delivered {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}
