//! What the primary's and the workers' sides share: encoding frames, messages and requests
//! received, and requests waiting for their replies.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use ustad_core::ipc::{self, Envelope, Kind};

use crate::error::RequestError;

/// A whole frame for `kind` (`msg`, `req`, `rep`) with `body`, refused when its body is
/// larger than `max` (what the receiver accepts: it would cut the sender off).
pub(crate) fn encode<T: Serialize + ?Sized>(
    kind: &Kind,
    body: &T,
    max: usize,
) -> Result<Bytes, RequestError> {
    let mut out = BytesMut::with_capacity(64);
    ipc::encode_body(&mut out, kind, body).map_err(|e| RequestError::Encoding(e.to_string()))?;
    let size = out.len() - ipc::HEADER;
    if size > max {
        return Err(RequestError::TooLarge { size, max });
    }
    Ok(out.freeze())
}

/// A message received.
#[derive(Debug, Clone)]
pub struct Message {
    envelope: Envelope,
}

impl Message {
    pub(crate) fn new(envelope: Envelope) -> Message {
        Message { envelope }
    }

    /// The message as `T`.
    ///
    /// # Errors
    /// When it does not fit `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        self.envelope.decode()
    }

    /// The message's JSON text.
    pub fn json(&self) -> &[u8] {
        self.envelope.body().unwrap_or(b"null")
    }
}

/// A request received: answer it with [`IncomingRequest::reply`] (or
/// [`IncomingRequest::fail`]). Dropped unanswered, it fails with "no reply".
#[derive(Debug)]
pub struct IncomingRequest {
    id: u64,
    envelope: Envelope,
    outbox: mpsc::Sender<Bytes>,
    /// The largest frame body the requester accepts.
    max: usize,
    answered: bool,
}

impl IncomingRequest {
    pub(crate) fn new(
        id: u64,
        envelope: Envelope,
        outbox: mpsc::Sender<Bytes>,
        max: usize,
    ) -> Self {
        IncomingRequest {
            id,
            envelope,
            outbox,
            max,
            answered: false,
        }
    }

    /// The request as `T`.
    ///
    /// # Errors
    /// When it does not fit `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        self.envelope.decode()
    }

    /// Answers with `reply`.
    ///
    /// # Errors
    /// When `reply` cannot be encoded, or the requester is gone.
    pub async fn reply<R: Serialize + ?Sized>(mut self, reply: &R) -> Result<(), RequestError> {
        self.answered = true;
        let frame = match encode(&Kind::Rep { id: self.id }, reply, self.max) {
            Ok(frame) => frame,
            Err(error) => {
                let failed = ipc::encode_simple(&Kind::Err {
                    id: self.id,
                    message: format!("the reply could not be encoded: {error}"),
                });
                let _ = self.outbox.send(failed).await;
                return Err(error);
            }
        };
        self.outbox
            .send(frame)
            .await
            .map_err(|_| RequestError::Stopped)
    }

    /// Answers with a failure: the requester's `request` returns [`RequestError::Failed`].
    ///
    /// # Errors
    /// When the requester is gone.
    pub async fn fail(mut self, message: &str) -> Result<(), RequestError> {
        self.answered = true;
        let frame = ipc::encode_simple(&Kind::Err {
            id: self.id,
            message: message.to_owned(),
        });
        self.outbox
            .send(frame)
            .await
            .map_err(|_| RequestError::Stopped)
    }
}

impl Drop for IncomingRequest {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.outbox.try_send(ipc::encode_simple(&Kind::Err {
                id: self.id,
                message: "the request was dropped without a reply".to_owned(),
            }));
        }
    }
}

/// Requests sent and not answered yet, by id.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Result<Envelope, RequestError>>>>,
}

impl Pending {
    pub(crate) fn register(&self, id: u64) -> oneshot::Receiver<Result<Envelope, RequestError>> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        rx
    }

    pub(crate) fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Hands a `rep` or `err` to its request; false if nobody waits for it (any more).
    pub(crate) fn resolve(&self, envelope: Envelope) -> bool {
        let (id, result) = match &envelope.kind {
            Kind::Rep { id } => (*id, Ok(())),
            Kind::Err { id, message } => (*id, Err(RequestError::Failed(message.clone()))),
            _ => return false,
        };
        let Some(waiter) = self.lock().remove(&id) else {
            return false;
        };
        waiter.send(result.map(|()| envelope)).is_ok()
    }

    /// Fails every request still waiting.
    pub(crate) fn fail_all(&self, error: &RequestError) {
        for (_, waiter) in self.lock().drain() {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Envelope, RequestError>>>>
    {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits for the reply of a registered request and decodes it.
pub(crate) async fn await_reply<R: DeserializeOwned>(
    reply: oneshot::Receiver<Result<Envelope, RequestError>>,
    gone: RequestError,
) -> Result<R, RequestError> {
    let envelope = reply.await.map_err(|_| gone)??;
    envelope
        .decode()
        .map_err(|e| RequestError::Encoding(e.to_string()))
}
