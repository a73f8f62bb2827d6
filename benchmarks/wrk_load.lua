-- wrk script for `benchmarks load` / `benchmarks ceiling` (driven by benchmarks/wrk.py).
--
-- Reads the request sequence Python generated (one "PATH<TAB>JSON BODY" per line, file named by
-- the WRK_BODIES environment variable), sends it round-robin across threads (thread k sends lines
-- k, k+T, k+2T, ... so the popularity of models is the sequence's), counts responses by status,
-- and keeps the server's `timing.compute_ms` / `timing.queue_ms` and `usage.tokens` from each 200
-- body. done() prints one JSON line prefixed "WRKJSON " that wrk.py parses.
-- No JSON library: the body fields are read with string.match (the service writes compact JSON).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("WRK_BODIES")
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  reqs = {}
  for line in io.lines(path) do
    local tab = line:find("\t", 1, true)
    local p, body = line:sub(1, tab - 1), line:sub(tab + 1)
    reqs[#reqs + 1] = wrk.format("POST", p, { ["Content-Type"] = "application/json" }, body)
  end
  step = nthreads
  idx = id + 1 -- Lua tables are 1-based; this thread's first line
  sent = 0
  statuses = {}
  compute = {}
  queue = {}
  tokens = 0
end

function request()
  local r = reqs[idx]
  idx = idx + step
  if idx > #reqs then
    idx = idx - #reqs
  end
  sent = sent + 1
  return r
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 200 and body then
    local c = body:match('"compute_ms"%s*:%s*([-%d%.eE+]+)')
    if c then compute[#compute + 1] = tonumber(c) end
    local q = body:match('"queue_ms"%s*:%s*([-%d%.eE+]+)')
    if q then queue[#queue + 1] = tonumber(q) end
    local t = body:match('"tokens"%s*:%s*(%d+)')
    if t then tokens = tokens + tonumber(t) end
  end
end

-- linear-interpolation percentile of a sorted list (numpy's default), nil when empty
local function pct(sorted, p)
  local n = #sorted
  if n == 0 then return nil end
  local pos = (n - 1) * p / 100
  local lo = math.floor(pos)
  local frac = pos - lo
  local a = sorted[lo + 1]
  local b = sorted[math.min(lo + 2, n)]
  return a + (b - a) * frac
end

local function summary_of(values)
  table.sort(values)
  if #values == 0 then return "null" end
  local sum = 0
  for _, v in ipairs(values) do sum = sum + v end
  return string.format('{"n":%d,"p50_ms":%.6f,"p90_ms":%.6f,"p99_ms":%.6f,"max_ms":%.6f,"mean_ms":%.6f}',
    #values, pct(values, 50), pct(values, 90), pct(values, 99), values[#values], sum / #values)
end

local function num(v)
  if v == nil then return "null" end
  return string.format("%.6f", v)
end

function done(summary, latency, requests)
  local statuses_all, compute_all, queue_all, sent_by_thread = {}, {}, {}, {}
  local tokens_all = 0
  for i, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do statuses_all[k] = (statuses_all[k] or 0) + v end
    for _, v in ipairs(t:get("compute")) do compute_all[#compute_all + 1] = v end
    for _, v in ipairs(t:get("queue")) do queue_all[#queue_all + 1] = v end
    tokens_all = tokens_all + t:get("tokens")
    sent_by_thread[i] = tostring(t:get("sent"))
  end
  -- requests answered within the SLO (all statuses): the largest percentile at or under it, found
  -- by bisection on latency:percentile (wrk's histogram is not indexable by value from Lua)
  local within = "null"
  local slo_us = tonumber(os.getenv("WRK_SLO_US") or "")
  if slo_us then
    local frac
    if latency.max <= slo_us then
      frac = 1
    elseif latency.min > slo_us then
      frac = 0
    else
      local lo, hi = 0, 100
      for _ = 1, 40 do
        local mid = (lo + hi) / 2
        if latency:percentile(mid) <= slo_us then lo = mid else hi = mid end
      end
      frac = lo / 100
    end
    within = tostring(math.floor(frac * summary.requests + 0.5))
  end
  local st = {}
  for k, v in pairs(statuses_all) do st[#st + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  -- wrk's latency object is in microseconds and covers every completed request
  local lat = string.format('{"p50_ms":%s,"p90_ms":%s,"p99_ms":%s,"max_ms":%s,"mean_ms":%s}',
    num(latency:percentile(50) / 1000), num(latency:percentile(90) / 1000), num(latency:percentile(99) / 1000),
    num(latency.max / 1000), num(latency.mean / 1000))
  io.write(string.format(
    'WRKJSON {"duration_s":%.6f,"requests":%d,"bytes":%d,"statuses":{%s},' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"latency":%s,' ..
    '"compute":%s,"queue":%s,"tokens":%d,"within_slo":%s,"sent_by_thread":[%s]}\n',
    summary.duration / 1e6, summary.requests, summary.bytes, table.concat(st, ","),
    e.connect, e.read, e.write, e.timeout, lat, summary_of(compute_all), summary_of(queue_all),
    tokens_all, within, table.concat(sent_by_thread, ",")))
end
