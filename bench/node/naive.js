'use strict';
// The app a user brings, knowing nothing of any manager: the hello world of Node's docs with the
// pid of the process that answered in `X-Worker-Pid`. No SIGTERM or SIGINT handler (a stop
// signal kills it, with whatever requests it was serving), no drain, no sd_notify, no
// process.send('ready'). bench/naive.sh runs it under ustad's defaults and its peers.
//
// Where it listens: on the inherited fd 3 when LISTEN_FDS is set (systemd socket activation,
// as ustad and bench/launch.py pass the socket), otherwise on HOST:PORT (default
// 127.0.0.1:8000), as under Node's cluster and PM2.
const http = require('node:http');

const pid = String(process.pid);
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'X-Worker-Pid': pid });
  res.end('hello\n');
});

if (process.env.LISTEN_FDS) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 8000), process.env.HOST || '127.0.0.1');
}
