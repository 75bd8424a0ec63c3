-- wrk script of bench/cluster.sh: prints one machine-readable line of results at the end
--   BENCH requests=… duration_us=… rps=… p50_us=… p99_us=… max_us=… connect=… read=… write=…
--         timeout=… status=… [responses=… non2xx=… pids=… max_share=… min_share=… balance=…]
-- and, with COUNT_PIDS=1 in the environment, counts the responses of each X-Worker-Pid (and the
-- non-2xx ones) per thread in response(), summed in done() through thread:get, followed by one
-- `BENCH pid <pid> <responses>` line per pid. Without COUNT_PIDS no response() is defined, so
-- wrk does not build a Lua table per response and measures at full speed.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if os.getenv("COUNT_PIDS") == "1" then
  function init(args)
    pids = {}
    non2xx = 0
  end

  function response(status, headers, body)
    local pid = headers["X-Worker-Pid"] or headers["x-worker-pid"] or "none"
    pids[pid] = (pids[pid] or 0) + 1
    if status < 200 or status > 299 then
      non2xx = non2xx + 1
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local line = string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d max_us=%d " ..
    "connect=%d read=%d write=%d timeout=%d status=%d",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status)
  if os.getenv("COUNT_PIDS") ~= "1" then
    io.write(line, "\n")
    return
  end
  local counts, bad, total = {}, 0, 0
  for _, thread in ipairs(threads) do
    for pid, n in pairs(thread:get("pids")) do
      counts[pid] = (counts[pid] or 0) + n
      total = total + n
    end
    bad = bad + thread:get("non2xx")
  end
  local npids, max, min = 0, 0, math.huge
  for _, n in pairs(counts) do
    npids = npids + 1
    if n > max then max = n end
    if n < min then min = n end
  end
  if npids == 0 then min = 0 end
  local balance = min > 0 and string.format("%.3f", max / min) or "inf"
  io.write(line, string.format(
    " responses=%d non2xx=%d pids=%d max_share=%.4f min_share=%.4f balance=%s\n",
    total, bad, npids, total > 0 and max / total or 0, total > 0 and min / total or 0, balance))
  for pid, n in pairs(counts) do
    io.write(string.format("BENCH pid %s %d\n", pid, n))
  end
end
