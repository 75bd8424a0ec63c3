//! What a reload changes, from the running configuration, the new one and the pools the
//! request names, and nothing else: no socket, process or clock, so that every case is a unit
//! test (`tests.rs`). The supervisor performs the result (`reload/mod.rs`).

use std::sync::Arc;

use crate::config::{Config, SocketSpec};
use crate::plan::{Event, RolloutTrigger};

/// What a reload changes, in the order it is done.
#[derive(Debug, Clone)]
pub(super) struct Changes {
    /// Sockets to bind before anything else, in the order declared: if one cannot be bound,
    /// the reload is refused and nothing changes.
    pub(super) bind: Vec<(String, SocketSpec)>,
    /// Sockets removed, to close once no worker uses them.
    pub(super) close: Vec<(String, SocketSpec)>,
    /// For the plan, in order: pools removed, then pools added and rolled.
    pub(super) events: Vec<Event>,
    /// Pools being started or rolled, that `reload --wait` waits for.
    pub(super) rolled: Vec<String>,
    /// What it does, for the client and the log.
    pub(super) summary: String,
}

/// The changes from `running` to `new`. Pools that changed are rolled with their new
/// settings; unchanged ones too when they are `named`, or when nothing is named (a deploy of
/// new code). Refused, with why, when a named pool is not in `new` or a socket changed in
/// place.
pub(super) fn diff(running: &Config, new: &Config, named: &[String]) -> Result<Changes, String> {
    if let Some(unknown) = named.iter().find(|n| !new.pools.contains_key(*n)) {
        return Err(format!(
            "configuration not reloaded: no pool named `{unknown}` in the configuration"
        ));
    }
    for (name, spec) in &new.sockets {
        if let Some(old) = running.sockets.get(name) {
            if old != spec {
                return Err(format!(
                    "configuration not reloaded: socket `{name}` changed ({} → {}); a socket cannot change while workers use it: add it under a new name (and remove the old one), or restart ustad",
                    old.listen, spec.listen
                ));
            }
        }
    }
    let mut summary = Vec::new();
    let bind: Vec<(String, SocketSpec)> = new
        .sockets
        .iter()
        .filter(|(name, _)| !running.sockets.contains_key(*name))
        .map(|(name, spec)| (name.clone(), spec.clone()))
        .collect();
    for (name, _) in &bind {
        summary.push(format!("socket {name} added"));
    }
    let close: Vec<(String, SocketSpec)> = running
        .sockets
        .iter()
        .filter(|(name, _)| !new.sockets.contains_key(*name))
        .map(|(name, spec)| (name.clone(), spec.clone()))
        .collect();
    for (name, _) in &close {
        summary.push(format!("socket {name} removed"));
    }
    let mut events = Vec::new();
    let mut rolled = Vec::new();
    for name in running.pools.keys() {
        if !new.pools.contains_key(name) {
            events.push(Event::RemovePool { name: name.clone() });
            summary.push(format!("pool {name} removed"));
        }
    }
    for (name, spec) in &new.pools {
        let wanted = named.is_empty() || named.contains(name);
        match running.pools.get(name) {
            None => {
                events.push(Event::AddPool {
                    name: name.clone(),
                    spec: Arc::new(spec.clone()),
                });
                summary.push(format!("pool {name} added"));
                rolled.push(name.clone());
            }
            Some(old) if old != spec || wanted => {
                events.push(Event::Rollout {
                    pool: Some(name.clone()),
                    trigger: RolloutTrigger::Reload,
                    spec: Some(Arc::new(spec.clone())),
                });
                summary.push(format!(
                    "pool {name} {}",
                    if old != spec {
                        "changed: rolling"
                    } else {
                        "rolling"
                    }
                ));
                rolled.push(name.clone());
            }
            Some(_) => {}
        }
    }
    if summary.is_empty() {
        summary.push("configuration unchanged, nothing to do".to_owned());
    }
    Ok(Changes {
        bind,
        close,
        events,
        rolled,
        summary: format!("configuration reloaded: {}", summary.join(", ")),
    })
}

/// Without a configuration file to re-read, a reload rolls the `named` pools (every pool when
/// none is named) with their running settings. Refused when a named pool is not running.
pub(super) fn restart(running: &[String], named: &[String]) -> Result<Changes, String> {
    if let Some(unknown) = named.iter().find(|n| !running.contains(n)) {
        return Err(format!("no pool named `{unknown}`"));
    }
    let rolled = if named.is_empty() {
        running.to_vec()
    } else {
        named.to_vec()
    };
    let events = rolled
        .iter()
        .map(|pool| Event::Rollout {
            pool: Some(pool.clone()),
            trigger: RolloutTrigger::Restart,
            spec: None,
        })
        .collect();
    let summary = match rolled.as_slice() {
        [one] => format!("rolling restart of pool {one}"),
        many => format!("rolling restart of pools {}", many.join(", ")),
    };
    Ok(Changes {
        bind: Vec::new(),
        close: Vec::new(),
        events,
        rolled,
        summary,
    })
}
