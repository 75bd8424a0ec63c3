//! The primary's own sd_notify messages to its service manager, on the `NOTIFY_SOCKET` it was
//! started with: `READY=1` once every pool serves, `RELOADING=1` … `READY=1` around a reload,
//! `STOPPING=1` at shutdown, and `STATUS=` summaries for `systemctl status`.
//!
//! Why: under systemd `Type=notify`, `systemctl start ustad` returns, and units ordered after
//! ustad start, only when the workers serve rather than when the primary process exists; under
//! `Type=notify-reload`, `systemctl reload` waits until the rolling restart is over.
//!
//! [`crate::notify`] is the other direction: the primary's own notify socket, for its workers.
//! A worker never sees the primary's `NOTIFY_SOCKET` ([`crate::spawn`] drops it from what
//! workers inherit; a `ready = "notify"` pool gets the primary's socket instead).
//!
//! It also keeps copies of the primary's sockets in the service manager's fd store
//! ([`store_fd`](ServiceNotifier::store_fd), [`remove_stored`](ServiceNotifier::remove_stored);
//! what to keep there is [`crate::fdstore`]'s to decide).
//!
//! Sending never fails the primary: an error is logged (once, until a message gets through
//! again) and the message is lost, as with `sd_notify(3)`.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use ustad_proto::env::NOTIFY_SOCKET;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};
use ustad_proto::notify::{
    FDNAME, FDSTORE, FDSTOREREMOVE, FLAG, MONOTONIC_USEC, READY, RELOADING, STATUS, STOPPING,
};

use crate::status::PoolStatus;
use crate::sys;

/// How long a message may wait for room in the service manager's queue: the primary's event
/// loop waits meanwhile.
const SEND_TIMEOUT: Duration = Duration::from_millis(250);

/// Sends the primary's state to its service manager; does nothing when the primary has no
/// `NOTIFY_SOCKET`.
///
/// Either call [`ready`](ServiceNotifier::ready), [`reloading`](ServiceNotifier::reloading),
/// [`stopping`](ServiceNotifier::stopping) and [`status`](ServiceNotifier::status) at the right
/// moments yourself, or call [`update`](ServiceNotifier::update) with the pools' status after
/// every change and [`reloading`](ServiceNotifier::reloading) /
/// [`stopping`](ServiceNotifier::stopping) when a reload or shutdown begins: `update` then
/// sends `READY=1` when every pool first has all its workers ready, `READY=1` again when the
/// rollouts of a reload are over, and `STATUS=` whenever the summary changes.
///
/// ```no_run
/// use ustad_core::service::ServiceNotifier;
///
/// let service = ServiceNotifier::from_env();
/// service.ready("web: 4/4 ready");
/// service.reloading();
/// service.ready("web: 4/4 ready (generation 2)");
/// service.stopping();
/// ```
#[derive(Debug)]
pub struct ServiceNotifier {
    target: Option<Target>,
    state: Mutex<State>,
    /// A send failed and was logged; later failures are not, until one succeeds.
    failing: AtomicBool,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    address: SocketAddr,
    /// The same address, for `sendmsg` with fds.
    with_fds: SocketAddrUnix,
    /// `NOTIFY_SOCKET` as given, for messages.
    shown: String,
}

#[derive(Debug, Default)]
struct State {
    phase: Phase,
    /// The last `STATUS=` sent.
    status: String,
}

/// Where the primary is, as its service manager was told.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `READY=1` not sent yet.
    #[default]
    Starting,
    /// `READY=1` sent.
    Running,
    /// `RELOADING=1` sent; `READY=1` is due when the rollouts are over.
    Reloading,
    /// `STOPPING=1` sent; nothing but `STATUS=` any more.
    Stopping,
}

