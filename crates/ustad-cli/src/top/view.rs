//! The screen of `ustad top` as lines of styled text: a pure function of the model, the clock
//! and the terminal's size, so that the layout is tested without a terminal.
//!
//! Every line comes out already cut to the width and the whole to the height: the painter
//! only positions and colours. Text that comes from workers (their `STATUS=` line) passes
//! through [`clean`] first, so that a worker cannot send escape sequences to the terminal.

use ustad_core::control::protocol::EventRecord;
use ustad_core::status::{PoolStatus, WaitingSlot, WorkerState, WorkerStatus};

use super::model::Model;
use crate::human::{bytes, duration};

/// How a piece of text looks; the painter maps tones to colours (or to nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tone {
    Plain,
    Bold,
    /// The table's column titles.
    Heading,
    Dim,
    Good,
    Warn,
    Bad,
    Accent,
}

/// A run of text in one tone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) text: String,
    pub(crate) tone: Tone,
}

/// One row of the screen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) spans: Vec<Span>,
}

impl Line {
    fn push(&mut self, text: impl Into<String>, tone: Tone) -> &mut Line {
        let text = text.into();
        if !text.is_empty() {
            self.spans.push(Span { text, tone });
        }
        self
    }

    fn plain(&mut self, text: impl Into<String>) -> &mut Line {
        self.push(text, Tone::Plain)
    }

    /// The text without styles.
    #[cfg(test)]
    fn text(&self) -> String {
        self.spans.iter().map(|span| span.text.as_str()).collect()
    }

    /// Columns it takes on a terminal.
    pub(crate) fn width(&self) -> usize {
        self.spans.iter().map(|span| text_width(&span.text)).sum()
    }

    /// Cut to `width` columns, with `…` where something was cut.
    fn fit(self, width: usize) -> Line {
        if self.width() <= width {
            return self;
        }
        if width == 0 {
            return Line::default();
        }
        let mut left = width - 1; // for the mark
        let mut spans = Vec::new();
        for span in self.spans {
            let mut text = String::new();
            let mut whole = true;
            for c in span.text.chars() {
                let w = char_width(c);
                if w > left {
                    whole = false;
                    break;
                }
                text.push(c);
                left -= w;
            }
            if !text.is_empty() {
                spans.push(Span {
                    text,
                    tone: span.tone,
                });
            }
            if !whole {
                break;
            }
        }
        match spans.last_mut() {
            Some(last) => last.text.push('…'),
            None => spans.push(Span {
                text: "…".to_owned(),
                tone: Tone::Plain,
            }),
        }
        Line { spans }
    }
}

/// A column of the workers' table.
struct Column {
    title: &'static str,
    width: usize,
    right: bool,
}

const fn column(title: &'static str, width: usize, right: bool) -> Column {
    Column {
        title,
        width,
        right,
    }
}

/// Everything but the status text, which takes what is left of the line.
const COLUMNS: [Column; 10] = [
    column("ID", 6, true),
    column("SLOT", 4, true),
    column("GEN", 3, true),
    column("PID", 8, true),
    column("STATE", 8, false),
    column("UPTIME", 7, true),
    column("RESTARTS", 8, true),
    column("CPU%", 6, true),
    column("RSS", 9, true),
    column("LAST EXIT", 28, false),
];
const GAP: &str = "  ";

/// Lines the events pane keeps for itself when the table is too long for the terminal.
const EVENTS_MIN: usize = 4;

/// The whole screen: at most `height` lines of at most `width` columns.
///
/// `now` is the time in seconds since the Unix epoch (the clock of [`EventRecord::time`]).
pub(crate) fn render(model: &Model, now: f64, width: usize, height: usize) -> Vec<Line> {
    let mut top = header(model);
    top.push(Line::default());
    top.push(table_heading(width));
    let table_start = top.len();
    for pool in &model.status.pools {
        top.push(pool_line(pool));
        top.extend(pool.workers.iter().map(worker_line));
        top.extend(pool.waiting.iter().map(waiting_line));
    }
    if model.status.pools.is_empty() {
        top.push(dim("  no pools"));
    }

    // The table gives way to a few lines of events, and says what it leaves out.
    let room = if height >= table_start + 1 + EVENTS_MIN + 2 {
        height - EVENTS_MIN
    } else {
        height
    };
    if top.len() > room && room > 0 {
        let hidden = top.len() - (room - 1);
        top.truncate(room - 1);
        top.push(dim(&format!(
            "  … {hidden} more lines: make the terminal taller"
        )));
    }

    let mut lines = top;
    if height > lines.len() + 1 {
        lines.push(Line::default());
        let mut title = Line::default();
        title.push("Recent events", Tone::Bold);
        if let Some(problem) = &model.events_problem {
            title.push(format!("  (reconnecting: {})", clean(problem)), Tone::Dim);
        }
        lines.push(title);
        let room = height - lines.len();
        if model.events.is_empty() {
            if room > 0 && model.events_problem.is_none() {
                lines.push(dim("  none yet"));
            }
        } else {
            lines.extend(
                model
                    .events
                    .iter()
                    .rev()
                    .take(room)
                    .map(|e| event_line(e, now)),
            );
        }
    }
    lines.truncate(height);
    lines.into_iter().map(|line| line.fit(width)).collect()
}

