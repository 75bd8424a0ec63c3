//! `ustad status` as a table readable at a glance.

use std::fmt::Write as _;

use ustad_core::status::{ClusterStatus, WorkerState};

use crate::human::{bytes, duration as age};

/// What a line of the table shows.
#[derive(Debug, Clone, Copy)]
enum Line {
    /// A pool's summary.
    Pool,
    /// A worker.
    Worker(WorkerState),
    /// An empty slot waiting for its next attempt.
    Waiting,
}

/// How an empty slot waiting for its next attempt reads in the STATE column:
/// `backoff: 4 failed starts, next in 6s`.
pub(crate) fn waiting_state(waiting: &ustad_core::status::WaitingSlot) -> String {
    let Some(next) = waiting.next_attempt_secs.filter(|_| !waiting.stopped) else {
        return "empty: stopped by an operator".to_owned();
    };
    let next = age(next);
    match waiting.failures {
        0 => format!("empty, restart in {next}"),
        1 => format!("backoff: 1 failed start, next in {next}"),
        n => format!("backoff: {n} failed starts, next in {next}"),
    }
}

/// The whole table, ending with a newline.
/// `, ustad 0.2.0 (upgraded from 0.1.0 5m ago)`.
fn upgraded(version: &str, upgrade: &ustad_core::status::UpgradeStatus) -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |now| (now.as_secs_f64() - upgrade.time).max(0.0));
    let times = match upgrade.count {
        1 => String::new(),
        n => format!(", {n} upgrades"),
    };
    format!(
        ", ustad {version} (upgraded from {} {} ago{times})",
        upgrade.from,
        age(since)
    )
}

