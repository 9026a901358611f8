-- hold_mark.lua: set the state of existing hold records (never creates a record).
--
-- KEYS     the record hashes
-- ARGV[1]  the new state ("releasing")
-- ARGV[2]  when, in ms since the epoch (the caller's clock)
--
-- Returns one integer per key: 1 when the record existed and was marked, 0 when it is gone
-- (deleted or expired meanwhile: a plain HSET would have created a partial record).

local marked = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'state', ARGV[1], 'state_ms', ARGV[2])
    marked[i] = 1
  else
    marked[i] = 0
  end
end
return marked
