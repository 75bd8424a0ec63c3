//! What the primary's and the workers' sides share: sending frames, messages and requests
//! received, and requests waiting for their replies.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use ustad_core::config::IpcProtocol;
use ustad_core::ipc::{self, Envelope, Kind, Outbox, PushError};

use crate::error::RequestError;

/// Queues the frame for `kind` (`msg`, `req`, `rep`) with `body` in `outbox`, waiting while it
/// is full; refused when the body is larger than `max` (what the receiver accepts: it would
/// cut the sender off).
///
/// # Errors
/// [`RequestError::TooLarge`], [`RequestError::Encoding`], or `closed` when the channel is.
pub(crate) async fn send<T: Serialize + ?Sized>(
    outbox: &Outbox,
    protocol: IpcProtocol,
    kind: &Kind,
    body: &T,
    max: usize,
    closed: RequestError,
) -> Result<(), RequestError> {
    if protocol == IpcProtocol::Node && *kind != Kind::Msg {
        return Err(RequestError::NotSupported(
            "a Node worker (ipc = \"node\") takes messages (process.on('message')), not requests",
        ));
    }
    let encode = |buffer: &mut BytesMut| {
        let start = buffer.len();
        let (encoded, overhead) = match protocol {
            IpcProtocol::Ustad => (ipc::encode_body(buffer, kind, body), ipc::HEADER),
            IpcProtocol::Node => (ipc::node::encode(buffer, body), 1),
        };
        encoded.map_err(|e| RequestError::Encoding(e.to_string()))?;
        let size = buffer.len() - start - overhead;
        if size > max {
            return Err(RequestError::TooLarge { size, max });
        }
        Ok(())
    };
    outbox.push(encode).await.map_err(|error| match error {
        PushError::Closed(_) => closed,
        PushError::Encode(error) => error,
    })
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
    outbox: Outbox,
    /// The largest frame body the requester accepts.
    max: usize,
    answered: bool,
}

impl IncomingRequest {
    pub(crate) fn new(id: u64, envelope: Envelope, outbox: Outbox, max: usize) -> Self {
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
        let kind = Kind::Rep { id: self.id };
        let ustad = IpcProtocol::Ustad;
        match send(
            &self.outbox,
            ustad,
            &kind,
            reply,
            self.max,
            RequestError::Stopped,
        )
        .await
        {
            Err(error @ (RequestError::Encoding(_) | RequestError::TooLarge { .. })) => {
                let failed = ipc::encode_simple(&Kind::Err {
                    id: self.id,
                    message: format!("the reply could not be encoded: {error}"),
                });
                let _ = self.outbox.push_now(&failed);
                Err(error)
            }
            other => other,
        }
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
            .push_now(&frame)
            .map_err(|_| RequestError::Stopped)
    }
}

impl Drop for IncomingRequest {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.outbox.push_now(&ipc::encode_simple(&Kind::Err {
                id: self.id,
                message: "the request was dropped without a reply".to_owned(),
            }));
        }
    }
}

/// A reply, or why there is none.
type Reply = Result<Envelope, RequestError>;

/// Who waits for the reply to each request id.
type Waiting = HashMap<u64, oneshot::Sender<Reply>, BuildHasherDefault<IdHasher>>;

/// Requests sent and not answered yet, by id.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<Waiting>,
}

/// Request ids are sequential numbers: one multiplication spreads them over the table, where
/// SipHash would cost more than the rest of the lookup.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Pending {
    pub(crate) fn register(&self, id: u64) -> oneshot::Receiver<Reply> {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits for the reply of a registered request and decodes it.
pub(crate) async fn await_reply<R: DeserializeOwned>(
    reply: oneshot::Receiver<Reply>,
    gone: RequestError,
) -> Result<R, RequestError> {
    let envelope = reply.await.map_err(|_| gone)??;
    envelope
        .decode()
        .map_err(|e| RequestError::Encoding(e.to_string()))
}
