-- stream-learner join step: one atomic call per poll of the joiner.
--
-- Applies a batch of prediction and label events to the join state, advances
-- the watermark, closes windows and garbage-collects, and returns the examples
-- to emit. Everything a call emits is also written to the outbox, as one
-- entry per call, and kept until the joiner acknowledges the entry (after the
-- broker has its examples), so a crash between this call and the produce
-- never loses an example: the entry is claimed and re-emitted, with the same
-- deterministic example ids.
--
-- Keys (all share one hash tag, so one Redis Cluster slot):
--   KEYS[1] prefix, e.g. "sl:{j}:"; per request: prefix.."r:"..request_id, a
--   string: the stored event as the joiner packed it, a msgpack array that
--   begins with the request's state letter (byte 3) and the event time (a
--   float64, bytes 5-12), which this script reads at those offsets (and
--   changes the letter in place); it copies the rest into emissions without
--   looking inside.
-- States: w prediction waiting for its label, e label waiting for its
--   prediction (early), x window closed unlabeled (keeps the prediction for
--   a late label), j joined (labeled), t late label joined. j and t keep only
--   the array's first three bytes, to recognise duplicates: their events are
--   in the outbox entry that emitted them, until it is acknowledged.
-- Other keys: due (zset request -> window deadline: the predictions whose
--   window is open, waiting or already joined), gc (zset request -> event time
--   at which the state is deleted: x, j and t after their window closed, and
--   e at its orphan deadline plus 0.5, which marks it as an orphan), wm (hash
--   partition -> max event time), cu (hash partition -> wall ms since the
--   partition is caught up and silent: since it was caught up, or since its
--   last record if later; 0 if lagging), rp (hash partition -> wall ms of the
--   last call that reported it), wmv (the watermark, monotonic: closes
--   windows), wme (the event-time watermark, monotonic: the watermark without
--   idle advance; collects state), ob (zset outbox token -> lease wall ms),
--   ob:<token> (string: the emissions of one call), step (the token of the
--   last call sent again after a failure).
-- TTL (the wall-clock safety net): set when a request's state is created,
--   ttl for a prediction, ttl + orphan_retention for an early label (it
--   covers the wait for its prediction); transitions keep it.
-- Redis calls: one SET per request the batch changes (a prediction and its
--   label in one batch: one SET); reads (MGET), sorted-set updates (ZADD),
--   removals (ZREMRANGEBYRANK, DEL) go in chunks for the whole batch.
--
-- ARGV: now, window, late_retention, orphan_retention, ttl, idle_timeout,
--   idle_advance, max_expire, allowed_lateness, claim_before,
--   n_total (input partitions that exist), token (unique to this call),
--   then three msgpack arrays: acks {token}*, partitions {{part, max_time,
--   caught_up, read}}* (read: the poll held records of it, valid or not),
--   events {{type 'P'|'L', request, time, stored event}}*, then
--   mark ('1': write even if nothing changes, see 8).
-- Returns: {watermark, duplicates, orphans_dropped, early_labels, more_to_claim,
--   emissions, {claimed_token, claimed_emissions}*}. Emissions are one msgpack
--   array of [kind, stored prediction, stored label or nil]; '' when none.
--   The caller acknowledges this call's token (when emissions is not '')
--   and every claimed token once the broker has their examples.

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
local token = ARGV[12]
local acks = cmsgpack.unpack(ARGV[13])
local parts = cmsgpack.unpack(ARGV[14])
local events = cmsgpack.unpack(ARGV[15])
local mark = ARGV[16] == '1'

local DUE, GC, WM, CU, WMV = P .. 'due', P .. 'gc', P .. 'wm', P .. 'cu', P .. 'wmv'
local RP, WME = P .. 'rp', P .. 'wme'
local OB, OBX, R = P .. 'ob', P .. 'ob:', P .. 'r:'
-- How many outbox entries one call claims; more are claimed by the next calls.
local MAX_CLAIM = 8
-- unpack() pushes its values on Lua's C stack: variadic commands go in chunks.
local CHUNK = 1000

