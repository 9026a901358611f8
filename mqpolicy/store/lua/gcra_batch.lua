--[[
gcra_batch.lua: evaluate a batch of independent rate decisions in one atomic call.

Math: exactly mqpolicy.store.budget.gcra_step (IEEE doubles, same expressions in the same order).
Rules: exactly mqpolicy.store.memory.MemoryStore.evaluate (see that module's docstring):
checks run in order and see what earlier checks of the same decision spent on the same key;
a failing blocking check spends nothing for the whole decision; otherwise every passing
consume check is spent; a present once key makes the decision a duplicate (nothing spent).
Decisions are independent of each other but run in order, so a later decision sees what an
earlier one in the same batch spent.

KEYS: every key name the batch uses (bucket keys and once keys), each listed once.

ARGV[1]            D, the number of decisions; -D for the same plus backlogs (below)
then, D times:
  now_ms           the caller's clock for this decision (ms)
  n                number of checks
  once_index       KEYS index of the decision's once key, 0 for none
  once_ttl_ms      lifetime of the once key (ms)
  then, n times:
    key_index      KEYS index of the bucket
    interval_ms    ms for one unit to come back (may be fractional)
    burst          units that may be spent at once
    cost           units this check spends
    flags          1 = consume + 2 = blocking

Returns: an array of D arrays, one per decision, each of integers:
  committed, duplicate, then per check: allowed, remaining, retry_after_ms
  (committed/duplicate/allowed are 1 or 0; retry_after_ms is -1 when cost > burst: never)
  With -D, a committed row also ends with, per check, its bucket's backlog before the
  decision, tat - now_ms (0 for a full bucket), as a '%.17g' string (for the cluster
  store's give-back, mqpolicy.store.cluster; the decision itself is the same).

Writes: each spent bucket is SET to its new tat (string.format '%.17g', so Python reads back
the same double) with PX max(1, ceil(tat - now_ms)) (budget.ttl_for); the once key is SET to
'1' with PX once_ttl_ms. Uncommitted and duplicate decisions write nothing.
]]

local floor, ceil, max = math.floor, math.ceil, math.max
local format = string.format

-- the stored tat raised to now (an absent or stale key is a full bucket)
local function stored_tat(index, now)
  local value = redis.call('GET', KEYS[index])
  local tat = nil
  if value then
    tat = tonumber(value)
  end
  if tat == nil or tat < now then
    return now
  end
  return tat
end

-- whole units of interval in span_ms, counted relative to now (budget.whole_units: the
-- slack 1e-9 + burst * 1e-12 covers the rounding of interval * burst and of the division)
local function whole_units(span, interval, burst)
  local left = floor(span / interval + (1e-9 + burst * 1e-12))
  if left < 0 then
    return 0
  end
  return left
end

-- units the bucket holds (budget.free_units; tat already raised to now)
local function free_units(interval, burst, tat, now)
  return whole_units(interval * burst - (tat - now), interval, burst)
end

local out = {}
local pos = 2
local count = tonumber(ARGV[1])
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
  local row = {0, 0}

  if once > 0 and redis.call('EXISTS', KEYS[once]) == 1 then
    row[2] = 1
    for i = 1, n do
      local k = tonumber(ARGV[pos])
      local interval = tonumber(ARGV[pos + 1])
      local burst = tonumber(ARGV[pos + 2])
      pos = pos + 5
      row[3 * i] = 1
      row[3 * i + 1] = free_units(interval, burst, stored_tat(k, now), now)
      row[3 * i + 2] = 0
    end
  else
    local original, tentative, last_spender = {}, {}, {}
    local keys, intervals, bursts, allowed, spent_left, retry = {}, {}, {}, {}, {}, {}
    local blocked = false
    for i = 1, n do
      local k = tonumber(ARGV[pos])
      local interval = tonumber(ARGV[pos + 1])
      local burst = tonumber(ARGV[pos + 2])
      local cost = tonumber(ARGV[pos + 3])
      local flags = tonumber(ARGV[pos + 4])
      pos = pos + 5

      local tat = tentative[k]
      if tat == nil then
        tat = stored_tat(k, now)
        original[k] = tat
        tentative[k] = tat
      end
      local tolerance = interval * burst
      local increment = interval * cost
      local new_tat = tat + increment
      local allow_at = new_tat - tolerance
      local ok, wait = 0, 0
      if increment > tolerance then
        wait = -1
      elseif allow_at <= now then
        ok = 1
        if flags % 2 == 1 then
          tentative[k] = new_tat
          last_spender[k] = i
          spent_left[i] = whole_units((tolerance - (tat - now)) - increment, interval, burst)
        end
      else
        wait = max(1, ceil(allow_at - now))
      end
      if ok == 0 and flags >= 2 then
        blocked = true
      end
      keys[i], intervals[i], bursts[i], allowed[i], retry[i] = k, interval, burst, ok, wait
    end

    if not blocked then
      row[1] = 1
    end
    for i = 1, n do
      local k = keys[i]
      local left
      if blocked then
        left = free_units(intervals[i], bursts[i], original[k], now)
      elseif last_spender[k] == i then
        left = spent_left[i]
      else
        left = free_units(intervals[i], bursts[i], tentative[k], now)
      end
      row[3 * i] = allowed[i]
      row[3 * i + 1] = left
      row[3 * i + 2] = retry[i]
    end

    if not blocked then
      for i = 1, n do
        local k = keys[i]
        if last_spender[k] == i then
          local tat = tentative[k]
          local ttl = format('%d', max(1, ceil(tat - now)))
          redis.call('SET', KEYS[k], format('%.17g', tat), 'PX', ttl)
        end
      end
      if once > 0 then
        redis.call('SET', KEYS[once], '1', 'PX', once_ttl)
      end
      if backlogs then
        for i = 1, n do
          row[3 * n + 2 + i] = format('%.17g', original[keys[i]] - now)
        end
      end
    end
  end
  out[d] = row
end
return out
