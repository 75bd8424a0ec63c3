//! The preload library (`crates/ustad-preload`, built by `build.rs`), carried inside the `ustad`
//! binary and made into a file the workers' dynamic loader can open when a cluster starts.
//!
//! The file is a sealed memfd that the primary keeps open for its whole life, named to workers
//! as `/proc/<primary's pid>/fd/<fd>`: nothing is written to disk, nothing is left behind, no
//! `noexec` mount or temp-file cleaner can take it away from a long-running primary, and two
//! versions of ustad never share it. Where memfds are not available, it is a file in ustad's
//! private runtime directory (`$XDG_RUNTIME_DIR/ustad`, or `/tmp/ustad-<uid>`), named after its
//! contents.
//!
//! Workers that run as another user or group (ustad started as root) may not open another
//! user's fds through `/proc`: for them the library is also a file anyone may read, in a
//! directory only ustad's user may write (`/run/ustad-preload`, or `/tmp/ustad-preload-<uid>`),
//! named after its contents.
//!
//! The bytes are copied from the executable file, not from the embedded copy in memory: reading
//! that would map its ~330 KiB into the primary's resident memory for good. Copies are checked
//! against the hash `build.rs` computed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The library, as built for this binary's target (empty where there is none).
const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libustad_preload.so"));

/// FNV-1a of [`LIBRARY`], computed by `build.rs`.
const LIBRARY_FNV: &str = env!("USTAD_PRELOAD_FNV");

/// The library, where workers can load it; keeps it there while it lives.
#[derive(Debug)]
pub(crate) struct Materialised {
    /// The memfd, when the library is one.
    _memfd: Option<OwnedFd>,
    /// Its paths.
    pub(crate) library: ustad_core::preload::Library,
    /// Why there is no copy for workers of other users, when ustad could run some.
    pub(crate) shared_error: Option<io::Error>,
}

/// Makes the library loadable by workers; `Ok(None)` when this binary has none.
pub(crate) fn materialise() -> io::Result<Option<Materialised>> {
    if LIBRARY.is_empty() {
        return Ok(None);
    }
    let hash: u64 = LIBRARY_FNV
        .parse()
        .map_err(|_| io::Error::other("the library's hash is not a number"))?;
    let (memfd, path) = match in_memfd(library_bytes, hash) {
        Ok((memfd, path)) => (Some(memfd), path),
        Err(memfd_error) => {
            let dir = ustad_core::control::paths::default_dir();
            let path = in_dir(library_bytes, hash, &dir, Access::Private).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("in a memfd: {memfd_error}; in {}: {error}", dir.display()),
                )
            })?;
            (None, path)
        }
    };
    let (for_other_users, shared_error) = if ustad_core::accounts::can_switch_users() {
        let dir = shared_dir();
        match in_dir(library_bytes, hash, &dir, Access::Shared) {
            Ok(path) => (Some(path), None),
            Err(error) => (
                None,
                Some(io::Error::new(
                    error.kind(),
                    format!("in {}: {error}", dir.display()),
                )),
            ),
        }
    } else {
        (None, None)
    };
    Ok(Some(Materialised {
        _memfd: memfd,
        library: ustad_core::preload::Library {
            path,
            for_other_users,
        },
        shared_error,
    }))
}

/// Where the copy anyone may read goes: `/run/ustad-preload` (a tmpfs no cleaner ages), or the
/// temporary directory where there is no `/run` to write to.
fn shared_dir() -> PathBuf {
    let run = Path::new("/run");
    if rustix::fs::access(run, rustix::fs::Access::WRITE_OK).is_ok() {
        run.join("ustad-preload")
    } else {
        std::env::temp_dir().join(format!(
            "ustad-preload-{}",
            rustix::process::geteuid().as_raw()
        ))
    }
}

/// Who may read a copy of the library in a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// ustad's user only: its private runtime directory.
    Private,
    /// Everyone (workers of other users): a directory only ustad's user may write, mode 0755,
    /// and the file 0644.
    Shared,
}

/// Creates `dir` readable by all and writable by this user only, or makes an existing one of
/// this user's so (a symlink or another user's directory is refused): anyone who could write
/// there could put a library of their own into the workers.
fn ensure_shared_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} must be a directory of uid {uid}", dir.display()),
        ));
    }
    // Whatever the umask made of it, or an earlier run left: searchable by all, writable by
    // this user only.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// The library's bytes: from the executable file, where the embedded copy is, or (if that
/// cannot be found) from memory.
fn library_bytes() -> Box<dyn Read> {
    match in_executable(LIBRARY) {
        Ok(reader) => Box::new(reader),
        Err(_) => Box::new(LIBRARY),
    }
}

