//! The built-in demo worker (placeholder: being written).
use std::time::Duration;

/// How the demo worker behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a keep-alive connection may stay idle after SIGTERM before it is closed.
    pub idle_grace: Duration,
}

/// Runs the demo worker until it has drained after SIGTERM.
pub fn run(_options: Options) -> anyhow::Result<()> {
    anyhow::bail!("the demo worker is not written yet")
}
