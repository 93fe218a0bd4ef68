-- renew: extend a lock's lifetime, only while it is still ours.
--
-- KEYS  lock_key     dormant:lock:<uuid>
-- ARGV  lock_value   "<fence>:<token>" this holder took
--       lock_ttl_ms  the new lifetime
--
-- Returns 1 when renewed, 0 when the lock is gone or someone else's.
local lock_key = KEYS[1]
local lock_value = ARGV[1]
local lock_ttl_ms = ARGV[2]

if redis.call('GET', lock_key) == lock_value then
  return redis.call('PEXPIRE', lock_key, lock_ttl_ms)
end
return 0
