-- wrk script for benches/e2e.sh.
--
-- Without WRK_RUNS: wrk requests the URL it is given (one hot run).
-- With WRK_RUNS=N and WRK_PREFIX=P (decimal): every request asks for one of the runs 0..N-1 of
-- id set P, picked uniformly at random; the ids are those of `loadgen run_id`
-- ("%08x-0000-4000-8000-%012x") and the request strings are built once, before the run.
--
-- On exit it prints one line that the script parses:
--   WRK requests=R secs=S p50=US p99=US p999=US errors=E
-- (latencies in microseconds; errors counts connect/read/write/timeout errors and non-2xx/3xx).

local runs = tonumber(os.getenv("WRK_RUNS") or "")
local prefix = tonumber(os.getenv("WRK_PREFIX") or "0")

-- WRK_AUTH: an Authorization header for every request (needed only straight to the mock).
local auth = os.getenv("WRK_AUTH")
if auth then
  wrk.headers["Authorization"] = auth
end

if runs then
  local reqs = {}

  function init(args)
    math.randomseed(os.time())
    for i = 0, runs - 1 do
      local path = string.format("/v1/workflows/run/%08x-0000-4000-8000-%012x", prefix, i)
      reqs[i + 1] = wrk.format("GET", path)
    end
  end

  function request()
    return reqs[math.random(runs)]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout + e.status
  io.write(string.format(
    "WRK requests=%d secs=%.3f p50=%d p99=%d p999=%d errors=%d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), errors))
end
