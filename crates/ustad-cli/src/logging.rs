//! ustad's own log on stderr: readable lines, or JSON objects with every field as a key.
//!
//! The level comes from `USTAD_LOG`: a level (`debug`, `warn`…) or comma-separated
//! `target=level` directives (`info,ustad_core=debug`; a word that is not a level names a
//! target), `info` by default or when it does not parse. A [`Targets`] filter, not an
//! `EnvFilter`: the latter's span and field filters bring a regex engine (~0.3 MiB of code) into
//! the binary, whose pages the primary keeps mapped.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{ColorChoice, LogFormat};

/// Whether to colour a stream under `choice`.
pub(crate) fn use_color(choice: ColorChoice, is_terminal: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    }
}

/// Installs the global subscriber.
pub(crate) fn init(format: LogFormat, color: ColorChoice) {
    let filter = std::env::var("USTAD_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // Every level: `filter` decides (the builder's own default would stop at `info`).
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .finish()
            .with(filter)
            .init(),
        LogFormat::Text => builder
            .event_format(TextFormat {
                color: use_color(color, std::io::stderr().is_terminal()),
            })
            .finish()
            .with(filter)
            .init(),
    }
}

/// `2026-11-22T10:15:02.123Z  INFO web.0 (id 1, pid 4242) ready after 31ms`: the message
/// carries everything a reader needs; the structured fields are for the JSON format.
struct TextFormat {
    color: bool,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let level = *metadata.level();
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let (paint, reset) = match (self.color, level) {
            (false, _) => ("", ""),
            (true, tracing::Level::ERROR) => ("\x1b[31m", "\x1b[0m"),
            (true, tracing::Level::WARN) => ("\x1b[33m", "\x1b[0m"),
            (true, tracing::Level::INFO) => ("\x1b[32m", "\x1b[0m"),
            (true, _) => ("\x1b[2m", "\x1b[0m"),
        };
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        writeln!(writer, "{time} {paint}{level:>5}{reset} {}", message.0)
    }
}

struct MessageOnly(String);

impl Visit for MessageOnly {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}
