-- hold_lease.lua: the scheduler's lease (one active scheduler per MTA instance).
--
-- KEYS[1]  the lease key
-- ARGV[1]  "acquire" or "release"
-- ARGV[2]  the caller's owner token (host, pid and a random part)
-- ARGV[3]  lease length in ms (acquire only)
--
-- acquire: take the lease when it is free, or extend it when the caller holds it already.
-- release: delete the lease only when the caller holds it (compare-and-delete).
-- Returns 1 when the caller holds the lease afterwards (acquire) or released it (release),
-- else 0. The lease expires by itself (PX): a scheduler that dies loses it after ARGV[3] ms.

local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'acquire' then
  if holder == false or holder == ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
    return 1
  end
  return 0
end
if ARGV[1] == 'release' then
  if holder == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
return redis.error_reply('hold_lease.lua: unknown operation ' .. tostring(ARGV[1]))
