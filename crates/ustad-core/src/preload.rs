//! Apps that bind their own port: what a worker gets so that ustad's preload library
//! (`crates/ustad-preload`) hands it ustad's socket when it binds one of its pool's addresses
//! itself, and what to tell the operator when a worker still finds an address in use.
//!
//! For a pool with `preload` on (the default) and sockets, once a library is set
//! ([`set_library`]; the `ustad` binary sets its embedded copy, and a copy anyone may read for
//! workers that run as another user), each worker gets:
//! - `LD_PRELOAD`: the library, before whatever the worker would get otherwise;
//! - `USTAD_PRELOAD_FDS`: each socket's fd, its inode and, for a Unix socket file, the file's
//!   device and inode (`ustad_proto::env::USTAD_PRELOAD_FDS`), so that the library hands out
//!   a socket only while its fd still holds it, in the worker and in its children;
//! - `PORT`, when exactly one of its sockets is TCP (the Heroku and PM2 convention), unless the
//!   pool's `env` sets it: the primary's own `PORT` would name another port.
//!
//! The library reaches programs that call libc's `bind`: statically linked ones (Go) take their
//! sockets as fd 3, 4, … instead (`LISTEN_FDS`), which every worker gets in any case.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use socket2::{SockAddr, SockRef};
use ustad_proto::env::{LD_PRELOAD, LISTEN_FDS_START, PORT, USTAD_PRELOAD_FDS};

use crate::config::PoolSpec;

static LIBRARY: OnceLock<Library> = OnceLock::new();

/// The memfd [`Library::path`] names, when it is one (see [`keep_memfd`]).
static MEMFD: OnceLock<OwnedFd> = OnceLock::new();

/// The preload library, where workers can load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// For workers that run as ustad's own user: any path their dynamic loader can open, such
    /// as `/proc/<pid>/fd/<fd>` of a memfd this process keeps open.
    pub path: PathBuf,
    /// For workers that run as another user or group (a pool's `user`, `group`): a file anyone
    /// may read, since they may not open this process's fds through `/proc`. Without it, their
    /// pools go without the library.
    pub for_other_users: Option<PathBuf>,
}

impl Library {
    /// The path for a worker that runs as another user or group (`other`), or as ustad's.
    pub fn path_for(&self, other: bool) -> Option<&Path> {
        if other {
            self.for_other_users.as_deref()
        } else {
            Some(&self.path)
        }
    }
}

/// Makes workers of pools with `preload` on and sockets load `library`. Once per process: a
/// second call returns its library back.
///
/// Without a library, `preload` does nothing: workers get their sockets as fd 3, 4, … only.
pub fn set_library(library: Library) -> Result<(), Library> {
    LIBRARY.set(library)
}

/// The library set by [`set_library`].
pub fn library() -> Option<&'static Library> {
    LIBRARY.get()
}

/// Keeps open, for the rest of the process's life, the memfd that the library's path names
/// (`/proc/<pid>/fd/<fd>`). An upgrade hands it over at the same number, and the new program
/// puts its own library there ([`Handover::take_preload`](crate::supervisor::Handover)): the
/// path a worker was given stays valid, for the programs it starts after the upgrade too.
/// Once per process: a second call returns its fd back.
pub fn keep_memfd(memfd: OwnedFd) -> Result<(), OwnedFd> {
    MEMFD.set(memfd)
}

/// The memfd kept by [`keep_memfd`].
pub(crate) fn memfd() -> Option<BorrowedFd<'static>> {
    MEMFD.get().map(AsFd::as_fd)
}

/// Whether the workers of `spec` run as another user or group than ustad.
pub(crate) fn runs_as_other(spec: &PoolSpec) -> bool {
    spec.user.is_some() || spec.group.is_some()
}

/// What identifies a socket for the library: its inode while open, and its socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    inode: u64,
    /// Device major, minor and inode of a Unix socket's file.
    file: Option<(u32, u32, u64)>,
    address: SockAddr,
}

fn identity(fd: BorrowedFd<'_>) -> io::Result<Identity> {
    let inode = rustix::fs::fstat(fd)?.st_ino;
    let address = SockRef::from(&fd).local_addr()?;
    let file = match address.as_pathname() {
        Some(path) => {
            let stat = rustix::fs::stat(path)?;
            Some((
                rustix::fs::major(stat.st_dev),
                rustix::fs::minor(stat.st_dev),
                stat.st_ino,
            ))
        }
        None => None,
    };
    Ok(Identity {
        inode,
        file,
        address,
    })
}

