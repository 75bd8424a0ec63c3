//! Starting a worker process: resolve its program, build its environment, place its sockets at
//! fds 3, 4, … and start it in its own process group.
//!
//! The environment a worker gets, on top of the primary's own and its pool's `env`:
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` (its own pid) when it has sockets;
//! `NOTIFY_SOCKET` when its pool uses `ready = "notify"`; `USTAD_POOL`, `USTAD_WORKER_ID`,
//! `USTAD_WORKER_INDEX` and `USTAD_GENERATION` (a pool's `before_start` command gets the pool
//! and the generation only). Variables of those names inherited by the
//! primary are never passed on: a worker must not see its supervisor's own socket activation.
//! With sockets and the pool's `preload` on, also `LD_PRELOAD`, `USTAD_PRELOAD_FDS` and `PORT`
//! ([`crate::preload`]).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ustad_proto::env::{
    LISTEN_FDNAMES, LISTEN_FDNAMES_SEPARATOR, LISTEN_FDS, NODE_CHANNEL_FD,
    NODE_CHANNEL_SERIALIZATION_JSON, NODE_CHANNEL_SERIALIZATION_MODE, NOTIFY_SOCKET,
    USTAD_GENERATION, USTAD_IPC_FD, USTAD_IPC_MAX_FRAME, USTAD_POOL, USTAD_WORKER_ID,
    USTAD_WORKER_INDEX, WATCHDOG_USEC,
};

use crate::accounts::Credentials;
use crate::config::{IpcProtocol, OutputTarget, PoolSpec, Readiness};
use crate::plan::WorkerId;
use crate::sys::{self, ExecImage, LISTEN_FDS_START};

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The program was not found in `PATH` (or at the given path).
    #[error("command not found: `{program}` (looked in {searched})")]
    NotFound {
        /// The program as configured.
        program: String,
        /// Where it was looked for.
        searched: String,
    },
    /// The program exists but cannot be executed.
    #[error("`{}` is not executable: {reason}", path.display())]
    NotExecutable {
        /// The resolved path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The working directory does not exist.
    #[error("working directory {} does not exist", path.display())]
    NoCwd {
        /// The directory.
        path: PathBuf,
    },
    /// The pool's user or group cannot be used.
    #[error("cannot run as the pool's user: {0}")]
    Credentials(String),
    /// Preparing or performing the spawn failed.
    #[error("cannot start `{program}`: {source}")]
    Io {
        /// The program.
        program: String,
        /// The error from the OS.
        source: std::io::Error,
    },
}

/// Everything needed to start one worker, or its pool's `before_start` command.
#[derive(Debug)]
pub struct WorkerLaunch<'a> {
    /// The worker's id and slot; `None` for the pool's `before_start` command.
    pub worker: Option<(WorkerId, usize)>,
    /// Its pool's name.
    pub pool: &'a str,
    /// Its generation.
    pub generation: u64,
    /// What to run.
    pub spec: &'a PoolSpec,
    /// Its sockets, in fd order: name and the primary's fd.
    pub sockets: Vec<(&'a str, BorrowedFd<'a>)>,
    /// The primary's notify socket path, given when the pool uses `ready = "notify"`.
    pub notify_socket: Option<&'a Path>,
    /// The worker's end of its message channel, placed after the sockets.
    pub ipc: Option<BorrowedFd<'a>>,
}

/// Variables the primary never passes on from its own environment (nor from a pool's `env`):
/// [`ustad_proto::env::is_reserved`].
fn is_reserved(key: &OsStr) -> bool {
    ustad_proto::env::is_reserved(key.as_bytes())
}

fn env_entry(key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> CString {
    let mut entry = key.as_ref().as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value.as_ref().as_bytes());
    // Keys and values with NUL bytes are rejected by config validation; the inherited
    // environment cannot contain any.
    CString::new(entry).unwrap_or_default()
}

impl WorkerLaunch<'_> {
    /// What to log if this worker says an address is already in use (see
    /// [`crate::preload`]): what ustad holds for its pool, and what to do.
    pub fn address_in_use_hint(&self) -> String {
        let sockets: Vec<BorrowedFd<'_>> = self.sockets.iter().map(|(_, fd)| *fd).collect();
        let library = crate::preload::library()
            .and_then(|library| library.path_for(crate::preload::runs_as_other(self.spec)));
        crate::preload::address_in_use_hint(self.pool, self.spec, &sockets, library)
    }
}

/// The environment of a worker, except `LISTEN_PID`, which the child fills in itself. A worker
/// that runs as another user gets its `USER`, `LOGNAME` and `HOME`, as a login would (unless
/// the pool's `env` says otherwise). With `preload` (the library's path), what
/// [`crate::preload`] adds.
fn worker_env(
    launch: &WorkerLaunch<'_>,
    credentials: Option<&Credentials>,
    preload: Option<&Path>,
) -> Vec<CString> {
    let spec = launch.spec;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| !is_reserved(key) && !spec.env.contains_key(&*key.to_string_lossy()))
        .map(|(key, value)| env_entry(key, value))
        .collect();
    env.extend(
        spec.env
            .iter()
            .filter(|(k, _)| !is_reserved(OsStr::new(k)))
            .map(|(k, v)| env_entry(k, v)),
    );
    if !launch.sockets.is_empty() {
        env.push(env_entry(LISTEN_FDS, launch.sockets.len().to_string()));
        let names: Vec<&str> = launch.sockets.iter().map(|(name, _)| *name).collect();
        env.push(env_entry(
            LISTEN_FDNAMES,
            names.join(LISTEN_FDNAMES_SEPARATOR),
        ));
    }
    if let Some(path) = launch.notify_socket {
        env.push(env_entry(NOTIFY_SOCKET, path));
        if let Some(watchdog) = spec.watchdog {
            // WATCHDOG_PID is left out: sd_watchdog_enabled() checks it only when it is set,
            // and the worker's pid is not known before the fork.
            env.push(env_entry(WATCHDOG_USEC, watchdog.as_micros().to_string()));
        }
    }
    if let (Some(_), Some(ipc)) = (launch.ipc, spec.ipc) {
        let fd = sys::LISTEN_FDS_START + launch.sockets.len() as RawFd;
        match ipc.protocol {
            IpcProtocol::Ustad => {
                env.push(env_entry(USTAD_IPC_FD, fd.to_string()));
                env.push(env_entry(USTAD_IPC_MAX_FRAME, ipc.max_message.to_string()));
            }
            IpcProtocol::Node => {
                env.push(env_entry(NODE_CHANNEL_FD, fd.to_string()));
                env.push(env_entry(
                    NODE_CHANNEL_SERIALIZATION_MODE,
                    NODE_CHANNEL_SERIALIZATION_JSON,
                ));
            }
        }
    }
    if let Some((name, home)) = credentials.and_then(|c| c.account.as_ref()) {
        for (key, value) in [
            ("USER", name.as_str()),
            ("LOGNAME", name.as_str()),
            ("HOME", &*home.to_string_lossy()),
        ] {
            if !spec.env.contains_key(key) {
                env.retain(|entry| !entry.as_bytes().starts_with(format!("{key}=").as_bytes()));
                env.push(env_entry(key, value));
            }
        }
    }
    env.push(env_entry(USTAD_POOL, launch.pool));
    if let Some((id, slot)) = launch.worker {
        env.push(env_entry(USTAD_WORKER_ID, id.0.to_string()));
        env.push(env_entry(USTAD_WORKER_INDEX, slot.to_string()));
    }
    env.push(env_entry(USTAD_GENERATION, launch.generation.to_string()));
    let sockets: Vec<BorrowedFd<'_>> = launch.sockets.iter().map(|(_, fd)| *fd).collect();
    crate::preload::add_env(&mut env, spec, &sockets, preload);
    env
}

/// Finds the program the way `execvp` would, but before forking, so that a missing or
/// non-executable program is a clear error rather than an exit code 127.
pub fn resolve_program(spec: &PoolSpec) -> Result<PathBuf, SpawnError> {
    let program = spec.command.program();
    let cwd = spec.cwd.clone().unwrap_or_else(|| PathBuf::from("."));
    let executable = |path: &Path| -> Result<(), String> {
        let metadata = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if metadata.is_dir() {
            return Err("it is a directory".to_owned());
        }
        rustix::fs::access(path, rustix::fs::Access::EXEC_OK).map_err(|e| e.to_string())
    };
    if program.contains('/') {
        // Relative to the worker's working directory, as the child will resolve it.
        let path = PathBuf::from(program);
        let checked = if path.is_absolute() {
            path.clone()
        } else {
            cwd.join(&path)
        };
        if !checked.exists() {
            return Err(SpawnError::NotFound {
                program: program.to_owned(),
                searched: checked.display().to_string(),
            });
        }
        return executable(&checked)
            .map(|()| path)
            .map_err(|reason| SpawnError::NotExecutable {
                path: checked,
                reason,
            });
    }
    let path_var: OsString = spec
        .env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = None;
    for dir in std::env::split_paths(&path_var) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        let checked = if candidate.is_absolute() {
            candidate.clone()
        } else {
            cwd.join(&candidate)
        };
        if !checked.is_file() {
            continue;
        }
        match executable(&checked) {
            Ok(()) => return Ok(candidate),
            Err(reason) => denied = denied.or(Some((checked, reason))),
        }
    }
    match denied {
        Some((path, reason)) => Err(SpawnError::NotExecutable { path, reason }),
        None => Err(SpawnError::NotFound {
            program: program.to_owned(),
            searched: format!("PATH={}", path_var.to_string_lossy()),
        }),
    }
}

/// Starts a worker: in its own process group, with stdin from `/dev/null`, stdout and stderr
/// piped to the primary (or discarded when the pool is `silent`), dying with the primary.
///
/// Must be called from the supervisor's long-lived thread: `PR_SET_PDEATHSIG` fires when the
/// thread that forked a worker exits.
pub fn spawn_worker(launch: &WorkerLaunch<'_>) -> Result<tokio::process::Child, SpawnError> {
    let spec = launch.spec;
    let program_name = spec.command.program().to_owned();
    let io_error = |source| SpawnError::Io {
        program: program_name.clone(),
        source,
    };
    if let Some(cwd) = &spec.cwd {
        if !cwd.is_dir() {
            return Err(SpawnError::NoCwd { path: cwd.clone() });
        }
    }
    let program = resolve_program(spec)?;
    let credentials = crate::accounts::resolve(spec.user.as_deref(), spec.group.as_deref())
        .map_err(SpawnError::Credentials)?;
    let program_c = CString::new(program.clone().into_os_string().into_vec())
        .map_err(|e| io_error(std::io::Error::other(e)))?;
    let argv: Vec<CString> = spec
        .command
        .words()
        .iter()
        .map(|w| CString::new(w.as_bytes()).unwrap_or_default())
        .collect();
    let image = ExecImage::new(
        program_c,
        argv,
        worker_env(
            launch,
            credentials.as_ref(),
            crate::preload::library().and_then(|library| library.path_for(credentials.is_some())),
        ),
        !launch.sockets.is_empty(),
    );

    // Move the sockets above the range they will be placed into, and keep std's own pipes
    // above it too, so that placing them clobbers nothing.
    // The channel, if any, goes right after the sockets (not counted in LISTEN_FDS).
    let passed: Vec<BorrowedFd<'_>> = launch
        .sockets
        .iter()
        .map(|(_, fd)| *fd)
        .chain(launch.ipc)
        .collect();
    let above = LISTEN_FDS_START + passed.len() as RawFd;
    let _reserved = sys::reserve_low_fds(above).map_err(io_error)?;
    let fds: Vec<OwnedFd> = passed
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, above).map_err(std::io::Error::from))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;

    let mut command = tokio::process::Command::new(&program);
    command
        .args(spec.command.args())
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    let stdio = |target: &OutputTarget| match target {
        // Files are written by the primary, line by line, as it relays: piped too.
        OutputTarget::Relay | OutputTarget::File(_) => Stdio::piped(),
        OutputTarget::Inherit => Stdio::inherit(),
        OutputTarget::Null => Stdio::null(),
    };
    let (stdout, stderr) = spec.outputs();
    command.stdout(stdio(&stdout)).stderr(stdio(&stderr));
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    sys::prepare_worker(
        &mut command,
        image,
        fds,
        credentials,
        rustix::process::getpid(),
    );
    command
        .spawn()
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EACCES | libc::ENOEXEC) => SpawnError::NotExecutable {
                path: program.clone(),
                reason: source.to_string(),
            },
            Some(libc::ENOENT) => SpawnError::NotFound {
                program: spec.command.program().to_owned(),
                searched: format!("{} (or its interpreter)", program.display()),
            },
            _ => io_error(source),
        })
}

/// Starts a pool's `before_start` command for `generation` as its workers are started (same
/// `cwd`, `env`, user and group, output, own process group, dying with the primary), without
/// sockets, notify socket or channel; it gets `USTAD_POOL` and `USTAD_GENERATION`.
///
/// Must be called from the supervisor's long-lived thread, as [`spawn_worker`].
pub fn spawn_before_start(
    pool: &str,
    generation: u64,
    spec: &PoolSpec,
) -> Result<tokio::process::Child, SpawnError> {
    let Some(command) = spec.before_start.clone() else {
        return Err(SpawnError::Io {
            program: String::new(),
            source: std::io::Error::other("the pool has no before_start command"),
        });
    };
    let spec = PoolSpec {
        command,
        sockets: Vec::new(),
        ready: Readiness::None,
        watchdog: None,
        ipc: None,
        preload: false,
        ..spec.clone()
    };
    spawn_worker(&WorkerLaunch {
        worker: None,
        pool,
        generation,
        spec: &spec,
        sockets: Vec::new(),
        notify_socket: None,
        ipc: None,
    })
}

/// Whether a pool's workers get `NOTIFY_SOCKET`: those that may say they are ready (with
/// `listening`, `READY=1` counts too) or must send `WATCHDOG=1`.
pub fn wants_notify(spec: &PoolSpec) -> bool {
    matches!(spec.ready, Readiness::Notify | Readiness::Listening) || spec.watchdog.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Command;

    fn spec(words: &[&str]) -> PoolSpec {
        PoolSpec::new(Command::new(words.iter().copied()).unwrap())
    }

    #[test]
    fn programs_are_found_in_path_or_refused_clearly() {
        let found = resolve_program(&spec(&["sh", "-c", "true"])).unwrap();
        assert!(found.ends_with("sh"), "{found:?}");
        let missing = resolve_program(&spec(&["no-such-program-ustad"])).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("command not found: `no-such-program-ustad`")
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "not a program").unwrap();
        let not_exec = resolve_program(&spec(&[plain.to_str().unwrap()])).unwrap_err();
        assert!(
            matches!(not_exec, SpawnError::NotExecutable { .. }),
            "{not_exec}"
        );
        let dir = resolve_program(&spec(&["/tmp"])).unwrap_err();
        assert!(dir.to_string().contains("directory"), "{dir}");
    }

    #[test]
    fn reserved_variables_are_never_inherited() {
        assert!(is_reserved(OsStr::new("LISTEN_FDS")));
        assert!(is_reserved(OsStr::new("NOTIFY_SOCKET")));
        assert!(is_reserved(OsStr::new("USTAD_WORKER_ID")));
        assert!(!is_reserved(OsStr::new("PATH")));
    }
}
