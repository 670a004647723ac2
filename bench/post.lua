-- wrk script: POST one OpenAI-style chat request again and again, then print the run's figures
-- as one JSON line that bench/harness.py parses (wrk's own text output is for humans).
--
-- Environment: BENCH_MODEL (the "model" field), BENCH_BODY_BYTES (pad the body to this size;
-- 0 = a small, realistic request).

local model = os.getenv("BENCH_MODEL") or "fast"
local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0")

local prefix = '{"model":"' .. model .. '","messages":[{"role":"user","content":"'
local suffix = '"}],"max_tokens":16}'
local content = "Say hi in one word."
local padding = body_bytes - #prefix - #suffix
if padding > #content then
  content = string.rep("x", padding)
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = prefix .. content .. suffix

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,'
      .. '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
