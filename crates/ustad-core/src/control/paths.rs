//! Where control sockets live, and finding a running instance.
//!
//! Each primary listens on `<dir>/<name>.sock`, where `<dir>` is `$XDG_RUNTIME_DIR/ustad`
//! (per user, on a tmpfs, cleaned at logout) or `/tmp/ustad-<uid>` when that variable is
//! unset, created mode 0700. Clients find an instance by name, or take the only one running.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The directory of this user's control sockets (not created).
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("ustad"),
        None => std::env::temp_dir().join(format!("ustad-{}", rustix::process::geteuid().as_raw())),
    }
}

/// The default control socket of the instance called `name`.
pub fn default_socket(name: &str) -> PathBuf {
    default_dir().join(format!("{name}.sock"))
}

/// Creates `dir` (mode 0700) if needed, and refuses one that another user owns or that
/// others may write to: anyone who can write there could put a socket in our place.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(error) => {
            return Err(io::Error::new(
                error.kind(),
                format!("cannot create {}: {error}", dir.display()),
            ));
        }
    }
    let meta = std::fs::metadata(dir)?;
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to this user (uid {uid})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by other users (mode {:o}); make it 0700",
                dir.display(),
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    Ok(())
}

/// Whether a primary answers on this socket.
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// The live control sockets in `dir`, sorted by name.
pub fn live_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sockets: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sock"))
        .filter(|path| is_live(path))
        .collect();
    sockets.sort();
    sockets
}

/// How a client picks its instance.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--control PATH`.
    pub control: Option<PathBuf>,
    /// `--name NAME`.
    pub name: Option<String>,
}

impl Target {
    /// The socket to talk to: the one given, the named one, or the only live one.
    ///
    /// # Errors
    /// A message for people when none, or more than one, is running.
    pub fn resolve(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.control {
            return Ok(path.clone());
        }
        if let Some(name) = &self.name {
            return Ok(default_socket(name));
        }
        let dir = default_dir();
        let live = live_sockets(&dir);
        match live.as_slice() {
            [only] => Ok(only.clone()),
            [] => Err(format!(
                "no ustad is running (no control socket answers in {}); start one with `ustad run`, or pass --control PATH",
                dir.display()
            )),
            several => Err(format!(
                "{} ustad instances are running: {}; pick one with --name",
                several.len(),
                several
                    .iter()
                    .filter_map(|p| p.file_stem())
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}