pub(crate) fn render(status: &ClusterStatus, color: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (pid {}), up {}{}{}{}",
        status.name,
        status.pid,
        age(status.uptime_secs),
        status
            .config_file
            .as_ref()
            .map(|p| format!(", config {}", p.display()))
            .unwrap_or_default(),
        status
            .upgrade
            .as_ref()
            .map(|upgrade| upgraded(&status.version, upgrade))
            .unwrap_or_default(),
        if status.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    let header = [
        "POOL",
        "ID",
        "SLOT",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "RSS",
        "LAST EXIT",
    ];
    let mut rows: Vec<[String; 10]> = Vec::new();
    let mut states: Vec<Line> = Vec::new();
    for pool in &status.pools {
        let mut summary = format!("{}/{} ready", pool.ready, pool.size);
        if pool.done {
            summary = "done: every worker exited 0".to_owned();
        }
        if !pool.waiting_for.is_empty() {
            let _ = write!(summary, ", waiting for {}", pool.waiting_for.join(", "));
        }
        if let Some(hook) = &pool.before_start {
            let _ = write!(summary, ", {}", hook.describe());
        }
        if let Some(rollout) = &pool.rollout {
            let _ = write!(
                summary,
                ", rolling to generation {}: {}/{}",
                rollout.generation, rollout.replaced, rollout.size
            );
        }
        let restarts: u64 = pool.restarts.values().sum();
        if restarts > 0 {
            let by: Vec<String> = pool
                .restarts
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let _ = write!(summary, ", {restarts} restarts ({})", by.join(", "));
        }
        rows.push([
            pool.name.clone(),
            summary,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        states.push(Line::Pool);
        for worker in &pool.workers {
            let state = match &worker.stop_reason {
                Some(reason) => format!("stopping ({reason})"),
                None => worker.state.as_str().to_owned(),
            };
            let last_exit = worker
                .last_exit
                .as_ref()
                .map(|exit| {
                    format!(
                        "{} ({}) {} ago",
                        exit.status,
                        exit.reason,
                        age(exit.secs_ago)
                    )
                })
                .unwrap_or_else(|| "-".to_owned());
            rows.push([
                String::new(),
                worker.id.to_string(),
                worker.slot.to_string(),
                worker.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                state,
                age(worker.uptime_secs),
                worker.restarts.to_string(),
                worker
                    .cpu_percent
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}%")),
                worker.rss_bytes.map_or_else(|| "-".to_owned(), bytes),
                last_exit,
            ]);
            states.push(Line::Worker(worker.state));
        }
        for waiting in &pool.waiting {
            rows.push([
                String::new(),
                "-".to_owned(),
                waiting.slot.to_string(),
                "-".to_owned(),
                waiting_state(waiting),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                waiting
                    .last_exit
                    .as_ref()
                    .map(|exit| {
                        format!(
                            "{} ({}) {} ago",
                            exit.status,
                            exit.reason,
                            age(exit.secs_ago)
                        )
                    })
                    .unwrap_or_else(|| "-".to_owned()),
            ]);
            states.push(Line::Waiting);
        }
    }
    // Pool summary lines span the columns after the pool's name.
    let mut widths = header.map(str::len);
    for row in &rows {
        if row[2].is_empty() && !row[0].is_empty() {
            widths[0] = widths[0].max(row[0].len());
            continue;
        }
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        text.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
    for (row, state) in rows.iter().zip(&states) {
        let text = match state {
            Line::Pool => format!("{:<width$}  {}", row[0], row[1], width = widths[0]),
            Line::Worker(_) | Line::Waiting => line(row),
        };
        let paint = match state {
            _ if !color => None,
            Line::Pool => Some("1"),
            Line::Worker(WorkerState::Ready) => None,
            Line::Worker(WorkerState::Starting) => Some("33"),
            Line::Worker(WorkerState::Stopping) => Some("2"),
            Line::Waiting => Some("31"),
        };
        match paint {
            Some(code) => {
                let _ = writeln!(out, "\x1b[{code}m{text}\x1b[0m");
            }
            None => {
                let _ = writeln!(out, "{text}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ustad_core::status::{LastExitStatus, PoolStatus, WaitingSlot, WorkerStatus};

    use super::*;

    #[test]
    fn a_table_with_a_pool_summary_and_its_workers() {
        let worker = |id, slot, state| WorkerStatus {
            uptime_secs: 65.0,
            restarts: 1,
            last_exit: Some(LastExitStatus {
                status: "SIGKILL".into(),
                reason: "crash".into(),
                secs_ago: 70.0,
            }),
            cpu_percent: Some(2.5),
            cpu_seconds: Some(1.0),
            rss_bytes: Some(10 << 20),
            ..WorkerStatus::fixture(id, slot, state)
        };
        let status = ClusterStatus {
            name: "shop".into(),
            pid: 42,
            uptime_secs: 3700.0,
            config_file: None,
            shutting_down: false,
            pools: vec![PoolStatus {
                name: "web".into(),
                size: 2,
                ready: 1,
                generation: 1,
                rollout: None,
                restarts: BTreeMap::from([("crash".to_owned(), 2)]),
                workers: vec![
                    worker(3, 0, WorkerState::Ready),
                    worker(4, 1, WorkerState::Starting),
                ],
                waiting: vec![WaitingSlot {
                    slot: 2,
                    failures: 4,
                    next_attempt_secs: Some(6.2),
                    stopped: false,
                    last_exit: Some(LastExitStatus {
                        status: "exit code 1".into(),
                        reason: "crash".into(),
                        secs_ago: 1.0,
                    }),
                }],
                waiting_for: Vec::new(),
                done: false,
                before_start: None,
            }],
            version: String::new(),
            upgrade: None,
        };
        let table = render(&status, false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "shop (pid 42), up 1h01m");
        assert!(lines[1].starts_with("POOL  ID  SLOT  PID   STATE"));
        assert_eq!(lines[2], "web   1/2 ready, 2 restarts (crash 2)");
        assert!(lines[3].contains("1003") && lines[3].contains("ready"));
        assert!(lines[3].contains("2.5%") && lines[3].contains("10.0 MiB"));
        assert!(lines[3].ends_with("SIGKILL (crash) 1m10s ago"));
        assert!(lines[4].contains("starting"));
        // An empty slot says why, and when it is tried again.
        assert!(
            lines[5].contains("backoff: 4 failed starts, next in 6s"),
            "{table}"
        );
        assert!(lines[5].ends_with("exit code 1 (crash) 1s ago"), "{table}");

        // After an upgrade of ustad itself, the first line says so.
        let mut upgraded = status.clone();
        upgraded.version = "0.2.0".into();
        upgraded.upgrade = Some(ustad_core::status::UpgradeStatus {
            count: 2,
            from: "0.1.0".into(),
            binary: "/usr/local/bin/ustad".into(),
            time: 0.0,
            switch_ms: 8.5,
            workers_kept: 2,
            workers_lost: 0,
        });
        let first = render(&upgraded, false);
        let first = first.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("shop (pid 42), up 1h01m, ustad 0.2.0 (upgraded from 0.1.0 ")
                && first.ends_with(" ago, 2 upgrades)"),
            "{first}"
        );
    }
}
