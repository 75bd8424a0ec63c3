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
    pub(crate) path: PathBuf,
}

/// Makes the library loadable by workers; `Ok(None)` when this binary has none.
pub(crate) fn materialise() -> io::Result<Option<Materialised>> {
    if LIBRARY.is_empty() {
        return Ok(None);
    }
    let hash: u64 = LIBRARY_FNV
        .parse()
        .map_err(|_| io::Error::other("the library's hash is not a number"))?;
    let memfd_error = match in_memfd(library_bytes, hash) {
        Ok(materialised) => return Ok(Some(materialised)),
        Err(error) => error,
    };
    let dir = ustad_core::control::paths::default_dir();
    in_dir(library_bytes, hash, &dir)
        .map(Some)
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("in a memfd: {memfd_error}; in {}: {error}", dir.display()),
            )
        })
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

fn in_memfd(bytes: fn() -> Box<dyn Read>, hash: u64) -> io::Result<Materialised> {
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
    Ok(Materialised {
        _memfd: Some(fd),
        path,
    })
}

/// Writes the library into `dir` (ustad's private runtime directory, created if needed) as
/// `libustad-preload-<hash>.so`, unless it is there already.
fn in_dir(bytes: fn() -> Box<dyn Read>, hash: u64, dir: &Path) -> io::Result<Materialised> {
    ustad_core::control::paths::ensure_private_dir(dir)?;
    let path = dir.join(format!("libustad-preload-{hash:016x}.so"));
    if check(&path, hash).is_err() {
        // Written whole under another name, then renamed: a loader never sees half of it.
        let partial = dir.join(format!(
            ".libustad-preload-{hash:016x}-{}.tmp",
            std::process::id()
        ));
        let mut file = File::create(&partial)?;
        io::copy(&mut bytes(), &mut file)?;
        file.sync_all()?;
        drop(file);
        check(&partial, hash)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(Materialised { _memfd: None, path })
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
        let materialised = in_memfd(bytes_one, hash(b"one")).unwrap();
        assert_eq!(std::fs::read(&materialised.path).unwrap(), b"one");
        let error = std::fs::OpenOptions::new()
            .write(true)
            .open(&materialised.path)
            .and_then(|mut file| file.write_all(b"x"));
        assert!(error.is_err(), "sealed against writes");
        assert!(in_memfd(bytes_one, hash(b"two")).is_err(), "checked");
    }

    #[test]
    fn without_memfds_the_library_is_a_file_named_after_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("ustad");
        let first = in_dir(bytes_one, hash(b"one"), &private).unwrap();
        assert_eq!(std::fs::read(&first.path).unwrap(), b"one");
        let again = in_dir(bytes_one, hash(b"one"), &private).unwrap();
        assert_eq!(again.path, first.path);
        let other = in_dir(bytes_two, hash(b"two"), &private).unwrap();
        assert_ne!(other.path, first.path);
        // A damaged copy is replaced.
        std::fs::write(&first.path, b"damaged").unwrap();
        let repaired = in_dir(bytes_one, hash(b"one"), &private).unwrap();
        assert_eq!(std::fs::read(&repaired.path).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(&private)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
