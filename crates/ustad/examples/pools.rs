//! usta's pools: one program, three pools, each with its own code path.
//!
//! - `web` ×4 serves HTTP on 127.0.0.1:8000 (`POOLS_ADDR` to change it);
//! - `jobs` ×2 answers the primary's requests (`echo`, `sleep`, `flood`);
//! - `crons` ×1 sends the primary a `tick` every 200 ms.
//!
//! Run it:
//!
//!     cargo run --example pools                   # Ctrl-C to stop
//!     POOLS_RUN_FOR=3s cargo run --example pools  # stop by itself after 3 s
//!
//! It is also the worker program of the library's tests, which start its `jobs` pool under a
//! primary of their own.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use ustad::{Event, FromPrimary, Pool, Primary, Role, Worker};

/// What the primary asks a `jobs` worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Job {
    /// Answer with the value.
    Echo { value: serde_json::Value },
    /// Answer after `ms` milliseconds.
    Sleep { ms: u64 },
    /// Send `count` messages to the primary as fast as possible, then answer.
    Flood { count: u64 },
}

/// What workers tell the primary.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Report {
    Tick { n: u64 },
    Flooded { n: u64 },
    Done { job: String, by: u64 },
    Echoed { value: serde_json::Value, by: u64 },
}

fn main() -> anyhow::Result<()> {
    let role = ustad::role();
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        Role::Primary(primary) => runtime.block_on(supervise(primary)),
        Role::Worker(worker) => runtime.block_on(async move {
            match worker.pool() {
                "web" => web(worker).await,
                "jobs" => jobs(worker).await,
                "crons" => crons(worker).await,
                other => anyhow::bail!("no code for pool {other}"),
            }
        }),
    }
}

async fn supervise(primary: Primary) -> anyhow::Result<()> {
    let address = std::env::var("POOLS_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".to_owned());
    let cluster = primary
        .pool("web", Pool::new(4).listen(&address))
        .pool("jobs", Pool::new(2))
        .pool("crons", Pool::new(1))
        .start()?;
    let mut events = cluster.events().expect("first call");
    let run_for = std::env::var("POOLS_RUN_FOR")
        .ok()
        .map(|d| ustad_core_duration(&d))
        .transpose()?;
    let deadline = async {
        match run_for {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let (mut ticks, mut ready) = (0u64, Vec::new());
    let mut stopping = false;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Ready(worker)) => {
                    println!("{}.{} ready (id {}, pid {})", worker.pool, worker.slot, worker.id, worker.pid);
                    ready.push(worker.pool.clone());
                    if worker.pool == "jobs" {
                        let answer: Report = cluster
                            .request(worker.id, &Job::Echo { value: "hi".into() }, Duration::from_secs(5))
                            .await?;
                        println!("jobs worker {} answered {answer:?}", worker.id);
                    }
                }
                Some(Event::Message { message, .. }) => {
                    if let Report::Tick { .. } = message.decode()? {
                        ticks += 1;
                    }
                }
                Some(_) => {}
                None => break,
            },
            () = &mut deadline, if !stopping => {
                stopping = true;
                cluster.stop(None).await?;
            }
        }
    }
    let count = |pool: &str| ready.iter().filter(|p| *p == pool).count();
    println!(
        "summary: web={} jobs={} crons={} ticks={ticks}",
        count("web"),
        count("jobs"),
        count("crons")
    );
    Ok(())
}

fn ustad_core_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse()?;
    Ok(match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        other => anyhow::bail!("unknown unit {other} in POOLS_RUN_FOR"),
    })
}

async fn web(worker: Worker) -> anyhow::Result<()> {
    let listener = worker.tokio_tcp_listener("web")?;
    let body = Bytes::from(format!("hello from web worker {}\n", worker.id()));
    worker.ready().await?;
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut stopped => return Ok(()),
        };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn jobs(worker: Worker) -> anyhow::Result<()> {
    worker.ready().await?;
    let by = worker.id();
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let request = tokio::select! {
            received = worker.recv() => match received? {
                Some(FromPrimary::Request(request)) => request,
                Some(FromPrimary::Message(_)) => continue,
                None => return Ok(()),
            },
            _ = &mut stopped => return Ok(()),
        };
        let worker = worker.clone();
        // Each request on its own task: a slow one does not hold up the others.
        tokio::spawn(async move {
            let report = match request.decode::<Job>() {
                Ok(Job::Echo { value }) => Report::Echoed { value, by },
                Ok(Job::Sleep { ms }) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Report::Done {
                        job: "sleep".into(),
                        by,
                    }
                }
                Ok(Job::Flood { count }) => {
                    for n in 0..count {
                        if worker.send(&Report::Flooded { n }).await.is_err() {
                            return;
                        }
                    }
                    Report::Done {
                        job: "flood".into(),
                        by,
                    }
                }
                Err(error) => {
                    let _ = request.fail(&format!("unknown job: {error}")).await;
                    return;
                }
            };
            let _ = request.reply(&report).await;
        });
    }
}

async fn crons(worker: Worker) -> anyhow::Result<()> {
    worker.ready().await?;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    for n in 0.. {
        tokio::select! {
            _ = every.tick() => worker.send(&Report::Tick { n }).await?,
            _ = &mut stopped => break,
        }
    }
    Ok(())
}
