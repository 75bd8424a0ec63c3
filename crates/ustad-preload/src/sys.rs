//! Every `unsafe` block of the library: the functions it defines in place of libc's (`bind`,
//! `listen`, `shutdown`, `unlink`, `unlinkat`, `fcntl`, `fcntl64`, `ioctl`), the constructor
//! that reads the table before the program's `main`, and the few libc calls it makes, declared
//! here by hand (the library has no dependencies; the tests check the constants against the
//! `libc` crate).
//!
//! What runs inside a `bind` allocates nothing and takes no lock: the table is read once, by
//! the constructor, and libc's own definitions are looked up once each, without a lock.
//!
//! # Caveats
//! - A definition found with `dlsym(RTLD_NEXT, …)` is the next one in the lookup order: a
//!   library preloaded after this one (the user's own `LD_PRELOAD`) sees the calls this one
//!   passes on, not those it answers itself.
//! - libc's internal calls (`remove` calls its own `unlink`) and raw system calls bypass
//!   these definitions.

#![allow(unsafe_code)]
// Test builds leave the exports out (a test binary keeps libc's definitions), so what only they
// use looks unused there.
#![cfg_attr(test, allow(dead_code))]

use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::addr::{Addr, FileId, SOCKADDR_MAX, Target};
use crate::table::{self, Held, Table};

pub(crate) const SOL_SOCKET: c_int = 1;
pub(crate) const SO_TYPE: c_int = 3;
pub(crate) const SO_PROTOCOL: c_int = 38;
pub(crate) const SOCK_STREAM: c_int = 1;
pub(crate) const IPPROTO_TCP: c_int = 6;
pub(crate) const IPPROTO_MPTCP: c_int = 262;
pub(crate) const F_GETFD: c_int = 1;
pub(crate) const F_SETFD: c_int = 2;
pub(crate) const F_GETFL: c_int = 3;
pub(crate) const F_SETFL: c_int = 4;
pub(crate) const FD_CLOEXEC: c_int = 1;
pub(crate) const O_CLOEXEC: c_int = 0o2_000_000;
pub(crate) const O_NONBLOCK: c_int = 0o4000;
pub(crate) const AT_FDCWD: c_int = -100;
pub(crate) const AT_EMPTY_PATH: c_int = 0x1000;
pub(crate) const AT_SYMLINK_NOFOLLOW: c_int = 0x100;
pub(crate) const AT_REMOVEDIR: c_int = 0x200;
pub(crate) const STATX_TYPE: c_uint = 0x1;
pub(crate) const STATX_INO: c_uint = 0x100;
pub(crate) const S_IFMT: u16 = 0o170_000;
pub(crate) const S_IFSOCK: u16 = 0o140_000;
pub(crate) const FIOCLEX: c_ulong = 0x5451;
pub(crate) const EADDRINUSE: c_int = 98;
pub(crate) const ENOSYS: c_int = 38;
/// `RTLD_NEXT`, `((void *) -1)` in glibc and musl.
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;

/// `struct statx`, whose layout is the same on every architecture.
#[repr(C)]
pub(crate) struct Statx {
    mask: u32,
    blksize: u32,
    attributes: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u16,
    _spare0: u16,
    ino: u64,
    /// size, blocks, attributes_mask, and the four timestamps.
    _between: [u64; 11],
    rdev_major: u32,
    rdev_minor: u32,
    dev_major: u32,
    dev_minor: u32,
    _spare: [u64; 14],
}

const _: () = assert!(std::mem::size_of::<Statx>() == 256);

unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int;
    fn getsockopt(fd: c_int, level: c_int, name: c_int, value: *mut c_void, len: *mut u32)
    -> c_int;
    fn getsockname(fd: c_int, address: *mut c_void, len: *mut u32) -> c_int;
    fn statx(
        dirfd: c_int,
        path: *const c_char,
        flags: c_int,
        mask: c_uint,
        buf: *mut Statx,
    ) -> c_int;
    fn __errno_location() -> *mut c_int;
}

type BindFn = unsafe extern "C" fn(c_int, *const c_void, u32) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type ShutdownFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type UnlinkFn = unsafe extern "C" fn(*const c_char) -> c_int;
type UnlinkatFn = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
/// libc's `fcntl` and `ioctl` are variadic, and called as such. Their third argument, when
/// there is one, is an integer or a pointer: this library's own definitions take it as a
/// `usize`, where every supported ABI passes it for a variadic call too.
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;

