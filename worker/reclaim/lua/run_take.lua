-- run_take: start up to `want` queued actions of a run, never one of a later wave before the
-- waves ahead of it finished (worker/reclaim/order.py `room`, the same rule), in one step:
-- no WATCH to lose to an action finishing meanwhile, so no retries when a host is busy.
--
-- KEYS  run_key    dormant:run:<id>        (hash: done, taken, waves = JSON list of wave ends)
--       queue_key  dormant:run:<id>:queue  (list of the instances still to act on)
-- ARGV  want       how many actions the caller may start
--
-- Returns the instances taken (maybe none), in queue order.
local run_key, queue_key = KEYS[1], KEYS[2]
local want = tonumber(ARGV[1])

local fields = redis.call('HMGET', run_key, 'done', 'taken', 'waves')
local done = tonumber(fields[1] or '0')
local taken = tonumber(fields[2] or '0')
local room = want
for _, wave_end in ipairs(cjson.decode(fields[3] or '[]')) do
  if wave_end > done then  -- the current wave: the first whose end is beyond what is done
    room = math.max(0, math.min(want, wave_end - taken))
    break
  end
end
if room <= 0 then
  return {}
end
local items = redis.call('LPOP', queue_key, room)
redis.call('HINCRBY', run_key, 'taken', room)
return items or {}
