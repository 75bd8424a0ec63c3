'use strict';
// Node's own cluster module running bench/node/app.js (or the file APP names: bench/naive.sh
// runs naive.js), as its documentation and most guides do it: WORKERS workers (default 2) share
// the app's HOST:PORT through the primary, with the scheduling policy of
// NODE_CLUSTER_SCHED_POLICY (`rr`, the default on Linux, or `none`).
//
// SIGHUP: the usual rolling restart, one worker at a time: fork a replacement, wait for its
// 'listening', then stop the old worker (SIGTERM: app.js drains, as it does under ustad and
// PM2; SIGKILL after KILL_TIMEOUT_MS) and wait for its exit before the next one. A SIGHUP
// during a restart queues one more. A replacement that never listens stalls the restart there,
// its predecessor still serving: there is no listen timeout (PM2 has one, 3 s by default).
// SIGTERM, SIGINT: stop every worker the same way, then exit.
// A worker that dies on its own is replaced after RESTART_DELAY_MS (default 1000, as ustad's
// restart delay; bench/naive.sh uses 0, as the guides' `cluster.on('exit', () => fork())`).
const cluster = require('node:cluster');
const path = require('node:path');

const WORKERS = Number(process.env.WORKERS || 2);
const KILL_TIMEOUT_MS = Number(process.env.KILL_TIMEOUT_MS || 30000);
const RESTART_DELAY_MS = Number(process.env.RESTART_DELAY_MS ?? 1000);

cluster.setupPrimary({ exec: process.env.APP || path.join(__dirname, 'app.js') });

const retiring = new Set();
let stopping = false;
let restarting = false;
let restartQueued = false;

function fork() {
  const worker = cluster.fork();
  worker.on('exit', () => {
    if (!retiring.delete(worker) && !stopping) setTimeout(fork, RESTART_DELAY_MS);
  });
  return worker;
}

function stop(worker) {
  retiring.add(worker);
  return new Promise((resolve) => {
    if (worker.isDead()) return resolve();
    const timer = setTimeout(() => worker.process.kill('SIGKILL'), KILL_TIMEOUT_MS);
    worker.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    worker.process.kill('SIGTERM');
  });
}

async function rollingRestart() {
  if (restarting) {
    restartQueued = true;
    return;
  }
  restarting = true;
  do {
    restartQueued = false;
    for (const old of Object.values(cluster.workers)) {
      if (stopping) break;
      if (retiring.has(old)) continue;
      const replacement = fork();
      await new Promise((resolve) => {
        replacement.once('listening', resolve);
        replacement.once('exit', resolve);
      });
      await stop(old);
    }
  } while (restartQueued && !stopping);
  restarting = false;
}

async function shutdown() {
  if (stopping) return;
  stopping = true;
  await Promise.all(Object.values(cluster.workers).map(stop));
  process.exit(0);
}

process.on('SIGHUP', rollingRestart);
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
for (let i = 0; i < WORKERS; i++) fork();
