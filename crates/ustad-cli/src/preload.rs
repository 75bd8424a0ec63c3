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
//! The bytes are in a section of the executable file that no segment loads (`.ustad_preload`,
//! put there by `.incbin`), and are copied from the file. In `.rodata`, where `include_bytes!`
//! puts them, nothing read them, yet 64–212 KiB of their ~340 KiB were resident in the primary:
//! the kernel maps a whole page-cache folio (up to 128 KiB here) and the 64 KiB around a fault
//! at once, so their pages came in with the data next to them. Each copy is hashed as it is
//! written and checked against the hash `build.rs` computed; a copy already on disk is
//! compared with the section, byte for byte. Every start pays for this, an upgrade's new
//! program too while the control socket waits: one hash of the library (~0.4 ms), where
//! reading each copy back to hash it again cost three times as much.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

// The library, as built for this binary's target, in a section of the executable file with no
// flags: no segment loads it, so no page of it is ever mapped. Not where `build.rs` makes none
// (the section would be empty, and the assembler syntax is ELF's). `global_asm!` counts as unsafe
// code; this one only adds bytes that nothing in the program refers to.
#[cfg(ustad_preload)]
#[allow(unsafe_code)]
mod section {
    std::arch::global_asm!(
        ".pushsection .ustad_preload,\"\",%progbits",
        concat!(".incbin \"", env!("OUT_DIR"), "/libustad_preload.so\""),
        ".popsection",
    );
}

/// The name of the section that holds the library.
const SECTION: &[u8] = b".ustad_preload";

/// The library's length in bytes, computed by `build.rs` (0 where there is none).
const LIBRARY_LEN: &str = env!("USTAD_PRELOAD_LEN");

/// FNV-1a of the library, computed by `build.rs`.
const LIBRARY_FNV: &str = env!("USTAD_PRELOAD_FNV");

/// The library, where workers can load it.
#[derive(Debug)]
pub(crate) struct Materialised {
    /// The memfd, when the library is one: to keep open while workers may load it.
    pub(crate) memfd: Option<OwnedFd>,
    /// Its paths.
    pub(crate) library: ustad_core::preload::Library,
    /// Why there is no copy for workers of other users, when ustad could run some.
    pub(crate) shared_error: Option<io::Error>,
}

