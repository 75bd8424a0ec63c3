//! A channel's sending side: every sender encodes its frame straight into one shared buffer,
//! bounded in bytes, and one writer task writes whatever has gathered with one `write`.
//!
//! Why not a queue of frames: a queue costs an allocation, a copy and a queue operation per
//! frame, and bounds memory in frames (of up to `max_message` each) instead of bytes. Here a
//! frame costs one short lock; under load, a write carries every frame gathered since the last
//! one. A sender waits while the buffer holds `limit` bytes or more (backpressure: the peer
//! reads slowly, the socket is full), so memory stays below `2 × limit + max_message` per
//! channel: what is being written, what gathers meanwhile, and one frame over the mark.
//!
//! **Writing through.** Waking the writer task costs a thread hop when the sender runs on
//! another thread (5–10 µs on a VM), on the critical path of a request and of its reply. So
//! when the outbox is idle (nothing gathered, no write under way) and armed, the sender writes
//! its frame to the socket itself, with one non-blocking `write`, and disarms the outbox; what
//! the socket does not take goes to the writer task as usual. Hearing from the peer arms it
//! again ([`Outbox::heard`]) when what it sent came alone (under load frames come many to a
//! read, and are batched both ways). A request and its reply thus each cost one `write` and no
//! hop, while a stream of messages (nobody answers) is written through once and then batched.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::{Buf, BytesMut};
use tokio::sync::Notify;

use super::ChannelSocket;

/// Bytes gathered for a channel before senders wait.
pub const OUTBOX_BYTES: usize = 256 * 1024;

/// The sending side of a channel; clones share it.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The socket, once attached: senders write through it when the outbox is idle.
    socket: OnceLock<Arc<ChannelSocket>>,
    /// The buffer went from empty to not, or the outbox closed: the writer has work.
    work: Notify,
    /// The writer drained the buffer, or the outbox closed: waiting senders may go on.
    room: Notify,
    limit: usize,
}

#[derive(Debug)]
struct State {
    buffer: BytesMut,
    closed: bool,
    /// The writer task is writing outside the lock: nobody else may write.
    busy: bool,
    /// The next frame of an idle outbox may be written through.
    armed: bool,
}

/// The outbox is closed: the peer is gone, or the channel was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the channel is closed")]
pub struct Closed;

/// Why [`Outbox::push`] did not queue a frame.
#[derive(Debug, thiserror::Error)]
pub enum PushError<E> {
    /// The channel is closed.
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The encoder refused: nothing was queued.
    #[error(transparent)]
    Encode(E),
}

