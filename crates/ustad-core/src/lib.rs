//! The ustad engine.
pub mod config;
pub mod notify;
pub mod output;
pub mod plan;
pub mod procfs;
pub mod sockets;
pub mod spawn;
pub mod supervisor;
mod sys;
