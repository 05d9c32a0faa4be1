"""The queue's Lua scripts: each write of the protocol is one atomic step that can be run twice.

The client sends a command once more when its connection breaks, and a reply
can be lost after Redis carried the command out. So every write here is
idempotent: run again, it finds its own trace and changes nothing. Times come
from Redis' own clock (``TIME``), never from a caller's.
"""

from __future__ import annotations

# KEYS: stream, job state. ARGV: group, max depth (0: none), job json, timeout ms, state ttl s.
# -> {admitted 0/1, entry id, depth}. Admission and enqueue in one step, so the bound holds across any
# number of gateways. Depth = entries never delivered = XLEN - pending (acknowledged entries are deleted).
# A retried call finds the entry it added (``entry`` in the job's state) and adds nothing.
ENQUEUE = """
local stream, state = KEYS[1], KEYS[2]
local prior = redis.call('HGET', state, 'entry')
if prior then return {1, prior, -1} end
local pending = 0
local info = redis.pcall('XPENDING', stream, ARGV[1])
if type(info) == 'table' and info.err then
  redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
else
  pending = info[1]
end
local depth = redis.call('XLEN', stream) - pending
local limit = tonumber(ARGV[2])
if limit > 0 and depth >= limit then return {0, '', depth} end
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
local id = redis.call('XADD', stream, '*', 'job', ARGV[3], 'deadline_ms', string.format('%d', deadline))
redis.call('HSET', state, 'entry', id)
redis.call('EXPIRE', state, ARGV[5])
return {1, id, depth + 1}
"""

# KEYS: stream. ARGV: group. -> jobs admitted and not yet started (never delivered to a worker).
DEPTH = """
local info = redis.pcall('XPENDING', KEYS[1], ARGV[1])
local pending = 0
if type(info) == 'table' and not info.err then pending = info[1] end
local depth = redis.call('XLEN', KEYS[1]) - pending
if depth < 0 then return 0 end
return depth
"""

# KEYS: stream, job state, answered. ARGV: group, entry id, attempt token, max tries, deadline ms, state ttl s.
# -> {status, tries, now ms, last error}. A worker starts a job: answered already, abandoned by its caller or
# past its deadline (Redis' clock) -> acknowledged and done with; else the try is counted once per attempt token.
BEGIN = """
local stream, state, answered = KEYS[1], KEYS[2], KEYS[3]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if redis.call('EXISTS', answered) == 1 or now_ms >= tonumber(ARGV[5]) then
  redis.call('XACK', stream, ARGV[1], ARGV[2])
  redis.call('XDEL', stream, ARGV[2])
  local mark = redis.call('GET', answered)
  if mark == 'abandoned' then
    redis.call('DEL', state)
    return {'abandoned', 0, now_ms, ''}
  end
  if mark then return {'answered', 0, now_ms, ''} end
  redis.call('DEL', state)
  return {'expired', 0, now_ms, ''}
end
local tries
if redis.call('HGET', state, 'token') == ARGV[3] then
  tries = tonumber(redis.call('HGET', state, 'tries'))
else
  tries = redis.call('HINCRBY', state, 'tries', 1)
  redis.call('HSET', state, 'token', ARGV[3])
end
redis.call('EXPIRE', state, ARGV[6])
local last = redis.call('HGET', state, 'error') or ''
if tries > tonumber(ARGV[4]) then return {'exhausted', tries - 1, now_ms, last} end
return {'run', tries, now_ms, last}
"""

# KEYS: events, job state, answered. ARGV: attempt, sequence number, data json, ttl s.
# -> 1 published (or published before), 0 the job has ended: stop generating. Keyed by sequence number.
TOKEN = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local field = 'seq:' .. ARGV[1]
if tonumber(redis.call('HGET', KEYS[2], field) or '0') >= tonumber(ARGV[2]) then return 1 end
redis.call('XADD', KEYS[1], '*', 'type', 'token', 'attempt', ARGV[1], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], field, ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4], 'NX')
return 1
"""

# KEYS: events, job state, answered. ARGV: attempt, first sequence number, ttl s, then the data json of each
# token in order. -> 1 published (or published before), 0 the job has ended: stop generating. A batch of
# tokens in one round trip; each is keyed by its sequence number, so a batch sent again adds only the
# tokens that did not make it the first time.
TOKENS = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local field = 'seq:' .. ARGV[1]
local done = tonumber(redis.call('HGET', KEYS[2], field) or '0')
local first = tonumber(ARGV[2])
local last = done
for i = 4, #ARGV do
  local seq = first + i - 4
  if seq > done then
    redis.call('XADD', KEYS[1], '*', 'type', 'token', 'attempt', ARGV[1], 'data', ARGV[i])
    last = seq
  end
end
if last > done then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], field, last)
  redis.call('EXPIRE', KEYS[2], ARGV[3], 'NX')
end
return 1
"""

