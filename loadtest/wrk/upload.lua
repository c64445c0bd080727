-- wrk script: POSTs one fixed multipart body to the gateway, over and over,
-- so that the load generator does nothing per request but send bytes.
--
--   venus-loadtest --write-body /tmp/body --seed 7 > /tmp/body.json
--   VENUS_BODY=/tmp/body VENUS_CONTENT_TYPE="$(jq -r .content_type /tmp/body.json)" \
--     wrk -t2 -c32 -d15s -s loadtest/wrk/upload.lua http://127.0.0.1:8080/api/v1/upload
--
-- At the end it prints one JSON line (prefixed "wrk-json: ") with requests,
-- seconds, non-2xx answers, socket errors and latency percentiles in ms.
-- The body's events are the same every time; the gateway does not
-- deduplicate, so every accepted request writes all of its valid events.

local path = os.getenv("VENUS_BODY") or error("set VENUS_BODY to the body file")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("VENUS_CONTENT_TYPE")
  or error("set VENUS_CONTENT_TYPE to the body's Content-Type")
local key = os.getenv("VENUS_KEY")
if key then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'wrk-json: {"requests":%d,"seconds":%.3f,"non_2xx":%d,"socket_errors":%d,' ..
    '"timeouts":%d,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"p999_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3, latency.max / 1e3))
end
