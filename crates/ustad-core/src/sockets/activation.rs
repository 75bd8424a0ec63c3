//! Sockets passed to the primary by its service manager (systemd socket activation), taken
//! instead of bound: the service manager then holds them across restarts of ustad itself, so
//! connections wait in their queues instead of being refused, and ustad needs no privilege to
//! listen on port 80.
//!
//! The protocol is `sd_listen_fds(3)`'s: `LISTEN_PID` is the pid the fds are meant for (any
//! other pid means "not for this process", as when the variables leaked from a parent),
//! `LISTEN_FDS` how many there are, from fd 3 on, and `LISTEN_FDNAMES` their names separated by
//! `:` (a socket unit's `FileDescriptorName=`, by default the unit's own name). Each fd is
//! matched by name to a `[sockets.NAME]` of the configuration.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Socket, Type};
use ustad_proto::env::{
    LISTEN_FDNAMES, LISTEN_FDNAMES_SEPARATOR, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID, UNNAMED_FD,
};

use super::store::{self, StoredSockets};
use crate::config::{Config, ListenAddr, SocketSpec};
use crate::sys;

/// The most fds ustad accepts from a service manager.
const MAX_LISTEN_FDS: usize = 4096;

/// The fds a service manager passed to this process, with their names; empty when it was not
/// socket-activated.
#[derive(Debug, Default)]
pub struct Activation {
    sockets: Vec<(String, OwnedFd)>,
}

/// Why the sockets passed by the service manager cannot be used. ustad does not start then:
/// a socket it ignored would still be held by the service manager, and connections to it
/// would wait forever instead of being refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// A `LISTEN_*` variable meant for this process (`LISTEN_PID` is its pid) is malformed.
    #[error("socket activation: {variable}={value:?} {why}")]
    Variable {
        /// `LISTEN_FDS` or `LISTEN_FDNAMES`.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A passed fd cannot serve as the socket it is named after.
    #[error("socket activation: fd {fd} (`{name}`) {why}")]
    Unusable {
        /// The fd number (3, 4, …).
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A passed fd's name matches no socket of the configuration.
    #[error(
        "socket activation: fd {fd} is named `{name}`{}, but the configuration has no socket of that name ({}); give each socket of the socket unit the name of a [sockets.NAME] with FileDescriptorName=",
        unnamed_hint(name),
        defined_sockets(defined)
    )]
    UnknownName {
        /// The fd number.
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
        /// The configuration's socket names.
        defined: Vec<String>,
    },
    /// Two passed fds have the same name.
    #[error(
        "socket activation: fds {first} and {second} are both named `{name}`; each [sockets.{name}] takes one socket"
    )]
    DuplicateName {
        /// The name.
        name: String,
        /// The first fd of that name.
        first: RawFd,
        /// The second one.
        second: RawFd,
    },
}

fn unnamed_hint(name: &str) -> &'static str {
    if name == UNNAMED_FD {
        " (the default when LISTEN_FDNAMES is not set)"
    } else {
        ""
    }
}

fn defined_sockets(defined: &[String]) -> String {
    if defined.is_empty() {
        "it defines none".to_owned()
    } else {
        format!("defined: {}", defined.join(", "))
    }
}

impl Activation {
    /// Takes the sockets the service manager passed to this process, as its `LISTEN_PID`,
    /// `LISTEN_FDS` and `LISTEN_FDNAMES` describe them, and marks them close-on-exec.
    ///
    /// Returns no sockets when the variables are unset or `LISTEN_PID` is another process's,
    /// and when they were taken before (an fd has one owner: only the first call in a process
    /// takes them).
    ///
    /// # Errors
    /// When the variables are malformed, or a passed fd is not open or not a socket.
    pub fn from_env() -> Result<Activation, ActivationError> {
        let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        let passed = listen_fds_from(
            var(LISTEN_PID).as_deref(),
            var(LISTEN_FDS).as_deref(),
            var(LISTEN_FDNAMES).as_deref(),
            std::process::id(),
        )?;
        if passed.is_empty() {
            return Ok(Activation::default());
        }
        let Some(taken) = sys::take_listen_fds(passed.len()) else {
            tracing::debug!("the socket activation fds were taken before; not taking them again");
            return Ok(Activation::default());
        };
        let mut sockets = Vec::with_capacity(taken.len());
        for ((fd, name), (_, result)) in passed.into_iter().zip(taken) {
            match result {
                Ok(owned) => sockets.push((name, owned)),
                Err(error) => {
                    let why = match error.raw_os_error() {
                        Some(libc::EBADF) => "is not open".to_owned(),
                        Some(libc::ENOTSOCK) => "is not a socket".to_owned(),
                        _ => format!("cannot be taken: {error}"),
                    };
                    return Err(ActivationError::Unusable { fd, name, why });
                }
            }
        }
        Ok(Activation { sockets })
    }