# KEYS: answered, events, job state, stream, dead letters.
# ARGV: group, entry id ('' none), type, attempt, attempt token, data json, ttl s, dead-letter cap,
#       then the dead-letter entry's field/value pairs (none for ``done``).
# -> {1 this attempt ended the job / 0 another did, dead letters trimmed}. Every terminal event of a job
# goes through here: the answered mark (SET NX) lets exactly one ``done`` or ``error`` out.
FINISH = """
local answered, events, state, stream, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local won, trimmed = 0, 0
if redis.call('SET', answered, ARGV[5], 'NX', 'EX', ARGV[7]) then
  won = 1
  redis.call('XADD', events, '*', 'type', ARGV[3], 'attempt', ARGV[4], 'data', ARGV[6])
  redis.call('EXPIRE', events, ARGV[7])
  if #ARGV > 8 then
    redis.call('XADD', dead, '*', unpack(ARGV, 9))
    trimmed = redis.call('XTRIM', dead, 'MAXLEN', ARGV[8])
  end
elseif redis.call('GET', answered) == ARGV[5] then
  won = 1
end
if ARGV[2] ~= '' then
  redis.call('XACK', stream, ARGV[1], ARGV[2])
  redis.call('XDEL', stream, ARGV[2])
end
redis.call('DEL', state)
return {won, trimmed}
"""

# KEYS: stream, dead letters. ARGV: group, entry id, dead-letter cap, entry field/value pairs.
# -> {1 moved / 0 moved before, trimmed}. A job with no readable id: dead-lettered, nobody to tell.
BURY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return {0, 0} end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
return {1, redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[3])}
"""

# KEYS: stream, job state, answered. ARGV: group, entry id, error ('' for a hand-back), field/value pairs.
# -> 1 back at the end of the stream, 0 not (done before, or the job has ended meanwhile).
REQUEUE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[3]) end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
return 1
"""

# KEYS: stream, job state, answered. ARGV: group, entry id, attempt token, field/value pairs.
# -> 1 back at the end of the stream, 0 not (done before, or the job has ended meanwhile). A try that never
# reached the model server (its connection refused): the count ``begin`` made for this attempt token is
# taken back, so waiting for a server that is starting costs a job none of its tries.
UNTRIED = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], 'token') == ARGV[3] then
  redis.call('HINCRBY', KEYS[2], 'tries', -1)
  redis.call('HDEL', KEYS[2], 'token')
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
return 1
"""

# KEYS: stream, job state. ARGV: group, entry id. The caller gave up: acknowledged, nothing published.
DROP = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: live workers (sorted set). ARGV: consumer, live for ms. A worker says it is alive: its score is the
# moment (Redis' clock, ms) until which it counts as live; members whose moment has passed are trimmed, and
# the set expires with its latest member, so it does not outlive the last worker.
HEARTBEAT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2])))
return 1
"""

# KEYS: live workers (sorted set). -> workers whose last heartbeat still counts (Redis' clock); the rest
# are trimmed.
LIVE_WORKERS = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: answered, abandon notices. ARGV: ttl s, job id, notices kept (about). -> 1 marked, 0 the job had ended.
# The caller has gone (disconnected, or its deadline passed): the job ends with no answer. The answered mark
# ('abandoned') stops every later step as an ended job does (a try not yet started, the next token, a retry,
# a dead letter); the notice tells the workers reading the notice stream to stop generating it now.
ABANDON = """
if not redis.call('SET', KEYS[1], 'abandoned', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job', ARGV[2])
return 1
"""
