//! The terminal while `ustad top` runs: raw mode, the alternate screen, no cursor, no line
//! wrapping — and the promise to put all of it back, on a normal exit, an error or a panic.
//!
//! A shell left in raw mode on the alternate screen looks dead to the person who typed
//! `ustad top`; that is why restoring happens in [`Screen`]'s `Drop` *and* in a panic hook
//! (which runs before the panic message is printed, so that the message lands on the normal
//! screen where it can be read).

use std::io::{self, BufWriter, Stdout, Write};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use crossterm::style::{Attribute, Color, Print, ResetColor, SetAttribute, SetForegroundColor};
use crossterm::terminal::{self, ClearType};
use crossterm::{cursor, execute, queue};

use super::view::{Line, Tone};

/// Whether the terminal is ours to restore.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// The terminal, taken over until dropped.
#[derive(Debug)]
pub(crate) struct Screen {
    out: BufWriter<Stdout>,
    color: bool,
}

impl Screen {
    /// Takes the terminal over. `color`: colours for tones (otherwise bold, dim and reverse
    /// video only, as `NO_COLOR` asks).
    pub(crate) fn enter(color: bool) -> io::Result<Screen> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        terminal::enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on, an error drops the screen, which restores what was done.
        let mut screen = Screen {
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
            color,
        };
        execute!(
            screen.out,
            terminal::EnterAlternateScreen,
            cursor::Hide,
            terminal::DisableLineWrap,
            terminal::Clear(ClearType::All)
        )?;
        Ok(screen)
    }

    /// Columns and rows.
    pub(crate) fn size() -> io::Result<(usize, usize)> {
        let (columns, rows) = terminal::size()?;
        Ok((usize::from(columns), usize::from(rows)))
    }

    /// Paints `lines` over the previous frame, row by row (no clear: no flicker), as one
    /// synchronized update where the terminal supports it. `lines` fit the size already.
    pub(crate) fn draw(&mut self, lines: &[Line], width: usize, height: usize) -> io::Result<()> {
        queue!(self.out, terminal::BeginSynchronizedUpdate)?;
        for row in 0..height {
            queue!(
                self.out,
                cursor::MoveTo(0, u16::try_from(row).unwrap_or(u16::MAX))
            )?;
            let Some(line) = lines.get(row) else {
                queue!(self.out, terminal::Clear(ClearType::CurrentLine))?;
                continue;
            };
            for span in &line.spans {
                self.style(span.tone)?;
                queue!(self.out, Print(&span.text))?;
                queue!(self.out, SetAttribute(Attribute::Reset), ResetColor)?;
            }
            // Clearing from a full line's end would erase its last cell on some terminals.
            if line.width() < width {
                queue!(self.out, terminal::Clear(ClearType::UntilNewLine))?;
            }
        }
        queue!(self.out, terminal::EndSynchronizedUpdate)?;
        self.out.flush()
    }

    fn style(&mut self, tone: Tone) -> io::Result<()> {
        let (attribute, color) = match tone {
            Tone::Plain => (None, None),
            Tone::Bold => (Some(Attribute::Bold), None),
            Tone::Heading => (Some(Attribute::Reverse), None),
            Tone::Dim => (Some(Attribute::Dim), None),
            Tone::Good => (None, Some(Color::Green)),
            Tone::Warn => (Some(Attribute::Bold), Some(Color::Yellow)),
            Tone::Bad => (Some(Attribute::Bold), Some(Color::Red)),
            Tone::Accent => (Some(Attribute::Bold), Some(Color::Cyan)),
        };
        if let Some(attribute) = attribute {
            queue!(self.out, SetAttribute(attribute))?;
        }
        match color {
            Some(color) if self.color => queue!(self.out, SetForegroundColor(color)),
            _ => Ok(()),
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.out.flush();
        restore();
    }
}

/// Puts the terminal back as `ustad top` found it, once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let mut out = io::stdout();
        let _ = execute!(
            out,
            SetAttribute(Attribute::Reset),
            ResetColor,
            terminal::EnableLineWrap,
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
        let _ = terminal::disable_raw_mode();
    }
}
