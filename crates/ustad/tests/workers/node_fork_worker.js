'use strict';
// A Node worker that knows nothing of ustad, only Node's own IPC (as a child of
// child_process.fork): it greets its parent, says 'ready' (PM2's convention), answers every
// message with {back: message, pid}, and exits on 'shutdown'.
process.on('message', (message) => {
  if (message === 'shutdown') {
    process.exit(0);
  }
  process.send({ back: message, pid: process.pid });
});
process.send({ hello: process.pid });
process.send('ready');
