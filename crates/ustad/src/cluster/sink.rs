//! Where one worker's frames go once its channel's reader has them: replies to the requests
//! waiting for them, messages and requests into the program's event stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use ustad_core::ipc::{Envelope, Kind};
use ustad_core::supervisor::FrameSink;

use super::event::{Event, WorkerRef};
use super::hub::{Conn, Shared};
use crate::channel::{IncomingRequest, Message};

/// Where one worker's channel puts its frames: replies to the requests waiting for them,
/// messages and requests into the event stream (waiting when the program is behind).
pub(super) struct WorkerSink {
    pub(super) worker: WorkerRef,
    pub(super) conn: Arc<Conn>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) shared: Arc<Shared>,
}

impl FrameSink for WorkerSink {
    fn online(&mut self) {
        self.shared.publish(Event::Online(self.worker.clone()));
    }

    fn offer(&mut self, envelope: Envelope) -> Result<(), Envelope> {
        if matches!(envelope.kind, Kind::Rep { .. } | Kind::Err { .. }) {
            self.conn.pending.resolve(envelope);
            return Ok(());
        }
        if !self.shared.listening.load(Ordering::Acquire) {
            // Nobody reads the stream yet: dropped (a request fails at once, on drop).
            if let Kind::Req { id } = envelope.kind {
                let conn = &self.conn;
                drop(IncomingRequest::new(
                    id,
                    envelope,
                    conn.outbox.clone(),
                    conn.max_message,
                ));
            }
            return Ok(());
        }
        let permit = match self.events.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => return Err(envelope),
            // The program dropped the stream.
            Err(mpsc::error::TrySendError::Closed(())) => return Ok(()),
        };
        let worker = self.worker.clone();
        permit.send(match envelope.kind {
            Kind::Req { id } => Event::Request {
                worker,
                request: IncomingRequest::new(
                    id,
                    envelope,
                    self.conn.outbox.clone(),
                    self.conn.max_message,
                ),
            },
            _ => Event::Message {
                worker,
                message: Message::new(envelope),
            },
        });
        Ok(())
    }

    fn ready(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move { self.events.reserve().await.is_ok() })
    }
}