fn header(model: &Model) -> Vec<Line> {
    let status = &model.status;
    let mut first = Line::default();
    first
        .push("ustad ", Tone::Bold)
        .push(clean(&status.name), Tone::Bold)
        .plain(format!("  pid {}", status.pid))
        .plain(format!("  up {}", duration(status.uptime_secs)))
        .plain(format!("  {}", count(status.pools.len(), "pool", "pools")))
        .plain("  workers ");
    let (ready, size, live) = status.pools.iter().fold((0, 0, 0), |(r, s, l), pool| {
        (r + pool.ready, s + pool.size, l + pool.workers.len())
    });
    first.push(format!("{ready}/{size} ready"), readiness(ready, size));
    if live != size {
        first.plain(format!(" ({live} running)"));
    }
    if status.shutting_down {
        first.push("  shutting down", Tone::Bad);
    }

    let mut second = Line::default();
    match &status.config_file {
        Some(path) => second.push(
            format!("config {}", clean(&path.display().to_string())),
            Tone::Dim,
        ),
        None => second.push("no config file", Tone::Dim),
    };
    second.push("  ·  q quit", Tone::Dim);

    let mut lines = vec![first, second];
    if let Some(gone) = model.gone {
        let mut line = Line::default();
        line.push(
            format!("ustad (pid {}) is gone; q to leave", gone.pid),
            Tone::Bad,
        );
        lines.push(line);
    } else if let Some(problem) = &model.problem {
        let mut line = Line::default();
        line.push(format!("no answer: {}", clean(problem)), Tone::Warn);
        lines.push(line);
    }
    lines
}

fn table_heading(width: usize) -> Line {
    let mut text = String::new();
    for column in &COLUMNS {
        text.push_str(&align(column.title, column.width, column.right));
        text.push_str(GAP);
    }
    text.push_str("STATUS");
    // Full width, so that the heading reads as a bar.
    let pad = width.saturating_sub(text_width(&text));
    text.extend(std::iter::repeat_n(' ', pad));
    let mut line = Line::default();
    line.push(text, Tone::Heading);
    line
}

fn pool_line(pool: &PoolStatus) -> Line {
    let mut line = Line::default();
    line.push(clean(&pool.name), Tone::Accent)
        .plain("  ")
        .push(
            format!("{}/{} ready", pool.ready, pool.size),
            readiness(pool.ready, pool.size),
        )
        .plain(format!(
            "  size {}  generation {}",
            pool.size, pool.generation
        ));
    if pool.done {
        line.push("  done", Tone::Good);
    }
    if !pool.waiting_for.is_empty() {
        let on: Vec<String> = pool.waiting_for.iter().map(|p| clean(p)).collect();
        line.push(format!("  waiting for {}", on.join(", ")), Tone::Warn);
    }
    if let Some(hook) = &pool.before_start {
        let tone = match hook.running_secs {
            Some(_) => Tone::Warn,
            None => Tone::Bad,
        };
        line.push(format!("  {}", clean(&hook.describe())), tone);
    }
    if let Some(rollout) = &pool.rollout {
        line.push(
            format!(
                "  rolling out generation {}: {}/{} replaced, {}",
                rollout.generation,
                rollout.replaced,
                rollout.size,
                duration(rollout.elapsed_secs)
            ),
            Tone::Warn,
        );
    }
    let restarts: u64 = pool.restarts.values().sum();
    line.plain(format!("  restarts {restarts}"));
    if restarts > 0 {
        let reasons: Vec<String> = pool
            .restarts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{} {n}", clean(reason)))
            .collect();
        line.push(format!(" ({})", reasons.join(", ")), Tone::Dim);
    }
    line
}

