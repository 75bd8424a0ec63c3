'use strict';
// Node's cluster IPC, measured as crates/ustad/benches/ipc_report.rs measures ustad's: one
// primary, one worker (cluster.fork, the default JSON serialization), small `{type, n}`
// messages with worker.send / process.send. Prints one JSON line per run with the same keys:
//
//   w2p_per_s            worker → primary, messages/s (the worker sends as fast as it can)
//   p2w_per_s            primary → worker, messages/s (until the worker has counted them all)
//   rtt1_p50_us …        echo round trips with 1 in flight: latency p50/p99, round trips/s
//   rtt100_…, rtt1000_…  the same with 100 and 1,000 in flight (pipelined)
//   flood_*              a worker flooding IPC_FLOOD messages while the primary's event loop is
//                        blocked for IPC_STALL_MS: growth of each side's peak RSS (MiB), and
//                        the time until the primary has them all
//
// Knobs: the environment variables of ipc_report.rs (IPC_RUNS, IPC_MESSAGES, IPC_ROUND_TRIPS,
// IPC_PIPELINED, IPC_FLOOD, IPC_STALL_MS, IPC_OUT).
//
//   node bench/node/ipc-echo.js
const cluster = require('node:cluster');
const fs = require('node:fs');

const knob = (name, fallback) => Number((process.env[name] || String(fallback)).replace(/_/g, ''));
const mb = (bytes) => bytes / (1024 * 1024);

if (cluster.isPrimary) {
  primary().catch((error) => {
    console.error(error);
    process.exit(1);
  });
} else {
  worker();
}

function worker() {
  let received = 0;
  process.on('message', (m) => {
    switch (m.type) {
      case 'small':
        received += 1;
        break;
      case 'echo':
        process.send({ type: 'echo', n: m.n });
        break;
      case 'sync':
        process.send({ type: 'count', n: received });
        break;
      case 'flood': {
        const before = process.memoryUsage().rss;
        // As fast as it can: process.send queues what the channel cannot take at once.
        for (let n = 0; n < m.n; n += 1) process.send({ type: 'small', n });
        // Everything is queued in this process now: its memory is at its highest.
        const after = process.memoryUsage().rss;
        process.send({ type: 'count', n: m.n, grew: Math.max(0, after - before) });
        break;
      }
      default:
        break;
    }
  });
  process.send({ type: 'ready' });
}

