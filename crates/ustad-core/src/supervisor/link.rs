//! The supervisor's side of the Rust library: a [`Link`] to the program that embeds it, and
//! the message channel of each library worker.
//!
//! Lifecycle news goes to the program as [`LinkEvent`]s (unbounded: a handful per worker's
//! life). Messages do not pass through the supervisor loop at all: each worker's channel has a
//! reader task that hands the worker's messages straight to the program ([`Inbound`], through
//! a bounded queue: a worker that sends faster than the program reads is slowed down by its
//! own socket, and memory stays bounded), and a writer task that the program feeds directly
//! (the worker's `outbox`). Only lifecycle frames (`ready`, `heartbeat`, `restart`,
//! `stopping`) reach the loop, as plan events.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::config::IpcSpec;
use crate::control::server::Call;
use crate::ipc::{self, Envelope, FrameError, FrameReader, Kind};
use crate::plan::{ExitCause, ExitStatus, StopReason, WorkerId};

/// Frames queued for one worker before a sender waits.
pub const OUTBOX: usize = 1024;
/// Bytes written to a worker's socket in one call at most.
const WRITE_BATCH: usize = 256 * 1024;

/// A worker, as the program sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id (unique for the primary's life).
    pub id: WorkerId,
    /// Its pool.
    pub pool: Arc<str>,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
}

/// What happens to workers, for the program.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A worker process was started; `outbox` takes frames for it (library pools only).
    Spawned {
        /// Which.
        worker: WorkerInfo,
        /// Its pid.
        pid: u32,
        /// Frames to write to its channel.
        outbox: Option<mpsc::Sender<Bytes>>,
        /// The largest frame body it accepts.
        max_message: usize,
    },
    /// It is ready.
    Ready {
        /// Which.
        id: WorkerId,
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

/// A frame from a worker that is for the program: `msg`, `req`, `rep` or `err`.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// From which worker.
    pub worker: Arc<WorkerInfo>,
    /// What it said.
    pub envelope: Envelope,
}

/// The program's ends of the supervisor.
#[derive(Debug)]
pub struct Link {
    /// Lifecycle events.
    pub events: mpsc::UnboundedSender<LinkEvent>,
    /// Workers' messages.
    pub inbound: mpsc::Sender<Inbound>,
    /// Requests, as the control socket would make them (status, scale, restart, stop…).
    pub calls: mpsc::Receiver<Call>,
}

/// Lifecycle frames, for the supervisor loop.
pub(super) type Lifecycle = mpsc::UnboundedSender<(WorkerId, Result<Kind, String>)>;

/// A connection to hand to a worker: its `conn` frame and its fd.
pub(super) type Handed = (Bytes, OwnedFd);

/// Where a worker's frames go: messages, and connections with their fds.
#[derive(Debug, Clone)]
pub(super) struct Outboxes {
    pub(super) frames: mpsc::Sender<Bytes>,
    pub(super) conns: mpsc::Sender<Handed>,
}

/// Connections queued for one worker before the acceptor picks another.
const CONNS: usize = 64;

/// Starts the reader and writer of a worker's channel; returns its outboxes.
pub(super) fn start_channel(
    socket: OwnedFd,
    worker: Arc<WorkerInfo>,
    spec: IpcSpec,
    lifecycle: Lifecycle,
    inbound: Option<mpsc::Sender<Inbound>>,
) -> std::io::Result<Outboxes> {
    let stream = std::os::unix::net::UnixStream::from(socket);
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let (reader, mut writer) = stream.into_split();
    let (outbox, mut frames) = mpsc::channel::<Bytes>(OUTBOX);
    let (conns, mut handed) = mpsc::channel::<Handed>(CONNS);
    tokio::spawn(async move {
        let mut batch = BytesMut::new();
        let mut frames_open = true;
        loop {
            tokio::select! {
                frame = frames.recv(), if frames_open => {
                    let Some(frame) = frame else {
                        frames_open = false;
                        continue;
                    };
                    batch.extend_from_slice(&frame);
                    while batch.len() < WRITE_BATCH {
                        match frames.try_recv() {
                            Ok(frame) => batch.extend_from_slice(&frame),
                            Err(_) => break,
                        }
                    }
                    if writer.write_all(&batch).await.is_err() {
                        return;
                    }
                    batch.clear();
                }
                conn = handed.recv() => {
                    // Closed here once sent: the worker has its own copy of the connection.
                    let Some((frame, fd)) = conn else { return };
                    if ipc::send_with_fd(&mut writer, &frame, &fd).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let answers = outbox.clone();
    tokio::spawn(async move {
        let mut reader = FrameReader::new(reader, spec.max_message);
        loop {
            let frame = match reader.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                // A worker that exits or dies (even mid-frame) closes its channel: that is the
                // end of it, not a breach of the protocol.
                Err(error @ (FrameError::Io(_) | FrameError::Truncated { .. })) => {
                    tracing::debug!(
                        id = worker.id.0,
                        "channel of worker {} ended: {error}",
                        worker.id
                    );
                    return;
                }
                Err(error) => {
                    let _ = lifecycle.send((worker.id, Err(error.to_string())));
                    return;
                }
            };
            let envelope = match ipc::decode(frame) {
                Ok(envelope) => envelope,
                Err(error) => {
                    let _ = lifecycle.send((worker.id, Err(error.to_string())));
                    return;
                }
            };
            match &envelope.kind {
                Kind::Ready | Kind::Heartbeat | Kind::Restart | Kind::Stopping => {
                    if lifecycle.send((worker.id, Ok(envelope.kind))).is_err() {
                        return;
                    }
                }
                Kind::Stop { .. } | Kind::Conn { .. } => {
                    let _ = lifecycle.send((
                        worker.id,
                        Err("a worker may not send `stop` or `conn`".to_owned()),
                    ));
                    return;
                }
                Kind::Msg | Kind::Req { .. } | Kind::Rep { .. } | Kind::Err { .. } => {
                    let Some(inbound) = &inbound else {
                        // Nobody on this side takes messages (`Primary::run`): a request gets
                        // an answer at once rather than waiting out its timeout.
                        if let Kind::Req { id } = envelope.kind {
                            let refusal = ipc::encode_simple(&Kind::Err {
                                id,
                                message: "this primary takes no requests (it runs Primary::run, not Primary::start)".to_owned(),
                            });
                            if answers.send(refusal).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    };
                    let message = Inbound {
                        worker: worker.clone(),
                        envelope,
                    };
                    // Waits while the program is behind: the worker's writes back up.
                    if inbound.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Outboxes {
        frames: outbox,
        conns,
    })
}

impl super::Runtime {
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
                self.channels.remove(&id);
                self.handoff.remove(id);
                if let Some(events) = &self.link_events {
                    let _ = events.send(LinkEvent::ChannelClosed { id });
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
        let Some(events) = &self.link_events else {
            return;
        };
        let event = match notice {
            Notice::Ready { worker, .. } => LinkEvent::Ready { id: worker.id },
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
            Notice::SpawnFailed { worker, .. } => LinkEvent::Exited {
                id: worker.id,
                status: ExitStatus::Code(-1),
                cause: ExitCause::Crashed,
            },
            _ => return,
        };
        let _ = events.send(event);
    }
}
