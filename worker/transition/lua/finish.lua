-- finish: record a transition's result, journal it, update the deadline, release the lock.
--
-- KEYS  lock_key          dormant:lock:<uuid>
--       request_key       dormant:request:<request id>
--       journal_key       dormant:journal:<uuid>   (the instance's journal)
--       fleet_journal_key dormant:journal          (every entry of the fleet)
--       deadlines_key     dormant:deadlines        (zset uuid -> auto-unpause time)
--       deadline_key      dormant:deadline:<uuid>  (hash: at, request_id, host)
--       where_key         dormant:where:<uuid>     (registry: host serving the instance)
-- ARGV  lock_value        "<fence>:<token>" held, or '' when no lock was taken
--       record            the request's record (JSON), or '' to store none
--       result_ttl        seconds the record is kept
--       entry             the journal entry (JSON)
--       deadline          epoch seconds to set, 'clear' to remove, '' to leave alone
--       must_own          '1': refuse (return 0) unless the lock still carries lock_value
--       journal_maxlen    approximate length kept of the instance's journal
--       fleet_maxlen      approximate length kept of the fleet journal
--       instance          the instance's UUID (member of the deadline set)
--       request_id        the request id (kept with the deadline)
--       host              this worker's host
--       registry_ttl      seconds for where_key; '0' leaves the registry alone
--       journal_instance  '1': also append to the instance's journal (a known instance)
--       journal_ttl       seconds the instance's journal outlives its last entry
--
-- Returns 1, or 0 when must_own and the lock was lost (nothing written).
local lock_key, request_key, journal_key, fleet_journal_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local deadlines_key, deadline_key, where_key = KEYS[5], KEYS[6], KEYS[7]
local lock_value = ARGV[1]
local record = ARGV[2]
local result_ttl = ARGV[3]
local entry = ARGV[4]
local deadline = ARGV[5]
local must_own = ARGV[6] == '1'
local journal_maxlen = ARGV[7]
local fleet_maxlen = ARGV[8]
local instance = ARGV[9]
local request_id = ARGV[10]
local host = ARGV[11]
local registry_ttl = ARGV[12]
local journal_instance = ARGV[13] == '1'
local journal_ttl = ARGV[14]

local owned = lock_value ~= '' and redis.call('GET', lock_key) == lock_value
if must_own and not owned then
  return 0
end

local store_record = record ~= ''
if store_record and not owned then
  -- Without the lock, never overwrite a result another attempt finished.
  local existing = redis.call('GET', request_key)
  if existing and cjson.decode(existing).status == 'done' then
    store_record = false
  end
end
if store_record then
  redis.call('SET', request_key, record, 'EX', result_ttl)
end

if journal_instance then
  redis.call('XADD', journal_key, 'MAXLEN', '~', journal_maxlen, '*', 'entry', entry)
  redis.call('EXPIRE', journal_key, journal_ttl)
end
redis.call('XADD', fleet_journal_key, 'MAXLEN', '~', fleet_maxlen, '*', 'entry', entry)

if deadline == 'clear' then
  redis.call('ZREM', deadlines_key, instance)
  redis.call('DEL', deadline_key)
elseif deadline ~= '' then
  redis.call('ZADD', deadlines_key, deadline, instance)
  redis.call('HSET', deadline_key, 'at', deadline, 'request_id', request_id, 'host', host)
end

if must_own and registry_ttl ~= '0' then
  redis.call('SET', where_key, host, 'EX', registry_ttl)
end
if owned then
  redis.call('DEL', lock_key)
end
return 1
