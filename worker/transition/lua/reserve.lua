-- reserve: promise room on a host to one save (disk) or restore (memory), if it fits beside
-- the promises of those in flight there.
--
-- KEYS  reserved_key  dormant:host:<host>:reserved:<resource>
--                     (hash: guest uuid -> "<bytes>:<expiry epoch ms>")
-- ARGV  member        the guest's uuid (a retry of the same guest replaces its own promise)
--       bytes         what this one needs
--       room          bytes free now minus the reserve (the worker's fresh reading)
--       now_ms        the worker's clock, epoch milliseconds
--       expiry_ms     when this promise lapses if never released (its call's deadline)
--
-- Returns {1, in_flight} when promised, {0, in_flight} when in_flight + bytes > room; in_flight
-- is what the others hold. Promises past their expiry (a worker that died) are dropped here.
local reserved_key = KEYS[1]
local member = ARGV[1]
local bytes = tonumber(ARGV[2])
local room = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local expiry_ms = tonumber(ARGV[5])

local in_flight = 0
local latest = expiry_ms
local promises = redis.call('HGETALL', reserved_key)
for i = 1, #promises, 2 do
  local other, value = promises[i], promises[i + 1]
  local sep = string.find(value, ':', 1, true)
  local other_bytes = tonumber(string.sub(value, 1, sep - 1))
  local other_expiry = tonumber(string.sub(value, sep + 1))
  if other_expiry <= now_ms then
    redis.call('HDEL', reserved_key, other)
  elseif other ~= member then
    in_flight = in_flight + other_bytes
    if other_expiry > latest then latest = other_expiry end
  end
end
if in_flight + bytes > room then
  return {0, in_flight}
end
redis.call('HSET', reserved_key, member, string.format('%d:%d', bytes, expiry_ms))
redis.call('PEXPIREAT', reserved_key, latest)
return {1, in_flight}