impl Outbox {
    /// An outbox whose senders wait once `limit` bytes are gathered.
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    buffer: BytesMut::with_capacity(4096),
                    closed: false,
                    busy: false,
                    armed: true,
                }),
                socket: OnceLock::new(),
                work: Notify::new(),
                room: Notify::new(),
                limit: limit.max(1),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets senders write through `socket` (the one the writer task writes to).
    pub fn attach(&self, socket: Arc<ChannelSocket>) {
        let _ = self.shared.socket.set(socket);
    }

    /// The peer sent something: the next frame of an idle outbox is written through.
    pub fn heard(&self) {
        self.lock().armed = true;
    }

    /// Queues the frame that `encode` appends to the buffer (header and all), waiting while
    /// the buffer is full. When `encode` fails, whatever it appended is taken back.
    ///
    /// `encode` runs under the outbox's lock, so that frames never interleave: it should only
    /// serialize (a `Serialize` impl that sends on the same channel would deadlock).
    ///
    /// # Errors
    /// [`PushError::Closed`], or the encoder's error.
    pub async fn push<E>(
        &self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), PushError<E>> {
        let mut encode = Some(encode);
        loop {
            // Created before the check: a `notify_waiters` after it wakes this one.
            let room = self.shared.room.notified();
            {
                let mut state = self.lock();
                if state.closed {
                    return Err(Closed.into());
                }
                if state.buffer.len() < self.shared.limit {
                    let encode = encode.take().expect("called once: it returns");
                    return self.append(&mut state, encode);
                }
            }
            room.await;
        }
    }

    fn append<E>(
        &self,
        state: &mut State,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), PushError<E>> {
        let before = state.buffer.len();
        // A serializer that panics half way must not leave half a frame for the peer (which
        // would take the channel for broken): the guard takes it back as the panic unwinds.
        let mut rewind = Rewind {
            buffer: &mut state.buffer,
            to: Some(before),
        };
        let encoded = encode(rewind.buffer);
        if encoded.is_ok() {
            rewind.to = None;
        }
        drop(rewind);
        if let Err(error) = encoded {
            return Err(PushError::Encode(error));
        }
        if before == 0 && !state.buffer.is_empty() {
            if state.armed && !state.busy {
                if let Some(socket) = self.shared.socket.get() {
                    state.armed = false;
                    // Under the lock, so nothing can be written in between; the outbox is
                    // idle, so nobody waits long for it.
                    match socket.try_write(&state.buffer) {
                        Ok(n) if n == state.buffer.len() => {
                            state.buffer.clear();
                            return Ok(());
                        }
                        Ok(n) => state.buffer.advance(n),
                        // Full, or broken: the writer task waits, or finds out.
                        Err(_) => {}
                    }
                }
            }
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Queues `frame` at once, full or not: for the few small frames that must not wait
    /// (`stop`, the answer to a dropped request).
    ///
    /// # Errors
    /// [`Closed`].
    pub fn push_now(&self, frame: &[u8]) -> Result<(), Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        self.append::<()>(&mut state, |buffer| {
            buffer.extend_from_slice(frame);
            Ok(())
        })
        .map_err(|_| Closed)
    }

    /// Closes the outbox: senders get [`Closed`], the writer writes what is gathered and ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.work.notify_one();
        self.shared.room.notify_waiters();
    }

    /// Whether the outbox is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The next bytes to write, swapped with `spare` (empty); `None` once closed and drained.
    /// Waits for work. Until [`Outbox::finish_batch`], nobody writes through.
    pub async fn next_batch(&self, spare: &mut BytesMut) -> Option<()> {
        loop {
            let work = self.shared.work.notified();
            {
                let mut state = self.lock();
                if !state.buffer.is_empty() {
                    std::mem::swap(&mut state.buffer, spare);
                    state.busy = true;
                    return Some(());
                }
                if state.closed {
                    return None;
                }
            }
            work.await;
        }
    }

    /// Keeps senders from writing through while the writer task writes something else to the
    /// socket (a frame with an fd), until [`Outbox::release`]; waits for a write through
    /// under way to finish.
    pub fn hold(&self) {
        self.lock().busy = true;
    }

    /// Ends a [`Outbox::hold`], or the write of a batch: senders may write through again, and
    /// those waiting for room go on.
    pub fn release(&self) {
        let mut state = self.lock();
        state.busy = false;
        // Gathered while the writer wrote: it is the writer's to write.
        if !state.buffer.is_empty() {
            self.shared.work.notify_one();
        }
        drop(state);
        self.shared.room.notify_waiters();
    }

    /// Writes batches to `socket` until the outbox closes (or the socket fails: then it
    /// closes). For a channel whose writer does nothing else.
    pub async fn write_to(&self, socket: &ChannelSocket) {
        let mut batch = BytesMut::with_capacity(4096);
        while self.next_batch(&mut batch).await.is_some() {
            if !self.write_batch(socket, &mut batch).await {
                return;
            }
        }
    }

    /// Writes a batch [`Outbox::next_batch`] gave, then [`Outbox::finish_batch`]; false (and
    /// the outbox closed) when the socket failed.
    pub async fn write_batch(&self, socket: &ChannelSocket, batch: &mut BytesMut) -> bool {
        if socket.write_all(batch).await.is_err() {
            self.close();
            return false;
        }
        self.finish_batch(batch);
        true
    }

    /// After a batch is written: empties it (shrinking one that grew past the bound), then
    /// [`Outbox::release`].
    pub fn finish_batch(&self, batch: &mut BytesMut) {
        batch.clear();
        if batch.capacity() > 2 * self.shared.limit {
            *batch = BytesMut::with_capacity(4096);
        }
        self.release();
    }
}

/// Truncates a buffer back to `to` when dropped, unless `to` was cleared.
struct Rewind<'a> {
    buffer: &'a mut BytesMut,
    to: Option<usize>,
}

