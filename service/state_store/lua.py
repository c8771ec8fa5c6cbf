"""The Redis store's Lua scripts: each one indivisible read-check-write inside Redis.

Every script touches only the keys it is given, and all of them lie in one hash slot (the
session's: see layout.py), as Redis Cluster requires. KEYS are [session, lease, expiry index]
of one session unless a script says otherwise.

Scripts that a client may send twice (its connection broke after Redis ran the first one, and
the cluster client retried after a failover) give the same answer the second time: ACQUIRE
recognises its own token, SAVE recognises its own state.
"""

from __future__ import annotations

# ARGV: ttl (ms), expiry score (ms), session id, state, updated_ms, owner ('' without API keys)
CREATE = """
redis.call('del', KEYS[1])
if ARGV[6] == '' then
  redis.call('hset', KEYS[1], 'state', ARGV[4], 'updated_ms', ARGV[5])
else
  redis.call('hset', KEYS[1], 'state', ARGV[4], 'updated_ms', ARGV[5], 'owner', ARGV[6])
end
redis.call('pexpire', KEYS[1], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# ARGV: token, lease_ms, ttl_s, expiry score, session id, owner ('' : anyone)
# -> {-1} no such session (or another owner's), {0} busy, {1, state} taken
ACQUIRE = """
if redis.call('exists', KEYS[1]) == 0 then return {-1} end
if ARGV[6] ~= '' and redis.call('hget', KEYS[1], 'owner') ~= ARGV[6] then return {-1} end
if not redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('get', KEYS[2]) ~= ARGV[1] then return {0} end
end
redis.call('expire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return {1, redis.call('hget', KEYS[1], 'state')}
"""

# ARGV: token, lease_ms, ttl_s, expiry score, session id -> 1 renewed, 0 lease or session lost
RENEW = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('pexpire', KEYS[2], ARGV[2])
redis.call('expire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return 1
"""

# ARGV: token, state, ttl_s, expiry score, session id, updated_ms, release ('1': also free the lease)
# -> 1 saved, 0 not (the lease is not ours, or the session expired or was evicted: it stays gone)
SAVE = """
local ours = redis.call('get', KEYS[2]) == ARGV[1]
local exists = redis.call('exists', KEYS[1]) == 1
if not ours then
  if exists and redis.call('hget', KEYS[1], 'state') == ARGV[2] then return 1 end
  return 0
end
if ARGV[7] == '1' then redis.call('del', KEYS[2]) end
if not exists then return 0 end
redis.call('hset', KEYS[1], 'state', ARGV[2], 'updated_ms', ARGV[6])
redis.call('expire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return 1
"""

# KEYS: [lease]; ARGV: token
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# ARGV: token, session id
DELETE = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1], KEYS[2])
redis.call('zrem', KEYS[3], ARGV[2])
return 1
"""

# KEYS: [session] -> {state or false, owner or false, ttl}
GET = """
local fields = redis.call('hmget', KEYS[1], 'state', 'owner')
return {fields[1], fields[2], redis.call('ttl', KEYS[1])}
"""

# The sweep reads each slot's index for ids past their expected expiry (plain ZRANGEBYSCORE),
# then settles each one here. Removing the entry is the claim: only one replica's ZREM returns
# 1, so each expiry is counted once.
# KEYS: [expiry index, session]; ARGV: session id, now (ms) -> 1 expired and counted, else 0
SETTLE_EXPIRY = """
local ttl = redis.call('pttl', KEYS[2])
if ttl == -2 then return redis.call('zrem', KEYS[1], ARGV[1]) end
if ttl == -1 then redis.call('zrem', KEYS[1], ARGV[1]) return 0 end
redis.call('zadd', KEYS[1], tonumber(ARGV[2]) + ttl, ARGV[1])
return 0
"""
