-- wrk script: one OneSignal Event Streams POST per request, each with a new event.id.
--
-- A repeated id would be answered from the gateway's dedupe window and measure that path
-- instead of the publish path, so every request gets an id no other request of any thread or
-- run has: <run nonce>-<thread number>-4000-8000-<per-thread counter>.
--
-- wrk ... -s bench/post.lua <url> -- <nonce8hex> <body file> <secret> <x-forwarded-for>
-- The body file holds the JSON body with the placeholder EVENT_ID_PLACEHOLDER once.
-- Soak runs set BENCH_DELAY_MS: each connection then waits that long between requests.

local counter = 0
local prefix, suffix
local nonce = "00000000"
local started = 0

-- runs in wrk's main Lua state, once per thread, before that thread's init()
function setup(thread)
   started = started + 1
   thread:set("thread_number", started)
end

function init(args)
   nonce = args[1]
   local f = assert(io.open(args[2], "rb"))
   local body = f:read("*a")
   f:close()
   local s, e = string.find(body, "EVENT_ID_PLACEHOLDER", 1, true)
   assert(s, "placeholder missing from the body file")
   prefix = string.sub(body, 1, s - 1)
   suffix = string.sub(body, e + 1)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer " .. args[3]
   wrk.headers["X-Forwarded-For"] = args[4]
end

function request()
   counter = counter + 1
   -- thread_number is the global set by setup(); a UUID-shaped, never-repeating id
   local id = string.format("%s-%04x-4000-8000-%012x", nonce, thread_number, counter)
   return wrk.format(nil, nil, nil, prefix .. id .. suffix)
end

-- wrk decides at load time whether delay() exists, so it is defined only when asked for
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
   function delay()
      return delay_ms
   end
end