/// `USTAD_PRELOAD_FDS` for sockets placed at fd 3, 4, … in this order. A socket whose identity
/// cannot be read is left out (the program then binds for itself, as without the library).
fn preload_fds(identities: &[Option<Identity>]) -> String {
    let mut entries = Vec::new();
    for (index, identity) in identities.iter().enumerate() {
        let Some(identity) = identity else { continue };
        let fd = LISTEN_FDS_START + index as i32;
        let mut entry = format!("{fd}:{}", identity.inode);
        if let Some((major, minor, ino)) = identity.file {
            entry.push_str(&format!(":{major}:{minor}:{ino}"));
        }
        entries.push(entry);
    }
    entries.join(",")
}

/// The value of `key` in `env`.
fn get<'e>(env: &'e [CString], key: &str) -> Option<&'e [u8]> {
    env.iter().find_map(|entry| {
        entry
            .as_bytes()
            .strip_prefix(key.as_bytes())?
            .strip_prefix(b"=")
    })
}

/// Sets `key` to `value` in `env`, in place of any value it had.
fn set(env: &mut Vec<CString>, key: &str, value: &[u8]) {
    env.retain(|entry| {
        entry
            .as_bytes()
            .strip_prefix(key.as_bytes())
            .is_none_or(|rest| !rest.starts_with(b"="))
    });
    let mut entry = key.as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value);
    // Paths and numbers: no NUL (a value read from `env` has none either).
    env.push(CString::new(entry).unwrap_or_default());
}

/// Whether `spec`'s workers get the library: a library is set, the pool wants it, and it has
/// sockets its workers accept on (fds passed to the worker; round-robin sockets are not).
pub(crate) fn applies(spec: &PoolSpec, sockets: usize, library: Option<&Path>) -> bool {
    library.is_some() && spec.preload && sockets > 0
}

