--[[
gcra_batch.lua: evaluate a batch of independent rate decisions in one atomic call.

Arithmetic: exactly mqpolicy.store.budget's (see that module's docstring): a bucket is its debt in
scaled tokens at its own time, stored as struct.pack('<dd', debt, at_ms) (two little-endian
doubles, 16 bytes: a quarter cheaper to read and write than text, and as exact); every
number is an integer below 2^53 (the checks are validated before they are sent), so every
double here is exact. Products are
formed only where they cannot pass the debt or the capacity (the refill's elapsed time is
capped at the time to refill the debt); divisions are exact integer divisions (fmod).
Rules: exactly mqpolicy.memory_store.MemoryStore.evaluate (see that module's docstring):
checks run in order and see what earlier checks of the same decision spent on the same key;
a failing blocking check spends nothing for the whole decision; otherwise every passing
consume check is spent; a present once key makes the decision a duplicate (nothing spent).
Decisions are independent of each other but run in order, so a later decision sees what an
earlier one in the same batch spent.

KEYS: every key name the batch uses (bucket keys and once keys), each listed once.

ARGV[1]            D, the number of decisions; -D for the same plus backlogs (below)
ARGV[2]            allowance_ms: how long a bucket is kept after it is full again
then, D times:
  now_ms           the caller's clock for this decision (ms)
  n                number of checks; -n when a ledger index follows once_ttl_ms
  once_index       KEYS index of the decision's once key, 0 for none
  once_ttl_ms      lifetime of the once key (ms), and of the ledger
  [ledger_index]   (with -n) KEYS index of the message's ledger (a list)
  then, n times:
    key_index      KEYS index of the bucket
    refill         tokens that come back per ms
    unit           tokens one unit of budget is
    burst          units the bucket holds when full
    cost           units this check spends
    flags          1 = consume + 2 = blocking + 4 * cond, cond = 2 * j + 1: counted only
                   if check j (1-based) failed, 2 * j: only if it passed (a check not
                   counted is allowed, spends and blocks nothing)

Returns: an array of D arrays, one per decision, each of integers:
  committed, duplicate, then per check: allowed, remaining, retry_after_ms
  (committed/duplicate/allowed are 1 or 0; retry_after_ms is -1 when cost > burst: never)
  With -D, a committed row also ends with, per check, its bucket's debt before the decision
  and the bucket's time (for the cluster store's give-back, mqpolicy.store.cluster; the
  decision itself is the same).

Writes: each spent bucket is SET to its debt and time with PX (at_ms - now_ms) + the time
to refill its debt + allowance_ms, or deleted when its debt is 0 (a full bucket is no key);
the once key is SET to '1' with PX once_ttl_ms; with a ledger, each spent bucket's
key name, the tokens added, its debt before and its time, and its refill are RPUSHed to
the ledger (gcra_give_back.lua gives them back), which gets PX once_ttl_ms. Uncommitted
and duplicate decisions write nothing.
]]

local fmod = math.fmod
local format = string.format
local pack, unpack = struct.pack, struct.unpack

-- floor(a / b) and ceil(a / b) for integers 0 <= a < 2^53, 0 < b < 2^53: a - fmod(a, b)
-- is an exact multiple of b, so the division is exact (a plain a / b could round up)
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

-- the bucket's debt and time at now (budget.debt_at): nothing refilled before its own
-- time (a clock that stepped back), refill * elapsed formed only below the debt
local function bucket_at(index, now, refill)
  local value = redis.call('GET', KEYS[index])
  if not value then
    return 0, now
  end
  if #value ~= 16 then  -- not a bucket of this arithmetic
    return 0, now
  end
  local debt, at = unpack('<dd', value)
  if now <= at then
    return debt, at
  end
  if debt > 0 then
    local elapsed = now - at
    if elapsed >= div_ceil(debt, refill) then
      debt = 0
    else
      debt = debt - refill * elapsed
    end
  end
  return debt, now
end

-- whole units left (budget.free_units)
local function free_units(debt, unit, burst)
  local room = burst * unit - debt
  if room <= 0 then
    return 0
  end
  return div_floor(room, unit)
end

local out = {}
local count = tonumber(ARGV[1])
local allowance = tonumber(ARGV[2])
local pos = 3
local backlogs = count < 0
if backlogs then
  count = -count
