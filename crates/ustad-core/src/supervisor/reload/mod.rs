//! Reloading: re-read the configuration file and apply what changed, or roll the pools.
//!
//! A configuration that fails to parse or validate is refused whole and nothing changes. One
//! that does is applied as a difference ([`diff::diff`]): new sockets are bound (a bind error
//! refuses the whole reload), new pools start, removed pools stop gracefully, changed pools are
//! rolled with their new settings, and removed sockets are closed once no worker uses them
//! (a socket the service manager passed is not removed: the reload is refused).
//! Which unchanged pools roll too is the caller's choice: every pool for SIGHUP and a bare
//! `ustad reload` (a deploy of new code), only the named ones for `ustad reload POOL…`.

mod diff;
#[cfg(test)]
mod tests;

use std::time::Instant;

use super::Supervisor;

/// What a reload did.
#[derive(Debug)]
pub(super) struct Applied {
    /// For people.
    pub(super) message: String,
    /// Pools being rolled (or started), for `reload --wait`.
    pub(super) rolled: Vec<String>,
}

impl Supervisor {
    /// Reloads, rolling the `named` pools and those that changed (every pool when none is
    /// named); refused, with why, when nothing could be changed or the plan refused a change.
    pub(super) fn reload(&mut self, named: &[String]) -> Result<Applied, String> {
        if self.plan.is_shutting_down() {
            return Err("ustad is shutting down".to_owned());
        }
        let Some(reload) = self.reload.as_mut() else {
            let running: Vec<String> = self.plan.pools().map(|(p, _)| p.to_owned()).collect();
            let changes = diff::restart(&running, named)?;
            for event in changes.events {
                self.handle(event);
            }
            return Ok(Applied {
                message: changes.summary,
                rolled: changes.rolled,
            });
        };
        let config = reload().map_err(|error| {
            format!("configuration not reloaded, the cluster keeps running as it is:\n{error}")
        })?;
        config.check_privileges().map_err(|problems| {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            format!(
                "configuration not reloaded, the cluster keeps running as it is: {}",
                problems.join("; ")
            )
        })?;
        if config.runs_other_users() {
            self.notify
                .open_to_other_users()
                .map_err(|error| format!("configuration not reloaded: the notify socket cannot be opened to the pools' users: {error}"))?;
        }
        let changes = diff::diff(&self.config, &config, named)?;
        if let Some((name, _)) = changes
            .close
            .iter()
            .find(|(name, _)| self.listeners.is_inherited(name))
        {
            // Its socket unit would go on listening: connections would queue on a socket
            // nobody accepts from, and wait forever instead of being refused.
            return Err(format!(
                "configuration not reloaded: socket `{name}` was passed by the service manager (socket activation), and its socket unit would go on listening with nobody to accept; stop and remove the socket unit, then restart ustad"
            ));
        }
        // Bind new sockets first: if one fails, undo and refuse the whole reload.
        let mut bound = Vec::new();
        for (name, spec) in &changes.bind {
            self.retired_sockets.retain(|(retired, _)| retired != name);
            if let Err(error) = self.listeners.add(name, spec) {
                for (added, spec) in bound {
                    self.listeners.remove(added, spec);
                }
                return Err(format!("configuration not reloaded: {error}"));
            }
            bound.push((name.as_str(), spec));
        }
        for (socket, address) in self.listeners.addresses() {
            if changes.bind.iter().any(|(name, _)| *name == socket) {
                tracing::info!(event = "listening", socket = %socket, address = %address, "socket {socket} listening on {address}");
            }
        }
        self.retired_sockets.extend(changes.close);
        self.config = config;
        self.sync_watches();
        let mut refusals = Vec::new();
        for event in changes.events {
            let outcome = self.plan.handle(event, Instant::now());
            refusals.extend(outcome.refusal().map(str::to_owned));
            self.perform(outcome);
        }
        self.close_retired_sockets();
        if !refusals.is_empty() {
            return Err(refusals.join("; "));
        }
        tracing::info!(event = "reloaded", "{}", changes.summary);
        Ok(Applied {
            message: changes.summary,
            rolled: changes.rolled,
        })
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
