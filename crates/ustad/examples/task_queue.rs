//! isotropic-cluster's task distribution: the primary hands tasks to a pool of workers and
//! gets the results back; one worker is killed in the middle of the run, and no task is lost.
//!
//!     cargo run --example task_queue              # TASKS=1000 to change the count
//!
//! Tasks are routed by type with a `#[serde(tag = "type")]` enum and a `match`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use ustad::{Event, FromPrimary, Pool, Role, Worker};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Task {
    Square { n: u64 },
    Shout { text: String },
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type")]
enum Answer {
    Squared { n: u64, square: u64, by: u64 },
    Shouted { text: String, by: u64 },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let role = ustad::role();
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        Role::Primary(primary) => runtime.block_on(async {
            let cluster = primary
                .pool(
                    "workers",
                    Pool::new(4)
                        .max_in_flight(4)
                        .restart_delay(Duration::from_millis(100)),
                )
                .start()?;
            let mut events = cluster.events().expect("first call");
            // Wait until all 4 workers are ready.
            let mut ready = 0;
            while ready < 4 {
                match events.recv().await {
                    Some(Event::Ready(_)) => ready += 1,
                    Some(_) => {}
                    None => anyhow::bail!("the cluster stopped before its workers were ready"),
                }
            }
            let tasks: u64 = std::env::var("TASKS")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(400);
            let cluster = std::sync::Arc::new(cluster);
            let mut running = JoinSet::new();
            for n in 0..tasks {
                let cluster = cluster.clone();
                running.spawn(async move {
                    let task = if n % 5 == 0 {
                        Task::Shout {
                            text: format!("task {n}"),
                        }
                    } else {
                        Task::Square { n }
                    };
                    (n, cluster.dispatch::<Task, Answer>("workers", &task).await)
                });
            }
            let mut done = 0;
            let mut killed = None;
            let mut results = vec![false; tasks as usize];
            while let Some(joined) = running.join_next().await {
                let (n, answer) = joined?;
                match answer? {
                    Answer::Squared { n: m, square, .. } => assert!(m == n && square == n * n),
                    Answer::Shouted { text, .. } => assert_eq!(text, format!("TASK {n}")),
                }
                assert!(!results[n as usize], "task {n} answered twice");
                results[n as usize] = true;
                done += 1;
                if done == tasks / 4 && killed.is_none() {
                    let victim = cluster.workers("workers")[0].clone();
                    println!(
                        "killing worker {} (pid {}) with SIGKILL",
                        victim.id, victim.pid
                    );
                    std::process::Command::new("kill")
                        .args(["-KILL", &victim.pid.to_string()])
                        .status()?;
                    killed = Some(victim.id);
                }
            }
            while let Ok(event) = events.try_recv() {
                if let Event::Exited { worker, status, .. } = event {
                    println!("worker {} exited: {status}", worker.id);
                }
            }
            println!(
                "all {tasks} tasks answered, each once; worker {:?} was killed midway",
                killed.map(|id| id.0)
            );
            cluster.stop(None).await?;
            Ok(())
        }),
        Role::Worker(worker) => runtime.block_on(work(worker)),
    }
}

async fn work(worker: Worker) -> anyhow::Result<()> {
    worker.ready().await?;
    let by = worker.id();
    loop {
        let request = tokio::select! {
            received = worker.recv() => match received? {
                Some(FromPrimary::Request(request)) => request,
                Some(FromPrimary::Message(_)) => continue,
                None => break,
            },
            _ = worker.stopped() => break,
        };
        let answer = match request.decode::<Task>()? {
            Task::Square { n } => {
                // Long enough that tasks are in flight when a worker dies.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Answer::Squared {
                    n,
                    square: n * n,
                    by,
                }
            }
            Task::Shout { text } => Answer::Shouted {
                text: text.to_uppercase(),
                by,
            },
        };
        request.reply(&answer).await?;
    }
    Ok(())
}
