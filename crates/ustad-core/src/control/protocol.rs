//! The control protocol's messages. Documented for users and other languages in
//! `docs/control.md`; the field names here are that contract.
//!
//! One request per connection: the client writes one JSON object on one line; the primary
//! answers with JSON lines, the last of which is final (`status`, `done` or `error`), then
//! closes. `logs --follow` and `events` stream until the client hangs up.

use serde::{Deserialize, Serialize};

use crate::status::ClusterStatus;

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A snapshot of pools and workers. Answer: `status`.
    // `{}` rather than a unit variant, so that unknown fields are refused here too.
    Status {},
    /// A rolling restart. With a config file, it is re-read first and its differences applied
    /// (pools added, removed, changed); `pools` also rolls the named pools when unchanged.
    /// Answer: `done`, or with `wait`, `progress` lines until every roll finished, then `done`
    /// (or `error` when a roll stopped).
    Reload {
        /// Pools to roll even when their configuration is unchanged; empty: every pool.
        #[serde(default)]
        pools: Vec<String>,
        /// Answer only when the rolls are over.
        #[serde(default)]
        wait: bool,
    },
    /// Replace the primary's own program in place, keeping every worker (see
    /// `docs/design.md`, "Upgrading ustad itself"). The new binary is checked first; answer:
    /// `error` if it is refused or cannot be executed, otherwise none: the connection closes
    /// as the primary executes the new program, which then answers `status` with its
    /// `upgrade` record.
    Upgrade {
        /// The new program; by default the path the primary was started from.
        #[serde(default)]
        binary: Option<std::path::PathBuf>,
    },
    /// Grow or shrink a pool. Answer: `done`.
    Scale {
        /// The pool.
        pool: String,
        /// The new size.
        #[serde(default)]
        size: Option<usize>,
        /// Or a change of size (`+1`, `-1`).
        #[serde(default)]
        delta: Option<i64>,
    },
    /// Replace a pool's workers, or one worker, rolling. Answer: `done`.
    Restart {
        /// A pool.
        #[serde(default)]
        pool: Option<String>,
        /// Or a worker id.
        #[serde(default)]
        worker: Option<u64>,
    },
    /// Stop every worker gracefully, then exit. Answer: `done` once the stop has begun; the
    /// connection closes when the primary exits. With `worker`: stop that one worker gracefully
    /// and leave its slot empty until its pool is restarted or scaled (answer: `done`).
    Stop {
        /// Give workers this long (e.g. `"10s"`) instead of their `kill_timeout`.
        #[serde(default)]
        timeout: Option<String>,
        /// Only this worker (by id), not replaced.
        #[serde(default)]
        worker: Option<u64>,
    },
    /// Send a signal to the process groups of one worker, or of every worker of a pool. A
    /// worker the signal ends is replaced as any that dies. Answer: `done`.
    Kill {
        /// A pool.
        #[serde(default)]
        pool: Option<String>,
        /// Or a worker id.
        #[serde(default)]
        worker: Option<u64>,
        /// The signal's name (`SIGTERM`, `TERM`, `SIGUSR1`…) [default: SIGTERM].
        #[serde(default)]
        signal: Option<String>,
    },
    /// Recent output lines of the workers, then (with `follow`) new ones as they come.
    /// Answer: `log` lines, then `done` (without `follow`).
    Logs {
        /// One pool, or every pool.
        #[serde(default)]
        pool: Option<String>,
        /// How many recent lines (per request, across pools).
        #[serde(default = "default_lines")]
        lines: usize,
        /// Keep streaming.
        #[serde(default)]
        follow: bool,
    },
    /// Lifecycle events as they happen (what `ustad top` shows). Answer: `event` lines.
    Events {},
}

fn default_lines() -> usize {
    100
}

/// One line of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Final: the cluster's state.
    Status(ClusterStatus),
    /// Final: the request was carried out (or, for `reload --wait`, its rolls finished).
    Done {
        /// What happened, for people.
        message: String,
    },
    /// Final: the request was refused or failed.
    Error {
        /// What went wrong, for people.
        message: String,
    },
    /// One output line of a worker.
    Log(LogLine),
    /// A lifecycle event.
    Event(EventRecord),
    /// How far a `reload --wait` has come.
    Progress(Progress),
}

impl Reply {
    /// Whether this is the last line of an answer.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Reply::Status(_) | Reply::Done { .. } | Reply::Error { .. }
        )
    }

    /// A final error.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
        }
    }

    /// A final success.
    pub fn done(message: impl Into<String>) -> Reply {
        Reply::Done {
            message: message.into(),
        }
    }
}

/// One line a worker wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// The worker's pool.
    pub pool: String,
    /// Its slot.
    pub slot: usize,
    /// Its id.
    pub id: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text (invalid UTF-8 replaced).
    pub line: String,
}

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// What happened: `spawned`, `ready`, `exited`, `rollout_finished`… (as in the JSON log).
    pub event: String,
    /// The pool, when it concerns one.
    pub pool: Option<String>,
    /// The worker id, when it concerns one.
    pub id: Option<u64>,
    /// The worker's slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    /// The worker's pid, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The worker's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// `exited`: its exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// `exited`: the signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `exited`, `stopping`: why (`crash`, `rollout`, `ttl`, `operator`… as in the JSON log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The log message.
    pub message: String,
}

/// A pool's rolling restart, under way or over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The pool.
    pub pool: String,
    /// Workers replaced.
    pub replaced: usize,
    /// Workers to replace.
    pub size: usize,
    /// `rolling`, `finished` or `aborted`.
    pub state: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let parse = |text: &str| serde_json::from_str::<Request>(text);
        assert_eq!(
            parse(r#"{"command":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert_eq!(
            parse(r#"{"command":"scale","pool":"web","delta":-1}"#).unwrap(),
            Request::Scale {
                pool: "web".into(),
                size: None,
                delta: Some(-1)
            }
        );
        assert_eq!(
            parse(r#"{"command":"logs"}"#).unwrap(),
            Request::Logs {
                pool: None,
                lines: 100,
                follow: false
            }
        );
        assert!(parse(r#"{"command":"explode"}"#).is_err());
        assert!(parse(r#"{"command":"status","extra":1}"#).is_err());
    }

    #[test]
    fn replies_are_externally_tagged() {
        let line = serde_json::to_string(&Reply::done("scaled")).unwrap();
        assert_eq!(line, r#"{"done":{"message":"scaled"}}"#);
        assert!(Reply::error("no").is_final());
        let progress = Reply::Progress(Progress {
            pool: "web".into(),
            replaced: 1,
            size: 2,
            state: "rolling".into(),
        });
        assert!(!progress.is_final());
    }
}