/// The next definition of a function this library defines (libc's), found by the constructor
/// (or on first use, if a call comes before it). Lock-free, so that a call made while it is
/// being found cannot deadlock: at worst two threads both look it up.
struct Next {
    name: &'static std::ffi::CStr,
    found: AtomicPtr<c_void>,
}

impl Next {
    const fn new(name: &'static std::ffi::CStr) -> Next {
        Next {
            name,
            found: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    fn get(&self) -> *mut c_void {
        let found = self.found.load(Ordering::Acquire);
        if !found.is_null() {
            return found;
        }
        // SAFETY: dlsym takes a NUL-terminated name; RTLD_NEXT is a valid pseudo-handle.
        let found = unsafe { dlsym(RTLD_NEXT, self.name.as_ptr()) };
        self.found.store(found, Ordering::Release);
        found
    }
}

static NEXT_BIND: Next = Next::new(c"bind");
static NEXT_LISTEN: Next = Next::new(c"listen");
static NEXT_SHUTDOWN: Next = Next::new(c"shutdown");
static NEXT_UNLINK: Next = Next::new(c"unlink");
static NEXT_UNLINKAT: Next = Next::new(c"unlinkat");
static NEXT_FCNTL: Next = Next::new(c"fcntl");
static NEXT_FCNTL64: Next = Next::new(c"fcntl64");
static NEXT_IOCTL: Next = Next::new(c"ioctl");

static TABLE: OnceLock<Table> = OnceLock::new();

fn table() -> &'static Table {
    TABLE.get_or_init(load)
}

/// libc's `fcntl`, which this library's own calls use (its `fcntl` is the one defined here).
fn next_fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    // SAFETY: libc's fcntl has this ABI (see `FcntlFn`); null becomes `None`.
    match unsafe { std::mem::transmute::<*mut c_void, Option<FcntlFn>>(NEXT_FCNTL.get()) } {
        // SAFETY: the commands this library uses take an int or nothing.
        Some(fcntl) => unsafe { fcntl(fd, cmd, arg) },
        None => missing(),
    }
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life.
    unsafe { *__errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *__errno_location() = value };
}

/// Fails as libc would without a definition to call.
fn missing() -> c_int {
    set_errno(ENOSYS);
    -1
}

