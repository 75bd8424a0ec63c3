//! The recent output of the workers, kept by the primary for `ustad logs`: a bounded ring of
//! lines per pool, and a broadcast of new lines for `ustad logs -f`.
//!
//! Bounded in lines and in bytes per pool, so a chatty pool cannot grow the primary (lines
//! are at most `output::MAX_LINE` bytes each); a follower that falls behind the broadcast
//! misses lines and is told how many, rather than being buffered for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::control::protocol::LogLine;

/// Lines kept per pool.
pub const LINES_PER_POOL: usize = 1000;
/// Bytes of text kept per pool.
pub const BYTES_PER_POOL: usize = 256 * 1024;
/// Lines a follower may lag behind before it misses some.
const FOLLOW_QUEUE: usize = 1024;

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<Arc<LogLine>>,
    bytes: usize,
}

/// Shared between the output relay (which writes) and the control server (which reads).
#[derive(Debug, Clone)]
pub struct LogBook {
    rings: Arc<Mutex<HashMap<String, Ring>>>,
    new_lines: broadcast::Sender<Arc<LogLine>>,
}

impl Default for LogBook {
    fn default() -> Self {
        LogBook {
            rings: Arc::default(),
            new_lines: broadcast::channel(FOLLOW_QUEUE).0,
        }
    }
}

impl LogBook {
    /// Keeps a line, dropping the oldest of its pool beyond the bounds, and broadcasts it.
    pub fn record(&self, line: LogLine) {
        let line = Arc::new(line);
        {
            let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
            // The pool's name is copied once, for its first line.
            let ring = match rings.get_mut(&line.pool) {
                Some(ring) => ring,
                None => rings.entry(line.pool.clone()).or_default(),
            };
            ring.bytes += line.line.len();
            ring.lines.push_back(line.clone());
            while ring.lines.len() > LINES_PER_POOL || ring.bytes > BYTES_PER_POOL {
                let Some(old) = ring.lines.pop_front() else {
                    break;
                };
                ring.bytes -= old.line.len();
            }
        }
        // No follower is not an error.
        let _ = self.new_lines.send(line);
    }

    /// The last `count` lines of `pool` (or of every pool, interleaved by time), oldest first.
    pub fn recent(&self, pool: Option<&str>, count: usize) -> Vec<Arc<LogLine>> {
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<Arc<LogLine>> = rings
            .iter()
            .filter(|(name, _)| pool.is_none_or(|p| p == name.as_str()))
            .flat_map(|(_, ring)| {
                let skip = ring.lines.len().saturating_sub(count);
                ring.lines.iter().skip(skip).cloned()
            })
            .collect();
        // Stable: lines of one pool with the same time keep their order.
        lines.sort_by(|a, b| a.time.total_cmp(&b.time));
        let skip = lines.len().saturating_sub(count);
        lines.split_off(skip)
    }

    /// New lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.new_lines.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(pool: &str, time: f64, text: &str) -> LogLine {
        LogLine {
            time,
            pool: pool.into(),
            slot: 0,
            id: 1,
            stream: "stdout".into(),
            line: text.into(),
        }
    }

    #[test]
    fn recent_lines_by_pool_and_interleaved() {
        let book = LogBook::default();
        book.record(line("web", 1.0, "w1"));
        book.record(line("jobs", 2.0, "j1"));
        book.record(line("web", 3.0, "w2"));
        let text =
            |lines: Vec<Arc<LogLine>>| lines.iter().map(|l| l.line.clone()).collect::<Vec<_>>();
        assert_eq!(text(book.recent(None, 10)), ["w1", "j1", "w2"]);
        assert_eq!(text(book.recent(None, 2)), ["j1", "w2"]);
        assert_eq!(text(book.recent(Some("web"), 10)), ["w1", "w2"]);
        assert!(book.recent(Some("cron"), 10).is_empty());
    }

    #[test]
    fn each_pool_is_bounded_in_lines_and_bytes() {
        let book = LogBook::default();
        for i in 0..LINES_PER_POOL + 10 {
            book.record(line("web", i as f64, "x"));
        }
        assert_eq!(book.recent(Some("web"), usize::MAX).len(), LINES_PER_POOL);
        let big = "y".repeat(8 * 1024);
        for i in 0..100 {
            book.record(line("jobs", i as f64, &big));
        }
        let kept = book.recent(Some("jobs"), usize::MAX);
        assert_eq!(kept.len(), BYTES_PER_POOL / big.len());
        assert_eq!(kept.last().unwrap().time, 99.0);
    }

    #[tokio::test]
    async fn followers_get_new_lines() {
        let book = LogBook::default();
        let mut follower = book.follow();
        book.record(line("web", 1.0, "hello"));
        assert_eq!(follower.recv().await.unwrap().line, "hello");
    }
}
