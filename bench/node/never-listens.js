'use strict';
// A broken release of naive.js for the never-listening rollout of bench/naive.sh: it starts
// and stays up but never listens, like an app stuck at start-up on a dependency that never
// answers. Like naive.js it has no signal handlers: a stop signal ends it.
setInterval(() => {}, 60 * 60 * 1000);
