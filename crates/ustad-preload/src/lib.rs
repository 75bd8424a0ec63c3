//! `ustad-preload`: the library ustad loads into its workers with `LD_PRELOAD`, so that a
//! program that binds its own port (`app.listen(3000)`) gets the socket ustad holds for that
//! address instead of a new one, as Node's `cluster` and PM2 give their workers theirs.
//!
//! # Theory of operation
//!
//! ustad binds each socket of a pool itself, before any worker starts, and passes it to every
//! worker at fd 3, 4, … (`LISTEN_FDS`). With a pool's `preload` on (the default), it also sets
//! `LD_PRELOAD` to this library and `USTAD_PRELOAD_FDS` to the identities of those fds (see
//! `table.rs`). When the library is loaded, before the program's `main`, it learns from
//! `getsockname` where each of them listens. Then:
//!
//! 1. **`bind(fd, address)`** on a stream socket, for an address one of them holds (see
//!    `addr::rank`: same port, and the same address, or a wildcard on either side, or
//!    `localhost` in either family, IPv4-mapped IPv6 addresses as their IPv4 address; a Unix
//!    socket file by its device and inode; an abstract name by its bytes), puts ustad's socket
//!    in `fd` with `dup3` and returns 0. `fd` keeps its close-on-exec flag and its
//!    `O_NONBLOCK` as the program set them (the latter belongs to the socket description that
//!    every holder of the socket shares: workers of one program agree on it). Socket options
//!    the program set before the bind (`SO_REUSEADDR`, `SO_REUSEPORT`, …) went with its own
//!    socket: the socket is ustad's, with ustad's options. `getsockname` then returns the
//!    address ustad holds.
//! 2. **`listen(fd)`** on ustad's socket does nothing: it listens already, with the backlog
//!    the pool configured.
//! 3. **`shutdown(fd)`** on ustad's socket does nothing: the kernel would stop the socket
//!    listening for every worker and for ustad.
//! 4. **`unlink(path)`** of ustad's Unix socket file does nothing (and returns 0): programs
//!    remove a stale file before they bind, which would leave ustad's socket unreachable.
//! 5. **`fcntl(fd, F_SETFD, FD_CLOEXEC)`** and **`ioctl(fd, FIOCLEX)`** on the fds ustad
//!    passed (3, 4, …) leave them inheritable: Node marks every fd it inherited close-on-exec
//!    when it starts, so a launcher such as `npm start` would never pass them to the server it
//!    starts. ustad holds its sockets for its whole life anyway; a child that inherits one
//!    keeps nothing open that would not be open otherwise.
//!
//! Everything else goes to the next definition (libc's) untouched: other addresses and ports,
//! port 0, datagram sockets, outgoing connections, and every call once the library found no
//! socket of ustad's in the process (its table is empty).
//!
//! # Children, and what the library cannot reach
//!
//! A worker's children (`npm start` → `sh` → `node`) inherit the environment and, unless a
//! parent closed them (Python's `subprocess` does, unless told `pass_fds`), the fds; a socket counts in a process as long as its fd there still has
//! the inode ustad named, whatever `LISTEN_PID` says (which is for the worker itself). A
//! second `bind` of the same address in one process gets the same socket again (a server
//! closed and started again, a port probe). A program that unsets `LD_PRELOAD` keeps the
//! library it has; programs it starts afterwards do without it. Statically linked programs
//! (Go, musl-static) and programs that make system calls themselves never call libc's `bind`:
//! they must take fd 3 (`LISTEN_FDS`).
//!
//! The library is built from this crate by `crates/ustad-cli/build.rs`, with `rustc` alone: it
//! has no dependencies, so its few libc declarations and constants are written out in `sys.rs`
//! (its tests check them against the `libc` crate).

/// The variable that lists the sockets to hand out (`ustad_proto::env::USTAD_PRELOAD_FDS`;
/// spelled here too, since the library is built without dependencies).
pub(crate) const USTAD_PRELOAD_FDS: &str = "USTAD_PRELOAD_FDS";

pub(crate) mod addr;
// The constants of `sys` are Linux's on these architectures (asm-generic); elsewhere the
// library is empty, and ustad does without it.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
))]
pub(crate) mod sys;
pub(crate) mod table;

#[cfg(test)]
mod tests {
    #[test]
    fn the_variable_is_spelled_as_ustad_sets_it() {
        assert_eq!(
            super::USTAD_PRELOAD_FDS,
            ustad_proto::env::USTAD_PRELOAD_FDS
        );
    }
}
