//! The preload library (`crates/ustad-preload`, built by `build.rs`), carried inside the `ustad`
//! binary and made into a file the workers' dynamic loader can open when a cluster starts.
//!
//! The file is a sealed memfd that the primary keeps open for its whole life, named to workers
//! as `/proc/<primary's pid>/fd/<fd>`: nothing is written to disk, nothing is left behind, no
//! `noexec` mount or temp-file cleaner can take it away from a long-running primary, and two
//! versions of ustad never share it. Where memfds are not available, it is a file in ustad's
//! private runtime directory (`$XDG_RUNTIME_DIR/ustad`, or `/tmp/ustad-<uid>`), named after its
//! contents.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The library, as built for this binary's target (empty where there is none).
const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libustad_preload.so"));

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
    let memfd_error = match in_memfd(LIBRARY) {
        Ok(materialised) => return Ok(Some(materialised)),
        Err(error) => error,
    };
    let dir = ustad_core::control::paths::default_dir();
    in_dir(LIBRARY, &dir).map(Some).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("in a memfd: {memfd_error}; in {}: {error}", dir.display()),
        )
    })
}

fn in_memfd(library: &[u8]) -> io::Result<Materialised> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "ustad-preload",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(library)?;
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
    check_contents(&path, library)?;
    Ok(Materialised {
        _memfd: Some(fd),
        path,
    })
}

/// Writes the library into `dir` (ustad's private runtime directory, created if needed) as
/// `libustad-preload-<hash of its contents>.so`, unless it is there already.
fn in_dir(library: &[u8], dir: &Path) -> io::Result<Materialised> {
    ustad_core::control::paths::ensure_private_dir(dir)?;
    let path = dir.join(format!("libustad-preload-{:016x}.so", fnv1a(library)));
    if check_contents(&path, library).is_err() {
        // Written whole under another name, then renamed: a loader never sees half of it.
        let partial = dir.join(format!(
            ".libustad-preload-{}-{:016x}.tmp",
            std::process::id(),
            fnv1a(library)
        ));
        std::fs::write(&partial, library)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(Materialised { _memfd: None, path })
}

fn check_contents(path: &Path, library: &[u8]) -> io::Result<()> {
    let mut contents = Vec::with_capacity(library.len());
    File::open(path)?.read_to_end(&mut contents)?;
    if contents != library {
        return Err(io::Error::other(format!(
            "{} is not this ustad's preload library",
            path.display()
        )));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a name for the library's contents.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_carries_a_shared_library() {
        assert!(
            LIBRARY.starts_with(b"\x7fELF"),
            "the preload library is embedded"
        );
    }

    #[test]
    fn the_library_is_a_sealed_memfd_that_reads_back_whole() {
        let materialised = in_memfd(b"library bytes").unwrap();
        assert_eq!(std::fs::read(&materialised.path).unwrap(), b"library bytes");
        let error = std::fs::OpenOptions::new()
            .write(true)
            .open(&materialised.path)
            .and_then(|mut file| file.write_all(b"x"));
        assert!(error.is_err(), "sealed against writes");
    }

    #[test]
    fn without_memfds_the_library_is_a_file_named_after_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("ustad");
        let first = in_dir(b"one", &private).unwrap();
        assert_eq!(std::fs::read(&first.path).unwrap(), b"one");
        let again = in_dir(b"one", &private).unwrap();
        assert_eq!(again.path, first.path);
        let other = in_dir(b"two", &private).unwrap();
        assert_ne!(other.path, first.path);
        // A damaged copy is replaced.
        std::fs::write(&first.path, b"damaged").unwrap();
        let repaired = in_dir(b"one", &private).unwrap();
        assert_eq!(std::fs::read(&repaired.path).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(&private)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
