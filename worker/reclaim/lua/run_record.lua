-- run_record: finish one entry of a run; count it once even if a redelivered task records it
-- again, and add it to the run's manifest when it was suspended.
--
-- KEYS  run_key       dormant:run:<id>           (hash: meta, i:<uuid> entries, todo, done)
--       manifest_key  dormant:run:<id>:manifest  (set of the instances the run suspended)
-- ARGV  field         the entry's field in run_key: i:<uuid>
--       entry         the finished entry (JSON, with "finished": true)
--       suspended     '1': the action suspended the instance (add it to the manifest)
--       ttl           seconds the manifest is kept (as long as the report)
--       instance      the instance's UUID (the manifest member)
--
-- Returns {first, done, todo}: first is 1 when this call finished the entry (0 when it was
-- already finished); the caller that sees done == todo first closes the run.
local run_key, manifest_key = KEYS[1], KEYS[2]
local field = ARGV[1]
local entry = ARGV[2]
local suspended = ARGV[3] == '1'
local ttl = ARGV[4]
local instance = ARGV[5]

local first = 1
local old = redis.call('HGET', run_key, field)
if old then
  local ok, decoded = pcall(cjson.decode, old)
  if ok and decoded['finished'] then first = 0 end
end
redis.call('HSET', run_key, field, entry)
if suspended then
  redis.call('SADD', manifest_key, instance)
  redis.call('EXPIRE', manifest_key, ttl)
end
local done = tonumber(redis.call('HGET', run_key, 'done') or '0')
if first == 1 then done = redis.call('HINCRBY', run_key, 'done', 1) end
local todo = tonumber(redis.call('HGET', run_key, 'todo') or '0')
return {first, done, todo}
