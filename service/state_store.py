"""Where session state lives between requests: in this process (memory://) or in Redis.

Both stores give the same guarantees, so the HTTP layer never knows which one it has:

- a session is one record (state bytes) with a sliding TTL, written in one atomic operation;
- a per-session lease (lock with a random token and an expiry) admits one request at a time; a
  save or delete only happens while the caller still holds its lease, so no update is ever lost,
  and a replica that dies mid-request only blocks its sessions until the lease expires.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The state store does not answer (Redis down or unreachable)."""


class SessionNotFound(LookupError):
    pass


class SessionBusy(RuntimeError):
    """Another request holds this session's lease."""


@dataclass
class StoredSession:
    state: bytes
    expires_in_s: int
    owner: str | None = None  # owner id (a hash of the API key that created it), None without keys


def new_lease_token() -> str:
    return secrets.token_hex(16)


class SessionStore(abc.ABC):
    """Async interface used by the service; every method may raise StoreUnavailable."""

    def __init__(self, ttl_s: int, lease_ms: int) -> None:
        self.ttl_s = ttl_s
        self.lease_ms = lease_ms

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def open_connections(self, count: int) -> None:
        """Connect ahead of time so that a burst of requests does not pay for connection set-up."""

    @abc.abstractmethod
    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        """Store a new session with a fresh TTL (and its owner, in the same atomic write)."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> StoredSession | None:
        """Read without taking the lease or refreshing the TTL (inspection)."""

    @abc.abstractmethod
    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        """Take the lease, refresh the TTL, return (token, state).

        Raises SessionNotFound or SessionBusy. With ``owner``, a session owned by anyone else is
        SessionNotFound (checked before the lease is taken, so it is not even briefly locked).
        """

    @abc.abstractmethod
    async def renew(self, session_id: str, token: str) -> bool:
        """Extend a held lease; False if it was lost."""

    @abc.abstractmethod
    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        """Write state and refresh the TTL atomically, only while token holds the lease."""

    @abc.abstractmethod
    async def release(self, session_id: str, token: str) -> None: ...

    @abc.abstractmethod
    async def delete(self, session_id: str, token: str) -> bool:
        """Remove the session, only while token holds the lease."""

    @abc.abstractmethod
    async def sweep_expired(self) -> int:
        """Forget sessions whose TTL ran out; returns how many (each counted once, by one replica)."""

    async def close(self) -> None:
        return None


class MemoryStore(SessionStore):
    """In-process store for a single process; sessions die with it. All calls run on the event loop."""

    def __init__(self, ttl_s: int, lease_ms: int) -> None:
        super().__init__(ttl_s, lease_ms)
        self._sessions: dict[str, tuple[bytes, float]] = {}  # id -> (state, expires at, monotonic)
        self._leases: dict[str, tuple[str, float]] = {}
        self._owners: dict[str, str] = {}

    def _live(self, session_id: str) -> bytes | None:
        entry = self._sessions.get(session_id)
        return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def _holder(self, session_id: str) -> str | None:
        lease = self._leases.get(session_id)
        return lease[0] if lease is not None and lease[1] > time.monotonic() else None

    async def ping(self) -> None:
        return None

    async def open_connections(self, count: int) -> None:
        return None  # nothing to connect to

    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        self._sessions[session_id] = (state, time.monotonic() + self.ttl_s)
        if owner is not None:
            self._owners[session_id] = owner

    async def get(self, session_id: str) -> StoredSession | None:
        entry = self._sessions.get(session_id)
        if entry is None or self._live(session_id) is None:
            return None
        return StoredSession(entry[0], max(0, round(entry[1] - time.monotonic())), self._owners.get(session_id))

    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        state = self._live(session_id)
        if state is None or (owner is not None and self._owners.get(session_id) != owner):
            raise SessionNotFound(session_id)
        if self._holder(session_id) is not None:
            raise SessionBusy(session_id)
        token = new_lease_token()
        now = time.monotonic()
        self._leases[session_id] = (token, now + self.lease_ms / 1000)
        self._sessions[session_id] = (state, now + self.ttl_s)
        return token, state

    async def renew(self, session_id: str, token: str) -> bool:
        if self._holder(session_id) != token:
            return False
        self._leases[session_id] = (token, time.monotonic() + self.lease_ms / 1000)
        return True

    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        if self._holder(session_id) != token:
            return False
        self._sessions[session_id] = (state, time.monotonic() + self.ttl_s)
        return True

    async def release(self, session_id: str, token: str) -> None:
        if self._holder(session_id) == token:
            del self._leases[session_id]

    async def delete(self, session_id: str, token: str) -> bool:
        if self._holder(session_id) != token:
            return False
        self._sessions.pop(session_id, None)
        self._leases.pop(session_id, None)
        self._owners.pop(session_id, None)
        return True

    async def sweep_expired(self) -> int:
        now = time.monotonic()
        expired = [sid for sid, (_, until) in self._sessions.items() if until <= now]
        for sid in expired:
            del self._sessions[sid]
            self._owners.pop(sid, None)
        for sid in [sid for sid, (_, until) in self._leases.items() if until <= now]:
            del self._leases[sid]
        return len(expired)


# Lua runs atomically inside Redis: each script is one indivisible read-check-write.
ACQUIRE = """
if redis.call('exists', KEYS[1]) == 0 then return {-1} end
if ARGV[6] ~= '' and redis.call('hget', KEYS[1], 'owner') ~= ARGV[6] then return {-1} end
if not redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
redis.call('expire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return {1, redis.call('hget', KEYS[1], 'state')}
"""
RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""
SAVE = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[1], 'state', ARGV[2], 'updated_ms', ARGV[6])
redis.call('expire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return 1
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
DELETE = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1], KEYS[2])
redis.call('zrem', KEYS[3], ARGV[2])
return 1
"""
# The expiry index (a sorted set of id -> expected expiry time) lets replicas count expirations
# without keyspace notifications; the check-and-remove is atomic, so each is counted once.
SWEEP = """
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local expired = 0
for _, id in ipairs(ids) do
  local ttl = redis.call('pttl', ARGV[2] .. id)
  if ttl == -2 then
    redis.call('zrem', KEYS[1], id)
    expired = expired + 1
  elseif ttl == -1 then
    redis.call('zrem', KEYS[1], id)
  else
    redis.call('zadd', KEYS[1], tonumber(ARGV[1]) + ttl, id)
  end
end
return expired
"""


class RedisStore(SessionStore):
    """Sessions in Redis: hash {prefix}session:{id} (state, updated_ms, owner) with a TTL,
    lease {prefix}lease:{id} (SET NX PX token), expiry index {prefix}expiries."""

    def __init__(self, url: str, ttl_s: int, lease_ms: int, prefix: str = "chargen:", timeout_s: float = 2.0) -> None:
        super().__init__(ttl_s, lease_ms)
        self.prefix = prefix
        # One quick try per call: a request must fail fast with 503, and the pool reconnects by
        # itself on the next call once Redis is back.
        self.redis = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self._acquire = self.redis.register_script(ACQUIRE)
        self._renew = self.redis.register_script(RENEW)
        self._save = self.redis.register_script(SAVE)
        self._release = self.redis.register_script(RELEASE)
        self._delete = self.redis.register_script(DELETE)
        self._sweep = self.redis.register_script(SWEEP)

    def _keys(self, session_id: str) -> list[str]:
        return [f"{self.prefix}session:{session_id}", f"{self.prefix}lease:{session_id}", f"{self.prefix}expiries"]

    def _expiry_score(self) -> int:
        return int(time.time() * 1000) + self.ttl_s * 1000

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as err:
            raise StoreUnavailable(f"Redis is unreachable ({err})") from None
        except RedisError as err:
            raise StoreUnavailable(f"Redis error ({err})") from None

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    async def open_connections(self, count: int) -> None:
        # Every running generation holds a pooled connection for its lease and its save: a burst
        # of 64 new streams on a cold pool opened 60 connections at once (~1.5 ms each on the
        # event loop) and its time to first character tripled. `count` concurrent PINGs make
        # the pool open that many now; they stay idle in the pool until needed.
        await self._call(asyncio.gather(*(self.redis.ping() for _ in range(count))))

    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        key, _, expiries = self._keys(session_id)
        fields: dict[str, Any] = {"state": state, "updated_ms": int(time.time() * 1000)}
        if owner is not None:
            fields["owner"] = owner  # in the same HSET: a session never exists without its owner
        async with self.redis.pipeline(transaction=True) as pipe:  # MULTI/EXEC: all or nothing
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl_s)
            pipe.zadd(expiries, {session_id: self._expiry_score()})
            await self._call(pipe.execute())

    async def get(self, session_id: str) -> StoredSession | None:
        key = self._keys(session_id)[0]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(key, ["state", "owner"])
            pipe.ttl(key)
            (state, owner), ttl = await self._call(pipe.execute())
        if state is None:
            return None
        return StoredSession(bytes(state), max(0, int(ttl)), owner.decode() if owner is not None else None)

    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        token = new_lease_token()
        args: list[Any] = [token, self.lease_ms, self.ttl_s, self._expiry_score(), session_id, owner or ""]
        result = await self._call(self._acquire(keys=self._keys(session_id), args=args))
        if result[0] == -1:
            raise SessionNotFound(session_id)
        if result[0] == 0:
            raise SessionBusy(session_id)
        return token, bytes(result[1])

    async def renew(self, session_id: str, token: str) -> bool:
        return bool(await self._call(self._renew(keys=[self._keys(session_id)[1]], args=[token, self.lease_ms])))

    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        args: list[Any] = [token, state, self.ttl_s, self._expiry_score(), session_id, int(time.time() * 1000)]
        return bool(await self._call(self._save(keys=self._keys(session_id), args=args)))

    async def release(self, session_id: str, token: str) -> None:
        await self._call(self._release(keys=[self._keys(session_id)[1]], args=[token]))

    async def delete(self, session_id: str, token: str) -> bool:
        return bool(await self._call(self._delete(keys=self._keys(session_id), args=[token, session_id])))

    async def sweep_expired(self) -> int:
        now = int(time.time() * 1000)
        keys = [f"{self.prefix}expiries"]
        return int(await self._call(self._sweep(keys=keys, args=[now, f"{self.prefix}session:"])))

    async def close(self) -> None:
        await self.redis.aclose()


def make_store(url: str, ttl_s: int, lease_ms: int, prefix: str = "chargen:", timeout_s: float = 2.0) -> SessionStore:
    if url.startswith("memory://"):
        return MemoryStore(ttl_s, lease_ms)
    return RedisStore(url, ttl_s, lease_ms, prefix=prefix, timeout_s=timeout_s)
