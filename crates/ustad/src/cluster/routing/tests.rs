//! Round-robin and least-loaded picks over made-up candidates.

use super::*;

/// A candidate with no task in flight.
fn worker(id: u64, slot: usize) -> Candidate {
    busy(id, slot, 0)
}

fn busy(id: u64, slot: usize, in_flight: usize) -> Candidate {
    Candidate {
        id: WorkerId(id),
        slot,
        in_flight,
    }
}

/// `n` round-robin picks for (`pool`, `tag`) over the same candidates, as ids.
fn picks(
    rotations: &mut Rotations,
    pool: &str,
    tag: &str,
    candidates: &[Candidate],
    n: usize,
) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let chosen = rotations.pick(pool, tag, candidates.iter().copied());
            chosen.expect("a candidate").0
        })
        .collect()
}

#[test]
fn round_robin_rotates_in_slot_order() {
    let mut rotations = Rotations::default();
    // Ids out of slot order: the rotation follows slots.
    let workers = [worker(7, 0), worker(3, 1), worker(5, 2)];
    assert_eq!(
        picks(&mut rotations, "jobs", "a", &workers, 7),
        [7, 3, 5, 7, 3, 5, 7]
    );
}

#[test]
fn round_robin_does_not_depend_on_the_order_candidates_come_in() {
    let mut rotations = Rotations::default();
    let workers = [worker(5, 2), worker(3, 1), worker(7, 0)];
    assert_eq!(
        picks(&mut rotations, "jobs", "a", &workers, 4),
        [7, 3, 5, 7]
    );
}

#[test]
fn round_robin_rotates_each_tag_on_its_own() {
    let mut rotations = Rotations::default();
    let workers = [worker(1, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(
        picks(&mut rotations, "jobs", "a", &workers, 7),
        [1, 2, 3, 1, 2, 3, 1]
    );
    // A new tag starts from the first slot, whatever the other tags did.
    assert_eq!(picks(&mut rotations, "jobs", "b", &workers, 2), [1, 2]);
    // And the picks of `b` did not move `a` along.
    assert_eq!(picks(&mut rotations, "jobs", "a", &workers, 2), [2, 3]);
}

#[test]
fn round_robin_ties_go_to_the_lowest_slot_then_the_lowest_id() {
    let mut rotations = Rotations::default();
    // In a rolling restart a slot's replacement is ready before its old worker stops: two
    // workers share slot 0 for a while.
    let workers = [worker(9, 0), worker(4, 1), worker(6, 0)];
    assert_eq!(
        picks(&mut rotations, "jobs", "a", &workers, 4),
        [6, 9, 4, 6]
    );
}

#[test]
fn round_robin_picks_a_worker_that_joins_next() {
    let mut rotations = Rotations::default();
    let two = [worker(1, 0), worker(2, 1)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &two, 3), [1, 2, 1]);
    // Never picked for this tag: it comes before every worker that was, even in a higher slot.
    let three = [worker(1, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &three, 4), [3, 2, 1, 3]);
}

#[test]
fn round_robin_picks_a_replacement_before_the_rest_of_the_rotation() {
    let mut rotations = Rotations::default();
    let workers = [worker(1, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &workers, 2), [1, 2]);
    // Worker 1 is replaced by worker 4 in slot 0 before 3 had its turn: the newcomer goes
    // first, then the rotation goes on where it was.
    let replaced = [worker(4, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(
        picks(&mut rotations, "jobs", "a", &replaced, 4),
        [4, 3, 2, 4]
    );
}

#[test]
fn round_robin_skips_a_worker_that_leaves() {
    let mut rotations = Rotations::default();
    let three = [worker(1, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &three, 1), [1]);
    // Worker 2 stops before its turn.
    let two = [worker(1, 0), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &two, 4), [3, 1, 3, 1]);
}

#[test]
fn round_robin_remembers_a_worker_left_out_of_some_picks() {
    let mut rotations = Rotations::default();
    let three = [worker(1, 0), worker(2, 1), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &three, 3), [1, 2, 3]);
    let without_1 = [worker(2, 1), worker(3, 2)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &without_1, 2), [2, 3]);
    // Worker 1 is offered again: its last pick is the oldest, so it goes first.
    assert_eq!(picks(&mut rotations, "jobs", "a", &three, 3), [1, 2, 3]);
}

