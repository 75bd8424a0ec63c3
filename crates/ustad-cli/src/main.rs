//! `ustad`: run any program as a supervised cluster of worker processes.
mod demo;

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    // Placeholder wiring until the CLI lands: `ustad demo-worker [--idle-grace D]`.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("demo-worker") {
        let idle_grace = match args.iter().position(|a| a == "--idle-grace") {
            Some(i) => humantime::parse_duration(&args[i + 1])?,
            None => Duration::from_secs(1),
        };
        return demo::run(demo::Options { idle_grace });
    }
    anyhow::bail!("not yet")
}
