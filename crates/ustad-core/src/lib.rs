//! The ustad engine.
pub mod config;
pub mod plan;