end
for d = 1, count do
  local now = tonumber(ARGV[pos])
  local n = tonumber(ARGV[pos + 1])
  local once = tonumber(ARGV[pos + 2])
  local once_ttl = ARGV[pos + 3]
  pos = pos + 4
  local ledger = 0
  if n < 0 then
    n = -n
    ledger = tonumber(ARGV[pos])
    pos = pos + 1
  end
  local row = {0, 0}

  if once > 0 and redis.call('EXISTS', KEYS[once]) == 1 then
    row[2] = 1
    for i = 1, n do
      local k = tonumber(ARGV[pos])
      local refill = tonumber(ARGV[pos + 1])
      local unit = tonumber(ARGV[pos + 2])
      local burst = tonumber(ARGV[pos + 3])
      pos = pos + 6
      row[3 * i] = 1
      row[3 * i + 1] = free_units(bucket_at(k, now, refill), unit, burst)
      row[3 * i + 2] = 0
    end
  else
    local before, debts, times, spender = {}, {}, {}, {}
    local keys, refills, units, bursts, allowed, left, retry = {}, {}, {}, {}, {}, {}, {}
    local blocked, repeated = false, false
    for i = 1, n do
      local k = tonumber(ARGV[pos])
      local refill = tonumber(ARGV[pos + 1])
      local unit = tonumber(ARGV[pos + 2])
      local burst = tonumber(ARGV[pos + 3])
      local cost = tonumber(ARGV[pos + 4])
      local flags = tonumber(ARGV[pos + 5])
      pos = pos + 6
      local cond = (flags - flags % 4) / 4
      local consume = flags % 2 == 1
      local blocking = flags % 4 >= 2
      local skipped = false
      if cond > 0 then
        local j = (cond - cond % 2) / 2
        if (allowed[j] == 0) ~= (cond % 2 == 1) then
          consume, blocking, skipped = false, false, true
        end
      end

      local debt = debts[k]
      if debt == nil then
        local at
        debt, at = bucket_at(k, now, refill)
        before[k], debts[k], times[k] = debt, debt, at
      else
        repeated = true
      end
      local room = burst * unit - debt
      local ok, wait, units_left = 0, 0, 0
      if cost > burst then
        wait = -1
        units_left = free_units(debt, unit, burst)
      else
        local need = cost * unit
        if need <= room then
          ok = 1
          if consume then
            debts[k] = debt + need
            room = room - need
            spender[k] = i
          end
          units_left = div_floor(room, unit)
        else
          wait = (times[k] - now) + div_ceil(need - room, refill)
          units_left = free_units(debt, unit, burst)
        end
      end
      if ok == 0 and blocking then
        blocked = true
      end
      if skipped then
        ok, wait = 1, 0
      end
      keys[i], refills[i], units[i], bursts[i] = k, refill, unit, burst
      allowed[i], left[i], retry[i] = ok, units_left, wait
    end

    if not blocked then
      row[1] = 1
    end
    for i = 1, n do
      local k = keys[i]
      local units_left = left[i]
      if blocked then
        units_left = free_units(before[k], units[i], bursts[i])
      elseif repeated and spender[k] ~= i then
        units_left = free_units(debts[k], units[i], bursts[i])
      end
      row[3 * i] = allowed[i]
      row[3 * i + 1] = units_left
      row[3 * i + 2] = retry[i]
    end

    if not blocked then
      for i = 1, n do
        local k = keys[i]
        if spender[k] == i then
          local debt, at = debts[k], times[k]
          if debt > 0 then
            local ttl = (at - now) + div_ceil(debt, refills[i]) + allowance
            redis.call('SET', KEYS[k], pack('<dd', debt, at), 'PX', format('%.0f', ttl))
          else
            redis.call('DEL', KEYS[k])
          end
        end
      end
      if once > 0 then
        redis.call('SET', KEYS[once], '1', 'PX', once_ttl)
      end
      if ledger > 0 then
        local wrote = false
        for i = 1, n do
          local k = keys[i]
          if spender[k] == i and debts[k] > before[k] then
            redis.call('RPUSH', KEYS[ledger], KEYS[k], format('%.0f', debts[k] - before[k]),
                       format('%.0f', before[k]), format('%.0f', times[k]),
                       format('%.0f', refills[i]))
            wrote = true
          end
        end
        if wrote then
          redis.call('PEXPIRE', KEYS[ledger], once_ttl)
        end
      end
      if backlogs then
        for i = 1, n do
          row[3 * n + 1 + 2 * i] = before[keys[i]]
          row[3 * n + 2 + 2 * i] = times[keys[i]]
        end
      end
    end
  end
  out[d] = row
end
return out