/// Makes the library loadable by workers; `Ok(None)` when this binary has none. In a memfd at
/// the number of `at` when given (the previous program's, after an upgrade: the path its
/// workers were given stays valid), else at a new one.
pub(crate) fn materialise(at: Option<OwnedFd>) -> io::Result<Option<Materialised>> {
    if LIBRARY_LEN == "0" {
        return Ok(None);
    }
    let hash: u64 = LIBRARY_FNV
        .parse()
        .map_err(|_| io::Error::other("the library's hash is not a number"))?;
    let (memfd, path) = match in_memfd(library_bytes, hash, at) {
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
        memfd,
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

/// The library's bytes, from its section of the executable file.
fn library_bytes() -> io::Result<Box<dyn Read>> {
    let len = LIBRARY_LEN
        .parse()
        .map_err(|_| io::Error::other("the library's length is not a number"))?;
    let mut exe = File::open("/proc/self/exe")?;
    let (offset, size) = find_section(&mut exe, SECTION)?;
    if size != len {
        return Err(io::Error::other(format!(
            "the executable's section {} holds {size} bytes, not the library's {len}",
            String::from_utf8_lossy(SECTION)
        )));
    }
    exe.seek(SeekFrom::Start(offset))?;
    Ok(Box::new(exe.take(len)))
}

/// The file offset and size of the section called `name` of the ELF file `file`, from its
/// section headers (of this machine's byte order, 32 or 64 bits).
fn find_section(file: &mut File, name: &[u8]) -> io::Result<(u64, u64)> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut header = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut header)?;
    let native_order = if cfg!(target_endian = "little") { 1 } else { 2 };
    if header[..4] != *b"\x7fELF" || header[5] != native_order {
        return Err(invalid("not an ELF file of this machine's byte order"));
    }
    // Where the fields are: the header's section-table offset; its entry size, entry count and
    // name-table index; an entry's offset and size (its name is its first 4 bytes).
    let (table_at, entry_at, entry_offset, entry_size) = match header[4] {
        1 => ((0x20, 4), (0x2e, 0x30, 0x32), (0x10, 4), (0x14, 4)),
        2 => ((0x28, 8), (0x3a, 0x3c, 0x3e), (0x18, 8), (0x20, 8)),
        _ => return Err(invalid("an ELF file of an unknown class")),
    };
    let field = |bytes: &[u8], (at, len): (usize, usize)| -> io::Result<u64> {
        let raw = bytes
            .get(at..at + len)
            .ok_or_else(|| invalid("a truncated ELF header"))?;
        let mut value = [0u8; 8];
        if cfg!(target_endian = "little") {
            value[..len].copy_from_slice(raw);
            Ok(u64::from_le_bytes(value))
        } else {
            value[8 - len..].copy_from_slice(raw);
            Ok(u64::from_be_bytes(value))
        }
    };
    let table = field(&header, table_at)?;
    let entry_len = field(&header, (entry_at.0, 2))?;
    let count = field(&header, (entry_at.1, 2))?;
    let names_index = field(&header, (entry_at.2, 2))?;
    if count == 0 || names_index >= count || entry_len < 0x28 {
        return Err(invalid("no usable section headers"));
    }
    let mut entries = vec![0u8; (entry_len * count) as usize];
    file.seek(SeekFrom::Start(table))?;
    file.read_exact(&mut entries)?;
    let entry = |index: u64| &entries[(index * entry_len) as usize..][..entry_len as usize];
    let names_entry = entry(names_index);
    let names_len = field(names_entry, entry_size)?.min(1 << 20);
    let mut names = vec![0u8; names_len as usize];
    file.seek(SeekFrom::Start(field(names_entry, entry_offset)?))?;
    file.read_exact(&mut names)?;
    for index in 0..count {
        let entry = entry(index);
        let at = field(entry, (0, 4))? as usize;
        let found = names
            .get(at..)
            .and_then(|rest| rest.strip_prefix(name))
            .is_some_and(|rest| rest.first() == Some(&0));
        if found {
            return Ok((field(entry, entry_offset)?, field(entry, entry_size)?));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "the executable file has no section {}",
            String::from_utf8_lossy(name)
        ),
    ))
}

fn in_memfd(
    bytes: fn() -> io::Result<Box<dyn Read>>,
    hash: u64,
    at: Option<OwnedFd>,
) -> io::Result<(OwnedFd, PathBuf)> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "ustad-preload",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    let len = copy_checked(bytes, hash, &mut file)?;
    let fd = OwnedFd::from(file);
    // Nobody, not even a worker that finds the fd in /proc, can change it from now on.
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    // At the number given: the old memfd there is closed as this one takes its place.
    let fd = match at {
        Some(mut at) => {
            rustix::io::dup3(&fd, &mut at, rustix::io::DupFlags::CLOEXEC)?;
            at
        }
        None => fd,
    };
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ));
    // As a worker's loader will open it (the magic link, not this process's fd).
    let opened = File::open(&path)?.metadata()?.len();
    if opened != len {
        return Err(io::Error::other(format!(
            "{} holds {opened} bytes, not the library's {len}",
            path.display()
        )));
    }
    Ok((fd, path))
}

/// Writes the library into `dir` (created if needed) as `libustad-preload-<hash>.so`, unless it
/// is there already.
fn in_dir(
    bytes: fn() -> io::Result<Box<dyn Read>>,
    hash: u64,
    dir: &Path,
    access: Access,
) -> io::Result<PathBuf> {
    match access {
        Access::Private => ustad_core::control::paths::ensure_private_dir(dir)?,
        Access::Shared => ensure_shared_dir(dir)?,
    }
    let path = dir.join(format!("libustad-preload-{hash:016x}.so"));
    if !same_contents(&path, &mut bytes()?).unwrap_or(false) {
        // Written whole under another name, then renamed: a loader never sees half of it.
        let partial = dir.join(format!(
            ".libustad-preload-{hash:016x}-{}.tmp",
            std::process::id()
        ));
        let written = File::create(&partial).and_then(|mut file| {
            copy_checked(bytes, hash, &mut file)?;
            if access == Access::Shared {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            }
            file.sync_all()?;
            drop(file);
            std::fs::rename(&partial, &path)
        });
        if let Err(error) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    }
    Ok(path)
}

