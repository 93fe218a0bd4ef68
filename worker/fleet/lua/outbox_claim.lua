-- outbox_claim: take the outbox entries due now, each for one caller, as a lease.
--
-- KEYS  outbox_key   dormant:outbox  (zset: task id -> when to check it next)
-- ARGV  now          epoch seconds
--       lease_until  when an entry comes due again if its claimer never reschedules it
--                    (a worker that died mid-check)
--       limit        most entries taken at once
--
-- Returns the task ids taken (their checks move to lease_until, so no other caller sees them).
local outbox_key = KEYS[1]
local now = ARGV[1]
local lease_until = ARGV[2]
local limit = ARGV[3]

local ids = redis.call('ZRANGEBYSCORE', outbox_key, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZADD', outbox_key, lease_until, id)
end
return ids