-- Emissions are built as msgpack bytes: fixarray(3) header and kind, then the
-- stored prediction, then the stored label or nil.
local LABELED = '\147' .. cmsgpack.pack('labeled')
local UNLABELED = '\147' .. cmsgpack.pack('unlabeled')
local LATE = '\147' .. cmsgpack.pack('late')
local NIL = '\192'
local buf, n_emit = {}, 0
local dup, orphans, early = 0, 0, 0

local function emit(kind, p, l)
  local n = #buf
  buf[n + 1] = kind
  buf[n + 2] = p
  buf[n + 3] = l
  n_emit = n_emit + 1
end

local function array_header(n)
  if n < 16 then return string.char(144 + n) end
  if n < 65536 then return string.char(220, math.floor(n / 256), n % 256) end
  return string.char(221, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end

-- Sorted-set updates (ZADD score member ...) collected and sent in chunks.
local function zadd_all(key, pairs_)
  for a = 1, #pairs_, 2 * CHUNK do
    redis.call('ZADD', key, unpack(pairs_, a, math.min(#pairs_, a + 2 * CHUNK - 1)))
  end
end

-- 1. acknowledged outbox entries: the broker has their examples.
if #acks > 0 then
  local keys = {}
  for k = 1, #acks do keys[k] = OBX .. acks[k] end
  for a = 1, #acks, CHUNK do
    local b = math.min(#acks, a + CHUNK - 1)
    redis.call('DEL', unpack(keys, a, b))
    redis.call('ZREM', OB, unpack(acks, a, b))
  end
end

-- 2. the events of this poll, under the watermark of the previous call: an
-- event must not be judged by a watermark that later events of its own batch
-- moved. The batch's states are read with one MGET (per chunk) up front and
-- followed in `state` as the events change them; each changed request is
-- written once, after the events (a prediction and its label in one batch
-- cost one SET), with its TTL if the batch created it, keeping its TTL
-- otherwise. The sorted-set updates are sent after the events too (ZADD
-- applies its pairs in order, so the last score given for a request wins).
local wm = tonumber(redis.call('GET', WMV) or '-1')
local byte, unpack_time = string.byte, struct.unpack
local W, E, X, J, T = byte('w'), byte('e'), byte('x'), byte('j'), byte('t')
-- The value of a joined (j) or late-joined (t) request: the head of a stored
-- event (fixarray, fixstr, letter) with nothing after it.
local JOINED, LATE_JOINED = '\148\161j', '\148\161t'
local keys = {}
for k, ev in ipairs(events) do keys[k] = R .. ev[2] end
local state = {}
for a = 1, #keys, CHUNK do
  local b = math.min(#keys, a + CHUNK - 1)
  local values = redis.call('MGET', unpack(keys, a, b))
  for k = a, b do state[keys[k]] = values[k - a + 1] end
end
local changed, is_changed, new_ttl = {}, {}, {}
local function put(key, value, ttl_if_created)
  if not is_changed[key] then
    is_changed[key] = true
    changed[#changed + 1] = key
  end
  if ttl_if_created then new_ttl[key] = ttl_if_created end
  state[key] = value
end
local to_due, to_gc = {}, {}
local function later(list, score, req)
  list[#list + 1] = score
  list[#list + 1] = req
end

for k, ev in ipairs(events) do
  local typ, req, t, val = ev[1], ev[2], ev[3], ev[4]
  local key = keys[k]
  local v = state[key]
  if typ == 'P' then
    local deadline = t + window
    if not v then
      if deadline < wm then
        -- The window closed before the prediction arrived.
        put(key, string.sub(val, 1, 2) .. 'x' .. string.sub(val, 4), ttl)
        later(to_gc, deadline + late_ret, req)
        emit(UNLABELED, val, NIL)
      else
        put(key, val, ttl)
        later(to_due, deadline, req)
      end
    elseif byte(v, 3) == E then
      -- Replaces the early label's orphan deadline.
      later(to_gc, deadline + late_ret, req)
      if unpack_time('>d', v, 5) <= deadline then
        put(key, JOINED)
        emit(LABELED, val, v)
      else
        put(key, LATE_JOINED)
        emit(UNLABELED, val, NIL)
        emit(LATE, val, v)
      end
    else
      dup = dup + 1
    end
  elseif not v then
    put(key, val, ttl + orphan_ret)
    later(to_gc, t + orphan_ret + 0.5, req)
    early = early + 1
  else
    local st = byte(v, 3)
    if st == W then
      -- It stays in due: the window's close moves it to gc.
      if t <= unpack_time('>d', v, 5) + window then
        put(key, JOINED)
        emit(LABELED, v, val)
      else
        -- In event time the window had closed: unlabeled first, then late.
        put(key, LATE_JOINED)
        emit(UNLABELED, v, NIL)
        emit(LATE, v, val)
      end
    elseif st == X then
      put(key, LATE_JOINED)
      emit(LATE, v, val)
    else
      dup = dup + 1
    end
  end
end
for _, key in ipairs(changed) do
  local ms = new_ttl[key]
  if ms then
    redis.call('SET', key, state[key], 'PX', ms)
  else
    redis.call('SET', key, state[key], 'KEEPTTL')
  end
end
zadd_all(DUE, to_due)
zadd_all(GC, to_gc)

-- 3. the watermark: min over all input partitions of their max event time
-- (Flink's rule), skipping idle partitions. A partition is idle when it is
-- caught up and has had no record for idle_timeout (re-checked at every
-- call: a record restarts the silence), and only while some joiner reports
-- it: one nobody reported for idle_timeout (its joiner is down, or it is
-- being reassigned) may hold unread records, so it is active. When every
-- partition is idle (and idle_advance), each one's event time runs on with
-- the wall clock from its last event, less idle_timeout, and the watermark
-- is the least of them: traffic that stopped still closes its windows, and
-- a producer whose event times lag the wall clock is never overtaken. State
-- is collected by the event-time watermark (wme) alone, never moved by idle
-- advance: a label whose prediction idle advance expired still finds it.
local cu_set, rp_set = {}, {}
for _, part in ipairs(parts) do
  local name, max_time, caught_up, read = part[1], part[2], part[3], part[4]
  if max_time >= 0 then
    local old = tonumber(redis.call('HGET', WM, name) or '-1')
    if max_time > old then redis.call('HSET', WM, name, max_time) end
  end
  local since = 0
  if caught_up then
    since = tonumber(redis.call('HGET', CU, name) or '0')
    local last = tonumber(redis.call('HGET', RP, name) or '0')
    -- Records in this poll, just caught up, or unwatched a while: the silence starts now.
    if read or since == 0 or now - last >= idle_timeout then since = now end
  end
  cu_set[#cu_set + 1] = name
  cu_set[#cu_set + 1] = since
  rp_set[#rp_set + 1] = name
  rp_set[#rp_set + 1] = now
end
for a = 1, #cu_set, 2 * CHUNK do
  local b = math.min(#cu_set, a + 2 * CHUNK - 1)
  redis.call('HSET', CU, unpack(cu_set, a, b))
  redis.call('HSET', RP, unpack(rp_set, a, b))
end
local reported = redis.call('HGETALL', CU)
local last_report = {}
local rp_all = redis.call('HGETALL', RP)
for k = 1, #rp_all, 2 do last_report[rp_all[k]] = tonumber(rp_all[k + 1]) end
-- Until every input partition has reported, one of them may still hold old
-- events: the watermark waits.
local blocked = #reported / 2 < n_total
local lowest, any_active, idle_clock = nil, false, nil
for k = 1, #reported, 2 do
  local name, since = reported[k], tonumber(reported[k + 1])
  local watched = now - (last_report[name] or 0) < idle_timeout
  local t = redis.call('HGET', WM, name)
  if watched and since > 0 and now - since >= idle_timeout then
    if t then
      local clock = tonumber(t) + (now - since) - idle_timeout
      if idle_clock == nil or clock < idle_clock then idle_clock = clock end
    end
  else
    any_active = true
    if not t then
      blocked = true  -- active but no event yet: nothing known about its time
    elseif lowest == nil or tonumber(t) < lowest then
      lowest = tonumber(t)
    end
  end
end
local candidate, event_candidate = -1, -1
if blocked then
  candidate = -1
elseif any_active then
  candidate = lowest - lateness
  event_candidate = candidate
elseif idle_advance and idle_clock ~= nil then
  -- Every input is caught up and silent: let wall-clock time close windows.
  candidate = idle_clock - lateness
end
if candidate > wm then
  wm = candidate
  redis.call('SET', WMV, wm)
end
local wme = tonumber(redis.call('GET', WME) or '-1')
if event_candidate > wme then
  wme = event_candidate
  redis.call('SET', WME, wme)
end
local below_wm = string.format('(%d', wm)

-- 4. windows that the watermark closed (the lowest ranks of due): a
-- prediction still waiting gives an unlabeled example; every closed one
-- (waiting or joined) moves to gc, kept late_retention more.
local closed = redis.call('ZRANGEBYSCORE', DUE, '-inf', below_wm, 'WITHSCORES', 'LIMIT', 0, max_expire)
if #closed > 0 then
  redis.call('ZREMRANGEBYRANK', DUE, 0, #closed / 2 - 1)
  local collect = {}
  for a = 1, #closed, 2 * CHUNK do
    local b = math.min(#closed, a + 2 * CHUNK - 1)
    local ks = {}
    for k = a, b, 2 do ks[#ks + 1] = R .. closed[k] end
    local values = redis.call('MGET', unpack(ks))
    for k = a, b, 2 do
      local v = values[(k - a) / 2 + 1]
      local st = v and byte(v, 3)
      if st == W then
        redis.call('SETRANGE', ks[(k - a) / 2 + 1], 2, 'x')
        emit(UNLABELED, v, NIL)
      end
      if st == W or st == J or st == T then
        later(collect, tonumber(closed[k + 1]) + late_ret, closed[k])
      end
    end
  end
  zadd_all(GC, collect)
end

-- 5. state past its retention by event time (wme): deleted. An early label
-- still waiting for its prediction has a deadline with a half millisecond
-- added (event times are whole milliseconds): it is an orphan.
local old = redis.call('ZRANGEBYSCORE', GC, '-inf', string.format('(%d', wme), 'WITHSCORES', 'LIMIT', 0,
                       max_expire)
if #old > 0 then
  local keys = {}
  for k = 1, #old, 2 do
    keys[#keys + 1] = R .. old[k]
    local score = tonumber(old[k + 1])
    if score ~= math.floor(score) then orphans = orphans + 1 end
  end
  redis.call('ZREMRANGEBYRANK', GC, 0, #keys - 1)
  for a = 1, #keys, CHUNK do redis.call('DEL', unpack(keys, a, math.min(#keys, a + CHUNK - 1))) end
end

-- 6. outbox entries whose joiner never acknowledged them (it crashed): this
-- caller takes them over (a new lease) and emits them again.
local out = {0, 0, 0, 0, 0, ''}
if claim_before >= 0 then
  local stale = redis.call('ZRANGEBYSCORE', OB, '-inf', string.format('(%d', claim_before),
                           'LIMIT', 0, MAX_CLAIM + 1)
  if #stale > MAX_CLAIM then
    out[5] = 1
    stale[#stale] = nil
  end
  for _, tok in ipairs(stale) do
    local blob = redis.call('GET', OBX .. tok)
    if blob then
      redis.call('ZADD', OB, now, tok)
      out[#out + 1] = tok
      out[#out + 1] = blob
    else
      redis.call('ZREM', OB, tok)
    end
  end
end

-- 7. this call's emissions: one outbox entry, leased to the caller.
if n_emit > 0 then
  local blob = array_header(n_emit) .. table.concat(buf)
  redis.call('SET', OBX .. token, blob)
  redis.call('ZADD', OB, now, token)
  out[6] = blob
end

-- 8. a call sent again after its reply was lost writes, even if it changes
-- nothing: the WAITAOF behind it then also covers the first try's writes,
-- sent on another connection.
if mark then redis.call('SET', P .. 'step', token) end

out[1], out[2], out[3], out[4] = wm, dup, orphans, early
return out