/// Copies the library from `bytes` into `file`, hashing it on the way; returns its length.
///
/// # Errors
/// When it cannot be read or written, or its hash is not `hash` (the file is then not the
/// library, and must not be used).
fn copy_checked(
    bytes: fn() -> io::Result<Box<dyn Read>>,
    hash: u64,
    file: &mut File,
) -> io::Result<u64> {
    let mut source = bytes()?;
    let mut buffer = [0u8; 16 * 1024];
    let (mut found, mut len) = (FNV_OFFSET, 0u64);
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        found = fnv1a_more(found, &buffer[..n]);
        file.write_all(&buffer[..n])?;
        len += n as u64;
    }
    if found != hash {
        return Err(io::Error::other(
            "the executable's copy of the preload library has another hash than the one built",
        ));
    }
    Ok(len)
}

/// Whether the file at `path` holds exactly what `bytes` reads.
fn same_contents(path: &Path, bytes: &mut dyn Read) -> io::Result<bool> {
    let mut file = File::open(path)?;
    let (mut want, mut have) = ([0u8; 8 * 1024], [0u8; 8 * 1024]);
    loop {
        let n = read_full(bytes, &mut want)?;
        let m = read_full(&mut file, &mut have)?;
        if want[..n] != have[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads into `buffer` until it is full or the end; returns how much it holds.
fn read_full(source: &mut dyn Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match source.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
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

    /// The library as `build.rs` made it, for comparison.
    const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libustad_preload.so"));

    fn bytes_one() -> io::Result<Box<dyn Read>> {
        Ok(Box::new(&b"one"[..]))
    }

    fn bytes_two() -> io::Result<Box<dyn Read>> {
        Ok(Box::new(&b"two"[..]))
    }

    fn hash(bytes: &[u8]) -> u64 {
        fnv1a_more(FNV_OFFSET, bytes)
    }

    #[test]
    fn the_binary_carries_a_shared_library_and_its_hash() {
        assert!(
            LIBRARY.starts_with(b"\x7fELF"),
            "the preload library is built"
        );
        assert_eq!(LIBRARY_LEN.parse::<usize>().unwrap(), LIBRARY.len());
        assert_eq!(LIBRARY_FNV.parse::<u64>().unwrap(), hash(LIBRARY));
    }

    #[test]
    fn the_library_is_read_from_a_section_of_the_executable_file_that_is_not_loaded() {
        let mut copy = Vec::new();
        library_bytes()
            .expect("found in the executable")
            .read_to_end(&mut copy)
            .unwrap();
        assert!(copy == LIBRARY, "the same bytes");
        // Not in any mapping of the executable: no segment loads the section.
        let (offset, size) =
            find_section(&mut File::open("/proc/self/exe").unwrap(), SECTION).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for line in maps.lines().filter(|l| l.ends_with(exe.to_str().unwrap())) {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next().unwrap().split_once('-').unwrap();
            let len =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            let at = u64::from_str_radix(fields.nth(1).unwrap(), 16).unwrap();
            assert!(
                at + len <= offset || offset + size <= at,
                "mapped: {line} (the section is at {offset:#x}, {size} bytes)"
            );
        }
    }

    #[test]
    fn sections_are_found_by_their_whole_name() {
        let mut exe = File::open("/proc/self/exe").unwrap();
        assert!(find_section(&mut exe, b".text").is_ok());
        assert!(find_section(&mut exe, b".tex").is_err());
        assert!(find_section(&mut exe, b".ustad_preload_").is_err());
        let mut not_elf = tempfile::tempfile().unwrap();
        not_elf.write_all(&[0u8; 128]).unwrap();
        assert!(find_section(&mut not_elf, SECTION).is_err());
    }

    #[test]
    fn the_library_is_a_sealed_memfd_that_reads_back_whole() {
        let (_memfd, path) = in_memfd(bytes_one, hash(b"one"), None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let error = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"x"));
        assert!(error.is_err(), "sealed against writes");
        assert!(in_memfd(bytes_one, hash(b"two"), None).is_err(), "checked");
    }

    #[test]
    fn without_memfds_the_library_is_a_file_named_after_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("ustad");
        let first = in_dir(bytes_one, hash(b"one"), &private, Access::Private).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        let again = in_dir(bytes_one, hash(b"one"), &private, Access::Private).unwrap();
        assert_eq!(again, first);
        assert!(
            in_dir(bytes_two, hash(b"one"), &private, Access::Private).is_err(),
            "bytes of another hash are refused"
        );
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
