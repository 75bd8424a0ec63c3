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
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_number = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let line_text = text[line_start..line_end].trim_end_matches('\r').to_owned();
        let end = span.end.clamp(start, line_end);
        let width = text[start..end].chars().count().max(1);
        Diagnostic {
            origin: origin.into(),
            position: Some((line_number, column)),
            message: message.into(),
            snippet: Some((line_text, column - 1..column - 1 + width)),
        }
    }
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
}