impl Drop for Rewind<'_> {
    fn drop(&mut self) {
        if let Some(to) = self.to {
            self.buffer.truncate(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::SocketReader;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn pair() -> (SocketReader, Arc<ChannelSocket>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (
            SocketReader(Arc::new(ChannelSocket::new(a.into()).unwrap())),
            Arc::new(ChannelSocket::new(b.into()).unwrap()),
        )
    }

    fn push_bytes(bytes: &[u8]) -> impl FnOnce(&mut BytesMut) -> Result<(), ()> + '_ {
        move |buffer| {
            buffer.extend_from_slice(bytes);
            Ok(())
        }
    }

    #[tokio::test]
    async fn frames_from_several_senders_arrive_whole_and_in_order_per_sender() {
        let (mut near, far) = pair();
        let outbox = Outbox::new(64);
        outbox.attach(far.clone());
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.write_to(&far).await }
        });
        let mut senders = Vec::new();
        for sender in 0..4u8 {
            let outbox = outbox.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..200u8 {
                    outbox.push(push_bytes(&[sender, n])).await.unwrap();
                    if n % 50 == 0 {
                        // As a reply would: the next frame of an idle outbox goes straight
                        // to the socket, and must still keep its place.
                        outbox.heard();
                    }
                }
            }));
        }
        let mut received = vec![0u8; 4 * 200 * 2];
        near.read_exact(&mut received).await.unwrap();
        let mut next = [0u8; 4];
        for pair in received.chunks(2) {
            assert_eq!(
                pair[1], next[pair[0] as usize],
                "sender {} in order",
                pair[0]
            );
            next[pair[0] as usize] += 1;
        }
        assert_eq!(next, [200; 4]);
        for sender in senders {
            sender.await.unwrap();
        }
        outbox.close();
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_armed_outbox_is_written_through_without_its_writer() {
        let (mut near, far) = pair();
        let outbox = Outbox::new(1024);
        outbox.attach(far.clone());
        // No writer task: only a write through can deliver.
        outbox.push(push_bytes(b"req")).await.unwrap();
        let mut read = [0u8; 3];
        near.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"req");
        // Disarmed: the next frame waits for the writer.
        outbox.push(push_bytes(b"two")).await.unwrap();
        let mut batch = BytesMut::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], b"two");
        // While the writer holds the socket, nothing is written through, even when armed.
        outbox.heard();
        outbox.push(push_bytes(b"3")).await.unwrap();
        far.write_all(&batch).await.unwrap();
        outbox.finish_batch(&mut batch);
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], b"3");
        far.write_all(&batch).await.unwrap();
        outbox.finish_batch(&mut batch);
        let mut read = [0u8; 4];
        near.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"two3");
        // Armed and idle again: through.
        outbox.heard();
        outbox.push(push_bytes(b"4")).await.unwrap();
        let mut read = [0u8; 1];
        near.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"4");
    }

    #[tokio::test]
    async fn a_sender_that_panics_while_encoding_leaves_no_half_frame() {
        let outbox = Outbox::new(1024);
        outbox.push(push_bytes(b"whole")).await.unwrap();
        let panicking = outbox.clone();
        let panicked = tokio::spawn(async move {
            let _ = panicking
                .push(|buffer: &mut BytesMut| -> Result<(), ()> {
                    buffer.extend_from_slice(b"half");
                    panic!("a Serialize impl that panics");
                })
                .await;
        })
        .await;
        assert!(panicked.is_err(), "the task panicked");
        outbox.push(push_bytes(b"next")).await.unwrap();
        let mut batch = BytesMut::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], b"wholenext");
    }

    #[tokio::test]
    async fn a_full_outbox_holds_senders_back_until_the_writer_drains_it() {
        let outbox = Outbox::new(8);
        outbox.push(push_bytes(&[0; 8])).await.unwrap();
        let blocked = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(push_bytes(&[1])).await }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "8 bytes fill an outbox of 8");
        // Frames that must not wait still get in.
        outbox.push_now(&[2]).unwrap();
        let mut batch = BytesMut::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], &[0, 0, 0, 0, 0, 0, 0, 0, 2]);
        outbox.finish_batch(&mut batch);
        tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("room made")
            .unwrap()
            .unwrap();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], &[1]);
    }

    #[tokio::test]
    async fn a_failed_encoding_queues_nothing_and_closing_wakes_every_sender() {
        let outbox = Outbox::new(4);
        outbox.push(push_bytes(&[7])).await.unwrap();
        let refused = outbox
            .push(|buffer: &mut BytesMut| {
                buffer.extend_from_slice(&[8, 8]);
                Err("too large")
            })
            .await;
        assert!(matches!(refused, Err(PushError::Encode("too large"))));
        outbox.push(push_bytes(&[9, 9, 9])).await.unwrap();
        let blocked = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(push_bytes(&[1])).await }
        });
        tokio::task::yield_now().await;
        outbox.close();
        let result = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("woken")
            .unwrap();
        assert!(matches!(result, Err(PushError::Closed(Closed))));
        assert_eq!(outbox.push_now(&[1]), Err(Closed));
        // What was queued before the close is still written, then the writer ends.
        let mut batch = BytesMut::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(&batch[..], &[7, 9, 9, 9]);
        batch.clear();
        assert!(outbox.next_batch(&mut batch).await.is_none());
    }
}
