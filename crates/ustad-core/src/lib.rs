//! The ustad engine.
pub mod config;
