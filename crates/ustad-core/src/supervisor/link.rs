//! The supervisor's side of the Rust library: a [`Link`] to the program that embeds it, and
//! the message channel of each library worker.
//!
//! The program hears of its workers' lives through [`Program`], called on the supervisor's
//! thread as things happen. Messages do not pass through the supervisor loop at all: each
//! worker's channel has a reader task that hands the worker's messages, requests and replies
//! straight to the program's [`FrameSink`] (which holds it back when the program reads
//! slowly: the worker's writes then back up in its own socket, and memory stays bounded), and
//! a writer task that writes what the program (or the supervisor: `stop`, `conn`) puts in the
//! worker's [`Outbox`]. Only lifecycle frames (`ready`, `heartbeat`, `restart`, `stopping`)
//! reach the loop, as plan events.
//!
//! Both tasks run on the runtime the link names: the program's own, so that a reply wakes the
//! task waiting for it without a hop to another thread, or else the supervisor's.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{IpcProtocol, IpcSpec};
use crate::control::server::Call;
use crate::ipc::channel::{Ended, Flow};
use crate::ipc::{self, Envelope, Kind, Outbox};
use crate::plan::{ExitCause, ExitStatus, StopReason, WorkerId, WorkerRef};

/// What happens to workers after they are spawned, for the program.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// It is ready.
    Ready {
        /// Which.
        id: WorkerId,
    },
    /// It was seen waiting for connections on one of its sockets (`ready = "listening"`).
    Listening {
        /// Which.
        id: WorkerId,
        /// The socket's name.
        socket: Arc<str>,
        /// Its address, with the port actually bound (`127.0.0.1:41234`, `unix:/run/a.sock`).
        address: String,
    },
    /// It was asked to stop.
    Stopping {
        /// Which.
        id: WorkerId,
        /// Why.
        reason: StopReason,
    },
    /// Its channel was closed because it broke the protocol: it takes no more messages (it
    /// is being replaced).
    ChannelClosed {
        /// Which.
        id: WorkerId,
    },
    /// It could not be started.
    SpawnFailed {
        /// Its pool.
        pool: Arc<str>,
        /// Its slot.
        slot: usize,
        /// Why.
        error: String,
    },
    /// It exited.
    Exited {
        /// Which.
        id: WorkerId,
        /// How.
        status: ExitStatus,
        /// Why.
        cause: ExitCause,
    },
    /// The sockets are bound and the first workers are being started.
    Started,
    /// Every worker has stopped; the supervisor is about to return.
    Stopped,
}

/// The program that embeds the supervisor. Its methods are called on the supervisor's
/// thread, in the order things happen: keep them short, and never block in them.
pub trait Program: Send + Sync + std::fmt::Debug + 'static {
    /// A worker was started (its pid is known: `worker.pid` is `Some`). A worker with a
    /// channel comes with its outbox and what the channel speaks, with the largest frame body
    /// it accepts; the answer is where its frames for the program go (`None`: its messages are
    /// dropped and its requests refused).
    fn spawned(
        &self,
        worker: &WorkerRef,
        channel: Option<(Outbox, IpcSpec)>,
    ) -> Option<Box<dyn FrameSink>>;

    /// Anything else that happens to workers, and to the supervisor.
    fn event(&self, event: LinkEvent);
}

