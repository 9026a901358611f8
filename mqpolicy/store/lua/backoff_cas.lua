--[[
backoff_cas.lua: replace one destination's backoff state only if nobody changed it since
it was read (compare-and-set), so two feedback processes never lose each other's update.

KEYS[1]  the backoff hash (<prefix>backoff)
ARGV[1]  the destination (hash field)
ARGV[2]  the state read before, as read ('' when the field was absent)
ARGV[3]  the new state (JSON)
ARGV[4]  TTL of the hash in ms (a safety net: states are rewritten on every change)

Returns 1 when written, 0 when the state had changed (the caller reads again and retries).
]]
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then
  current = ''
end
if current ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
