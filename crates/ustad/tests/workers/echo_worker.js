// A worker in Node for a ustad library primary, speaking docs/protocol.md with the standard
// library only; the tests in foreign_workers.rs run it as a pool's `command`.
//
// It answers `req {"type":"echo","value":X}` with `{"type":"echoed","value":X,"pid":…,
// "lang":"node"}`, a `msg {"type":"ping"}` with a `msg {"type":"pong","pid":…}`, and
// `req {"type":"ask_primary"}` by asking the primary a question of its own (`req
// {"type":"question"}`) and answering with the primary's reply. `stop`, the stop signal or the
// end of the channel ends it with exit code 0.
'use strict';

const net = require('node:net');

const maxFrame = Number(process.env.USTAD_IPC_MAX_FRAME || 1024 * 1024);
const fd = Number(process.env.USTAD_IPC_FD);
const channel = new net.Socket({ fd, readable: true, writable: true });

function send(envelope) {
  const body = Buffer.from(JSON.stringify(envelope));
  const header = Buffer.alloc(4);
  header.writeUInt32LE(body.length);
  channel.write(Buffer.concat([header, body]));
}

// Flushes what was written, then exits: used for `stop`, the stop signal (which comes right
// after `stop`, often first) and the end of the channel. Handlers run between events, so no
// frame is half handled here.
let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  channel.end(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

let nextId = 1;
const asked = new Map(); // id of our question to the primary -> id of the request it answers

function handle(envelope) {
  const { t: kind, body } = envelope;
  const what = body !== null && typeof body === 'object' ? body.type : undefined;
  if (kind === 'stop') {
    stop();
  } else if (kind === 'msg' && what === 'ping') {
    send({ t: 'msg', body: { type: 'pong', pid: process.pid } });
  } else if (kind === 'req' && what === 'echo') {
    const echoed = { type: 'echoed', value: body.value, pid: process.pid, lang: 'node' };
    send({ t: 'rep', id: envelope.id, body: echoed });
  } else if (kind === 'req' && what === 'ask_primary') {
    asked.set(nextId, envelope.id);
    send({ t: 'req', id: nextId, body: { type: 'question' } });
    nextId += 1;
  } else if (kind === 'req') {
    send({ t: 'err', id: envelope.id, message: `unknown request ${JSON.stringify(body)}` });
  } else if ((kind === 'rep' || kind === 'err') && asked.has(envelope.id)) {
    const original = asked.get(envelope.id);
    asked.delete(envelope.id);
    if (kind === 'rep') {
      send({ t: 'rep', id: original, body });
    } else {
      send({ t: 'err', id: original, message: envelope.message || '' });
    }
  }
}

// A chunk may hold part of a frame, or several: keep what is left for the next one.
let buffer = Buffer.alloc(0);
channel.on('data', (chunk) => {
  buffer = buffer.length ? Buffer.concat([buffer, chunk]) : chunk;
  while (buffer.length >= 4 && !stopping) {
    const length = buffer.readUInt32LE(0);
    if (length === 0 || length > maxFrame) {
      console.error(`echo_worker.js: the primary sent a frame of ${length} bytes`);
      process.exit(1);
    }
    if (buffer.length < 4 + length) break;
    const body = buffer.subarray(4, 4 + length);
    buffer = buffer.subarray(4 + length);
    handle(JSON.parse(body.toString('utf8')));
  }
});
channel.on('end', stop);
channel.on('error', (error) => {
  console.error(`echo_worker.js: ${error.message}`);
  process.exit(1);
});

send({ t: 'ready' });
