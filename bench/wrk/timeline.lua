-- wrk script of bench/naive.sh, chaos.sh and soak.sh: counts every request sent and every 200
-- response, the 200s per 100 ms of wall-clock time, and the responses of each X-Worker-Pid, so
-- that a rolling restart's worst 100 ms and every failed request can be read from one wrk run.
--
-- wrk alone does not count every failure: when a server closes a connection (FIN) under a
-- request, wrk reconnects without counting an error, and a request never answered is counted
-- nowhere. So this script counts requests itself: request() counts each one wrk sends (a new
-- connection's first, and every retry after a reconnect, included) and response() each answer.
-- At the end, once the file STOP_FILE exists, delay() holds every connection back (nothing
-- more is sent) while the requests in flight are answered or not; the script that runs wrk
-- waits a grace period, then stops wrk with SIGINT. Then
--     failed = sent - 200 responses + connect errors
-- counts every request that was sent and not answered with a 200 (reset, closed under it,
-- non-200, unanswered within the grace period) and every connect that failed.
--
-- Output, from done():
--   TIMELINE sent=… ok=… non200=… connect=… read=… write=… timeout=… failed=… pids=… max_us=…
--   BUCKET <unix time in units of 100 ms> <200 responses completed in it>   (ascending)
--   PID <pid> <responses>
-- Buckets with no response are not printed: the reader fills the gaps with zeros.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } naive_bench_timespec;
  int clock_gettime(int clock, naive_bench_timespec *ts);
  int access(const char *path, int mode);
]]
local CLOCK_REALTIME = 0 -- the clock of the shell's `date +%s.%N`, so both sides agree
local ts = ffi.new("naive_bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_REALTIME, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local stop_file = os.getenv("STOP_FILE")
-- PACE_MS (bench/soak.sh): a pause before each request of a connection (but its first), for a
-- light load of about connections * 1000 / PACE_MS requests per second at most. 0 by default.
local pace = tonumber(os.getenv("PACE_MS") or "0") or 0
local threads = {}

function setup(thread) -- runs before the thread's init()
  table.insert(threads, thread)
  thread:set("index", #threads)
end

local req
local next_check = 0

function init(args)
  req = wrk.format()
  -- wrk calls the first thread's request() once before it starts, to check it
  -- (script_verify_request): that call sends nothing.
  sent = index == 1 and -1 or 0
  ok, non200 = 0, 0
  buckets, pids = {}, {}
  stopping = false
end

function request()
  sent = sent + 1
  return req
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    local bucket = math.floor(now_ms() / 100)
    buckets[bucket] = (buckets[bucket] or 0) + 1
  else
    non200 = non200 + 1
  end
  local pid = headers["X-Worker-Pid"] or headers["x-worker-pid"] or "none"
  pids[pid] = (pids[pid] or 0) + 1
end

-- Called before every request but the very first of each connection (wrk defines a delay
-- after each response when the script has delay()): looks for STOP_FILE every 20 ms at most.
function delay()
  if not stopping and stop_file then
    local t = now_ms()
    if t >= next_check then
      next_check = t + 20
      stopping = ffi.C.access(stop_file, 0) == 0
    end
  end
  return stopping and 3600000 or pace
end

function done(summary, latency, requests)
  local total_sent, total_ok, total_non200 = 0, 0, 0
  local counts, all_pids, npids = {}, {}, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_ok = total_ok + thread:get("ok")
    total_non200 = total_non200 + thread:get("non200")
    for bucket, n in pairs(thread:get("buckets")) do
      counts[bucket] = (counts[bucket] or 0) + n
    end
    for pid, n in pairs(thread:get("pids")) do
      if not all_pids[pid] then npids = npids + 1 end
      all_pids[pid] = (all_pids[pid] or 0) + n
    end
  end
  local e = summary.errors
  io.write(string.format(
    "TIMELINE sent=%d ok=%d non200=%d connect=%d read=%d write=%d timeout=%d failed=%d " ..
    "pids=%d max_us=%d\n",
    total_sent, total_ok, total_non200, e.connect, e.read, e.write, e.timeout,
    total_sent - total_ok + e.connect, npids, latency.max))
  local keys = {}
  for bucket in pairs(counts) do table.insert(keys, bucket) end
  table.sort(keys)
  for _, bucket in ipairs(keys) do
    io.write(string.format("BUCKET %d %d\n", bucket, counts[bucket]))
  end
  for pid, n in pairs(all_pids) do
    io.write(string.format("PID %s %d\n", pid, n))
  end
end
