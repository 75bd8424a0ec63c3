//! Who this worker is: its pool, its unique id and its slot (`USTAD_POOL`, `USTAD_WORKER_ID`,
//! `USTAD_WORKER_INDEX`).

use std::ffi::OsStr;
use std::fmt;

use crate::vars::{USTAD_POOL, USTAD_WORKER_ID, USTAD_WORKER_INDEX};
use crate::{Error, env_str};

/// The identity ustad gives each worker process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pool: String,
    id: u64,
    index: usize,
}

impl Identity {
    /// Reads the identity from the environment; `None` when none of the three variables is set
    /// (the worker runs without ustad).
    ///
    /// # Errors
    ///
    /// [`Error::MissingEnv`] when one is set but another is missing; [`Error::InvalidEnv`] when
    /// the id or index is not a number.
    pub fn from_env() -> Result<Option<Identity>, Error> {
        parse_identity(
            std::env::var_os(USTAD_POOL).as_deref(),
            std::env::var_os(USTAD_WORKER_ID).as_deref(),
            std::env::var_os(USTAD_WORKER_INDEX).as_deref(),
        )
    }

    /// The pool's name, as in the configuration.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// This process's id, unique among all workers of one supervisor run and never reused; a
    /// replacement gets a new one.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This worker's slot in its pool, `0..size`; a replacement takes over the slot, so it
    /// suits per-slot resources (a port offset, a cache directory).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Formats as `pool[index]#id`, e.g. `web[2]#17`.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]#{}", self.pool, self.index, self.id)
    }
}

pub(crate) fn parse_identity(
    pool: Option<&OsStr>,
    id: Option<&OsStr>,
    index: Option<&OsStr>,
) -> Result<Option<Identity>, Error> {
    let (pool, id, index) = (
        env_str(USTAD_POOL, pool)?,
        env_str(USTAD_WORKER_ID, id)?,
        env_str(USTAD_WORKER_INDEX, index)?,
    );
    if pool.is_none() && id.is_none() && index.is_none() {
        return Ok(None);
    }
    let pool = required(USTAD_POOL, pool)?;
    let id = required(USTAD_WORKER_ID, id)?;
    let index = required(USTAD_WORKER_INDEX, index)?;
    Ok(Some(Identity {
        pool: pool.to_owned(),
        id: id
            .parse()
            .map_err(|_| Error::invalid_env(USTAD_WORKER_ID, id, "not a worker id"))?,
        index: index
            .parse()
            .map_err(|_| Error::invalid_env(USTAD_WORKER_INDEX, index, "not a slot index"))?,
    }))
}

fn required<'a>(var: &'static str, value: Option<&'a str>) -> Result<&'a str, Error> {
    value.ok_or(Error::MissingEnv {
        var,
        reason: "other USTAD_* identity variables are set",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        pool: Option<&str>,
        id: Option<&str>,
        index: Option<&str>,
    ) -> Result<Option<Identity>, Error> {
        parse_identity(
            pool.map(OsStr::new),
            id.map(OsStr::new),
            index.map(OsStr::new),
        )
    }

    fn invalid_var(result: Result<Option<Identity>, Error>) -> &'static str {
        match result {
            Err(Error::InvalidEnv { var, .. } | Error::MissingEnv { var, .. }) => var,
            other => panic!("expected InvalidEnv or MissingEnv, got {other:?}"),
        }
    }

    #[test]
    fn none_without_ustad() {
        assert_eq!(parse(None, None, None).unwrap(), None);
    }

    #[test]
    fn reads_all_three() {
        let identity = parse(Some("web"), Some("17"), Some("2")).unwrap().unwrap();
        assert_eq!(identity.pool(), "web");
        assert_eq!(identity.id(), 17);
        assert_eq!(identity.index(), 2);
        assert_eq!(identity.to_string(), "web[2]#17");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = parse(Some("web"), None, Some("0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "USTAD_WORKER_ID is unset, but other USTAD_* identity variables are set"
        );
    }

    #[test]
    fn partial_or_garbage_names_the_variable() {
        assert_eq!(invalid_var(parse(None, Some("1"), Some("0"))), USTAD_POOL);
        assert_eq!(
            invalid_var(parse(Some("web"), None, Some("0"))),
            USTAD_WORKER_ID
        );
        assert_eq!(
            invalid_var(parse(Some("web"), Some("1"), None)),
            USTAD_WORKER_INDEX
        );
        assert_eq!(
            invalid_var(parse(Some("web"), Some("x"), Some("0"))),
            USTAD_WORKER_ID
        );
        assert_eq!(
            invalid_var(parse(Some("web"), Some("-1"), Some("0"))),
            USTAD_WORKER_ID
        );
        assert_eq!(
            invalid_var(parse(Some("web"), Some("1"), Some("1.5"))),
            USTAD_WORKER_INDEX
        );
    }
}