    /// Sockets obtained some other way, each with the name of the `[sockets.NAME]` it serves
    /// as (for embedding ustad, and for tests).
    pub fn from_fds(sockets: impl IntoIterator<Item = (String, OwnedFd)>) -> Activation {
        Activation {
            sockets: sockets.into_iter().collect(),
        }
    }

    /// Takes out the sockets the service manager kept in its fd store for ustad (named
    /// `ustad/…`), sorted against `config`: those that still serve it, and the names of those
    /// closed (see [`StoredSockets`]). What is left are a socket unit's.
    pub fn take_stored(&mut self, config: &Config) -> StoredSockets {
        let (stored, unit): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(name, _)| name.starts_with(store::PREFIX));
        self.sockets = unit;
        let unit: Vec<&str> = self.names().collect();
        let stored = stored
            .into_iter()
            .map(|(name, fd)| {
                let number = fd.as_raw_fd();
                (name, number, Socket::from(fd))
            })
            .collect();
        StoredSockets::sort(stored, config, &unit)
    }

    /// Whether no socket was passed.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The names of the passed sockets, in fd order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sockets.iter().map(|(name, _)| name.as_str())
    }

    /// Matches every passed socket to the socket of the configuration with its name, and
    /// checks that it can serve as that socket. Returns them by name, with their fd numbers.
    pub(super) fn match_sockets<'a>(
        self,
        specs: impl Iterator<Item = (&'a String, &'a SocketSpec)> + Clone,
    ) -> Result<Vec<(String, RawFd, Socket)>, ActivationError> {
        let mut matched: Vec<(String, RawFd, Socket)> = Vec::new();
        for (name, fd) in self.sockets {
            let number = fd.as_raw_fd();
            if let Some((_, first, _)) = matched.iter().find(|(n, _, _)| *n == name) {
                return Err(ActivationError::DuplicateName {
                    name,
                    first: *first,
                    second: number,
                });
            }
            let Some((_, spec)) = specs.clone().find(|(n, _)| **n == name) else {
                return Err(ActivationError::UnknownName {
                    fd: number,
                    name,
                    defined: specs.clone().map(|(n, _)| n.clone()).collect(),
                });
            };
            let socket = Socket::from(fd);
            if let Err(why) = check(&socket, &name, spec) {
                return Err(ActivationError::Unusable {
                    fd: number,
                    name,
                    why,
                });
            }
            matched.push((name, number, socket));
        }
        Ok(matched)
    }
}

