//! Reloading: re-read the configuration file and apply what changed, or roll the pools.
//!
//! A configuration that fails to parse or validate is refused whole and nothing changes. One
//! that does is applied as a difference: new sockets are bound (a bind error refuses the whole
//! reload), new pools start, removed pools stop gracefully, changed pools are rolled with their
//! new settings, and removed sockets are closed once no worker uses them. Which unchanged pools
//! roll too is the caller's choice: every pool for SIGHUP and a bare `ustad reload` (a deploy
//! of new code), only the named ones for `ustad reload POOL…`.

use std::sync::Arc;

use super::Supervisor;
use crate::plan::{Event, RolloutTrigger};

/// What a reload did.
#[derive(Debug)]
pub(super) struct Applied {
    /// For people.
    pub(super) message: String,
    /// Pools being rolled (or started), for `reload --wait`.
    pub(super) rolled: Vec<String>,
}

impl Supervisor {
    /// Reloads, rolling `named` pools (or, when empty and not `only_changed`, every pool).
    pub(super) fn reload(
        &mut self,
        named: &[String],
        only_changed: bool,
    ) -> Result<Applied, String> {
        if self.plan.is_shutting_down() {
            return Err("ustad is shutting down".to_owned());
        }
        let Some(reload) = self.reload.as_mut() else {
            let pools: Vec<String> = self.plan.pools().map(|(p, _)| p.to_owned()).collect();
            if let Some(unknown) = named.iter().find(|n| !pools.contains(n)) {
                return Err(format!("no pool named `{unknown}`"));
            }
            let rolled = if named.is_empty() {
                pools
            } else {
                named.to_vec()
            };
            for pool in &rolled {
                self.handle(Event::Rollout {
                    pool: Some(pool.clone()),
                    trigger: RolloutTrigger::Restart,
                    spec: None,
                });
            }
            return Ok(Applied {
                message: format!("rolling restart of {}", list(&rolled)),
                rolled,
            });
        };
        let config = reload().map_err(|error| {
            format!("configuration not reloaded, the cluster keeps running as it is:\n{error}")
        })?;
        if let Some(unknown) = named.iter().find(|n| !config.pools.contains_key(*n)) {
            return Err(format!(
                "configuration not reloaded: no pool named `{unknown}` in the configuration"
            ));
        }
        for (name, spec) in &config.sockets {
            if let Some(old) = self.config.sockets.get(name) {
                if old != spec {
                    return Err(format!(
                        "configuration not reloaded: socket `{name}` changed ({} → {}); a socket cannot change while workers use it: add it under a new name (and remove the old one), or restart ustad",
                        old.listen, spec.listen
                    ));
                }
            }
        }
        // Bind new sockets first: if one fails, undo and refuse the whole reload.
        let mut added_sockets = Vec::new();
        for (name, spec) in &config.sockets {
            if self.config.sockets.contains_key(name) {
                continue;
            }
            self.retired_sockets.retain(|(retired, _)| retired != name);
            if let Err(error) = self.listeners.add(name, spec) {
                for (added, spec) in added_sockets {
                    self.listeners.remove(added, spec);
                }
                return Err(format!("configuration not reloaded: {error}"));
            }
            added_sockets.push((name.as_str(), spec));
        }
        let mut summary = Vec::new();
        let mut rolled = Vec::new();
        for name in added_sockets.iter().map(|(n, _)| n) {
            summary.push(format!("socket {name} added"));
        }
        for (socket, address) in self.listeners.addresses() {
            if added_sockets.iter().any(|(name, _)| *name == socket) {
                tracing::info!(event = "listening", socket = %socket, address = %address, "socket {socket} listening on {address}");
            }
        }
        for (name, spec) in &self.config.sockets {
            if !config.sockets.contains_key(name) {
                self.retired_sockets.push((name.clone(), spec.clone()));
                summary.push(format!("socket {name} removed"));
            }
        }
        let mut events = Vec::new();
        for name in self.config.pools.keys() {
            if !config.pools.contains_key(name) {
                events.push(Event::RemovePool { name: name.clone() });
                summary.push(format!("pool {name} removed"));
            }
        }
        for (name, spec) in &config.pools {
            let wanted = named.contains(name) || (named.is_empty() && !only_changed);
            match self.config.pools.get(name) {
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
        self.config = config;
        let mut refusals = Vec::new();
        for event in events {
            let outcome = self.plan.handle(event, std::time::Instant::now());
            refusals.extend(outcome.refusal().map(str::to_owned));
            self.perform(outcome);
        }
        self.close_retired_sockets();
        if !refusals.is_empty() {
            return Err(refusals.join("; "));
        }
        if summary.is_empty() {
            summary.push("configuration unchanged, nothing to do".to_owned());
        }
        let message = format!("configuration reloaded: {}", summary.join(", "));
        tracing::info!(event = "reloaded", "{message}");
        Ok(Applied { message, rolled })
    }

    /// Closes the sockets a reload removed, once no live worker was started with them.
    pub(super) fn close_retired_sockets(&mut self) {
        if self.retired_sockets.is_empty() {
            return;
        }
        let retired = std::mem::take(&mut self.retired_sockets);
        for (name, spec) in retired {
            let in_use = self
                .plan
                .workers()
                .any(|worker| worker.spec().sockets.contains(&name));
            if in_use {
                self.retired_sockets.push((name, spec));
            } else {
                self.listeners.remove(&name, &spec);
                tracing::info!(event = "socket_closed", socket = %name, "socket {name} closed: no worker uses it any more");
            }
        }
    }
}

fn list(pools: &[String]) -> String {
    match pools {
        [one] => format!("pool {one}"),
        many => format!("pools {}", many.join(", ")),
    }
}
