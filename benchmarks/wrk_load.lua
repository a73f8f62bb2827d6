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

-- {{value_us, count}, ...} ascending: wrk's latency histogram with stats_correct's synthetic samples taken
-- out (processed from the top down, each bin's count is real once the bins above it are undone), and the
-- number of real samples. Cost: one scan of the histogram per distinct value (wrk's latency(i)).
function real_histogram(latency, runtime_us, complete, connections)
  local vals, count = {}, {}
  for i = 1, #latency do
    local v, c = latency(i)
    vals[i] = v
    count[v] = c
  end
  local per_conn = math.floor(complete / connections)
  if per_conn > 0 then
    local interval = math.floor(runtime_us / per_conn)
    for i = #vals, 1, -1 do
      local n = vals[i]
      local c = count[n]
      if interval > 0 and n >= 2 * interval and c > 0 then
        local m = n - interval
        while m > interval do
          count[m] = (count[m] or 0) - c
          m = m - interval
        end
      end
    end
  end
  local out, total = {}, 0
  for _, v in ipairs(vals) do
    if count[v] > 0 then
      out[#out + 1] = { v, count[v] }
      total = total + count[v]
    end
  end
  return out, total
end

-- linear-interpolation percentile (numpy's default) of a histogram of `total` samples
function hist_pct(hist, total, p)
  local pos = (total - 1) * p / 100
  local lo = math.floor(pos)
  local frac = pos - lo
  local function at(k) -- value of the k-th sample (0-based)
    local cum = 0
    for _, vc in ipairs(hist) do
      cum = cum + vc[2]
      if k < cum then return vc[1] end
    end
    return hist[#hist][1]
  end
  local a, b = at(lo), at(math.min(lo + 1, total - 1))
  return a + (b - a) * frac
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
  -- wrk 4.x "corrects" its histogram for coordinated omission before done() (stats_correct): every latency
  -- n >= 2 * interval adds synthetic samples at n - interval, n - 2 * interval, ... (> interval), with
  -- interval = runtime / (requests / connections). A closed loop omits nothing; the figures must be the
  -- requests' own, so the synthetic samples are taken out again (exactly: they are a function of the counts).
  local hist, n_real = real_histogram(latency, summary.duration, summary.requests,
    tonumber(os.getenv("WRK_CONNECTIONS") or "1"))
  -- requests answered within the SLO (all statuses), counted from the real histogram
  local within = "null"
  local slo_us = tonumber(os.getenv("WRK_SLO_US") or "")
  if slo_us then
    local k = 0
    for _, vc in ipairs(hist) do if vc[1] <= slo_us then k = k + vc[2] end end
    within = tostring(k)
  end
  local st = {}
  for k, v in pairs(statuses_all) do st[#st + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  -- microseconds -> ms; every response received within --timeout (wrk keeps no later ones)
  local lat = '{"p50_ms":null,"p90_ms":null,"p99_ms":null,"max_ms":null,"mean_ms":null}'
  if n_real > 0 then
    local sum = 0
    for _, vc in ipairs(hist) do sum = sum + vc[1] * vc[2] end
    lat = string.format('{"p50_ms":%s,"p90_ms":%s,"p99_ms":%s,"max_ms":%s,"mean_ms":%s}',
      num(hist_pct(hist, n_real, 50) / 1000), num(hist_pct(hist, n_real, 90) / 1000),
      num(hist_pct(hist, n_real, 99) / 1000), num(hist[#hist][1] / 1000), num(sum / n_real / 1000))
  end
  io.write(string.format(
    'WRKJSON {"duration_s":%.6f,"requests":%d,"bytes":%d,"statuses":{%s},' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"latency":%s,' ..
    '"compute":%s,"queue":%s,"tokens":%d,"within_slo":%s,"sent_by_thread":[%s]}\n',
    summary.duration / 1e6, summary.requests, summary.bytes, table.concat(st, ","),
    e.connect, e.read, e.write, e.timeout, lat, summary_of(compute_all), summary_of(queue_all),
    tokens_all, within, table.concat(sent_by_thread, ",")))
end
