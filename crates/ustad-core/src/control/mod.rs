//! The control socket: how `ustad status`, `reload`, `scale`, `restart`, `stop`, `logs` and
//! `top` talk to a running primary.
//!
//! A Unix stream socket, mode 0600 in a 0700 directory, and the primary checks each peer's
//! credentials (`SO_PEERCRED`): only its own uid and root get in. The protocol is JSON lines,
//! one request per connection ([`protocol`], `docs/control.md`). The server never trusts a
//! client: requests are bounded in size and time, and a client that does not read its
//! stream is dropped rather than buffered for.

pub mod client;
pub mod paths;
pub mod protocol;
pub mod server;