fn worker_line(worker: &WorkerStatus) -> Line {
    let state_tone = match worker.state {
        WorkerState::Starting => Tone::Warn,
        WorkerState::Ready => Tone::Good,
        WorkerState::Stopping => Tone::Bad,
    };
    let last_exit = worker.last_exit.as_ref().map_or_else(
        || ("-".to_owned(), Tone::Dim),
        |exit| {
            let tone = if exit_was_trouble(&exit.reason) {
                Tone::Bad
            } else {
                Tone::Plain
            };
            let text = format!(
                "{}: {}, {} ago",
                clean(&exit.reason),
                clean(&exit.status),
                ago(exit.secs_ago)
            );
            (text, tone)
        },
    );
    // During a rollout, the generation tells old workers from new ones.
    let cells: [(String, Tone); 10] = [
        (worker.id.to_string(), Tone::Plain),
        (worker.slot.to_string(), Tone::Plain),
        (worker.generation.to_string(), Tone::Plain),
        (or_dash(worker.pid), Tone::Plain),
        (worker.state.as_str().to_owned(), state_tone),
        (duration(worker.uptime_secs), Tone::Plain),
        (worker.restarts.to_string(), Tone::Plain),
        (
            worker
                .cpu_percent
                .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}")),
            Tone::Plain,
        ),
        (
            worker.rss_bytes.map_or_else(|| "-".to_owned(), bytes),
            Tone::Plain,
        ),
        last_exit,
    ];
    let mut line = Line::default();
    for (column, (text, tone)) in COLUMNS.iter().zip(cells) {
        line.push(align(&text, column.width, column.right), tone)
            .plain(GAP);
    }
    if let Some(reason) = &worker.stop_reason {
        line.push(format!("stopping for {}", clean(reason)), Tone::Warn);
        if worker.status.is_some() {
            line.plain(" · ");
        }
    }
    if let Some(status) = &worker.status {
        line.plain(clean(status));
    }
    line
}

/// An empty slot that waits for its next attempt: in the slot column, with why in the status
/// text (`backoff: 3 failed starts, next in 4s`).
fn waiting_line(waiting: &WaitingSlot) -> Line {
    let mut line = Line::default();
    for (index, column) in COLUMNS.iter().enumerate() {
        let text = match index {
            1 => waiting.slot.to_string(),
            4 => "empty".to_owned(),
            _ => "-".to_owned(),
        };
        let tone = if index == 4 { Tone::Bad } else { Tone::Dim };
        line.push(align(&text, column.width, column.right), tone)
            .plain(GAP);
    }
    let why = match waiting.next_attempt_secs.filter(|_| !waiting.stopped) {
        None => "stopped by an operator: restart or scale the pool to refill it".to_owned(),
        Some(next) => {
            let next = duration(next);
            match waiting.failures {
                0 => format!("restart in {next}"),
                1 => format!("backoff: 1 failed start, next in {next}"),
                n => format!("backoff: {n} failed starts, next in {next}"),
            }
        }
    };
    line.push(why, Tone::Warn);
    if let Some(exit) = &waiting.last_exit {
        line.plain(format!(
            " · last: {}: {}, {} ago",
            clean(&exit.reason),
            clean(&exit.status),
            ago(exit.secs_ago)
        ));
    }
    line
}

/// The event's message names its worker (`web.1 (id 4, pid 1234) ready`), so no column
/// repeats pool and id.
fn event_line(event: &EventRecord, now: f64) -> Line {
    let mut line = Line::default();
    line.push(align(&ago(now - event.time), 5, true), Tone::Dim)
        .plain(GAP)
        .push(
            align(&clean(&event.event), 17, false),
            event_tone(&event.event),
        )
        .plain(GAP)
        .plain(clean(&event.message));
    line
}

fn event_tone(event: &str) -> Tone {
    match event {
        "spawn_failed" | "killed" | "hung" | "over_memory" | "rollout_aborted" | "guard_lost"
        | "notify_error" | "notify_rejected" | "reload_failed" | "orphan" | "refused" => Tone::Bad,
        "exited" | "stopping" | "restart_scheduled" | "replace_abandoned" | "shutdown" => {
            Tone::Warn
        }
        "ready" | "rollout_finished" | "listening" => Tone::Good,
        _ => Tone::Plain,
    }
}

