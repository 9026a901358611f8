--[[
gcra_refund.lua: give back what decisions spent in one slot of a Redis Cluster when another
slot of the same decision refused it (or found it a duplicate), in one atomic call.
Used only by mqpolicy.store.cluster; see its docstring for the protocol and the guarantee.

A spend raised a bucket's tat by amount_ms at spent_ms (the decision's now_ms), on top of a
backlog of backlog_ms (how far the tat was ahead of spent_ms before). Until
spent_ms + backlog_ms the bucket cannot have refilled to full, so later spends were made on
top of this one. When the refund runs, at Redis' own clock now = TIME, the spend therefore
still holds at least amount_ms - max(0, (now - spent_ms) - backlog_ms) of the bucket, and
that is what is given back: never more than the spend still holds, so a refund never lets
more through than the budget (clocks agreeing, as key expiry already needs). At worst, for
a bucket that was nearly full, what refilled during the round trip stays spent.

KEYS: every key name the call uses (bucket keys and once keys), each listed once.

ARGV[1]            R, the number of refunds
then, R times:
  spent_ms         the decision's now_ms
  once_index       KEYS index of a once key this decision set and must delete, 0 for none
  b                number of buckets to give back
  then, b times:
    key_index      KEYS index of the bucket
    amount_ms      how far the decision raised its tat (sum of interval_ms * cost spent)
    backlog_ms     (tat - spent_ms) before the decision, as gcra_batch.lua reports it
  n                number of checks to report on
  then, n times:
    key_index      KEYS index of the bucket
    interval_ms    the check's interval
    burst          the check's burst

Returns: an array of R arrays, each of n integers: the free units of each reported bucket
after the refund, counted at now = max(spent_ms, TIME) (budget.free_units).

Writes: each bucket given back is SET to its new tat ('%.17g') with PX ceil(tat - now), where
now = max(spent_ms, TIME), or deleted when the new tat is not after now (a full bucket); the
once key is deleted.
]]

local floor, ceil = math.floor, math.ceil
local format = string.format

-- budget.free_units: whole units free at now, counted relative to now
local function free_units(interval, burst, tat, now)
  local left = floor((interval * burst - (tat - now)) / interval + (1e-9 + burst * 1e-12))
  if left < 0 then
    return 0
  end
  return left
end

local clock = redis.call('TIME')
local server_ms = tonumber(clock[1]) * 1000 + floor(tonumber(clock[2]) / 1000)

local out = {}
local pos = 2
for r = 1, tonumber(ARGV[1]) do
  local spent = tonumber(ARGV[pos])
  local once = tonumber(ARGV[pos + 1])
  local b = tonumber(ARGV[pos + 2])
  pos = pos + 3
  local now = spent
  if server_ms > now then
    now = server_ms
  end
  local elapsed = now - spent
  for _ = 1, b do
    local key = KEYS[tonumber(ARGV[pos])]
    local lost = elapsed - tonumber(ARGV[pos + 2])
    if lost < 0 then
      lost = 0
    end
    local give = tonumber(ARGV[pos + 1]) - lost
    pos = pos + 3
    if give > 0 then
      local value = redis.call('GET', key)
      local tat = value and tonumber(value)
      if tat then
        tat = tat - give
        if tat > now then
          redis.call('SET', key, format('%.17g', tat), 'PX', format('%d', ceil(tat - now)))
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
    local value = redis.call('GET', KEYS[tonumber(ARGV[pos])])
    local interval = tonumber(ARGV[pos + 1])
    local burst = tonumber(ARGV[pos + 2])
    pos = pos + 3
    local tat = now
    if value then
      tat = tonumber(value) or now
    end
    if tat < now then
      tat = now
    end
    row[i] = free_units(interval, burst, tat, now)
  end
  out[r] = row
end
return out
