-- stream-learner join step: one atomic call per poll of the joiner.
--
-- Applies a batch of prediction and label events to the join state, advances
-- the watermark, closes windows and garbage-collects, and returns the examples
-- to emit. Everything a call emits is also recorded in an outbox and kept
-- until the joiner acknowledges it (after the broker has the examples), so a
-- crash between this call and the produce never loses an example: the outbox
-- is claimed and re-emitted, with the same deterministic example ids.
--
-- Keys (all share one hash tag, so one Redis Cluster slot):
--   KEYS[1] prefix, e.g. "sl:{j}:"; per request: prefix.."r:"..request_id (hash)
-- Hash fields of a request: st (state), p/ps (prediction payload/source),
--   pt (prediction event time), l/ls/lt (label payload/source/time).
-- States: w waiting for label, e label waiting for prediction (early),
--   j joined (labeled), x window closed unlabeled, t late label joined.
-- Other keys: due (zset request -> window deadline), gc (zset request ->
--   event time at which the state is deleted), wm (hash partition -> max event
--   time), cu (hash partition -> wall ms since caught up, 0 if lagging),
--   wmv (the watermark, monotonic), ob (zset "kind|request" -> lease wall ms).
--
-- ARGV: now, window, late_retention, orphan_retention, ttl, idle_timeout,
--   idle_advance, max_expire, allowed_lateness, claim_before,
--   n_total (input partitions that exist), n_parts, {part, max_time, caught_up}*, n_acks, {member}*,
--   n_events, {type, request, time, source, payload}*
-- Returns: {watermark, duplicates, orphans_dropped, early_labels, n_emitted,
--   {kind, request, p, ps, l, ls}*}

local P = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local late_ret = tonumber(ARGV[3])
local orphan_ret = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local idle_timeout = tonumber(ARGV[6])
local idle_advance = ARGV[7] == '1'
local max_expire = tonumber(ARGV[8])
local lateness = tonumber(ARGV[9])
local claim_before = tonumber(ARGV[10])
local n_total = tonumber(ARGV[11])

local DUE, GC, WM, CU, WMV, OB = P .. 'due', P .. 'gc', P .. 'wm', P .. 'cu', P .. 'wmv', P .. 'ob'
-- The first five slots are filled at the end; unpack() would overflow Lua's stack.
local out = {0, 0, 0, 0, 0}
local dup, orphans, early, n_emit = 0, 0, 0, 0

