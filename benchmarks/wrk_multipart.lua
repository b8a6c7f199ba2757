-- wrk script: POST each image of a list as a multipart upload, in turn; print a JSON summary at the end.
--
--   wrk -t1 -c32 -d10s -s benchmarks/wrk_multipart.lua http://127.0.0.1:3000/classify -- images.txt [field]
--
-- images.txt: one image path per line. Every request is built once, before the clock starts. Each
-- connection starts at another image. Counts every status code and the 503s that came without
-- Retry-After; done() prints one line `JSON {...}` (latencies in microseconds).

local boundary = "svertkawrkboundary7d1e"
local types = { png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg" }
local threads = {}

local function read_all(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local field = args[2] or "image"
  requests, statuses, no_retry_after = {}, {}, 0
  for path in io.lines(args[1]) do
    if path ~= "" then
      local name = path:match("([^/]+)$")
      local ext = (name:match("%.(%w+)$") or ""):lower()
      local body = "--" .. boundary .. "\r\n"
        .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. name .. '"\r\n'
        .. "Content-Type: " .. (types[ext] or "application/octet-stream") .. "\r\n\r\n"
        .. read_all(path) .. "\r\n--" .. boundary .. "--\r\n"
      local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
      table.insert(requests, wrk.format("POST", nil, headers, body))
    end
  end
  assert(#requests > 0, "no images listed in " .. tostring(args[1]))
  counter = math.random(#requests)
end

function request()
  counter = counter % #requests + 1
  return requests[counter]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    no_retry_after = no_retry_after + 1
  end
end

function done(summary, latency, requests)
  local codes, missing = {}, 0
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + n
    end
    missing = missing + thread:get("no_retry_after")
  end
  local parts = {}
  for code, n in pairs(codes) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"mean_us": %.1f, "status_counts": {%s}, "no_retry_after_503s": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ", "), missing
  ))
end