/// Whether a slot's previous worker ended by failing, rather than being replaced on purpose.
fn exit_was_trouble(reason: &str) -> bool {
    matches!(
        reason,
        "crash" | "memory" | "watchdog" | "ready_timeout" | "spawn_failed"
    )
}

fn readiness(ready: usize, size: usize) -> Tone {
    if ready >= size {
        Tone::Good
    } else if ready == 0 {
        Tone::Bad
    } else {
        Tone::Warn
    }
}

fn dim(text: &str) -> Line {
    let mut line = Line::default();
    line.push(text, Tone::Dim);
    line
}

fn or_dash(value: Option<u32>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `text` padded (or cut) to exactly `width` columns.
fn align(text: &str, width: usize, right: bool) -> String {
    let text = truncate(text, width);
    let pad = " ".repeat(width - text_width(&text));
    if right { pad + &text } else { text + &pad }
}

/// At most `width` columns of `text`, ending in `…` when cut.
fn truncate(text: &str, width: usize) -> String {
    if text_width(text) <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = char_width(c);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    if used < width {
        out.push('…');
    }
    out
}

/// Text from outside made safe to print: control characters (escape sequences, newlines)
/// become `�`, tabs spaces.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect()
}

fn text_width(text: &str) -> usize {
    text.chars().map(char_width).sum()
}

/// Columns a character takes: 2 for the wide East Asian ranges and most emoji, 0 for
/// combining marks, 1 otherwise. An approximation that keeps the common cases aligned without
/// a Unicode table; the painter turns line wrapping off, so a miss cannot spill over.
fn char_width(c: char) -> usize {
    match c as u32 {
        0x0300..=0x036F | 0x200B..=0x200F | 0xFE00..=0xFE0F => 0,
        0x1100..=0x115F
        | 0x2E80..=0x303E
        | 0x3041..=0x33FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F300..=0x1F64F
        | 0x1F900..=0x1F9FF
        | 0x20000..=0x3FFFD => 2,
        _ => 1,
    }
}

