--[[
gcra_give_back.lua: give back what a message's decisions spent (its ledger, written by
gcra_batch.lua), in one atomic call. The caller has read and deleted the ledger already.
Arithmetic: mqpolicy.store.budget's (given_back, debt_at), as in gcra_batch.lua (integers
below 2^53, exact divisions).

A spend raised a bucket's debt by amount tokens at the bucket's time at_ms, on top of a
debt of backlog tokens. The bucket refills its oldest debt first: at the bucket's time now
(max(now_ms, its stored time)) the spend still holds amount - max(0, refill * elapsed -
backlog) tokens (none once refill * elapsed >= backlog + amount), elapsed being that time
minus at_ms. Lowering the debt by that much leaves the bucket as it would be had the spend
never been made.

KEYS: the buckets, each listed once.

ARGV[1]            now_ms: the caller's clock
ARGV[2]            allowance_ms: how long a bucket is kept after it is full again
then, per spend:
  key_index        KEYS index of the bucket
  amount           tokens the spend added
  backlog          the bucket's debt before it
  at_ms            the bucket's time at the spend
  refill           tokens that come back per ms

Returns: the number of spends given back.

Writes: each bucket given back, or counted up to now_ms, is SET to its debt and time ('<dd')
with PX as gcra_batch.lua sets it, or deleted when its debt is 0 (a full bucket).
]]

local fmod = math.fmod
local format = string.format
local pack, unpack = struct.pack, struct.unpack

local function div_ceil(a, b)
  local r = fmod(a, b)
  if r == 0 then
    return a / b
  end
  return (a - r) / b + 1
end

local now = tonumber(ARGV[1])
local allowance = tonumber(ARGV[2])
local given = 0
local pos = 3
while pos + 4 <= #ARGV do
  local key = KEYS[tonumber(ARGV[pos])]
  local amount = tonumber(ARGV[pos + 1])
  local backlog = tonumber(ARGV[pos + 2])
  local spent_at = tonumber(ARGV[pos + 3])
  local refill = tonumber(ARGV[pos + 4])
  pos = pos + 5
  given = given + 1
  local value = redis.call('GET', key)
  if value and #value == 16 then
    local debt, at = unpack('<dd', value)
    local time = at
    if now > time then
      time = now
      if debt > 0 then
        if now - at >= div_ceil(debt, refill) then
          debt = 0
        else
          debt = debt - refill * (now - at)
        end
      end
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
    if give > debt then
      give = debt
    end
    -- the bucket is counted up to the give-back's time even when nothing is given back
    -- (as the memory store counts it): a clock that steps back afterwards sees it there
    if give > 0 or time > at then
      debt = debt - give
      if debt > 0 then
        local ttl = (time - now) + div_ceil(debt, refill) + allowance
        redis.call('SET', key, pack('<dd', debt, time), 'PX', format('%.0f', ttl))
      else
        redis.call('DEL', key)
      end
    end
  end
end
return given
