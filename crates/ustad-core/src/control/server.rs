//! The primary's side of the control socket: accepts clients, checks who they are, reads one
//! request each and streams the supervisor's replies back.
//!
//! The supervisor loop never waits on a client: each connection is a task that hands the
//! parsed request over with a bounded reply channel ([`Call`]), and writes what comes back.
//! A client that sends too much, too slowly (its request must come within
//! [`REQUEST_TIMEOUT`]), or garbage gets an `error` line and is closed; one that stops reading
//! its stream fills its channel and is dropped.
//!
//! Nothing an idle client holds can keep the owner out: connections are not counted while they
//! wait for their request (each costs a task and a socket until its deadline), and only the
//! requests that hold a connection open for long, following events or logs, are capped
//! ([`MAX_STREAMS`]). `status` and `stop` are always answered.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use super::paths;
use super::protocol::{MAX_REQUEST, Reply, Request};

/// Clients following events or logs at once; more are told to retry.
pub const MAX_STREAMS: usize = 64;
/// How long a client may take to send its request, from its connection: a client of the
/// `ustad` command sends it at once.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing one reply line may take before the client is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies queued for one client.
pub const REPLY_QUEUE: usize = 1024;

/// A request handed to the supervisor, with where to send the replies. Dropping `replies`
/// ends the answer (the connection is closed once what was sent is written).
#[derive(Debug)]
pub struct Call {
    /// What the client asked.
    pub request: Request,
    /// Where the answer goes.
    pub replies: mpsc::Sender<Reply>,
}

/// The bound control socket. Removes its file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (mode 0600), creating its directory (0700) when it is the default one.
    /// A stale socket left by a killed primary is replaced; a live one is an error: another
    /// instance of the same name runs. Must be called within a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        let context = |error: io::Error| {
            io::Error::new(
                error.kind(),
                format!("control socket {}: {error}", path.display()),
            )
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if dir == paths::default_dir() || !dir.exists() {
                paths::ensure_private_dir(dir)?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if paths::is_live(path) {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "another ustad already listens on {} (pick another --name or --control)",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path).map_err(context)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "control socket {}: the path exists and is not a socket",
                        path.display()
                    ),
                ));
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(context)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(context)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Describes the socket for an upgrade's handover document (its fd, marked to survive
    /// the exec, and its path): clients that connect during the exec wait in its backlog.
    ///
    /// # Errors
    /// When its flags cannot be changed.
    pub fn hand_over(
        &self,
        keep: &mut crate::handover::Keep,
    ) -> io::Result<(std::os::fd::RawFd, PathBuf)> {
        use std::os::fd::AsFd;
        Ok((keep.fd(self.listener.as_fd())?, self.path.clone()))
    }

    /// The socket handed over as `fd`, bound at `path`. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// When it was not handed over, or cannot be registered.
    pub fn take_over(
        (fd, path): (std::os::fd::RawFd, PathBuf),
        fds: &mut crate::handover::HandedFds,
    ) -> io::Result<ControlServer> {
        let listener = std::os::unix::net::UnixListener::from(fds.get(fd, "the control socket")?);
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener: UnixListener::from_std(listener)?,
            path,
        })
    }

    /// Accepts clients until `calls` is closed, handing each request to the supervisor.
    pub async fn serve(&self, calls: mpsc::Sender<Call>) {
        let streams = Arc::new(Semaphore::new(MAX_STREAMS));
        let own_uid = rustix::process::geteuid().as_raw();
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!("control socket: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if calls.is_closed() {
                return;
            }
            tokio::spawn(serve_client(
                stream,
                own_uid,
                calls.clone(),
                streams.clone(),
            ));
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn refuse(mut stream: UnixStream, why: &str) {
    let _ = write_reply(&mut stream, &Reply::error(why)).await;
}

async fn serve_client(
    mut stream: UnixStream,
    own_uid: u32,
    calls: mpsc::Sender<Call>,
    streams: Arc<Semaphore>,
) {
    // tokio's, not rustix's: rustix reads the kernel's answer into a non-zero pid, and a
    // client in a pid namespace the primary cannot see (the socket bind-mounted into a
    // container) comes with pid 0.
    let peer = match stream.peer_cred() {
        Ok(peer) => peer,
        Err(error) => {
            warn!("control socket: cannot read the client's credentials: {error}");
            return;
        }
    };
    let (uid, pid) = (peer.uid(), peer.pid().unwrap_or(0));
    if uid != own_uid && uid != 0 {
        warn!(
            event = "control_refused",
            uid,
            pid,
            "control socket: refused a client of uid {uid} (pid {pid}): only uid {own_uid} and root may steer this ustad"
        );
        refuse(
            stream,
            &format!("permission denied: this ustad runs as uid {own_uid}; only that user and root may control it"),
        )
        .await;
        return;
    }
    let request = match read_request(&mut stream).await {
        Ok(request) => request,
        Err(why) => {
            debug!(pid, "control socket: bad request: {why}");
            refuse(stream, &why).await;
            return;
        }
    };
    debug!(pid, ?request, "control request");
    let follows = matches!(
        request,
        Request::Events {} | Request::Logs { follow: true, .. }
    );
    let _stream_permit = match follows {
        true => match streams.try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let why = format!(
                    "{MAX_STREAMS} clients already follow events or logs; retry when one is done"
                );
                refuse(stream, &why).await;
                return;
            }
        },
        false => None,
    };
    let (replies, mut answer) = mpsc::channel(REPLY_QUEUE);
    if calls.send(Call { request, replies }).await.is_err() {
        refuse(stream, "ustad is exiting").await;
        return;
    }
    let (reader, mut writer) = stream.into_split();
    // A client hanging up ends its stream (`logs -f`, `events`): watch for end-of-file.
    let mut hung_up = Box::pin(async move {
        let mut reader = reader;
        let mut scratch = [0u8; 256];
        loop {
            match reader.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    loop {
        let reply = tokio::select! {
            reply = answer.recv() => reply,
            () = &mut hung_up => return,
        };
        let Some(reply) = reply else { break };
        if write_reply(&mut writer, &reply).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// The read buffer of a client's request line.
const REQUEST_BUFFER: usize = 256;

/// Reads the one request line, bounded in size and time.
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    // A small buffer: a request is one short line, and a client that connects and waits costs
    // its buffer until the deadline (tokio's 8 KiB made 1,000 idle clients 9 MiB of the
    // primary's memory, kept by the allocator after they left; 256 bytes make it ~1 MiB).
    let mut reader = BufReader::with_capacity(
        REQUEST_BUFFER,
        AsyncReadExt::take(stream, MAX_REQUEST as u64 + 1),
    );
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) => {
            return Err(format!(
                "no complete request within {}s",
                REQUEST_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(error)) => return Err(format!("cannot read the request: {error}")),
        Ok(Ok(_)) => {}
    }
    parse_request(&line)
}

/// The request in `line`, as read from a client (at most [`MAX_REQUEST`] bytes and a newline
/// are read): one JSON object ending with a newline, or why it is refused. Pure, so that the
/// fuzz target and the property tests exercise exactly what the server does with a line.
///
/// # Errors
/// The text of the `error` reply: too long, no final newline, or not a [`Request`].
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("the request must be one JSON object ending with a newline".to_owned());
    }
    serde_json::from_slice(line).map_err(|error| format!("bad request: {error}"))
}

async fn write_reply(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    reply: &Reply,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&line)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read",
        )),
    }
}