/// `statx` of an fd (`path` empty) or of a path relative to `dirfd`.
fn stat(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<Statx> {
    // SAFETY: an all-zero statx is a valid value of plain integers.
    let mut buf: Statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated (the callers' contract) and `buf` is a writable statx.
    let done = unsafe { statx(dirfd, path, flags, STATX_TYPE | STATX_INO, &mut buf) };
    (done == 0).then_some(buf)
}

/// The inode of the socket at `fd`; `None` when `fd` is not an open socket.
pub(crate) fn socket_inode(fd: c_int) -> Option<u64> {
    let buf = stat(fd, c"".as_ptr(), AT_EMPTY_PATH)?;
    (buf.mode & S_IFMT == S_IFSOCK).then_some(buf.ino)
}

/// The identity of the Unix socket file at `path` (NUL-terminated), relative to `dirfd`.
fn socket_file(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<FileId> {
    let buf = stat(dirfd, path, flags)?;
    (buf.mode & S_IFMT == S_IFSOCK).then_some(FileId {
        dev_major: buf.dev_major,
        dev_minor: buf.dev_minor,
        ino: buf.ino,
    })
}

fn sockopt(fd: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as u32;
    // SAFETY: `value` and `len` are writable and `len` is `value`'s size.
    let done = unsafe { getsockopt(fd, SOL_SOCKET, name, (&raw mut value).cast(), &raw mut len) };
    (done == 0).then_some(value)
}

/// Where the socket at `fd` is bound.
pub(crate) fn local_addr(fd: c_int) -> Option<Addr> {
    let mut buf = [0u8; SOCKADDR_MAX];
    let mut len = SOCKADDR_MAX as u32;
    // SAFETY: `buf` has `len` writable bytes; the kernel writes at most that many.
    let done = unsafe { getsockname(fd, buf.as_mut_ptr().cast(), &raw mut len) };
    if done != 0 {
        return None;
    }
    Addr::parse(buf.get(..len as usize)?)
}

/// Reads `USTAD_PRELOAD_FDS` and keeps each socket this process still has.
fn load() -> Table {
    match std::env::var_os(crate::USTAD_PRELOAD_FDS) {
        Some(value) => load_from(std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str())),
        None => Table::new([]),
    }
}

/// The sockets `value` (as in `USTAD_PRELOAD_FDS`) names that this process has.
fn load_from(value: &[u8]) -> Table {
    Table::new(table::parse(value).filter_map(|passed| {
        if socket_inode(passed.fd)? != passed.inode {
            return None;
        }
        let target = match local_addr(passed.fd)? {
            Addr::Ip(address) => Target::Ip(address),
            Addr::UnixPath(_) => Target::UnixFile(passed.file?),
            Addr::UnixAbstract(name) => Target::UnixAbstract(name),
        };
        Some(Held { passed, target })
    }))
}

/// What `bind` does with a request.
enum Bind {
    /// ustad's socket is in the program's fd.
    Adopted,
    /// Putting it there failed (`dup3`'s errno).
    Failed(c_int),
    /// Not an address of ustad's sockets: libc's `bind`. `held` is a socket of ustad's for
    /// this address that the process no longer has, for a diagnostic if libc's bind fails.
    Pass { held: Option<Held> },
}

const PASS: Bind = Bind::Pass { held: None };

fn decide_bind(table: &Table, fd: c_int, requested: &Addr) -> Bind {
    if sockopt(fd, SO_TYPE) != Some(SOCK_STREAM) {
        return PASS;
    }
    if socket_inode(fd).is_some_and(|inode| table.by_inode(inode).is_some()) {
        // Already ustad's socket: the kernel's answer (EINVAL) is the right one.
        return PASS;
    }
    let target = match requested {
        Addr::Ip(address) => {
            if !matches!(sockopt(fd, SO_PROTOCOL), Some(IPPROTO_TCP | IPPROTO_MPTCP)) {
                return PASS;
            }
            Target::Ip(*address)
        }
        Addr::UnixPath(name) => {
            let Some(path) = name.to_c_path() else {
                return PASS;
            };
            // Following symlinks: a link to ustad's socket names it too.
            match socket_file(AT_FDCWD, path.as_ptr().cast(), 0) {
                Some(file) => Target::UnixFile(file),
                None => return PASS,
            }
        }
        Addr::UnixAbstract(name) => Target::UnixAbstract(*name),
    };
    let candidates = table.candidates(&target);
    for held in candidates.iter() {
        if socket_inode(held.passed.fd) == Some(held.passed.inode) {
            return adopt(held.passed.fd, fd);
        }
    }
    Bind::Pass {
        held: candidates.iter().next().copied(),
    }
}

/// Puts ustad's socket (`ours`) in the program's fd, as the program had set that fd up.
fn adopt(ours: c_int, fd: c_int) -> Bind {
    let (fd_flags, status) = (next_fcntl(fd, F_GETFD, 0), next_fcntl(fd, F_GETFL, 0));
    if fd_flags < 0 || status < 0 {
        return Bind::Failed(errno());
    }
    let cloexec = if fd_flags & FD_CLOEXEC != 0 {
        O_CLOEXEC
    } else {
        0
    };
    // SAFETY: dup3 only changes the fd table; `fd` is the program's own socket, which it asked
    // to bind, and is replaced by a duplicate of `ours` (open: its inode was just checked).
    if unsafe { dup3(ours, fd, cloexec) } < 0 {
        return Bind::Failed(errno());
    }
    // O_NONBLOCK belongs to the socket description, shared by every holder of ustad's socket.
    let now = next_fcntl(fd, F_GETFL, 0);
    if now >= 0 && (now ^ status) & O_NONBLOCK != 0 {
        next_fcntl(
            fd,
            F_SETFL,
            ((now & !O_NONBLOCK) | (status & O_NONBLOCK)) as usize,
        );
    }
    Bind::Adopted
}

/// Says on stderr why a bind of an address ustad holds went to libc and failed.
fn explain_failed_bind(requested: &Addr, held: &Held) {
    let address = match requested {
        Addr::Ip(address) => address.to_string(),
        Addr::UnixPath(name) => format!("unix:{name:?}"),
        Addr::UnixAbstract(name) => format!("unix:@{name:?}"),
    };
    let fd = held.passed.fd;
    let _ = writeln!(
        std::io::stderr(),
        "ustad-preload[{}]: cannot bind {address}: ustad holds it and passed its socket as fd {fd}, but this process has closed fd {fd}: keep it open, or listen on fd {fd} (LISTEN_FDS)",
        std::process::id()
    );
}

/// What `bind` does: ustad's socket for an address it holds, `pass` (libc's bind) otherwise.
///
/// # Safety
/// As for libc's `bind`: `address` points to `len` readable bytes.
unsafe fn on_bind(
    table: &Table,
    fd: c_int,
    address: *const c_void,
    len: u32,
    pass: impl FnOnce() -> c_int,
) -> c_int {
    if table.is_empty() || address.is_null() || len as usize > SOCKADDR_MAX {
        return pass();
    }
    // SAFETY: the caller passes `len` readable bytes at `address` (bind's contract).
    let bytes = unsafe { std::slice::from_raw_parts(address.cast::<u8>(), len as usize) };
    let Some(requested) = Addr::parse(bytes) else {
        return pass();
    };
    let saved = errno();
    match decide_bind(table, fd, &requested) {
        Bind::Adopted => {
            set_errno(saved);
            0
        }
        Bind::Failed(error) => {
            set_errno(error);
            -1
        }
        Bind::Pass { held } => {
            set_errno(saved);
            let result = pass();
            if let (true, Some(held)) = (result != 0 && errno() == EADDRINUSE, held) {
                let error = errno();
                explain_failed_bind(&requested, &held);
                set_errno(error);
            }
            result
        }
    }
}

/// Whether `fd` holds one of ustad's sockets (for `listen` and `shutdown`, which then do
/// nothing).
fn is_ustads(table: &Table, fd: c_int) -> bool {
    let saved = errno();
    let ours =
        !table.is_empty() && socket_inode(fd).is_some_and(|inode| table.by_inode(inode).is_some());
    set_errno(saved);
    ours
}

/// Whether `path` (relative to `dirfd`) is the file of one of ustad's Unix sockets (for
/// `unlink`, which then does nothing); the link itself, not what a symlink points to.
fn is_ustads_file(table: &Table, dirfd: c_int, path: *const c_char) -> bool {
    let saved = errno();
    let ours = !path.is_null()
        && table.has_files()
        && socket_file(dirfd, path, AT_SYMLINK_NOFOLLOW).is_some_and(|file| table.holds_file(file));
    set_errno(saved);
    ours
}

/// Whether `fd` is one of the fds ustad passed (3, 4, …), still holding its socket: those
/// stay inheritable.
fn is_passed_fd(table: &Table, fd: c_int) -> bool {
    let saved = errno();
    let passed = table
        .by_fd(fd)
        .is_some_and(|held| socket_inode(fd) == Some(held.passed.inode));
    set_errno(saved);
    passed
}

/// What `fcntl` does: `F_SETFD` with `FD_CLOEXEC` on a passed fd clears the flag instead of
/// setting it (Node marks every inherited fd close-on-exec when it starts, and a launcher such
/// as npm would then never pass ustad's sockets to the server it starts).
fn on_fcntl(table: Option<&Table>, fd: c_int, cmd: c_int, arg: usize, next: FcntlFn) -> c_int {
    let arg = match table {
        Some(table)
            if cmd == F_SETFD && arg as c_int & FD_CLOEXEC != 0 && is_passed_fd(table, fd) =>
        {
            (arg as c_int & !FD_CLOEXEC) as usize
        }
        _ => arg,
    };
    // SAFETY: the next fcntl, with the caller's arguments (or fewer flags).
    unsafe { next(fd, cmd, arg) }
}

/// Whether `ioctl(fd, request)` is `FIOCLEX` on a passed fd, which then does nothing (as
/// [`on_fcntl`]).
fn ignores_ioctl(table: Option<&Table>, fd: c_int, request: c_ulong) -> bool {
    request == FIOCLEX && table.is_some_and(|table| is_passed_fd(table, fd))
}

/// The definitions that take libc's place, in the library only (a test binary keeps libc's).
/// `no_mangle` exports them from the library whatever their Rust visibility.
#[cfg(not(test))]
mod exports {
    use super::*;

    /// The next definition as a function of type `F`, or `None`.
    ///
    /// # Safety
    /// `F` must be a function pointer type with the C signature of the symbol `next` finds.
    unsafe fn call<F: Copy>(next: &Next) -> Option<F> {
        let found = next.get();
        if found.is_null() {
            return None;
        }
        // SAFETY: the caller's: `F` is the symbol's signature, and it is not null.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&found) })
    }

    /// `bind(2)`: ustad's socket for an address it holds; libc's `bind` otherwise.
    ///
    /// # Safety
    /// As for libc's `bind`: `address` points to `len` readable bytes.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn bind(fd: c_int, address: *const c_void, len: u32) -> c_int {
        // SAFETY: libc's bind has this signature.
        let pass = || match unsafe { call::<BindFn>(&NEXT_BIND) } {
            // SAFETY: libc's bind, with the caller's own arguments.
            Some(bind) => unsafe { bind(fd, address, len) },
            None => missing(),
        };
        // SAFETY: the caller's contract is on_bind's.
        unsafe { on_bind(table(), fd, address, len, pass) }
    }

    /// `listen(2)`: nothing for ustad's sockets (listening already, with the pool's backlog).
    #[unsafe(no_mangle)]
    extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
        if is_ustads(table(), fd) {
            return 0;
        }
        // SAFETY: libc's listen has this signature.
        match unsafe { call::<ListenFn>(&NEXT_LISTEN) } {
            // SAFETY: libc's listen, with the caller's own arguments.
            Some(listen) => unsafe { listen(fd, backlog) },
            None => missing(),
        }
    }

    /// `shutdown(2)`: nothing for ustad's sockets, which it would stop listening for every
    /// worker and for ustad.
    #[unsafe(no_mangle)]
    extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
        if is_ustads(table(), fd) {
            return 0;
        }
        // SAFETY: libc's shutdown has this signature.
        match unsafe { call::<ShutdownFn>(&NEXT_SHUTDOWN) } {
            // SAFETY: libc's shutdown, with the caller's own arguments.
            Some(shutdown) => unsafe { shutdown(fd, how) },
            None => missing(),
        }
    }

    /// `unlink(2)`: ustad's socket files stay (and the call succeeds).
    ///
    /// # Safety
    /// As for libc's `unlink`: `path` is NUL-terminated.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
        if is_ustads_file(table(), AT_FDCWD, path) {
            return 0;
        }
        // SAFETY: libc's unlink has this signature.
        match unsafe { call::<UnlinkFn>(&NEXT_UNLINK) } {
            // SAFETY: libc's unlink, with the caller's own argument.
            Some(unlink) => unsafe { unlink(path) },
            None => missing(),
        }
    }

    /// `unlinkat(2)`: as [`unlink`]; directories are libc's.
    ///
    /// # Safety
    /// As for libc's `unlinkat`: `path` is NUL-terminated.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
        if flags & AT_REMOVEDIR == 0 && is_ustads_file(table(), dirfd, path) {
            return 0;
        }
        // SAFETY: libc's unlinkat has this signature.
        match unsafe { call::<UnlinkatFn>(&NEXT_UNLINKAT) } {
            // SAFETY: libc's unlinkat, with the caller's own arguments.
            Some(unlinkat) => unsafe { unlinkat(dirfd, path, flags) },
            None => missing(),
        }
    }

    /// `fcntl(2)`: ustad's passed fds stay inheritable (see [`on_fcntl`]). The table is not
    /// read from here (only looked at once read), so that no call made while it is being read
    /// can wait for itself.
    #[unsafe(no_mangle)]
    extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
        // SAFETY: libc's fcntl has this ABI (see `FcntlFn`).
        match unsafe { call::<FcntlFn>(&NEXT_FCNTL) } {
            Some(next) => on_fcntl(TABLE.get(), fd, cmd, arg, next),
            None => missing(),
        }
    }

    /// `fcntl64`, which programs built against glibc 2.28 or later call: as [`fcntl`].
    #[unsafe(no_mangle)]
    extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
        // SAFETY: libc's fcntl64 and fcntl have this ABI (see `FcntlFn`).
        let next = unsafe { call::<FcntlFn>(&NEXT_FCNTL64).or_else(|| call(&NEXT_FCNTL)) };
        match next {
            Some(next) => on_fcntl(TABLE.get(), fd, cmd, arg, next),
            None => missing(),
        }
    }

    /// `ioctl(2)`: `FIOCLEX` on ustad's passed fds does nothing (see [`on_fcntl`]).
    #[unsafe(no_mangle)]
    extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: usize) -> c_int {
        if ignores_ioctl(TABLE.get(), fd, request) {
            return 0;
        }
        // SAFETY: libc's ioctl has this ABI (see `IoctlFn`).
        match unsafe { call::<IoctlFn>(&NEXT_IOCTL) } {
            // SAFETY: libc's ioctl, with the caller's own arguments.
            Some(ioctl) => unsafe { ioctl(fd, request, arg) },
            None => missing(),
        }
    }

    /// Runs before the program's `main`: the table is read while the environment and the fds
    /// are still as ustad left them (a program may clear one or close the other before it
    /// binds).
    extern "C" fn init() {
        table();
        // Found now, while the process has one thread: a forked child (libuv's, between fork
        // and exec) must never have to call dlsym, which takes the loader's lock.
        for next in [
            &NEXT_BIND,
            &NEXT_LISTEN,
            &NEXT_SHUTDOWN,
            &NEXT_UNLINK,
            &NEXT_UNLINKAT,
            &NEXT_FCNTL,
            &NEXT_FCNTL64,
            &NEXT_IOCTL,
        ] {
            next.get();
        }
    }

    #[used]
    #[unsafe(link_section = ".init_array")]
    static INIT: extern "C" fn() = init;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_constants_are_libcs() {
        assert_eq!(SOL_SOCKET, libc::SOL_SOCKET);
        assert_eq!(SO_TYPE, libc::SO_TYPE);
        assert_eq!(SO_PROTOCOL, libc::SO_PROTOCOL);
        assert_eq!(SOCK_STREAM, libc::SOCK_STREAM);
        assert_eq!(IPPROTO_TCP, libc::IPPROTO_TCP);
        assert_eq!(IPPROTO_MPTCP, libc::IPPROTO_MPTCP);
        assert_eq!(F_GETFD, libc::F_GETFD);
        assert_eq!(F_SETFD, libc::F_SETFD);
        assert_eq!(FIOCLEX, libc::FIOCLEX);
        assert_eq!(F_GETFL, libc::F_GETFL);
        assert_eq!(F_SETFL, libc::F_SETFL);
        assert_eq!(FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(O_CLOEXEC, libc::O_CLOEXEC);
        assert_eq!(O_NONBLOCK, libc::O_NONBLOCK);
        assert_eq!(AT_FDCWD, libc::AT_FDCWD);
        assert_eq!(AT_EMPTY_PATH, libc::AT_EMPTY_PATH);
        assert_eq!(AT_SYMLINK_NOFOLLOW, libc::AT_SYMLINK_NOFOLLOW);
        assert_eq!(AT_REMOVEDIR, libc::AT_REMOVEDIR);
        assert_eq!(STATX_TYPE, libc::STATX_TYPE);
        assert_eq!(STATX_INO, libc::STATX_INO);
        assert_eq!(u32::from(S_IFMT), libc::S_IFMT);
        assert_eq!(u32::from(S_IFSOCK), libc::S_IFSOCK);
        assert_eq!(EADDRINUSE, libc::EADDRINUSE);
        assert_eq!(ENOSYS, libc::ENOSYS);
        assert_eq!(RTLD_NEXT, libc::RTLD_NEXT);
        assert_eq!(
            std::mem::size_of::<Statx>(),
            std::mem::size_of::<libc::statx>()
        );
        assert_eq!(
            std::mem::offset_of!(Statx, ino),
            std::mem::offset_of!(libc::statx, stx_ino)
        );
        assert_eq!(
            std::mem::offset_of!(Statx, dev_major),
            std::mem::offset_of!(libc::statx, stx_dev_major)
        );
        assert_eq!(
            std::mem::offset_of!(Statx, mode),
            std::mem::offset_of!(libc::statx, stx_mode)
        );
    }

    #[test]
    fn a_listening_socket_is_known_by_inode_and_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let inode = socket_inode(fd).expect("a socket");
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_ne!(socket_inode(other.as_raw_fd()), Some(inode));
        assert_eq!(
            local_addr(fd),
            Some(Addr::Ip(listener.local_addr().unwrap()))
        );
        assert_eq!(sockopt(fd, SO_TYPE), Some(SOCK_STREAM));
        assert_eq!(sockopt(fd, SO_PROTOCOL), Some(IPPROTO_TCP));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(socket_inode(file.as_raw_fd()), None, "not a socket");
        assert_eq!(socket_inode(-1), None);
    }

    #[test]
    fn a_unix_socket_file_is_known_by_identity_not_by_spelling() {
        let dir = std::env::temp_dir().join(format!("ustad-preload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c_path = |p: &std::path::Path| {
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap()
        };
        let direct = socket_file(AT_FDCWD, c_path(&path).as_ptr(), 0).expect("a socket file");
        let roundabout = dir.join("..").join(dir.file_name().unwrap()).join("a.sock");
        assert_eq!(
            socket_file(AT_FDCWD, c_path(&roundabout).as_ptr(), 0),
            Some(direct)
        );
        let link = dir.join("link.sock");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(
            socket_file(AT_FDCWD, c_path(&link).as_ptr(), 0),
            Some(direct)
        );
        assert_eq!(
            socket_file(AT_FDCWD, c_path(&link).as_ptr(), AT_SYMLINK_NOFOLLOW),
            None,
            "the link itself is not the socket"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A socket as a program makes it: `socket(family, type | flags, 0)`.
    fn program_socket(family: c_int, kind: c_int) -> std::os::fd::OwnedFd {
        // SAFETY: socket takes integers; the fd is owned from here on.
        let fd = unsafe { libc::socket(family, kind, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    fn sockaddr(address: std::net::SocketAddr) -> (libc::sockaddr_storage, u32) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match address {
            std::net::SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
                let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as u16;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
                sin6.sin6_family = libc::AF_INET6 as u16;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_addr.s6_addr = v6.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as u32)
    }

    /// `on_bind` of `address` on `fd`; whether it was passed on to libc's bind.
    fn bind_through(table: &Table, fd: c_int, address: std::net::SocketAddr) -> (c_int, bool) {
        let (storage, len) = sockaddr(address);
        let mut passed = false;
        // SAFETY: `storage` holds `len` bytes; libc's bind gets the same arguments.
        let result = unsafe {
            on_bind(table, fd, (&raw const storage).cast(), len, || {
                passed = true;
                libc::bind(fd, (&raw const storage).cast(), len)
            })
        };
        (result, passed)
    }

    fn flags(fd: c_int) -> (c_int, c_int) {
        // SAFETY: reading flags.
        unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        }
    }

    #[test]
    fn a_program_binding_an_address_ustad_holds_gets_ustads_socket_as_it_set_its_fd_up() {
        let ustads = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ustads.local_addr().unwrap().port();
        let inode = socket_inode(ustads.as_raw_fd()).unwrap();
        let table = load_from(format!("{}:{inode}", ustads.as_raw_fd()).as_bytes());
        assert!(!table.is_empty());

        // As Node does: [::]:port, non-blocking, close-on-exec.
        let program = program_socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        );
        let fd = program.as_raw_fd();
        let wildcard = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        assert_eq!(bind_through(&table, fd, wildcard), (0, false));
        assert_eq!(socket_inode(fd), Some(inode));
        assert_eq!(local_addr(fd), Some(Addr::Ip(ustads.local_addr().unwrap())));
        let (fd_flags, status) = flags(fd);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "close-on-exec kept");
        assert_ne!(status & libc::O_NONBLOCK, 0, "O_NONBLOCK kept");
        assert!(is_ustads(&table, fd));
        assert!(is_ustads(&table, ustads.as_raw_fd()));
        // Binding it again is the kernel's business (EINVAL).
        assert_eq!(bind_through(&table, fd, wildcard), (-1, true));

        // An inheritable, blocking socket stays so (and turns ustad's socket blocking again:
        // the description is shared).
        let inheritable = program_socket(libc::AF_INET, libc::SOCK_STREAM);
        let localhost = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            bind_through(&table, inheritable.as_raw_fd(), localhost),
            (0, false),
            "a second bind of the address in one process gets the socket again"
        );
        let (fd_flags, status) = flags(inheritable.as_raw_fd());
        assert_eq!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_eq!(status & libc::O_NONBLOCK, 0);
        assert_eq!(flags(fd).1 & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn other_ports_port_zero_and_datagram_sockets_are_libcs() {
        let ustads = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ustads.local_addr().unwrap().port();
        let inode = socket_inode(ustads.as_raw_fd()).unwrap();
        let table = load_from(format!("{}:{inode}", ustads.as_raw_fd()).as_bytes());
        let any = |port| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));

        let elsewhere = program_socket(libc::AF_INET, libc::SOCK_STREAM);
        assert_eq!(
            bind_through(&table, elsewhere.as_raw_fd(), any(0)),
            (0, true)
        );
        assert_ne!(socket_inode(elsewhere.as_raw_fd()), Some(inode));
        assert!(!is_ustads(&table, elsewhere.as_raw_fd()));

        let udp = program_socket(libc::AF_INET, libc::SOCK_DGRAM);
        assert_eq!(bind_through(&table, udp.as_raw_fd(), any(port)), (0, true));
        assert_eq!(local_addr(udp.as_raw_fd()), Some(Addr::Ip(any(port))));
    }

    #[test]
    fn a_socket_the_process_no_longer_has_is_not_handed_out() {
        let ustads = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ustads.local_addr().unwrap().port();
        let inode = socket_inode(ustads.as_raw_fd()).unwrap();
        let table = load_from(format!("{}:{inode}", ustads.as_raw_fd()).as_bytes());
        // Named with a wrong inode: not the socket ustad passed.
        assert!(load_from(format!("{}:{}", ustads.as_raw_fd(), inode + 1).as_bytes()).is_empty());
        drop(ustads);
        let program = program_socket(libc::AF_INET, libc::SOCK_STREAM);
        let address = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        let (result, passed) = bind_through(&table, program.as_raw_fd(), address);
        assert!(passed, "libc's bind");
        assert_eq!(result, 0, "the port is free again");
    }

    #[test]
    fn ustads_socket_files_are_recognised_for_unlink() {
        let dir = std::env::temp_dir().join(format!("ustad-preload-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let _ = std::fs::remove_file(&path);
        let ustads = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c_path =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
                .unwrap();
        let file = socket_file(AT_FDCWD, c_path.as_ptr(), 0).unwrap();
        let inode = socket_inode(ustads.as_raw_fd()).unwrap();
        let table = load_from(
            format!(
                "{}:{inode}:{}:{}:{}",
                ustads.as_raw_fd(),
                file.dev_major,
                file.dev_minor,
                file.ino
            )
            .as_bytes(),
        );
        assert!(table.has_files());
        assert!(is_ustads_file(&table, AT_FDCWD, c_path.as_ptr()));
        let other = dir.join("other");
        std::fs::write(&other, "").unwrap();
        let c_other =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(other.as_os_str()))
                .unwrap();
        assert!(!is_ustads_file(&table, AT_FDCWD, c_other.as_ptr()));
        assert!(!is_ustads_file(&table, AT_FDCWD, std::ptr::null()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// libc's fcntl, as the next definition.
    fn libc_fcntl() -> FcntlFn {
        // SAFETY: libc's fcntl has this ABI (see `FcntlFn`).
        unsafe { std::mem::transmute::<*mut c_void, FcntlFn>(NEXT_FCNTL.get()) }
    }

    #[test]
    fn passed_fds_stay_inheritable_and_other_fds_do_as_they_are_told() {
        let ustads = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = ustads.as_raw_fd();
        let inode = socket_inode(fd).unwrap();
        let table = load_from(format!("{fd}:{inode}").as_bytes());
        let cloexec = |fd| flags(fd).0 & libc::FD_CLOEXEC != 0;
        assert!(cloexec(fd), "std's sockets are close-on-exec");
        assert_eq!(on_fcntl(Some(&table), fd, F_SETFD, 0, libc_fcntl()), 0);
        assert!(!cloexec(fd));
        // As Node's uv_disable_stdio_inheritance does on every fd it inherited:
        assert_eq!(
            on_fcntl(Some(&table), fd, F_SETFD, FD_CLOEXEC as usize, libc_fcntl()),
            0
        );
        assert!(!cloexec(fd), "ustad's fd stays inheritable");
        assert!(ignores_ioctl(Some(&table), fd, FIOCLEX));
        assert!(!ignores_ioctl(Some(&table), fd, FIOCLEX + 1));
        assert!(
            !ignores_ioctl(None, fd, FIOCLEX),
            "before the table is read"
        );

        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ofd = other.as_raw_fd();
        assert_eq!(on_fcntl(Some(&table), ofd, F_SETFD, 0, libc_fcntl()), 0);
        assert!(!cloexec(ofd));
        assert_eq!(
            on_fcntl(
                Some(&table),
                ofd,
                F_SETFD,
                FD_CLOEXEC as usize,
                libc_fcntl()
            ),
            0
        );
        assert!(cloexec(ofd), "another fd does as it is told");
        assert!(!ignores_ioctl(Some(&table), ofd, FIOCLEX));
        assert_eq!(
            on_fcntl(None, fd, F_SETFD, FD_CLOEXEC as usize, libc_fcntl()),
            0
        );
        assert!(cloexec(fd), "without a table, nothing is ustad's");
        assert_eq!(
            on_fcntl(Some(&table), fd, F_GETFL, 0, libc_fcntl()),
            flags(fd).1
        );
    }
}
