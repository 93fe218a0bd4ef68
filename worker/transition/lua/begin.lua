-- begin: the first step of a transition, atomic.
--
-- KEYS  request_key   dormant:request:<request id>  (its record: pending, done or failed)
--       lock_key      dormant:lock:<uuid>           ("<fence>:<token>")
--       fence_key     dormant:fence:<uuid>          (monotonic counter)
-- ARGV  token         this attempt's owner token
--       lock_ttl_ms   lifetime of the lock, renewed while held
--       fingerprint   what this request asks for ("action|uuid|target|max_seconds"),
--                     or '' to neither check nor bind it
--       pending       the record binding a new id (JSON, status pending; '' = none)
--       result_ttl    seconds a request record is kept
--       fence_floor   the fence a guest carries that this counter fell behind ('0' = none):
--                     a failover lost fences; the next one handed out is above it
--
-- Returns one of
--   {'mismatch', record}              the id was first used for another fingerprint
--   {'done', record}                  the request already finished: its recorded result
--   {'busy', holder, pttl_ms}         another transition holds the instance
--   {'acquired', lock_value, record}  the lock is ours ('' when the id is new)
local request_key, lock_key, fence_key = KEYS[1], KEYS[2], KEYS[3]
local token = ARGV[1]
local lock_ttl_ms = ARGV[2]
local fingerprint = ARGV[3]
local pending = ARGV[4]
local result_ttl = ARGV[5]
local fence_floor = tonumber(ARGV[6])

local record = redis.call('GET', request_key)
if record then
  local fields = cjson.decode(record)
  -- A record without a fingerprint predates binding (or never reached an instance).
  if fingerprint ~= '' and fields.fingerprint and fields.fingerprint ~= fingerprint then
    return {'mismatch', record}
  end
  if fields.status == 'done' then
    return {'done', record}
  end
end

local holder = redis.call('GET', lock_key)
if holder and holder:sub(-(#token + 1)) == ':' .. token then
  return {'acquired', holder, record or ''}  -- ours: a retried call whose first reply was lost
end
if holder then
  return {'busy', holder, redis.call('PTTL', lock_key)}
end

if fence_floor > tonumber(redis.call('GET', fence_key) or '0') then
  redis.call('SET', fence_key, fence_floor)
end
local fence = redis.call('INCR', fence_key)
local lock_value = fence .. ':' .. token
redis.call('SET', lock_key, lock_value, 'PX', lock_ttl_ms)
if not record and pending ~= '' then
  -- Bind the id now, so a concurrent reuse for something else is refused too.
  redis.call('SET', request_key, pending, 'EX', result_ttl)
end
return {'acquired', lock_value, record or ''}