async function primary() {
  const runs = knob('IPC_RUNS', 5);
  const messages = knob('IPC_MESSAGES', 500000);
  const roundTrips = knob('IPC_ROUND_TRIPS', 20000);
  const pipelined = knob('IPC_PIPELINED', 300000);
  const floodCount = knob('IPC_FLOOD', 1000000);
  const stallMs = knob('IPC_STALL_MS', 1000);
  const out = process.env.IPC_OUT;

  const w = cluster.fork();
  // One handler, swapped per measurement.
  let onMessage = () => {};
  w.on('message', (m) => onMessage(m));
  w.on('exit', (code, signal) => {
    if (!stopping) {
      console.error(`node worker exited: ${code} ${signal}`);
      process.exit(1);
    }
  });
  let stopping = false;
  await new Promise((resolve) => {
    onMessage = (m) => m.type === 'ready' && resolve();
  });

  const workerToPrimary = (count) =>
    new Promise((resolve) => {
      const started = process.hrtime.bigint();
      let seen = 0;
      let done = false;
      let elapsed = null;
      const finish = () => done && elapsed !== null && resolve(elapsed);
      onMessage = (m) => {
        if (m.type === 'small') {
          seen += 1;
          if (seen === count) {
            elapsed = Number(process.hrtime.bigint() - started) / 1e9;
            finish();
          }
        } else if (m.type === 'count') {
          done = true;
          finish();
        }
      };
      w.send({ type: 'flood', n: count });
    });

  const sync = () =>
    new Promise((resolve) => {
      onMessage = (m) => m.type === 'count' && resolve(m.n);
      w.send({ type: 'sync' });
    });

  const primaryToWorker = async (count) => {
    const before = await sync();
    const started = process.hrtime.bigint();
    for (let n = 0; n < count; n += 1) w.send({ type: 'small', n });
    const after = await sync();
    const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
    if (after - before !== count) throw new Error(`the worker got ${after - before} of ${count}`);
    return elapsed;
  };

  // `total` echo round trips, `inFlight` at a time: seconds, and each one's latency (µs).
  const roundTripsWith = (total, inFlight) =>
    new Promise((resolve) => {
      const sentAt = new Map();
      const latencies = [];
      let sent = 0;
      const started = process.hrtime.bigint();
      const send = () => {
        sentAt.set(sent, process.hrtime.bigint());
        w.send({ type: 'echo', n: sent });
        sent += 1;
      };
      onMessage = (m) => {
        if (m.type !== 'echo') return;
        const now = process.hrtime.bigint();
        latencies.push(Number(now - sentAt.get(m.n)) / 1000);
        sentAt.delete(m.n);
        if (sent < total) send();
        else if (latencies.length === total) {
          resolve([Number(now - started) / 1e9, latencies]);
        }
      };
      for (let i = 0; i < Math.min(inFlight, total); i += 1) send();
    });

  const floodWithStalledReader = (count) =>
    new Promise((resolve) => {
      const before = process.memoryUsage().rss;
      const started = process.hrtime.bigint();
      let seen = 0;
      let peak = before;
      let workerGrew = null;
      let elapsed = null;
      const finish = () => {
        if (workerGrew === null || elapsed === null) return;
        peak = Math.max(peak, process.memoryUsage().rss);
        resolve({ primaryGrew: peak - before, workerGrew, elapsed });
      };
      onMessage = (m) => {
        if (m.type === 'small') {
          seen += 1;
          if (seen % 50000 === 0) peak = Math.max(peak, process.memoryUsage().rss);
          if (seen === count) {
            elapsed = Number(process.hrtime.bigint() - started) / 1e9;
            finish();
          }
        } else if (m.type === 'count') {
          workerGrew = m.grew;
          finish();
        }
      };
      w.send({ type: 'flood', n: count });
      // The primary is busy elsewhere (blocked) for a while.
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, stallMs);
    });

  const percentile = (sorted, p) =>
    sorted[Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length))) - 1];

  // Warm up, as ipc_report.rs does.
  await roundTripsWith(20000, 1);
  await roundTripsWith(50000, 100);
  await workerToPrimary(50000);

  for (let run = 1; run <= runs; run += 1) {
    const r = {};
    r.w2p_per_s = messages / (await workerToPrimary(messages));
    r.p2w_per_s = messages / (await primaryToWorker(messages));
    {
      const [seconds, latencies] = await roundTripsWith(roundTrips, 1);
      latencies.sort((a, b) => a - b);
      r.rtt1_p50_us = percentile(latencies, 50);
      r.rtt1_p99_us = percentile(latencies, 99);
      r.rtt1_per_s = roundTrips / seconds;
    }
    for (const inFlight of [100, 1000]) {
      const [seconds, latencies] = await roundTripsWith(pipelined, inFlight);
      latencies.sort((a, b) => a - b);
      r[`rtt${inFlight}_per_s`] = pipelined / seconds;
      r[`rtt${inFlight}_p50_us`] = percentile(latencies, 50);
      r[`rtt${inFlight}_p99_us`] = percentile(latencies, 99);
    }
    if (floodCount > 0) {
      const flood = await floodWithStalledReader(floodCount);
      r.flood_primary_mb = mb(flood.primaryGrew);
      r.flood_worker_mb = mb(flood.workerGrew);
      r.flood_s = flood.elapsed;
    }
    r.impl = 'node';
    r.run = run;
    const line = JSON.stringify(r);
    console.error(`node run ${run}/${runs}: ${line}`);
    if (out) fs.appendFileSync(out, `${line}\n`);
  }
  stopping = true;
  w.kill();
}