/// `now`, `12s`, `3m`, `2h`, `4d`: how long ago, to one unit.
fn ago(secs: f64) -> String {
    let secs = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match secs {
        0 => "now".to_owned(),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Instant;

    use ustad_core::status::{ClusterStatus, LastExitStatus, RolloutStatus};

    use super::super::model::tests::{event, status};
    use super::super::model::{Gone, Model};
    use super::*;

    fn worker(id: u64, slot: usize, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            uptime_secs: 75.0,
            cpu_percent: Some(1.25),
            cpu_seconds: Some(0.5),
            rss_bytes: Some(12_900_000),
            ..WorkerStatus::fixture(id, slot, state)
        }
    }

    fn cluster() -> ClusterStatus {
        let mut web_1 = worker(7, 1, WorkerState::Ready);
        web_1.restarts = 2;
        web_1.status = Some("serving\x1b[2J 12 req/s".into());
        web_1.last_exit = Some(LastExitStatus {
            status: "exit code 1".into(),
            reason: "crash".into(),
            secs_ago: 30.0,
        });
        let mut old = worker(3, 1, WorkerState::Stopping);
        old.stop_reason = Some("rollout".into());
        let web = PoolStatus {
            name: "web".into(),
            size: 2,
            ready: 2,
            generation: 2,
            rollout: Some(RolloutStatus {
                generation: 2,
                replaced: 1,
                size: 2,
                elapsed_secs: 4.0,
            }),
            restarts: BTreeMap::from([("crash".to_owned(), 2), ("rollout".to_owned(), 1)]),
            workers: vec![worker(5, 0, WorkerState::Ready), old, web_1],
            waiting: Vec::new(),
            waiting_for: Vec::new(),
            done: false,
            before_start: None,
        };
        let jobs = PoolStatus {
            name: "jobs".into(),
            size: 1,
            ready: 0,
            generation: 1,
            rollout: None,
            restarts: BTreeMap::new(),
            workers: vec![worker(6, 0, WorkerState::Starting)],
            waiting: Vec::new(),
            waiting_for: Vec::new(),
            done: false,
            before_start: None,
        };
        ClusterStatus {
            name: "shop".into(),
            pid: 4242,
            uptime_secs: 3725.0,
            config_file: Some(PathBuf::from("/srv/shop/ustad.toml")),
            shutting_down: false,
            pools: vec![web, jobs],
            version: String::new(),
            upgrade: None,
        }
    }

    fn texts(lines: &[Line]) -> Vec<String> {
        lines.iter().map(Line::text).collect()
    }

    fn find<'a>(lines: &'a [Line], needle: &str) -> &'a Line {
        lines
            .iter()
            .find(|line| line.text().contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in {:#?}", texts(lines)))
    }

    fn tone_of(line: &Line, text: &str) -> Tone {
        line.spans
            .iter()
            .find(|span| span.text.contains(text))
            .unwrap_or_else(|| panic!("no span {text:?} in {line:?}"))
            .tone
    }

    #[test]
    fn the_header_sums_up_the_cluster() {
        let model = Model::new(cluster());
        let lines = render(&model, 0.0, 160, 40);
        let first = lines[0].text();
        assert_eq!(
            first,
            "ustad shop  pid 4242  up 1h02m  2 pools  workers 2/3 ready (4 running)"
        );
        assert_eq!(tone_of(&lines[0], "2/3 ready"), Tone::Warn);
        assert_eq!(lines[1].text(), "config /srv/shop/ustad.toml  ·  q quit");
    }

    #[test]
    fn an_empty_slot_says_it_backs_off_and_when_it_is_tried_again() {
        let mut status = cluster();
        status.pools[1].size = 2;
        status.pools[1].waiting = vec![WaitingSlot {
            slot: 1,
            failures: 3,
            next_attempt_secs: Some(4.2),
            stopped: false,
            last_exit: Some(LastExitStatus {
                status: "exit code 1".into(),
                reason: "crash".into(),
                secs_ago: 2.0,
            }),
        }];
        let lines = render(&Model::new(status), 0.0, 220, 40);
        let row = find(&lines, "backoff");
        assert!(
            row.text().ends_with(
                "backoff: 3 failed starts, next in 4s · last: crash: exit code 1, 2s ago"
            ),
            "{}",
            row.text()
        );
        assert_eq!(tone_of(row, "empty"), Tone::Bad);
        assert_eq!(tone_of(row, "backoff"), Tone::Warn);
        // Under its pool, after its workers.
        let jobs = lines
            .iter()
            .position(|l| l.text().starts_with("jobs"))
            .unwrap();
        let waiting = lines
            .iter()
            .position(|l| l.text().contains("backoff"))
            .unwrap();
        assert!(jobs < waiting);
    }

    #[test]
    fn pools_and_workers_line_up_under_the_heading() {
        let model = Model::new(cluster());
        let lines = render(&model, 0.0, 160, 40);
        let heading = find(&lines, "RESTARTS");
        assert_eq!(heading.text().len(), 160, "the heading spans the width");
        assert!(heading.text().starts_with(
            "    ID  SLOT  GEN       PID  STATE      UPTIME  RESTARTS    CPU%        RSS  LAST EXIT                     STATUS"
        ));

        let pool = find(&lines, "web  ");
        assert_eq!(
            pool.text(),
            "web  2/2 ready  size 2  generation 2  rolling out generation 2: 1/2 replaced, 4s  restarts 3 (crash 2, rollout 1)"
        );
        assert_eq!(tone_of(pool, "ready"), Tone::Good);
        assert_eq!(tone_of(pool, "rolling out"), Tone::Warn);

        let row = find(&lines, "1007");
        assert_eq!(
            row.text(),
            "     7     1    1      1007  ready       1m15s         2     1.2   12.3 MiB  crash: exit code 1, 30s ago   serving\u{FFFD}[2J 12 req/s"
        );
        assert_eq!(tone_of(row, "ready"), Tone::Good);
        assert_eq!(tone_of(row, "crash"), Tone::Bad);
        let status_column = heading.text().find("STATUS").unwrap();
        assert_eq!(row.text().find("serving"), Some(status_column));

        let stopping = find(&lines, "1003");
        assert!(
            stopping
                .spans
                .iter()
                .any(|span| span.text == "stopping" && span.tone == Tone::Bad),
            "{stopping:?}"
        );
        assert!(stopping.text().ends_with("stopping for rollout"));
        assert_eq!(tone_of(find(&lines, "1006"), "starting"), Tone::Warn);
        assert_eq!(tone_of(find(&lines, "jobs"), "0/1 ready"), Tone::Bad);

        // Workers follow their pool.
        let order: Vec<usize> = ["web  ", "1005", "1003", "1007", "jobs", "1006"]
            .iter()
            .map(|needle| {
                lines
                    .iter()
                    .position(|l| l.text().contains(needle))
                    .unwrap()
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }

    #[test]
    fn recent_events_come_newest_first_with_their_age() {
        let mut model = Model::new(cluster());
        let now = Instant::now();
        for (time, name) in [(100.0, "spawned"), (101.5, "ready"), (102.0, "exited")] {
            model.apply(super::super::model::Update::Event(event(time, name)), now);
        }
        let lines = render(&model, 110.0, 160, 40);
        let title = lines
            .iter()
            .position(|l| l.text() == "Recent events")
            .unwrap();
        assert_eq!(
            texts(&lines[title + 1..]),
            [
                "   8s  exited             worker exited",
                "   8s  ready              worker ready",
                "  10s  spawned            worker spawned",
            ]
        );
        assert_eq!(tone_of(&lines[title + 1], "exited"), Tone::Warn);
        assert_eq!(tone_of(&lines[title + 2], "ready"), Tone::Good);
    }

    #[test]
    fn a_small_terminal_keeps_room_for_events_and_says_what_it_cut() {
        let mut many = cluster();
        many.pools[0].workers = (0..30)
            .map(|i| worker(100 + i, i as usize, WorkerState::Ready))
            .collect();
        let mut model = Model::new(many);
        model.apply(
            super::super::model::Update::Event(event(1.0, "ready")),
            Instant::now(),
        );
        let lines = render(&model, 2.0, 60, 20);
        // The table up to the cut, a blank line, the title, the one event.
        assert_eq!(lines.len(), 19);
        assert!(
            lines.iter().all(|line| line.width() <= 60),
            "{:#?}",
            texts(&lines)
        );
        let more = find(&lines, "more lines");
        assert!(more.text().starts_with("  … "), "{}", more.text());
        assert!(find(&lines, "Recent events").text().len() < 60);
        assert!(lines.last().unwrap().text().contains("worker ready"));
    }

    #[test]
    fn lines_are_cut_to_the_width_with_a_mark() {
        let model = Model::new(cluster());
        for width in [1, 2, 10, 40, 79] {
            for line in render(&model, 0.0, width, 40) {
                assert!(line.width() <= width, "{width}: {:?}", line.text());
            }
        }
        let lines = render(&model, 0.0, 20, 40);
        assert_eq!(lines[0].text(), "ustad shop  pid 424…");
        assert!(render(&model, 0.0, 0, 0).is_empty());
    }

    #[test]
    fn a_gone_primary_and_failed_requests_are_said() {
        let mut model = Model::new(cluster());
        model.problem = Some("timed out".into());
        let lines = render(&model, 0.0, 160, 40);
        assert_eq!(lines[2].text(), "no answer: timed out");
        assert_eq!(tone_of(&lines[2], "no answer"), Tone::Warn);

        model.gone = Some(Gone {
            pid: 4242,
            since: Instant::now(),
        });
        model.events_problem = Some("connection refused".into());
        let lines = render(&model, 0.0, 160, 40);
        assert_eq!(lines[2].text(), "ustad (pid 4242) is gone; q to leave");
        assert_eq!(tone_of(&lines[2], "gone"), Tone::Bad);
        assert_eq!(
            find(&lines, "Recent events").text(),
            "Recent events  (reconnecting: connection refused)"
        );
    }

    #[test]
    fn an_empty_cluster_says_so() {
        let lines = render(&Model::new(status(9)), 0.0, 80, 24);
        let text = texts(&lines);
        assert!(text.contains(&"  no pools".to_owned()), "{text:#?}");
        assert!(text.contains(&"  none yet".to_owned()), "{text:#?}");
        assert_eq!(
            text[0],
            "ustad demo  pid 9  up 10s  0 pools  workers 0/0 ready"
        );
    }

    #[test]
    fn units_for_people() {
        assert_eq!(ago(-3.0), "now");
        assert_eq!(ago(12.7), "12s");
        assert_eq!(ago(600.0), "10m");
    }

    #[test]
    fn outside_text_cannot_drive_the_terminal_and_wide_text_is_measured() {
        assert_eq!(
            clean("a\tb\x1b]0;x\x07\nc"),
            "a b\u{FFFD}]0;x\u{FFFD}\u{FFFD}c"
        );
        assert_eq!(text_width("日本"), 4);
        assert_eq!(truncate("日本語", 5), "日本…");
        assert_eq!(truncate("abcdef", 3), "ab…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(align("7", 3, true), "  7");
        assert_eq!(align("toolong", 4, false), "too…");
    }
}
