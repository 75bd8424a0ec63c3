//! Integration tests of the testkit itself: the test worker, the process guard, the load checker
//! and the cluster fixture, each against real processes and sockets.

mod cluster;
mod load;
mod process;
mod util;
mod worker;
