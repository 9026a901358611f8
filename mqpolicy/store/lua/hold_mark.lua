-- hold_mark.lua: set the state of existing hold records (never creates a record).
--
-- KEYS     the record keys (each a JSON object of string fields)
-- ARGV[1]  the new state ("releasing")
-- ARGV[2]  when, in ms since the epoch (the caller's clock)
--
-- Returns one integer per key: 1 when the record existed and was marked, 0 when it is gone
-- (deleted or expired meanwhile: a plain SET would have created a partial record) or is
-- not a JSON object (left as it is, for the scheduler to report). The TTL is kept.

local marked = {}
for i, key in ipairs(KEYS) do
  marked[i] = 0
  local value = redis.call('GET', key)
  if value then
    local ok, record = pcall(cjson.decode, value)
    if ok and type(record) == 'table' then
      record['state'] = ARGV[1]
      record['state_ms'] = ARGV[2]
      redis.call('SET', key, cjson.encode(record), 'KEEPTTL')
      marked[i] = 1
    end
  end
end
return marked