/// Where one library worker's `msg`, `req`, `rep` and `err` frames go.
pub trait FrameSink: Send + 'static {
    /// The worker's first frame arrived, whatever it is: its code runs and talks (Node's
    /// `online`). Called once, before that frame is handled.
    fn online(&mut self);

    /// Takes a frame, or hands it back when the program is behind: the channel then waits on
    /// [`FrameSink::ready`] and offers it again.
    ///
    /// # Errors
    /// The frame, handed back.
    fn offer(&mut self, envelope: Envelope) -> Result<(), Envelope>;

    /// Resolves when the program may take frames again; `false` when it never will (the
    /// channel stops reading).
    fn ready(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// The program's ends of the supervisor.
#[derive(Debug)]
pub struct Link {
    /// Told of every worker's life.
    pub program: Arc<dyn Program>,
    /// Where workers' channels run (the program's runtime); `None`: the supervisor's.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Requests, as the control socket would make them (status, scale, restart, stop…).
    pub calls: mpsc::Receiver<Call>,
}

/// Lifecycle frames, for the supervisor loop.
pub(super) type Lifecycle = mpsc::UnboundedSender<(WorkerId, Result<Kind, String>)>;

/// A connection to hand to a worker: its `conn` frame and its fd.
pub(super) type Handed = ipc::channel::Handed;

/// Where a worker's frames go: messages, and connections with their fds.
#[derive(Debug, Clone)]
pub(super) struct Outboxes {
    pub(super) frames: Outbox,
    pub(super) conns: mpsc::Sender<Handed>,
    /// What the channel speaks.
    pub(super) protocol: IpcProtocol,
    /// The primary's end of the channel while its reader or writer holds it, to hand over
    /// in an upgrade.
    pub(super) socket: std::sync::Weak<ipc::ChannelSocket>,
}

/// Connections queued for one worker before the acceptor picks another.
const CONNS: usize = 64;

/// Starts the reader and writer of a worker's channel, on `runtime` (else the current one);
/// returns where connections for it go.
pub(super) fn start_channel(
    socket: OwnedFd,
    worker: WorkerId,
    spec: IpcSpec,
    lifecycle: Lifecycle,
    sink: Option<Box<dyn FrameSink>>,
    outbox: Outbox,
    runtime: Option<&tokio::runtime::Handle>,
) -> std::io::Result<(mpsc::Sender<Handed>, std::sync::Weak<ipc::ChannelSocket>)> {
    let runtime = match runtime {
        Some(runtime) => runtime.clone(),
        None => tokio::runtime::Handle::current(),
    };
    // Registered with the runtime that serves it.
    let _entered = runtime.enter();
    let stream = Arc::new(ipc::ChannelSocket::new(socket)?);
    outbox.attach(stream.clone());
    let (conns, handed) = mpsc::channel::<Handed>(CONNS);
    runtime.spawn(ipc::channel::write(
        outbox.clone(),
        stream.clone(),
        Some(handed),
    ));
    let handed_over = Arc::downgrade(&stream);
    let mut receiver = ToProgram {
        worker,
        lifecycle,
        sink,
        outbox,
        heard: false,
    };
    runtime.spawn(async move {
        let outbox = receiver.outbox.clone();
        let ended = ipc::channel::read(
            ipc::SocketReader(stream),
            spec.protocol,
            spec.max_message,
            &outbox,
            &mut receiver,
        )
        .await;
        let id = receiver.worker;
        match ended {
            Ended::Closed | Ended::Stopped => {}
            // A worker that exits or dies (even mid-frame) closes its channel: that is the
            // end of it, not a breach of the protocol.
            Ended::Lost(error) => {
                tracing::debug!(id = id.0, "channel of worker {id} ended: {error}");
            }
            Ended::Broken(why) => {
                let _ = receiver.lifecycle.send((id, Err(why)));
            }
        }
        outbox.close();
    });
    Ok((conns, handed_over))
}

/// The primary's side of a worker's channel: lifecycle frames go to the supervisor loop, the
/// rest to the program.
struct ToProgram {
    worker: WorkerId,
    lifecycle: Lifecycle,
    sink: Option<Box<dyn FrameSink>>,
    outbox: Outbox,
    /// A first frame came (the program was told the worker is online).
    heard: bool,
}

impl ipc::channel::Receiver for ToProgram {
    async fn envelope(&mut self, envelope: Envelope) -> Flow {
        if !self.heard {
            self.heard = true;
            if let Some(sink) = &mut self.sink {
                sink.online();
            }
        }
        match &envelope.kind {
            Kind::Ready | Kind::Heartbeat | Kind::Restart | Kind::Stopping => {
                match self.lifecycle.send((self.worker, Ok(envelope.kind))) {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Stop,
                }
            }
            Kind::Stop { .. } | Kind::Conn { .. } => {
                Flow::Broken("a worker may not send `stop` or `conn`".to_owned())
            }
            Kind::Msg | Kind::Req { .. } | Kind::Rep { .. } | Kind::Err { .. } => {
                let Some(sink) = &mut self.sink else {
                    // Nobody on this side takes messages (`Primary::run`): a request gets
                    // an answer at once rather than waiting out its timeout.
                    if let Kind::Req { id } = envelope.kind {
                        let refusal = ipc::encode_simple(&Kind::Err {
                            id,
                            message: "this primary takes no requests (it runs Primary::run, not Primary::start)".to_owned(),
                        });
                        if self.outbox.push_now(&refusal).is_err() {
                            return Flow::Stop;
                        }
                    }
                    return Flow::Continue;
                };
                let mut envelope = envelope;
                // Waits while the program is behind: the worker's writes back up.
                loop {
                    match sink.offer(envelope) {
                        Ok(()) => return Flow::Continue,
                        Err(back) => envelope = back,
                    }
                    if !sink.ready().await {
                        return Flow::Stop;
                    }
                }
            }
        }
    }
}

impl super::Supervisor {
    /// A lifecycle frame from a library worker, or why its channel broke.
    pub(super) fn on_lifecycle_frame(&mut self, id: WorkerId, frame: Result<Kind, String>) {
        use crate::plan::{Event, WorkerMessage};
        let message = match frame {
            Ok(Kind::Ready) => WorkerMessage::Ready,
            Ok(Kind::Heartbeat) => WorkerMessage::Watchdog,
            Ok(Kind::Restart) => WorkerMessage::RequestRestart,
            Ok(Kind::Stopping) => WorkerMessage::Stopping,
            Ok(_) => return,
            Err(why) => {
                // Cut off: the channel is closed (the worker sees it end), and the worker is
                // replaced, rolling, since it can no longer be talked to.
                if let Some(outboxes) = self.channels.remove(&id) {
                    outboxes.frames.close();
                }
                self.round_robin.remove(id);
                if let Some(program) = &self.program {
                    program.event(LinkEvent::ChannelClosed { id });
                }
                let who = self
                    .plan
                    .worker_ref(id)
                    .map_or_else(|| format!("id {id}"), |w| w.to_string());
                tracing::warn!(
                    event = "protocol_error",
                    id = id.0,
                    why = %why,
                    "worker {who} broke the message protocol ({why}): its channel is closed and it will be replaced"
                );
                self.handle(Event::Cut { id, why });
                return;
            }
        };
        self.handle(Event::Message { id, message });
    }

    /// Tells the embedding program what a notice means for its workers.
    pub(super) fn publish_link(&self, notice: &crate::plan::Notice) {
        use crate::plan::Notice;
        let Some(program) = &self.program else {
            return;
        };
        let event = match notice {
            Notice::Ready { worker, .. } => LinkEvent::Ready { id: worker.id },
            Notice::Listening { worker, socket, .. } => LinkEvent::Listening {
                id: worker.id,
                socket: socket.clone(),
                address: self
                    .listeners
                    .addresses()
                    .into_iter()
                    .find(|(name, _)| **name == **socket)
                    .map_or_else(|| "?".to_owned(), |(_, address)| address),
            },
            Notice::Stopping { worker, reason, .. } => LinkEvent::Stopping {
                id: worker.id,
                reason: *reason,
            },
            Notice::Exited {
                worker,
                status,
                cause,
                ..
            } => LinkEvent::Exited {
                id: worker.id,
                status: *status,
                cause: *cause,
            },
            Notice::Killed { worker, cause } => LinkEvent::Stopping {
                id: worker.id,
                reason: match cause {
                    crate::plan::KillCause::ReadyTimeout(_) => StopReason::ReadyTimeout,
                    _ => StopReason::Shutdown,
                },
            },
            Notice::SpawnFailed { worker, error } => LinkEvent::SpawnFailed {
                pool: worker.pool.clone(),
                slot: worker.slot,
                error: error.clone(),
            },
            _ => return,
        };
        program.event(event);
    }
}
