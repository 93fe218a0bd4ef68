-- intent: remember the state before a libvirt call, while the lock is still ours.
--
-- KEYS  lock_key     dormant:lock:<uuid>
--       request_key  dormant:request:<request id>
-- ARGV  lock_value   "<fence>:<token>" this holder took
--       pending      the pending record (JSON: state_before, fingerprint, ...)
--       result_ttl   seconds the record is kept
--
-- Returns 1, or 0 when the lock was lost (nothing written).
local lock_key, request_key = KEYS[1], KEYS[2]
local lock_value = ARGV[1]
local pending = ARGV[2]
local result_ttl = ARGV[3]

if redis.call('GET', lock_key) ~= lock_value then
  return 0
end
redis.call('SET', request_key, pending, 'EX', result_ttl)
return 1