local function emit(kind, req, key)
  local v = redis.call('HMGET', key, 'p', 'ps', 'l', 'ls')
  out[#out + 1] = kind
  out[#out + 1] = req
  out[#out + 1] = v[1] or ''
  out[#out + 1] = v[2] or ''
  out[#out + 1] = v[3] or ''
  out[#out + 1] = v[4] or ''
  n_emit = n_emit + 1
  redis.call('ZADD', OB, now, kind .. '|' .. req)
end

-- 1. acknowledged emissions: the broker has them; drop payloads no longer needed.
local i = 12
local n_parts = tonumber(ARGV[i]); i = i + 1
local parts = {}
for _ = 1, n_parts do
  parts[#parts + 1] = {ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1'}
  i = i + 3
end
local n_acks = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_acks do
  local member = ARGV[i]; i = i + 1
  if redis.call('ZREM', OB, member) == 1 then
    local req = string.sub(member, 3)
    local key = P .. 'r:' .. req
    local st = redis.call('HGET', key, 'st')
    if st == 'j' or st == 't' then
      redis.call('HDEL', key, 'p', 'l')
    end
  end
end

-- 2. the events of this poll, under the watermark of the previous call: an
-- event must not be judged by a watermark that later events of its own batch
-- moved.
local wm = tonumber(redis.call('GET', WMV) or '-1')
local n_events = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_events do
  local typ, req, t, src, payload = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local key = P .. 'r:' .. req
  local st = redis.call('HGET', key, 'st')
  if typ == 'P' then
    local deadline = t + window
    if not st then
      redis.call('HSET', key, 'st', 'w', 'p', payload, 'ps', src, 'pt', t)
      redis.call('PEXPIRE', key, ttl)
      if deadline < wm then
        -- The window closed before the prediction arrived.
        redis.call('HSET', key, 'st', 'x')
        redis.call('ZADD', GC, deadline + late_ret, req)
        emit('U', req, key)
      else
        redis.call('ZADD', DUE, deadline, req)
      end
    elseif st == 'e' then
      redis.call('HSET', key, 'p', payload, 'ps', src, 'pt', t)
      redis.call('PEXPIRE', key, ttl)
      redis.call('ZADD', GC, deadline + late_ret, req)
      local lt = tonumber(redis.call('HGET', key, 'lt'))
      if lt <= deadline then
        redis.call('HSET', key, 'st', 'j')
        emit('L', req, key)
      else
        redis.call('HSET', key, 'st', 't')
        emit('U', req, key)
        emit('T', req, key)
      end
    else
      dup = dup + 1
    end
  else
    if not st then
      redis.call('HSET', key, 'st', 'e', 'l', payload, 'ls', src, 'lt', t)
      redis.call('PEXPIRE', key, ttl)
      redis.call('ZADD', GC, t + orphan_ret, req)
      early = early + 1
    elseif st == 'w' then
      local pt = tonumber(redis.call('HGET', key, 'pt'))
      redis.call('HSET', key, 'l', payload, 'ls', src, 'lt', t)
      redis.call('ZREM', DUE, req)
      redis.call('ZADD', GC, pt + window + late_ret, req)
      if t <= pt + window then
        redis.call('HSET', key, 'st', 'j')
        emit('L', req, key)
      else
        -- In event time the window had closed: unlabeled first, then late.
        redis.call('HSET', key, 'st', 't')
        emit('U', req, key)
        emit('T', req, key)
      end
    elseif st == 'x' then
      redis.call('HSET', key, 'st', 't', 'l', payload, 'ls', src, 'lt', t)
      emit('T', req, key)
    else
      dup = dup + 1
    end
  end
end

-- 3. the watermark: min over all input partitions of their max event time
-- (Flink's rule), skipping partitions caught up and silent for idle_timeout.
for _, part in ipairs(parts) do
  local name, max_time, caught_up = part[1], part[2], part[3]
  if max_time >= 0 then
    local old = tonumber(redis.call('HGET', WM, name) or '-1')
    if max_time > old then redis.call('HSET', WM, name, max_time) end
  end
  if caught_up then
    if tonumber(redis.call('HGET', CU, name) or '0') == 0 then redis.call('HSET', CU, name, now) end
  else
    redis.call('HSET', CU, name, 0)
  end
end
local reported = redis.call('HGETALL', CU)
-- Until every input partition has reported, one of them may still hold old
-- events: the watermark waits.
local blocked = #reported / 2 < n_total
local lowest, any_active = nil, false
for k = 1, #reported, 2 do
  local since = tonumber(reported[k + 1])
  if not (since > 0 and now - since >= idle_timeout) then
    any_active = true
    local t = redis.call('HGET', WM, reported[k])
    if not t then
      blocked = true  -- active but no event yet: nothing known about its time
    elseif lowest == nil or tonumber(t) < lowest then
      lowest = tonumber(t)
    end
  end
end
local candidate = -1
if blocked then
  candidate = -1
elseif any_active then
  candidate = lowest - lateness
elseif #reported > 0 and idle_advance then
  -- Every input is caught up and silent: let wall-clock time close windows.
  candidate = now - idle_timeout
end
if candidate > wm then
  wm = candidate
  redis.call('SET', WMV, wm)
end

-- 4. windows that the watermark closed: unlabeled examples.
local closed = redis.call('ZRANGEBYSCORE', DUE, '-inf', string.format('(%d', wm), 'LIMIT', 0, max_expire)
for _, req in ipairs(closed) do
  local key = P .. 'r:' .. req
  redis.call('ZREM', DUE, req)
  if redis.call('HGET', key, 'st') == 'w' then
    local pt = tonumber(redis.call('HGET', key, 'pt'))
    redis.call('HSET', key, 'st', 'x')
    redis.call('ZADD', GC, pt + window + late_ret, req)
    emit('U', req, key)
  end
end

-- 5. state past its retention: deleted; a label that never met its prediction is an orphan.
local old = redis.call('ZRANGEBYSCORE', GC, '-inf', string.format('(%d', wm), 'LIMIT', 0, max_expire)
for _, req in ipairs(old) do
  local key = P .. 'r:' .. req
  if redis.call('HGET', key, 'st') == 'e' then orphans = orphans + 1 end
  redis.call('ZREM', GC, req)
  redis.call('DEL', key)
end

-- 6. emissions whose joiner never acknowledged them (it crashed): emit again.
if claim_before >= 0 then
  local stale = redis.call('ZRANGEBYSCORE', OB, '-inf', string.format('(%d', claim_before), 'LIMIT', 0, max_expire)
  for _, member in ipairs(stale) do
    local kind, req = string.sub(member, 1, 1), string.sub(member, 3)
    local key = P .. 'r:' .. req
    if redis.call('EXISTS', key) == 1 then
      emit(kind, req, key)
    else
      redis.call('ZREM', OB, member)
    end
  end
end

out[1], out[2], out[3], out[4], out[5] = wm, dup, orphans, early, n_emit
return out
