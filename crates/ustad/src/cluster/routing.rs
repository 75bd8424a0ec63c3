//! Which worker gets the next message or task: round-robin by tag, and least-loaded dispatch.
//! Plain data in, a choice out (no channels, processes or clocks), so every choice is
//! unit-tested; the hub decides which workers are candidates and calls these.

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use ustad_core::plan::WorkerId;

/// A worker that may be picked. The hub offers the workers of the pool asked for that are
/// ready, not stopping, and whose channel is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Candidate {
    pub(super) id: WorkerId,
    pub(super) slot: usize,
    /// Tasks dispatched to it and not answered yet.
    pub(super) in_flight: usize,
}

/// Round-robin by tag: each (pool, tag) rotates on its own, by when each worker was last
/// picked for it.
#[derive(Debug, Default)]
pub(super) struct Rotations {
    /// (pool, tag) → worker → the number of the pick that last chose it. A worker that exits is
    /// forgotten ([`Rotations::forget`]), so the map holds live workers only.
    last_picked: HashMap<(String, String), HashMap<WorkerId, u64>>,
    /// Picks made so far, over every (pool, tag): it orders picks, it is not a time.
    picks: u64,
}

impl Rotations {
    /// The candidate least recently picked for (`pool`, `tag`), recorded as picked. A worker
    /// never picked for it comes first (one that joins is picked next); ties go to the lowest
    /// slot, then the lowest id. `None` when there is no candidate, and nothing is recorded.
    pub(super) fn pick(
        &mut self,
        pool: &str,
        tag: &str,
        candidates: impl IntoIterator<Item = Candidate>,
    ) -> Option<WorkerId> {
        let key = (pool.to_owned(), tag.to_owned());
        let last_picked = self.last_picked.get(&key);
        let chosen = candidates
            .into_iter()
            .min_by_key(|candidate| {
                let last = last_picked
                    .and_then(|last_picked| last_picked.get(&candidate.id))
                    .copied()
                    .unwrap_or(0);
                (last, candidate.slot, candidate.id)
            })?
            .id;
        self.picks += 1;
        self.last_picked
            .entry(key)
            .or_default()
            .insert(chosen, self.picks);
        Some(chosen)
    }

    /// Drops everything known of `id` (it exited): ids are never reused, so its entries would
    /// only grow the map with every restart. A (pool, tag) left with no worker goes too.
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.last_picked.retain(|_, last_picked| {
            last_picked.remove(&id);
            !last_picked.is_empty()
        });
    }

    /// How many (pool, tag, worker) entries are kept: for tests of [`Rotations::forget`].
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.last_picked.values().map(HashMap::len).sum()
    }
}

/// The candidate to take one more task: one with fewer than `limit` tasks in flight, the fewest,
/// then the lowest slot, then the lowest id. A worker in `tried` (it lost this task already)
/// only when no other has room. `None` when every candidate is at the limit.
pub(super) fn least_loaded(
    candidates: impl IntoIterator<Item = Candidate>,
    limit: usize,
    tried: &[WorkerId],
) -> Option<WorkerId> {
    candidates
        .into_iter()
        .filter(|candidate| candidate.in_flight < limit)
        .min_by_key(|candidate| {
            (
                tried.contains(&candidate.id),
                candidate.in_flight,
                candidate.slot,
                candidate.id,
            )
        })
        .map(|candidate| candidate.id)
}
