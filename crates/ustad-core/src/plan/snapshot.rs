//! The plan as a document: everything it knows (pools, slots, generations, each worker's id,
//! pid, phase and deadlines, backoff, TTL and memory counters, scaled sizes, rollouts,
//! `before_start` runs), written by one primary and read back by the next, so that ustad can
//! replace its own program without touching a worker.
//!
//! A document starts with its [`STATE_VERSION`]; a program refuses a version it does not know
//! before anything else is read, so an upgrade to a program that cannot carry on is refused
//! while nothing has changed yet.
//!
//! Times are the one thing that cannot be written as they are: an `Instant` means nothing
//! outside its process. Every instant is written as a point of `CLOCK_MONOTONIC` (the clock
//! behind `Instant` on Linux, the same for every process until the machine reboots), through
//! a [`Clock`] read once for the whole document, and read back against the new program's
//! clock: a deadline keeps its moment across the exec, and the time the exec took counts as
//! time passed, as it did.

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::Plan;

/// The version of the document [`Plan::snapshot`] writes and [`Plan::restore`] reads.
pub const STATE_VERSION: u32 = 1;

/// One reading of both clocks, which maps instants to `CLOCK_MONOTONIC` and back.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    monotonic_ns: i64,
}

impl Clock {
    /// The clocks now.
    pub fn now() -> Clock {
        let instant = Instant::now();
        let micros = crate::sys::monotonic_usec();
        Clock {
            instant,
            monotonic_ns: i64::try_from(micros.saturating_mul(1_000)).unwrap_or(i64::MAX),
        }
    }

    /// A clock that reads `monotonic_ns` at `instant`: tests write and read documents with
    /// one, so that every instant reads back exactly.
    pub fn at(instant: Instant, monotonic_ns: i64) -> Clock {
        Clock {
            instant,
            monotonic_ns,
        }
    }

    pub(crate) fn to_monotonic(self, at: Instant) -> i64 {
        let signed = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        match at.checked_duration_since(self.instant) {
            Some(after) => self.monotonic_ns.saturating_add(signed(after)),
            None => self
                .monotonic_ns
                .saturating_sub(signed(self.instant.duration_since(at))),
        }
    }

    pub(crate) fn to_instant(self, monotonic_ns: i64) -> Option<Instant> {
        let offset = monotonic_ns.checked_sub(self.monotonic_ns)?;
        let magnitude = Duration::from_nanos(offset.unsigned_abs());
        if offset >= 0 {
            self.instant.checked_add(magnitude)
        } else {
            self.instant.checked_sub(magnitude)
        }
    }
}

thread_local! {
    /// The clock of the document being written or read on this thread.
    static CLOCK: Cell<Option<Clock>> = const { Cell::new(None) };
}

/// Runs `f` with `clock` as the document's clock.
fn with_clock<T>(clock: Clock, f: impl FnOnce() -> T) -> T {
    let previous = CLOCK.replace(Some(clock));
    let result = f();
    CLOCK.set(previous);
    result
}

/// An instant in a document: its point of `CLOCK_MONOTONIC`, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mono(pub(super) Instant);

impl Serialize for Mono {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let clock = CLOCK
            .get()
            .ok_or_else(|| serde::ser::Error::custom("an instant written without a clock"))?;
        clock.to_monotonic(self.0).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Mono {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Mono, D::Error> {
        let monotonic_ns = i64::deserialize(deserializer)?;
        let clock = CLOCK
            .get()
            .ok_or_else(|| de::Error::custom("an instant read without a clock"))?;
        clock
            .to_instant(monotonic_ns)
            .map(Mono)
            .ok_or_else(|| de::Error::custom(format!("instant {monotonic_ns} ns out of range")))
    }
}

/// An `Instant` field.
pub(super) mod mono {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(at: &Instant, serializer: S) -> Result<S::Ok, S::Error> {
        Mono(*at).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Instant, D::Error> {
        Ok(Mono::deserialize(deserializer)?.0)
    }
}

/// An `Option<Instant>` field.
pub(super) mod mono_opt {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        at: &Option<Instant>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        at.map(Mono).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Instant>, D::Error> {
        Ok(Option::<Mono>::deserialize(deserializer)?.map(|at| at.0))
    }
}

/// An `Option<(Instant, T)>` field: a moment and what happened then.
pub(super) mod mono_with {
    use super::*;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(
        value: &Option<(Instant, T)>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .as_ref()
            .map(|(at, what)| (Mono(*at), what))
            .serialize(serializer)
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<(Instant, T)>, D::Error> {
        Ok(Option::<(Mono, T)>::deserialize(deserializer)?.map(|(at, what)| (at.0, what)))
    }
}

/// Why a document was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Written by a program whose document this one does not know.
    #[error(
        "ustad's state version {found} is not one this program knows (it reads version {STATE_VERSION})"
    )]
    Version {
        /// The document's version.
        found: u32,
    },
    /// Not a document of a known shape.
    #[error("ustad's state cannot be read: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct Written<'a> {
    version: u32,
    plan: &'a Plan,
}

#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

#[derive(Deserialize)]
struct Read {
    plan: Plan,
}

impl Plan {
    /// The plan as a document (JSON), its instants read with `clock`.
    ///
    /// # Errors
    /// Only if a value cannot be written (it cannot: every field has a form).
    pub fn snapshot(&self, clock: Clock) -> Result<String, String> {
        with_clock(clock, || {
            serde_json::to_string(&Written {
                version: STATE_VERSION,
                plan: self,
            })
        })
        .map_err(|error| format!("cannot write ustad's state: {error}"))
    }

    /// The plan a document describes, its instants read with `clock`. Its version is checked
    /// before anything else.
    ///
    /// # Errors
    /// An unknown version, or a document that does not read.
    pub fn restore(document: &str, clock: Clock) -> Result<Plan, RestoreError> {
        let versioned: Versioned = serde_json::from_str(document)
            .map_err(|error| RestoreError::Malformed(error.to_string()))?;
        if versioned.version != STATE_VERSION {
            return Err(RestoreError::Version {
                found: versioned.version,
            });
        }
        with_clock(clock, || serde_json::from_str::<Read>(document))
            .map(|read| read.plan)
            .map_err(|error| RestoreError::Malformed(error.to_string()))
    }
}