/// A reader of `embedded`'s bytes in this process's executable file: the file offset of its
/// address, from the mapping `/proc/self/maps` lists for it.
fn in_executable(embedded: &'static [u8]) -> io::Result<impl Read> {
    let address = embedded.as_ptr() as u64;
    let mut exe = File::open("/proc/self/exe")?;
    let exe_meta = exe.metadata()?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let offset = maps
        .lines()
        .find_map(|line| {
            // start-end perms offset major:minor inode path
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let _perms = fields.next()?;
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let _device = fields.next()?;
            let inode: u64 = fields.next()?.parse().ok()?;
            let inside = (start..end).contains(&address)
                && address + embedded.len() as u64 <= end
                && inode == exe_meta.ino();
            inside.then(|| offset + (address - start))
        })
        .ok_or_else(|| {
            io::Error::other("the embedded library is not in a mapping of the executable")
        })?;
    exe.seek(SeekFrom::Start(offset))?;
    Ok(exe.take(embedded.len() as u64))
}

fn in_memfd(bytes: fn() -> Box<dyn Read>, hash: u64) -> io::Result<(OwnedFd, PathBuf)> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "ustad-preload",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    io::copy(&mut bytes(), &mut file)?;
    file.flush()?;
    let fd = OwnedFd::from(file);
    // Nobody, not even a worker that finds the fd in /proc, can change it from now on.
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ));
    // As a worker's loader will open it (the magic link, not this process's fd).
    check(&path, hash)?;
    Ok((fd, path))
}

/// Writes the library into `dir` (created if needed) as `libustad-preload-<hash>.so`, unless it
/// is there already.
fn in_dir(
    bytes: fn() -> Box<dyn Read>,
    hash: u64,
    dir: &Path,
    access: Access,
) -> io::Result<PathBuf> {
    match access {
        Access::Private => ustad_core::control::paths::ensure_private_dir(dir)?,
        Access::Shared => ensure_shared_dir(dir)?,
    }
    let path = dir.join(format!("libustad-preload-{hash:016x}.so"));
    if check(&path, hash).is_err() {
        // Written whole under another name, then renamed: a loader never sees half of it.
        let partial = dir.join(format!(
            ".libustad-preload-{hash:016x}-{}.tmp",
            std::process::id()
        ));
        let mut file = File::create(&partial)?;
        io::copy(&mut bytes(), &mut file)?;
        if access == Access::Shared {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        file.sync_all()?;
        drop(file);
        check(&partial, hash)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(path)
}

/// Checks that the file at `path` has the library's hash.
fn check(path: &Path, hash: u64) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut buffer = [0u8; 16 * 1024];
    let mut found = FNV_OFFSET;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        found = fnv1a_more(found, &buffer[..n]);
    }
    if found != hash {
        return Err(io::Error::other(format!(
            "{} is not this ustad's preload library",
            path.display()
        )));
    }
    Ok(())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits, continued over `bytes` (the same as `build.rs`'s).
fn fnv1a_more(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_one() -> Box<dyn Read> {
        Box::new(&b"one"[..])
    }

    fn bytes_two() -> Box<dyn Read> {
        Box::new(&b"two"[..])
    }

    fn hash(bytes: &[u8]) -> u64 {
        fnv1a_more(FNV_OFFSET, bytes)
    }

    #[test]
    fn the_binary_carries_a_shared_library_and_its_hash() {
        assert!(
            LIBRARY.starts_with(b"\x7fELF"),
            "the preload library is embedded"
        );
        assert_eq!(LIBRARY_FNV.parse::<u64>().unwrap(), hash(LIBRARY));
    }

    #[test]
    fn the_library_is_read_from_the_executable_file() {
        let mut copy = Vec::new();
        in_executable(LIBRARY)
            .expect("found in the executable")
            .read_to_end(&mut copy)
            .unwrap();
        assert!(copy == LIBRARY, "the same bytes");
    }

    #[test]
    fn the_library_is_a_sealed_memfd_that_reads_back_whole() {
        let (_memfd, path) = in_memfd(bytes_one, hash(b"one")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let error = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"x"));
        assert!(error.is_err(), "sealed against writes");
        assert!(in_memfd(bytes_one, hash(b"two")).is_err(), "checked");
    }

    #[test]
    fn without_memfds_the_library_is_a_file_named_after_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("ustad");
        let first = in_dir(bytes_one, hash(b"one"), &private, Access::Private).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        let again = in_dir(bytes_one, hash(b"one"), &private, Access::Private).unwrap();
        assert_eq!(again, first);
        let other = in_dir(bytes_two, hash(b"two"), &private, Access::Private).unwrap();
        assert_ne!(other, first);
        // A damaged copy is replaced.
        std::fs::write(&first, b"damaged").unwrap();
        let repaired = in_dir(bytes_one, hash(b"one"), &private, Access::Private).unwrap();
        assert_eq!(std::fs::read(&repaired).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(&private)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn the_copy_for_other_users_is_readable_by_all_and_writable_by_none() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("ustad-preload");
        let path = in_dir(bytes_one, hash(b"one"), &shared, Access::Shared).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&shared), 0o755);
        assert_eq!(mode(&path), 0o644);
        // A directory left writable by others, or closed to them, is set right.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        in_dir(bytes_one, hash(b"one"), &shared, Access::Shared).unwrap();
        assert_eq!(mode(&shared), 0o755);
        // A symlink in its place is refused.
        let elsewhere = dir.path().join("link");
        std::os::unix::fs::symlink(&shared, &elsewhere).unwrap();
        assert!(in_dir(bytes_one, hash(b"one"), &elsewhere, Access::Shared).is_err());
    }
}