/// Adds what the library needs to a worker's environment `env` (built otherwise in full),
/// for `sockets` placed at fd 3, 4, ….
pub(crate) fn add_env(
    env: &mut Vec<CString>,
    spec: &PoolSpec,
    sockets: &[BorrowedFd<'_>],
    library: Option<&Path>,
) {
    let Some(library) = library.filter(|_| applies(spec, sockets.len(), library)) else {
        return;
    };
    let identities: Vec<Option<Identity>> = sockets.iter().map(|fd| identity(*fd).ok()).collect();
    set(env, USTAD_PRELOAD_FDS, preload_fds(&identities).as_bytes());

    let ours = library.as_os_str().as_bytes();
    let mut preload = ours.to_vec();
    if let Some(theirs) = get(env, LD_PRELOAD) {
        // The loader splits the list at spaces and colons; ours goes first, once.
        let others: Vec<&[u8]> = theirs
            .split(|b| *b == b':' || *b == b' ')
            .filter(|item| !item.is_empty() && *item != ours)
            .collect();
        for item in others {
            preload.push(b':');
            preload.extend_from_slice(item);
        }
    }
    set(env, LD_PRELOAD, &preload);

    let mut tcp = identities
        .iter()
        .flatten()
        .filter_map(|identity| identity.address.as_socket());
    if let (Some(only), None) = (tcp.next(), tcp.next()) {
        if !spec.env.contains_key(PORT) {
            set(env, PORT, only.port().to_string().as_bytes());
        }
    }
}

/// What to tell the operator when a worker of `pool` says that an address is already in use,
/// for a worker with `sockets` and the library `library` (or none).
pub(crate) fn address_in_use_hint(
    pool: &str,
    spec: &PoolSpec,
    sockets: &[BorrowedFd<'_>],
    library: Option<&Path>,
) -> String {
    let addresses: Vec<String> = sockets
        .iter()
        .filter_map(|fd| SockRef::from(fd).local_addr().ok())
        .map(|address| describe(&address))
        .collect();
    if addresses.is_empty() {
        return format!(
            "a worker of pool {pool} says an address is already in use: without a socket of the pool, each worker binds its own, and only one can have a port. Let ustad hold the address (--listen 127.0.0.1:3000, or a [sockets.NAME] in the pool's `sockets`): every worker that binds it then gets ustad's socket"
        );
    }
    let held = format!(
        "ustad holds the sockets of pool {pool} ({}) and passes them to every worker as fd 3, 4, … (LISTEN_FDS)",
        addresses.join(", ")
    );
    let static_programs = "a statically linked program (Go) must take fd 3 instead, e.g. with go-systemd's activation.Listeners()";
    if !spec.preload {
        format!(
            "a worker of pool {pool} says an address is already in use: {held}, and the pool has preload = false (--no-preload), so a program that binds one of their addresses itself fails. Turn preload on, or make the program listen on fd 3; {static_programs}"
        )
    } else if library.is_none() {
        format!(
            "a worker of pool {pool} says an address is already in use: {held}; this ustad has no preload library to hand them to a program that binds their address itself, so make the program listen on fd 3 ({static_programs})"
        )
    } else {
        format!(
            "a worker of pool {pool} says an address is already in use: {held}. A program that binds one of their addresses itself gets ustad's socket through the preload library only when it is dynamically linked and calls libc's bind: {static_programs}. See \"Apps that bind their own port\" in docs/guide.md"
        )
    }
}

/// An address as the configuration writes it.
fn describe(address: &SockAddr) -> String {
    if let Some(ip) = address.as_socket() {
        return ip.to_string();
    }
    if let Some(path) = address.as_pathname() {
        return format!("unix:{}", path.display());
    }
    match address.as_abstract_namespace() {
        Some(name) => format!("unix:@{}", OsStr::from_bytes(name).to_string_lossy()),
        None => "unix:?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::config::Command;

    fn spec() -> PoolSpec {
        PoolSpec::new(Command::new(["node", "app.js"]).unwrap())
    }

    fn entry(text: &str) -> CString {
        CString::new(text).unwrap()
    }

    fn value<'e>(env: &'e [CString], key: &str) -> Option<&'e str> {
        get(env, key).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn a_worker_gets_the_library_first_its_sockets_identities_and_port() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let library = Path::new("/proc/1/fd/9");
        let mut env = vec![
            entry("PATH=/bin"),
            entry("PORT=9999"),
            entry("LD_PRELOAD=/usr/lib/libjemalloc.so /proc/1/fd/9:libx.so"),
        ];
        add_env(
            &mut env,
            &spec(),
            &[tcp.as_fd(), unix.as_fd()],
            Some(library),
        );
        assert_eq!(
            value(&env, "LD_PRELOAD"),
            Some("/proc/1/fd/9:/usr/lib/libjemalloc.so:libx.so")
        );
        assert_eq!(value(&env, "PORT"), Some(port.to_string().as_str()));
        assert_eq!(
            env.iter()
                .filter(|e| e.as_bytes().starts_with(b"PORT="))
                .count(),
            1
        );
        let fds = value(&env, "USTAD_PRELOAD_FDS").unwrap();
        let tcp_inode = rustix::fs::fstat(&tcp).unwrap().st_ino;
        let unix_inode = rustix::fs::fstat(&unix).unwrap().st_ino;
        let file = rustix::fs::stat(&path).unwrap();
        assert_eq!(
            fds,
            format!(
                "3:{tcp_inode},4:{unix_inode}:{}:{}:{}",
                rustix::fs::major(file.st_dev),
                rustix::fs::minor(file.st_dev),
                file.st_ino
            )
        );
        assert_eq!(value(&env, "PATH"), Some("/bin"));
    }

    #[test]
    fn port_is_set_only_for_one_tcp_socket_and_never_over_the_pools_own() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let library = Some(Path::new("/lib.so"));
        let mut env = vec![entry("PORT=9999")];
        add_env(&mut env, &spec(), &[a.as_fd(), b.as_fd()], library);
        assert_eq!(
            value(&env, "PORT"),
            Some("9999"),
            "two TCP sockets: left alone"
        );
        assert_eq!(value(&env, "LD_PRELOAD"), Some("/lib.so"));

        let mut own = spec();
        own.env.insert("PORT".into(), "8080".into());
        let mut env = vec![entry("PORT=8080")];
        add_env(&mut env, &own, &[a.as_fd()], library);
        assert_eq!(value(&env, "PORT"), Some("8080"), "the pool's env wins");
    }

    #[test]
    fn without_a_library_sockets_or_preload_nothing_is_added() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = vec![entry("PORT=9999"), entry("LD_PRELOAD=libx.so")];
        let library = Some(Path::new("/lib.so"));
        let mut off = spec();
        off.preload = false;
        for (spec, sockets, library) in [
            (spec(), vec![tcp.as_fd()], None),
            (spec(), vec![], library),
            (off, vec![tcp.as_fd()], library),
        ] {
            let mut env = before.clone();
            add_env(&mut env, &spec, &sockets, library);
            assert_eq!(env, before);
        }
    }

    #[test]
    fn the_hint_says_what_to_do_in_each_case() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = tcp.local_addr().unwrap().to_string();
        let library = Some(Path::new("/lib.so"));
        let on = address_in_use_hint("web", &spec(), &[tcp.as_fd()], library);
        assert!(on.contains(&address), "{on}");
        assert!(on.contains("statically linked"), "{on}");
        assert!(on.contains("go-systemd"), "{on}");
        let mut off = spec();
        off.preload = false;
        let off = address_in_use_hint("web", &off, &[tcp.as_fd()], library);
        assert!(off.contains("preload = false"), "{off}");
        let none = address_in_use_hint("web", &spec(), &[tcp.as_fd()], None);
        assert!(none.contains("no preload library"), "{none}");
        let bare = address_in_use_hint("web", &spec(), &[], library);
        assert!(bare.contains("--listen"), "{bare}");
    }
}
