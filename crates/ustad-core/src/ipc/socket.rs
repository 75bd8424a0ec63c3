//! The channel's socket: one end of the `socketpair`, shared by the task that reads it and by
//! every sender that writes through it (see `Outbox`), with `conn` frames' fds passed alongside.
//!
//! # Registered both ways, on purpose
//! On a Unix stream socket each read that frees room in the peer's send buffer signals
//! `EPOLLOUT` to the peer (`unix_write_space`), so a socket registered for writability wakes
//! its reactor whenever the other side reads what it sent. That looks like waste, and under
//! load it is some (`perf`: ~8 % of the CPU of a pipelined benchmark, in that wake-up path), but
//! it is what keeps a request's round trip short on a VM: the requester's reactor is woken as
//! the worker reads the request, and is still awake when the reply comes, instead of being
//! brought back from an idle CPU then. Measured both ways (docs/benchmarks.md, "IPC"): reading
//! only, round-trip p50 with 1 in flight was 1.7× longer, and pipelined round trips/s were
//! within the noise, so the socket stays registered both ways.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recv, recvmsg, send, sendmsg,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

use super::fdpass::ReceivedFds;

/// Most fds accepted with one `recvmsg` (more are closed by the kernel).
const MAX_FDS: usize = 32;

/// The channel's socket. Shared: one task reads, any number write (see `Outbox`).
#[derive(Debug)]
pub struct ChannelSocket {
    fd: AsyncFd<OwnedFd>,
}

impl std::os::fd::AsFd for ChannelSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl ChannelSocket {
    /// Registers `fd` (a Unix stream socket) with the current runtime, for reading.
    ///
    /// # Errors
    /// When it cannot be made non-blocking or registered (no runtime, a shut-down one).
    pub fn new(fd: OwnedFd) -> io::Result<ChannelSocket> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(ChannelSocket {
            fd: crate::sys::register_fd(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Writes what the socket takes now, without waiting.
    ///
    /// # Errors
    /// `WouldBlock` when it is full, or why it failed (the peer is gone).
    pub fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        Ok(send(
            self.fd.get_ref(),
            bytes,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        )?)
    }

    /// Writes all of `bytes`, waiting for room when the socket is full.
    ///
    /// # Errors
    /// When the socket fails (the peer is gone).
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.room().await?,
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Writes `frame` with `fd` attached to its first byte (`SCM_RIGHTS`).
    ///
    /// # Errors
    /// When the socket fails (the peer is gone).
    pub async fn send_with_fd(&self, frame: &[u8], fd: &OwnedFd) -> io::Result<()> {
        let sent = loop {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
            match sendmsg(
                self.fd.get_ref(),
                &[IoSlice::new(frame)],
                &mut control,
                flags,
            ) {
                Ok(sent) => break sent,
                Err(rustix::io::Errno::AGAIN) => self.room().await?,
                Err(error) => return Err(error.into()),
            }
        };
        self.write_all(&frame[sent..]).await
    }

    /// Waits until the socket may have room (a send then says).
    async fn room(&self) -> io::Result<()> {
        self.fd.writable().await?.clear_ready();
        Ok(())
    }

    /// Reads into `buf`; fds that come along go to `fds`, or (`None`) are closed.
    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        fds: Option<&ReceivedFds>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = guard.try_io(|fd| match fds {
                None => Ok(recv(fd.get_ref(), &mut *unfilled, RecvFlags::DONTWAIT)?.0),
                Some(fds) => {
                    let mut space =
                        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let message = recvmsg(
                        fd.get_ref(),
                        &mut [IoSliceMut::new(&mut *unfilled)],
                        &mut control,
                        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
                    )?;
                    let mut fds = fds.lock().unwrap_or_else(|e| e.into_inner());
                    for ancillary in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(passed) = ancillary {
                            fds.extend(passed);
                        }
                    }
                    Ok(message.bytes)
                }
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                // Not readable after all: readiness was cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads a channel's socket; fds a peer attaches are closed (the primary takes none).
#[derive(Debug)]
pub struct SocketReader(pub Arc<ChannelSocket>);

impl AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf, None)
    }
}

/// Reads a channel's socket, keeping the fds that come along (a worker's `conn` frames).
#[derive(Debug)]
pub struct FdReader {
    socket: Arc<ChannelSocket>,
    fds: ReceivedFds,
}

impl FdReader {
    /// Reads `socket`; fds received go to [`FdReader::fds`].
    pub fn new(socket: Arc<ChannelSocket>) -> FdReader {
        FdReader {
            socket,
            fds: ReceivedFds::default(),
        }
    }

    /// Where received fds wait for their `conn` frame.
    pub fn fds(&self) -> ReceivedFds {
        self.fds.clone()
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.socket.poll_read(cx, buf, Some(&this.fds))
    }
}

/// Two connected channel sockets, for tests. Must be called within a tokio runtime.
#[cfg(test)]
pub(crate) fn pair() -> (Arc<ChannelSocket>, Arc<ChannelSocket>) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    (
        Arc::new(ChannelSocket::new(a.into()).unwrap()),
        Arc::new(ChannelSocket::new(b.into()).unwrap()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_writer_that_fills_the_socket_waits_for_room_and_loses_nothing() {
        let (near, far) = pair();
        // Far more than a socket buffer holds: the writer must wait for the reader.
        let sent: Vec<u8> = (0..4 * 1024 * 1024u32).map(|n| (n % 251) as u8).collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move { near.write_all(&sent).await }
        });
        let mut received = vec![0u8; sent.len()];
        SocketReader(far).read_exact(&mut received).await.unwrap();
        writer.await.unwrap().unwrap();
        assert!(received == sent, "every byte, in order");
    }

    #[tokio::test]
    async fn the_end_of_the_peer_is_an_empty_read() {
        let (near, far) = pair();
        near.write_all(b"last").await.unwrap();
        drop(near);
        let mut received = Vec::new();
        SocketReader(far).read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last");
    }
}
