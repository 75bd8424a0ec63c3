//! `ustad top`: a live view of a running cluster — pools, workers, their state, CPU, memory,
//! restarts and recent events — redrawn in place until `q`.
//!
//! It is only a client of the control socket: a `status` snapshot every interval (CPU and
//! memory are sampled by the primary, so a snapshot is all there is to know) and one `events`
//! stream for what happened in between. The pieces, each testable on its own:
//! - [`feed`]: the threads that talk to the primary;
//! - [`model`]: what is known, and when to leave (the primary gone);
//! - [`view`]: the screen as lines of styled text, a pure function of the model;
//! - [`screen`]: the terminal, taken over and always given back.
//!
//! crossterm alone draws it: the screen is one table and a list, which needs no widget library.

mod feed;
mod model;
mod screen;
mod view;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ustad_core::control::paths::Target;

use self::model::{Model, Update};
use self::screen::Screen;

/// How often keys and updates are looked at: what a fresh snapshot may wait to be shown.
const TICK: Duration = Duration::from_millis(100);
/// Redraw at least this often, so that event ages move on while nothing else does.
const REDRAW: Duration = Duration::from_secs(1);
/// The shortest refresh interval taken: a smaller one would only load the primary.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Shows the cluster at `target`, asking for a fresh snapshot every `interval`, until the user
/// quits (`q`, `Esc`, Ctrl-C) or the primary goes away.
///
/// # Errors
/// When stdout is not a terminal, when the primary cannot be reached at the start, when the
/// terminal fails, and when the primary went away (`ustad (pid N) is gone`).
pub(crate) fn run(target: &Target, interval: Duration, color: bool) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "`ustad top` draws on a terminal, and stdout is not one; for a snapshot, use `ustad status` (or `ustad status --json`)"
        );
    }
    let socket = target.resolve().map_err(anyhow::Error::msg)?;
    // Asked before the screen is taken over, so that "is ustad running?" is printed plainly.
    let first = feed::fetch_status(&socket).map_err(|(error, _)| error)?;
    let (updates, received) = mpsc::channel();
    let interval = interval.max(MIN_INTERVAL);
    feed::spawn_status(socket.clone(), interval, updates.clone())
        .context("starting the status thread")?;
    feed::spawn_events(socket, updates).context("starting the events thread")?;

    let signalled = watch_signals().context("watching for SIGTERM")?;
    let mut screen = Screen::enter(color).context("setting up the terminal")?;
    let mut model = Model::new(first);
    let ended = show(&mut screen, &mut model, &received, &signalled);
    // The terminal is given back before any error is printed.
    drop(screen);
    ended?;
    model.outcome()
}

/// A flag raised by SIGTERM, SIGHUP or SIGINT (`kill`, a closed terminal): `top` then leaves
/// as if `q` was pressed, giving the terminal back, instead of dying in raw mode.
fn watch_signals() -> std::io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let flag = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Installed here, before the terminal is taken over, so that none is missed.
    let (mut term, mut hup, mut int) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let raised = flag.clone();
    std::thread::Builder::new()
        .name("top-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                    _ = int.recv() => {}
                }
            });
            raised.store(true, Ordering::Release);
        })?;
    Ok(flag)
}

/// The screen loop: returns when the user quits, a signal asks it to, or the primary has been
/// gone a moment.
fn show(
    screen: &mut Screen,
    model: &mut Model,
    updates: &Receiver<Update>,
    signalled: &AtomicBool,
) -> anyhow::Result<()> {
    let mut dirty = true;
    let mut drawn = Instant::now();
    let mut feeds_alive = true;
    loop {
        if dirty || drawn.elapsed() >= REDRAW {
            let (width, height) = Screen::size()?;
            let lines = view::render(model, epoch_now(), width, height);
            screen.draw(&lines, width, height)?;
            dirty = false;
            drawn = Instant::now();
        }
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(key) if is_quit(&key) => return Ok(()),
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        while feeds_alive {
            match updates.try_recv() {
                Ok(update) => {
                    model.apply(update, Instant::now());
                    dirty = true;
                }
                Err(TryRecvError::Empty) => break,
                // Both feeds stop only once the primary is gone, which the model knows.
                Err(TryRecvError::Disconnected) => feeds_alive = false,
            }
        }
        if model.should_exit(Instant::now()) || signalled.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}

/// `q`, `Esc` and Ctrl-C quit (raw mode turns Ctrl-C into a key, not a signal).
fn is_quit(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_esc_and_ctrl_c_quit() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(is_quit(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!is_quit(&release));
    }
}