impl ServiceNotifier {
    /// A notifier for the `NOTIFY_SOCKET` of this process's environment: an absolute path, or
    /// `@name` for an abstract socket. Without one (or with one it cannot use, which is logged)
    /// it does nothing.
    pub fn from_env() -> ServiceNotifier {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(value) if !value.is_empty() => match ServiceNotifier::new(&value) {
                Ok(notifier) => notifier,
                Err(error) => {
                    tracing::warn!(
                        event = "service_notify_failed",
                        "{NOTIFY_SOCKET}={}: {error}; the service manager will not be told when ustad is ready",
                        value.to_string_lossy()
                    );
                    ServiceNotifier::disabled()
                }
            },
            _ => ServiceNotifier::disabled(),
        }
    }

    /// A notifier for the sd_notify socket at `notify_socket` (as `NOTIFY_SOCKET` writes it).
    ///
    /// # Errors
    /// When `notify_socket` is neither an absolute path nor `@name` (`vsock:` addresses are
    /// not supported), or no socket can be created.
    pub fn new(notify_socket: &OsStr) -> io::Result<ServiceNotifier> {
        let bytes = notify_socket.as_bytes();
        let (address, with_fds) = match bytes.first() {
            Some(b'@') => (
                SocketAddr::from_abstract_name(&bytes[1..])?,
                SocketAddrUnix::new_abstract_name(&bytes[1..])?,
            ),
            Some(b'/') => (
                SocketAddr::from_pathname(Path::new(notify_socket))?,
                SocketAddrUnix::new(Path::new(notify_socket))?,
            ),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an absolute path or an abstract @name",
                ));
            }
        };
        // Close-on-exec, as std creates every socket: no worker inherits it.
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(ServiceNotifier {
            target: Some(Target {
                socket,
                address,
                with_fds,
                shown: notify_socket.to_string_lossy().into_owned(),
            }),
            state: Mutex::default(),
            failing: AtomicBool::new(false),
        })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> ServiceNotifier {
        ServiceNotifier {
            target: None,
            state: Mutex::default(),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether there is a service manager to tell.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1` with `STATUS=status`: the cluster serves (at start, or after a reload).
    /// Ignored once [`stopping`](ServiceNotifier::stopping) was sent.
    pub fn ready(&self, status: &str) {
        let mut state = self.lock();
        if state.phase == Phase::Stopping {
            return;
        }
        state.phase = Phase::Running;
        state.status = one_line(status);
        self.send(&format!("{READY}={FLAG}\n{STATUS}={}\n", state.status));
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (the `CLOCK_MONOTONIC` time, which systemd's
    /// `Type=notify-reload` requires): a reload began; send [`ready`](ServiceNotifier::ready)
    /// when it is over, even if it failed (the cluster serves as before).
    ///
    /// Ignored before the first `READY=1` (the service manager is still waiting for the start
    /// to finish) and after `STOPPING=1`.
    pub fn reloading(&self) {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Starting | Phase::Stopping) {
            return;
        }
        state.phase = Phase::Reloading;
        state.status = "reloading".to_owned();
        self.send(&format!(
            "{RELOADING}={FLAG}\n{MONOTONIC_USEC}={}\n{STATUS}={}\n",
            sys::monotonic_usec(),
            state.status
        ));
    }

    /// `STOPPING=1`: the primary is stopping its workers and will exit. Sent once.
    pub fn stopping(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Stopping {
            return;
        }
        state.phase = Phase::Stopping;
        state.status = "stopping".to_owned();
        self.send(&format!("{STOPPING}={FLAG}\n{STATUS}={}\n", state.status));
    }

    /// `STATUS=status`: one line for `systemctl status` (line breaks become spaces).
    pub fn status(&self, status: &str) {
        let mut state = self.lock();
        state.status = one_line(status);
        self.send(&format!("{STATUS}={}\n", state.status));
    }

    /// `FDSTORE=1` with `FDNAME=name` and `fd` attached: the service manager keeps a copy of
    /// `fd`, and passes it back under `name` (in `LISTEN_FDNAMES`) when it starts ustad again.
    /// It ignores a copy of an fd it already keeps.
    ///
    /// # Errors
    /// When there is no service manager, or the message cannot be sent (then it is logged
    /// too, as every failed message).
    pub fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no service manager",
            ));
        };
        let message = format!("{FDSTORE}={FLAG}\n{FDNAME}={name}\n");
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg_addr(
            &target.socket,
            &target.with_fds,
            &[IoSlice::new(message.as_bytes())],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map(drop)
        .map_err(io::Error::from);
        self.sent(target, &message, sent)
    }

    /// `FDSTOREREMOVE=1` with `FDNAME=name`: the service manager closes its copies of the fds
    /// it keeps under `name`.
    pub fn remove_stored(&self, name: &str) {
        self.send(&format!("{FDSTOREREMOVE}={FLAG}\n{FDNAME}={name}\n"));
    }

    /// Tells the service manager what changed, given every pool's status after an event:
    /// `READY=1` when every pool first has a ready worker in every slot, `READY=1` when a
    /// reload's rollouts are all over (finished or aborted), else `STATUS=` with
    /// [`summary`] when it changed. Call it after every event the supervisor handles.
    pub fn update(&self, pools: &[PoolStatus]) {
        let (phase, last) = {
            let state = self.lock();
            (state.phase, state.status.clone())
        };
        let summary = summary(pools, phase == Phase::Stopping);
        match phase {
            Phase::Starting if all_ready(pools) => self.ready(&summary),
            Phase::Reloading if pools.iter().all(|pool| pool.rollout.is_none()) => {
                self.ready(&summary);
            }
            _ if summary != last => self.status(&summary),
            _ => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else { return };
        let sent = target
            .socket
            .send_to_addr(message.as_bytes(), &target.address)
            .map(drop);
        let _ = self.sent(target, message, sent);
    }

    /// Logs what became of `message`: a failure once, until a message gets through again.
    fn sent(&self, target: &Target, message: &str, sent: io::Result<()>) -> io::Result<()> {
        match sent {
            Ok(()) => {
                self.failing.store(false, Ordering::Relaxed);
                tracing::debug!(
                    "told the service manager: {}",
                    message.trim_end().replace('\n', ", ")
                );
                Ok(())
            }
            Err(error) => {
                let first = !self.failing.swap(true, Ordering::Relaxed);
                let what = message.lines().next().unwrap_or_default();
                if first {
                    tracing::warn!(
                        event = "service_notify_failed",
                        "cannot tell the service manager {what} on {NOTIFY_SOCKET}={}: {error}",
                        target.shown
                    );
                } else {
                    tracing::debug!(
                        "cannot tell the service manager {what} on {NOTIFY_SOCKET}={}: {error}",
                        target.shown
                    );
                }
                Err(error)
            }
        }
    }
}

/// Whether every pool has a ready worker in every slot.
pub fn all_ready(pools: &[PoolStatus]) -> bool {
    pools.iter().all(|pool| pool.ready >= pool.size)
}

/// A one-line summary of the pools for `STATUS=`: `web 4/4 ready, jobs 1/2 ready`, with
/// `rolling to generation 3 (2/4 replaced)` for a pool in a rollout; when `stopping`, how many
/// workers are left.
pub fn summary(pools: &[PoolStatus], stopping: bool) -> String {
    if stopping {
        let left: usize = pools.iter().map(|pool| pool.workers.len()).sum();
        return format!(
            "stopping, {left} worker{} left",
            if left == 1 { "" } else { "s" }
        );
    }
    let parts: Vec<String> = pools
        .iter()
        .map(|pool| {
            let mut part = format!("{} {}/{} ready", pool.name, pool.ready, pool.size);
            if let Some(rollout) = &pool.rollout {
                part.push_str(&format!(
                    ", rolling to generation {} ({}/{} replaced)",
                    rollout.generation, rollout.replaced, rollout.size
                ));
            }
            part
        })
        .collect();
    if parts.is_empty() {
        "no pools".to_owned()
    } else {
        parts.join("; ")
    }
}

/// `STATUS=` is one line of the datagram: a line break would start another assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::status::RolloutStatus;

    fn pool(name: &str, ready: usize, size: usize, rolling: Option<u64>) -> PoolStatus {
        PoolStatus {
            name: name.to_owned(),
            size,
            ready,
            generation: 1,
            rollout: rolling.map(|generation| RolloutStatus {
                generation,
                replaced: 1,
                size,
                elapsed_secs: 0.5,
            }),
            restarts: BTreeMap::new(),
            workers: Vec::new(),
            waiting: Vec::new(),
            waiting_for: Vec::new(),
            done: false,
            before_start: None,
        }
    }

    /// A service manager's notify socket in a temp dir.
    struct Manager {
        _dir: tempfile::TempDir,
        socket: UnixDatagram,
        path: std::path::PathBuf,
    }

    impl Manager {
        fn new() -> Manager {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            Manager {
                _dir: dir,
                socket,
                path,
            }
        }

        fn notifier(&self) -> ServiceNotifier {
            ServiceNotifier::new(self.path.as_os_str()).unwrap()
        }

        /// Every datagram received so far.
        fn received(&self) -> Vec<String> {
            let mut buffer = [0u8; 4096];
            let mut messages = Vec::new();
            while let Ok(n) = self.socket.recv(&mut buffer) {
                messages.push(String::from_utf8(buffer[..n].to_vec()).unwrap());
            }
            messages
        }
    }

    #[test]
    fn each_method_sends_one_datagram_in_the_sd_notify_format() {
        let manager = Manager::new();
        let service = manager.notifier();
        service.ready("web 2/2\nready");
        service.reloading();
        service.status("rolling");
        service.ready("web 2/2 ready");
        service.stopping();
        service.stopping();
        let received = manager.received();
        assert_eq!(received[0], "READY=1\nSTATUS=web 2/2 ready\n");
        let reloading: Vec<&str> = received[1].lines().collect();
        assert_eq!(reloading[0], "RELOADING=1");
        let usec: u64 = reloading[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert_eq!(reloading[2], "STATUS=reloading");
        assert_eq!(
            &received[2..],
            [
                "STATUS=rolling\n",
                "READY=1\nSTATUS=web 2/2 ready\n",
                "STOPPING=1\nSTATUS=stopping\n"
            ],
            "STOPPING=1 is sent once"
        );
    }

    #[test]
    fn monotonic_usec_is_the_clock_of_instant() {
        // Instant is CLOCK_MONOTONIC: two readings a few ms apart bracket the value.
        let before = sys::monotonic_usec();
        std::thread::sleep(Duration::from_millis(5));
        let after = sys::monotonic_usec();
        assert!(after >= before + 5_000, "{before} {after}");
    }

    #[test]
    fn update_sends_ready_once_every_pool_is_ready_then_only_changes() {
        let manager = Manager::new();
        let service = manager.notifier();
        service.update(&[pool("web", 1, 2, None), pool("jobs", 1, 1, None)]);
        service.update(&[pool("web", 1, 2, None), pool("jobs", 1, 1, None)]);
        service.update(&[pool("web", 2, 2, None), pool("jobs", 1, 1, None)]);
        service.update(&[pool("web", 2, 2, None), pool("jobs", 1, 1, None)]);
        service.update(&[pool("web", 1, 2, None), pool("jobs", 1, 1, None)]);
        assert_eq!(
            manager.received(),
            [
                "STATUS=web 1/2 ready; jobs 1/1 ready\n",
                "READY=1\nSTATUS=web 2/2 ready; jobs 1/1 ready\n",
                "STATUS=web 1/2 ready; jobs 1/1 ready\n",
            ]
        );
    }

    #[test]
    fn a_reload_is_over_when_no_pool_is_rolling() {
        let manager = Manager::new();
        let service = manager.notifier();
        service.reloading();
        assert!(
            manager.received().is_empty(),
            "not before the first READY=1"
        );
        service.update(&[pool("web", 2, 2, None)]);
        service.reloading();
        service.update(&[pool("web", 2, 2, Some(2))]);
        service.update(&[pool("web", 2, 2, None)]);
        let received = manager.received();
        assert_eq!(received[0], "READY=1\nSTATUS=web 2/2 ready\n");
        assert!(received[1].starts_with("RELOADING=1\n"), "{received:?}");
        assert_eq!(
            &received[2..],
            [
                "STATUS=web 2/2 ready, rolling to generation 2 (1/2 replaced)\n",
                "READY=1\nSTATUS=web 2/2 ready\n"
            ]
        );
        // A reload that starts no rollout (a refused config) is over at the next update.
        service.reloading();
        service.update(&[pool("web", 2, 2, None)]);
        let received = manager.received();
        assert!(received[0].starts_with("RELOADING=1\n"), "{received:?}");
        assert_eq!(received[1], "READY=1\nSTATUS=web 2/2 ready\n");
    }

    #[test]
    fn after_stopping_only_the_status_changes() {
        let manager = Manager::new();
        let service = manager.notifier();
        service.update(&[pool("web", 1, 1, None)]);
        service.stopping();
        service.reloading();
        service.ready("ready again?");
        service.update(&[pool("web", 0, 1, None)]);
        assert_eq!(
            manager.received(),
            [
                "READY=1\nSTATUS=web 1/1 ready\n",
                "STOPPING=1\nSTATUS=stopping\n",
                "STATUS=stopping, 0 workers left\n"
            ]
        );
    }

    #[test]
    fn abstract_sockets_are_reached_by_name() {
        let name = format!(
            "ustad-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let manager =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let service = ServiceNotifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        service.status("hello");
        let mut buffer = [0u8; 64];
        let n = manager.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STATUS=hello\n");
    }

    #[test]
    fn unusable_addresses_are_refused_and_failures_are_not_fatal() {
        for bad in ["relative/path", "vsock:2:1234", ""] {
            assert!(ServiceNotifier::new(OsStr::new(bad)).is_err(), "{bad}");
        }
        let service = ServiceNotifier::new(OsStr::new("/nonexistent/ustad/notify")).unwrap();
        service.ready("nobody listens");
        service.stopping();
        assert!(service.failing.load(Ordering::Relaxed));
        let silent = ServiceNotifier::disabled();
        assert!(!silent.is_enabled());
        silent.ready("nothing is sent");
    }
}
