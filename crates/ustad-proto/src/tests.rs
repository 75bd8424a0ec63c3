//! The spellings of the wire, pinned: workers in other languages and systemd itself spell these
//! names too, so changing one here breaks them, whatever the Rust code agrees on.

use crate::{env, ipc, node, notify};

#[test]
fn environment_names_are_systemds_and_ustads() {
    assert_eq!(env::LISTEN_FDS, "LISTEN_FDS");
    assert_eq!(env::LISTEN_PID, "LISTEN_PID");
    assert_eq!(env::LISTEN_FDNAMES, "LISTEN_FDNAMES");
    assert_eq!(env::LISTEN_FDNAMES_SEPARATOR, ":");
    assert_eq!(env::UNNAMED_FD, "unknown");
    assert_eq!(env::LISTEN_FDS_START, 3);
    assert_eq!(env::NOTIFY_SOCKET, "NOTIFY_SOCKET");
    assert_eq!(env::WATCHDOG_USEC, "WATCHDOG_USEC");
    assert_eq!(env::WATCHDOG_PID, "WATCHDOG_PID");
    assert_eq!(env::USTAD_POOL, "USTAD_POOL");
    assert_eq!(env::USTAD_WORKER_ID, "USTAD_WORKER_ID");
    assert_eq!(env::USTAD_WORKER_INDEX, "USTAD_WORKER_INDEX");
    assert_eq!(env::USTAD_GENERATION, "USTAD_GENERATION");
    assert_eq!(env::USTAD_IPC_FD, "USTAD_IPC_FD");
    assert_eq!(env::USTAD_IPC_MAX_FRAME, "USTAD_IPC_MAX_FRAME");
    assert_eq!(env::NODE_CHANNEL_FD, "NODE_CHANNEL_FD");
    assert_eq!(
        env::NODE_CHANNEL_SERIALIZATION_MODE,
        "NODE_CHANNEL_SERIALIZATION_MODE"
    );
    assert_eq!(env::NODE_CHANNEL_SERIALIZATION_JSON, "json");
    assert!(env::is_reserved(env::NODE_CHANNEL_FD.as_bytes()));
    assert_eq!(env::USTAD_PRELOAD_FDS, "USTAD_PRELOAD_FDS");
    assert_eq!(env::LD_PRELOAD, "LD_PRELOAD");
    assert_eq!(env::PORT, "PORT");
}

#[test]
fn node_messages_are_pm2s_and_nodes() {
    assert_eq!(node::READY, "ready");
    assert_eq!(node::SHUTDOWN, "shutdown");
    assert_eq!(node::KEY, "ustad");
    assert_eq!(node::INTERNAL_KEY, "cmd");
    assert_eq!(node::INTERNAL_PREFIX, "NODE_");
    assert_eq!(node::request::RESTART, "restart");
    assert_eq!(node::request::STOPPING, "stopping");
    assert_eq!(node::request::HEARTBEAT, "heartbeat");
    assert_eq!(node::request::READY, "ready");
}

#[test]
fn every_variable_the_primary_sets_is_kept_from_what_workers_inherit() {
    for name in [
        env::LISTEN_FDS,
        env::LISTEN_PID,
        env::LISTEN_FDNAMES,
        env::NOTIFY_SOCKET,
        env::WATCHDOG_USEC,
        env::WATCHDOG_PID,
        env::USTAD_POOL,
        env::USTAD_WORKER_ID,
        env::USTAD_WORKER_INDEX,
        env::USTAD_GENERATION,
        env::USTAD_IPC_FD,
        env::USTAD_IPC_MAX_FRAME,
        env::USTAD_PRELOAD_FDS,
    ] {
        assert!(env::is_reserved(name.as_bytes()), "{name}");
    }
    // A user's own LD_PRELOAD and PORT are theirs: the primary adds to or replaces them.
    for name in [env::LD_PRELOAD, env::PORT] {
        assert!(!env::is_reserved(name.as_bytes()), "{name}");
    }
    for name in ["PATH", "HOME", "LISTEN_FDS_X", "USTAD", "MY_USTAD_POOL", ""] {
        assert!(!env::is_reserved(name.as_bytes()), "{name}");
    }
}

#[test]
fn notify_lines_are_sd_notifys_and_ustads() {
    let line = |key: &str, value: &str| format!("{key}={value}");
    assert_eq!(line(notify::READY, notify::FLAG), "READY=1");
    assert_eq!(line(notify::STOPPING, notify::FLAG), "STOPPING=1");
    assert_eq!(line(notify::RELOADING, notify::FLAG), "RELOADING=1");
    assert_eq!(line(notify::WATCHDOG, notify::FLAG), "WATCHDOG=1");
    assert_eq!(
        line(notify::WATCHDOG, notify::WATCHDOG_TRIGGER),
        "WATCHDOG=trigger"
    );
    assert_eq!(
        line(notify::USTAD_REQUEST, notify::REQUEST_RESTART),
        "USTAD_REQUEST=restart"
    );
    assert_eq!(line(notify::STATUS, "x"), "STATUS=x");
    assert_eq!(line(notify::MONOTONIC_USEC, "1"), "MONOTONIC_USEC=1");
}

#[test]
fn channel_constants_are_those_of_the_protocol_page() {
    assert_eq!(ipc::USTAD_IPC_FD, "USTAD_IPC_FD");
    assert_eq!(ipc::USTAD_IPC_MAX_FRAME, "USTAD_IPC_MAX_FRAME");
    assert_eq!(ipc::HEADER, 4);
    assert_eq!(ipc::DEFAULT_MAX_FRAME, 1_048_576);
    assert_eq!(
        [
            ipc::kind::READY,
            ipc::kind::HEARTBEAT,
            ipc::kind::RESTART,
            ipc::kind::STOPPING,
            ipc::kind::STOP,
            ipc::kind::MSG,
            ipc::kind::REQ,
            ipc::kind::REP,
            ipc::kind::ERR,
            ipc::kind::CONN,
        ],
        [
            "ready",
            "heartbeat",
            "restart",
            "stopping",
            "stop",
            "msg",
            "req",
            "rep",
            "err",
            "conn"
        ]
    );
}