#[test]
fn round_robin_with_no_candidate_picks_none_and_records_nothing() {
    let mut rotations = Rotations::default();
    assert_eq!(rotations.pick("nope", "a", []), None);
    assert!(rotations.last_picked.is_empty());
    assert_eq!(rotations.picks, 0);
    let workers = [worker(1, 0), worker(2, 1)];
    assert_eq!(picks(&mut rotations, "jobs", "a", &workers, 1), [1]);
    // A tag that matches no worker at the moment leaves the others' rotation alone.
    assert_eq!(rotations.pick("jobs", "a", []), None);
    assert_eq!(picks(&mut rotations, "jobs", "a", &workers, 2), [2, 1]);
}

#[test]
fn least_loaded_picks_the_fewest_in_flight() {
    let workers = [busy(1, 0, 3), busy(2, 1, 1), busy(3, 2, 2)];
    assert_eq!(least_loaded(workers, 64, &[]), Some(WorkerId(2)));
}

#[test]
fn least_loaded_with_equal_loads_picks_the_lowest_slot_then_the_lowest_id() {
    let workers = [busy(5, 2, 1), busy(9, 1, 1), busy(4, 1, 1)];
    assert_eq!(least_loaded(workers, 64, &[]), Some(WorkerId(4)));
    let reversed = [busy(4, 1, 1), busy(9, 1, 1), busy(5, 2, 1)];
    assert_eq!(least_loaded(reversed, 64, &[]), Some(WorkerId(4)));
}

#[test]
fn least_loaded_leaves_out_workers_at_the_limit() {
    let workers = [busy(1, 0, 2), busy(2, 1, 1)];
    assert_eq!(least_loaded(workers, 2, &[]), Some(WorkerId(2)));
    let full = [busy(1, 0, 2), busy(2, 1, 2)];
    assert_eq!(least_loaded(full, 2, &[]), None);
    assert_eq!(least_loaded([], 2, &[]), None);
}

#[test]
fn least_loaded_gives_a_worker_that_lost_the_task_its_turn_last() {
    let tried = [WorkerId(1)];
    // Idle but tried: a busier worker that has room goes first.
    let workers = [busy(1, 0, 0), busy(2, 1, 5)];
    assert_eq!(least_loaded(workers, 64, &tried), Some(WorkerId(2)));
    // Unless the others are at the limit.
    assert_eq!(least_loaded(workers, 5, &tried), Some(WorkerId(1)));
    // Among tried workers, the least loaded.
    let both = [WorkerId(1), WorkerId(2)];
    let workers = [busy(1, 0, 3), busy(2, 1, 2)];
    assert_eq!(least_loaded(workers, 64, &both), Some(WorkerId(2)));
}

#[test]
fn least_loaded_spreads_tasks_evenly_up_to_the_limit() {
    // As the hub does: each pick takes a slot on the chosen worker.
    let mut workers = [worker(1, 0), worker(2, 1), worker(3, 2)];
    let mut chosen = Vec::new();
    while let Some(id) = least_loaded(workers.iter().copied(), 2, &[]) {
        let picked = workers.iter_mut().find(|w| w.id == id).unwrap();
        picked.in_flight += 1;
        chosen.push(id.0);
    }
    assert_eq!(chosen, [1, 2, 3, 1, 2, 3]);
    // A task answered frees a slot on its worker, which takes the next one.
    workers[1].in_flight -= 1;
    assert_eq!(
        least_loaded(workers.iter().copied(), 2, &[]),
        Some(WorkerId(2))
    );
}

#[test]
fn an_exited_worker_is_forgotten_and_its_successor_joins_the_rotation() {
    let mut rotations = Rotations::default();
    let before = [worker(1, 0), worker(2, 1)];
    picks(&mut rotations, "web", "a", &before, 2);
    picks(&mut rotations, "web", "b", &before, 1);
    assert_eq!(rotations.entries(), 3);

    rotations.forget(WorkerId(1));
    assert_eq!(
        rotations.entries(),
        1,
        "only worker 2's pick for tag a is left"
    );

    // Worker 3 took slot 0: never picked, it comes first, then the rotation goes on.
    let after = [worker(3, 0), worker(2, 1)];
    assert_eq!(picks(&mut rotations, "web", "a", &after, 3), [3, 2, 3]);
    rotations.forget(WorkerId(2));
    rotations.forget(WorkerId(3));
    assert_eq!(
        rotations.entries(),
        0,
        "a (pool, tag) with no worker left goes too"
    );
}
