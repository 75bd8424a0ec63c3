//! The reload diff, from configurations alone: no socket is bound and no process started.

use super::diff::{Changes, diff, restart};
use crate::config::{Command, Config, PoolSpec, Size, SocketSpec};
use crate::plan::Event;

fn pool(command: &str) -> PoolSpec {
    PoolSpec::new(Command::new([command]).unwrap())
}

fn socket(listen: &str) -> SocketSpec {
    SocketSpec::new(listen.parse().unwrap())
}

fn config(sockets: &[(&str, &str)], pools: &[(&str, PoolSpec)]) -> Config {
    let mut config = Config::default();
    for (name, listen) in sockets {
        config.sockets.insert((*name).to_owned(), socket(listen));
    }
    for (name, spec) in pools {
        config.pools.insert((*name).to_owned(), spec.clone());
    }
    config
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// The plan events, one line each.
fn events(changes: &Changes) -> Vec<String> {
    changes
        .events
        .iter()
        .map(|event| match event {
            Event::AddPool { name, spec } => format!("add {name} running {}", spec.command),
            Event::RemovePool { name } => format!("remove {name}"),
            Event::Rollout {
                pool,
                trigger,
                spec,
            } => format!(
                "roll {} ({trigger}){}",
                pool.as_deref().unwrap_or("every pool"),
                spec.as_ref()
                    .map_or(String::new(), |spec| format!(" running {}", spec.command))
            ),
            other => format!("unexpected {other:?}"),
        })
        .collect()
}

fn socket_names(sockets: &[(String, SocketSpec)]) -> Vec<&str> {
    sockets.iter().map(|(name, _)| name.as_str()).collect()
}

#[test]
fn a_bare_reload_of_an_unchanged_configuration_rolls_every_pool() {
    let running = config(&[], &[("web", pool("web")), ("jobs", pool("jobs"))]);
    let changes = diff(&running, &running.clone(), &[]).unwrap();
    assert_eq!(
        events(&changes),
        [
            "roll web (reload) running web",
            "roll jobs (reload) running jobs"
        ]
    );
    assert_eq!(changes.rolled, ["web", "jobs"]);
    assert_eq!(
        changes.summary,
        "configuration reloaded: pool web rolling, pool jobs rolling"
    );
    assert!(changes.bind.is_empty() && changes.close.is_empty());
}

#[test]
fn an_added_pool_starts_and_a_removed_one_stops() {
    let running = config(&[], &[("web", pool("web")), ("old", pool("old"))]);
    let new = config(&[], &[("web", pool("web")), ("api", pool("api"))]);
    let changes = diff(&running, &new, &names(&["web"])).unwrap();
    assert_eq!(
        events(&changes),
        [
            "remove old",
            "roll web (reload) running web",
            "add api running api"
        ]
    );
    // A removed pool is not waited for: its workers stop, nothing rolls.
    assert_eq!(changes.rolled, ["web", "api"]);
    assert_eq!(
        changes.summary,
        "configuration reloaded: pool old removed, pool web rolling, pool api added"
    );
}

#[test]
fn a_changed_pool_rolls_with_its_new_settings() {
    let mut bigger = pool("web");
    bigger.size = Size::fixed(4).unwrap();
    let running = config(&[], &[("web", pool("web"))]);
    let new = config(&[], &[("web", bigger.clone())]);
    let changes = diff(&running, &new, &[]).unwrap();
    let [
        Event::Rollout {
            spec: Some(spec), ..
        },
    ] = changes.events.as_slice()
    else {
        panic!("one rollout with a spec: {:?}", changes.events);
    };
    assert_eq!(**spec, bigger);
    assert_eq!(
        changes.summary,
        "configuration reloaded: pool web changed: rolling"
    );
}

#[test]
fn named_pools_roll_with_the_changed_ones_and_the_others_are_left_alone() {
    let running = config(
        &[],
        &[
            ("web", pool("web")),
            ("api", pool("api")),
            ("jobs", pool("jobs")),
        ],
    );
    let new = config(
        &[],
        &[
            ("web", pool("web-v2")),
            ("api", pool("api")),
            ("jobs", pool("jobs")),
        ],
    );
    let changes = diff(&running, &new, &names(&["api"])).unwrap();
    assert_eq!(
        events(&changes),
        [
            "roll web (reload) running web-v2",
            "roll api (reload) running api"
        ]
    );
    assert_eq!(changes.rolled, ["web", "api"]);
    assert_eq!(
        changes.summary,
        "configuration reloaded: pool web changed: rolling, pool api rolling"
    );
}

#[test]
fn added_sockets_are_bound_and_removed_ones_closed() {
    let running = config(
        &[("http", "127.0.0.1:8000"), ("old", "127.0.0.1:8001")],
        &[("web", pool("web"))],
    );
    let new = config(
        &[
            ("http", "127.0.0.1:8000"),
            ("admin", "unix:/run/admin.sock"),
        ],
        &[("web", pool("web"))],
    );
    let changes = diff(&running, &new, &names(&["web"])).unwrap();
    assert_eq!(socket_names(&changes.bind), ["admin"]);
    assert_eq!(changes.bind[0].1, socket("unix:/run/admin.sock"));
    assert_eq!(socket_names(&changes.close), ["old"]);
    assert_eq!(
        changes.summary,
        "configuration reloaded: socket admin added, socket old removed, pool web rolling"
    );
}

#[test]
fn a_socket_changed_in_place_is_refused() {
    let running = config(&[("http", "127.0.0.1:8000")], &[("web", pool("web"))]);
    let new = config(&[("http", "127.0.0.1:9000")], &[("web", pool("web-v2"))]);
    assert_eq!(
        diff(&running, &new, &[]).unwrap_err(),
        "configuration not reloaded: socket `http` changed (127.0.0.1:8000 → 127.0.0.1:9000); a socket cannot change while workers use it: add it under a new name (and remove the old one), or restart ustad"
    );
}

#[test]
fn a_named_pool_must_be_in_the_new_configuration() {
    let running = config(&[], &[("web", pool("web")), ("old", pool("old"))]);
    let new = config(&[], &[("web", pool("web"))]);
    assert_eq!(
        diff(&running, &new, &names(&["old"])).unwrap_err(),
        "configuration not reloaded: no pool named `old` in the configuration"
    );
}

#[test]
fn nothing_to_change_is_said_so() {
    let empty = Config::default();
    let changes = diff(&empty, &empty, &[]).unwrap();
    assert!(changes.events.is_empty() && changes.rolled.is_empty());
    assert_eq!(
        changes.summary,
        "configuration reloaded: configuration unchanged, nothing to do"
    );
}

#[test]
fn without_a_file_a_reload_restarts_the_named_pools_or_every_one() {
    let running = names(&["web", "jobs"]);
    let every = restart(&running, &[]).unwrap();
    assert_eq!(
        events(&every),
        ["roll web (restart)", "roll jobs (restart)"]
    );
    assert_eq!(every.rolled, ["web", "jobs"]);
    assert_eq!(every.summary, "rolling restart of pools web, jobs");

    let one = restart(&running, &names(&["jobs"])).unwrap();
    assert_eq!(events(&one), ["roll jobs (restart)"]);
    assert_eq!(one.summary, "rolling restart of pool jobs");

    assert_eq!(
        restart(&running, &names(&["api"])).unwrap_err(),
        "no pool named `api`"
    );
}
