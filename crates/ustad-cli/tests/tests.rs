//! Integration tests of the `ustad` binary: real primaries, real workers, real sockets on
//! 127.0.0.1, real signals. Every process a test starts is killed when the test ends (the
//! testkit's guards kill whole process groups), and every wait is bounded.

mod after;
mod before_start;
mod compat;
mod config;
mod control;
mod demo_worker;
mod lifecycle;
mod listening;
mod logs;
mod metrics;
mod node_ipc;
mod notify;
mod preload;
mod rollout;
mod systemd;
mod top;
mod upgrade;
mod users;
mod util;
mod watch;
mod workers;
