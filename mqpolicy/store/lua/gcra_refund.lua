--[[
gcra_refund.lua: give back what decisions spent in one slot of a Redis Cluster when another
slot of the same decision refused it (or found it a duplicate), in one atomic call.
Used only by mqpolicy.store.cluster; see its docstring for the protocol and the guarantee.
Arithmetic: mqpolicy.store.budget's, as in gcra_batch.lua (integers below 2^53, exact divisions).

A spend raised a bucket's debt by amount tokens at the bucket's time at_ms, on top of a
debt of backlog tokens. The bucket refills refill tokens a ms, the older debt first, so
when the refund runs (at now = max(spent_ms, Redis' TIME), the bucket's time max(now, its
stored time)) the spend still holds at least amount - max(0, refill * elapsed - backlog)
tokens, elapsed being the bucket's time minus at_ms: that is what is given back, never
more than the spend still holds, so a refund never lets more through than the budget
(clocks agreeing, as key expiry already needs). At worst, for a bucket that was nearly
full, what refilled during the round trip stays spent.

KEYS: every key name the call uses (bucket keys and once keys), each listed once.

ARGV[1]            R, the number of refunds
ARGV[2]            allowance_ms: how long a bucket is kept after it is full again
then, R times:
  spent_ms         the decision's now_ms
  once_index       KEYS index of a once key this decision set and must delete, 0 for none
  b                number of buckets to give back
  then, b times:
    key_index      KEYS index of the bucket
    amount         tokens the decision added to its debt (cost * unit of each spend)
    backlog        the bucket's debt before the decision, as gcra_batch.lua reports it
    at_ms          the bucket's time at the decision, as gcra_batch.lua reports it
    refill         tokens that come back per ms
  n                number of checks to report on
  then, n times:
    key_index      KEYS index of the bucket
    refill, unit, burst   the check's

Returns: an array of R arrays, each of n integers: the free units of each reported bucket
after the refund, counted at now = max(spent_ms, TIME) (budget.free_units).

Writes: each bucket given back is SET to its debt and time ('<dd') with PX as gcra_batch.lua sets
it, or deleted when its debt is 0 (a full bucket); the once key is deleted.
]]

local floor, fmod = math.floor, math.fmod
local format = string.format
local pack, unpack = struct.pack, struct.unpack

local function div_floor(a, b)
  return (a - fmod(a, b)) / b
end

local function div_ceil(a, b)
  local r = fmod(a, b)
  if r == 0 then
    return a / b
  end
  return (a - r) / b + 1
end

-- a stored bucket: debt and time, nil for no bucket
local function stored(key)
  local value = redis.call('GET', key)
  if not value then
    return nil
  end
  if #value ~= 16 then
    return nil
  end
  return unpack('<dd', value)
end

-- budget.debt_at with the elapsed time capped (gcra_batch.lua's bucket_at)
local function debt_at(debt, at, now, refill)
  if now <= at or debt == 0 then
    return debt
  end
  if now - at >= div_ceil(debt, refill) then
    return 0
  end
  return debt - refill * (now - at)
end

local clock = redis.call('TIME')
local server_ms = tonumber(clock[1]) * 1000 + floor(tonumber(clock[2]) / 1000)
local allowance = tonumber(ARGV[2])

local out = {}
local pos = 3
for r = 1, tonumber(ARGV[1]) do
  local spent = tonumber(ARGV[pos])
  local once = tonumber(ARGV[pos + 1])
  local b = tonumber(ARGV[pos + 2])
  pos = pos + 3
  local now = spent
  if server_ms > now then
    now = server_ms
  end
  for _ = 1, b do
    local key = KEYS[tonumber(ARGV[pos])]
    local amount = tonumber(ARGV[pos + 1])
    local backlog = tonumber(ARGV[pos + 2])
    local spent_at = tonumber(ARGV[pos + 3])
    local refill = tonumber(ARGV[pos + 4])
    pos = pos + 5
    local debt, at = stored(key)
    if debt ~= nil and debt > 0 then
      local time = at
      if now > time then
        time = now
      end
      local give = amount
      local elapsed = time - spent_at
      if elapsed > 0 then
        if elapsed >= div_ceil(amount + backlog, refill) then
          give = 0
        elseif refill * elapsed > backlog then
          give = amount - (refill * elapsed - backlog)
        end
      end
      if give > 0 then
        debt = debt_at(debt, at, time, refill) - give
        if debt > 0 then
          local ttl = (time - now) + div_ceil(debt, refill) + allowance
          redis.call('SET', key, pack('<dd', debt, time), 'PX', format('%.0f', ttl))
        else
          redis.call('DEL', key)
        end
      end
    end
  end
  if once > 0 then
    redis.call('DEL', KEYS[once])
  end
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  local row = {}
  for i = 1, n do
    local debt, at = stored(KEYS[tonumber(ARGV[pos])])
    local refill = tonumber(ARGV[pos + 1])
    local unit = tonumber(ARGV[pos + 2])
    local burst = tonumber(ARGV[pos + 3])
    pos = pos + 4
    local room = burst * unit
    if debt ~= nil then
      room = room - debt_at(debt, at, now, refill)
    end
    if room > 0 then
      row[i] = div_floor(room, unit)
    else
      row[i] = 0
    end
  end
  out[r] = row
end
return out
