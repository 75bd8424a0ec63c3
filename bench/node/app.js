'use strict';
// The hello-world app of bench/cluster.sh: one HTTP server answering "hello" with the pid of the
// process that served the request in `X-Worker-Pid`.
//
// Where it listens:
// - on the inherited fd 3 when LISTEN_FDS is set (systemd socket activation, as ustad and the
//   no-manager launcher pass it; LISTEN_PID, when set, must be this process);
// - otherwise on HOST:PORT (default 127.0.0.1:8000): the bare app, Node's cluster, PM2.
//
// It drains on SIGTERM or SIGINT (PM2 sends SIGINT) the way ustad's demo worker does, so that a
// rolling restart measures the manager rather than the app:
// 1. it stops accepting (the listening socket stays open in the other holders);
// 2. every later response carries `Connection: close`, after which Node closes the connection;
// 3. a connection still idle IDLE_GRACE_MS later is closed then. Closing idle connections at
//    once, as Node's http.Server#close() does since Node 19, races with the client's next
//    request on them, which then fails: hence net.Server#close() below;
// 4. it exits 0 once every connection is closed, or 1 after DRAIN_LIMIT_MS.
// With DRAIN=close it stops the common way instead, with Node's http.Server#close(), to
// measure what that race costs (`DRAIN=close bash bench/cluster.sh`).
const http = require('node:http');
const net = require('node:net');

const IDLE_GRACE_MS = Number(process.env.IDLE_GRACE_MS || 1000);
const DRAIN_LIMIT_MS = Number(process.env.DRAIN_LIMIT_MS || 10000);
const BODY = 'hello\n';
const pid = String(process.pid);
let stopping = false;
let draining = false; // later responses carry `Connection: close`

const server = http.createServer((req, res) => {
  const headers = {
    'Content-Type': 'text/plain',
    'Content-Length': BODY.length,
    'X-Worker-Pid': pid,
  };
  if (draining) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(BODY);
});

function drain() {
  if (stopping) return;
  stopping = true;
  setTimeout(() => process.exit(1), DRAIN_LIMIT_MS).unref();
  if (process.env.DRAIN === 'close') {
    server.close(() => process.exit(0));
    return;
  }
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => server.closeIdleConnections(), IDLE_GRACE_MS).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);

const inherited = process.env.LISTEN_FDS &&
  (!process.env.LISTEN_PID || process.env.LISTEN_PID === pid);
if (inherited) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 8000), process.env.HOST || '127.0.0.1');
}
