-- external: journal a change made outside dormant (worker/events.py), atomic.
--
-- KEYS  lock_key         dormant:lock:<uuid>
--       fence_key        dormant:fence:<uuid>
--       journal_key      dormant:journal:<uuid>
--       journal_all_key  dormant:journal
--       deadlines_key    dormant:deadlines       (zset of auto-unpause times)
--       deadline_key     dormant:deadline:<uuid>
-- ARGV  fence_seen       the fence read before the real state was ('' = never locked)
--       last_id_seen     the newest journal id read then ('' = empty journal)
--       entry            the journal entry (JSON)
--       clear_deadline   '1' when the guest is no longer paused: drop its deadline
--       instance         the uuid (member of the deadlines zset)
--       maxlen           approximate length kept of the instance's journal
--       maxlen_all       approximate length kept of the fleet journal
--       journal_ttl      seconds the instance's journal outlives its last entry
--
-- Returns 'journaled', or 'locked' (a transition holds the instance: the change is its own)
-- or 'moved' (a transition took the lock or something was journaled since the caller read
-- the state, which may therefore be a transition's doing).
local lock_key, fence_key, journal_key, journal_all_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local deadlines_key, deadline_key = KEYS[5], KEYS[6]
local fence_seen = ARGV[1]
local last_id_seen = ARGV[2]
local entry = ARGV[3]
local clear_deadline = ARGV[4] == '1'
local instance = ARGV[5]
local maxlen = ARGV[6]
local maxlen_all = ARGV[7]
local journal_ttl = ARGV[8]

if redis.call('EXISTS', lock_key) == 1 then return 'locked' end
if (redis.call('GET', fence_key) or '') ~= fence_seen then return 'moved' end
local newest = redis.call('XREVRANGE', journal_key, '+', '-', 'COUNT', 1)[1]
if (newest and newest[1] or '') ~= last_id_seen then return 'moved' end
redis.call('XADD', journal_key, 'MAXLEN', '~', maxlen, '*', 'entry', entry)
redis.call('EXPIRE', journal_key, journal_ttl)
redis.call('XADD', journal_all_key, 'MAXLEN', '~', maxlen_all, '*', 'entry', entry)
if clear_deadline then
  redis.call('ZREM', deadlines_key, instance)
  redis.call('DEL', deadline_key)
end
return 'journaled'
