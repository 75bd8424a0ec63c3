//! Configuration errors that point at the file, line and column, with the offending line shown.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file (or flags) say something invalid. Every problem found is listed.
    #[error("{}", render(diagnostics))]
    Invalid {
        /// One entry per problem, in file order.
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem, located in a file when it came from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file (or `command line`).
    pub origin: String,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
    /// The source line and the span to underline in it (column range, 0-based chars).
    snippet: Option<(String, Range<usize>)>,
}

impl Diagnostic {
    /// A problem with no position (a flag, or a config built in code).
    pub fn unlocated(origin: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            origin: origin.into(),
            position: None,
            message: message.into(),
            snippet: None,
        }
    }

    /// A problem at a byte range of `text`.
    pub(crate) fn at_span(
        origin: impl Into<String>,
        text: &str,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Diagnostic {
        // The spans come from the TOML parser, on character boundaries; should one not be, the
        // underline is off by a character rather than the slicing panicking.
        let start = char_boundary(text, span.start);
        let (before, after) = text.split_at(start);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = after.find('\n').map_or(text.len(), |i| start + i);
        let line_number = before.matches('\n').count() + 1;
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        let line_text = text
            .get(line_start..line_end)
            .unwrap_or_default()
            .trim_end_matches('\r')
            .to_owned();
        let end = char_boundary(text, span.end.clamp(start, line_end));
        let width = text.get(start..end).map_or(0, |s| s.chars().count()).max(1);
        Diagnostic {
            origin: origin.into(),
            position: Some((line_number, column)),
            message: message.into(),
            snippet: Some((line_text, column - 1..column - 1 + width)),
        }
    }
}

/// The last character boundary of `text` at or before `at`.
fn char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.origin, self.message)?,
            None => write!(f, "{}: {}", self.origin, self.message)?,
        }
        if let (Some((line_text, underline)), Some((line, _))) = (&self.snippet, self.position) {
            let gutter = line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{line} | {line_text}\n{:gutter$} | {}{}",
                "",
                "",
                " ".repeat(underline.start),
                "^".repeat(underline.len()),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_the_line_is_underlined() {
        let text = "a = 1\nsize = 0\n";
        let diagnostic = Diagnostic::at_span("ustad.toml", text, 13..14, "size must be at least 1");
        assert_eq!(diagnostic.position, Some((2, 8)));
        assert_eq!(
            diagnostic.to_string(),
            "ustad.toml:2:8: size must be at least 1\n  |\n2 | size = 0\n  |        ^"
        );
    }

    #[test]
    fn a_span_inside_a_character_or_past_the_end_does_not_panic() {
        let text = "name = \"é\"\n";
        let inside = Diagnostic::at_span("u.toml", text, 9..10, "bad");
        assert_eq!(inside.position, Some((1, 9)));
        let past = Diagnostic::at_span("u.toml", text, 100..200, "bad");
        assert_eq!(past.position, Some((2, 1)));
        let _ = (inside.to_string(), past.to_string());
    }
}