/// Whether `socket` can serve as `[sockets.NAME]`: a listening stream socket of the family
/// its `listen` address has (TCP over IPv4 or IPv6 for an IP address, Unix for `unix:`). The
/// address itself is the socket unit's to decide, and may differ.
fn check(socket: &Socket, name: &str, spec: &SocketSpec) -> Result<(), String> {
    let inspect = |error: std::io::Error| format!("cannot be inspected: {error}");
    let kind = socket.r#type().map_err(inspect)?;
    if kind != Type::STREAM {
        let what = if kind == Type::DGRAM {
            "a datagram socket (ListenDatagram=)".to_owned()
        } else if kind == Type::SEQPACKET {
            "a sequential-packet socket (ListenSequentialPacket=)".to_owned()
        } else {
            format!("a socket of type {}", i32::from(kind))
        };
        return Err(format!(
            "is {what}; ustad passes listening stream sockets (ListenStream=)"
        ));
    }
    if !socket.is_listener().map_err(inspect)? {
        return Err("is not listening (a socket unit with Accept=yes passes each connection, not the listening socket: use Accept=no)".to_owned());
    }
    let domain = socket.domain().map_err(inspect)?;
    let local = socket
        .local_addr()
        .map(|a| super::describe(&a))
        .unwrap_or_else(|e| format!("? ({e})"));
    match &spec.listen {
        ListenAddr::Tcp(configured) if domain != Domain::IPV4 && domain != Domain::IPV6 => {
            Err(format!(
                "is not a TCP socket (it listens on {local}), but [sockets.{name}] listens on TCP ({configured})"
            ))
        }
        ListenAddr::Unix(path) if domain != Domain::UNIX => Err(format!(
            "is not a Unix socket (it listens on {local}), but [sockets.{name}] is one (unix:{})",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// The fds and names the socket activation variables describe, if they are meant for the
/// process `own_pid`; none otherwise.
///
/// As `sd_listen_fds_with_names(3)`: a missing or foreign `LISTEN_PID` means the variables
/// are not for this process (they leaked from a parent); without `LISTEN_FDNAMES`, every fd
/// is named `unknown`.
///
/// # Errors
/// When `LISTEN_FDS` is not a count, or `LISTEN_FDNAMES` does not name as many fds.
///
/// ```
/// use ustad_core::sockets::listen_fds_from;
///
/// let passed = listen_fds_from(Some("42"), Some("2"), Some("http:admin"), 42).unwrap();
/// assert_eq!(passed, [(3, "http".to_owned()), (4, "admin".to_owned())]);
/// assert!(listen_fds_from(Some("41"), Some("2"), Some("http:admin"), 42).unwrap().is_empty());
/// ```
pub fn listen_fds_from(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let for_us = listen_pid.and_then(|pid| pid.trim().parse::<u32>().ok()) == Some(own_pid);
    let Some(count) = listen_fds.filter(|_| for_us) else {
        if listen_fds.is_some() {
            tracing::debug!(
                "{LISTEN_FDS} is set but {LISTEN_PID}={listen_pid:?} is not this process ({own_pid}): not socket-activated"
            );
        }
        return Ok(Vec::new());
    };
    let invalid = |why: String| ActivationError::Variable {
        variable: LISTEN_FDS,
        value: count.to_owned(),
        why,
    };
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| invalid("is not a count of fds".to_owned()))?;
    if count > MAX_LISTEN_FDS {
        return Err(invalid(format!(
            "is more fds than ustad takes ({MAX_LISTEN_FDS})"
        )));
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<String> = match listen_fdnames {
        Some(names) => names
            .split(LISTEN_FDNAMES_SEPARATOR)
            .map(str::to_owned)
            .collect(),
        None => vec![UNNAMED_FD.to_owned(); count],
    };
    if names.len() != count {
        return Err(ActivationError::Variable {
            variable: LISTEN_FDNAMES,
            value: listen_fdnames.unwrap_or_default().to_owned(),
            why: format!("names {} fds, but {LISTEN_FDS}={count}", names.len()),
        });
    }
    Ok((LISTEN_FDS_START..).zip(names).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variables_count_only_for_the_pid_they_name() {
        let passed = listen_fds_from(Some("7"), Some("3"), Some("http:admin:http2"), 7).unwrap();
        assert_eq!(
            passed,
            [
                (3, "http".to_owned()),
                (4, "admin".to_owned()),
                (5, "http2".to_owned())
            ]
        );
        for foreign in [None, Some("8"), Some("not a pid"), Some("")] {
            assert!(
                listen_fds_from(foreign, Some("3"), Some("a:b:c"), 7)
                    .unwrap()
                    .is_empty(),
                "LISTEN_PID={foreign:?}"
            );
        }
        assert!(
            listen_fds_from(Some("7"), None, None, 7)
                .unwrap()
                .is_empty()
        );
        // As in systemd, no fd means nothing else is looked at.
        assert!(
            listen_fds_from(Some("7"), Some("0"), Some("x:y"), 7)
                .unwrap()
                .is_empty()
        );
        // An empty name is a name (that no socket has).
        assert_eq!(
            listen_fds_from(Some("7"), Some("2"), Some("http:"), 7).unwrap(),
            [(3, "http".to_owned()), (4, String::new())]
        );
    }

    #[test]
    fn without_names_every_fd_is_unknown() {
        let passed = listen_fds_from(Some("7"), Some("2"), None, 7).unwrap();
        assert_eq!(
            passed,
            [(3, "unknown".to_owned()), (4, "unknown".to_owned())]
        );
    }

    #[test]
    fn malformed_variables_are_errors_that_quote_them() {
        let error = listen_fds_from(Some("7"), Some("two"), None, 7).unwrap_err();
        assert_eq!(
            error.to_string(),
            "socket activation: LISTEN_FDS=\"two\" is not a count of fds"
        );
        let error = listen_fds_from(Some("7"), Some("3"), Some("http:admin"), 7).unwrap_err();
        assert_eq!(
            error.to_string(),
            "socket activation: LISTEN_FDNAMES=\"http:admin\" names 2 fds, but LISTEN_FDS=3"
        );
        let error = listen_fds_from(Some("7"), Some("100000"), None, 7).unwrap_err();
        assert!(
            error.to_string().contains("more fds than ustad takes"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_name_says_which_names_would_match() {
        let error = ActivationError::UnknownName {
            fd: 3,
            name: "unknown".to_owned(),
            defined: vec!["http".to_owned(), "admin".to_owned()],
        };
        assert_eq!(
            error.to_string(),
            "socket activation: fd 3 is named `unknown` (the default when LISTEN_FDNAMES is not set), but the configuration has no socket of that name (defined: http, admin); give each socket of the socket unit the name of a [sockets.NAME] with FileDescriptorName="
        );
    }
}
